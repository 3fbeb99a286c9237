"""The launcher: owns the config, the ipc directory and every child process.

It starts the children with `spawn`, waits until each reports ready (or names the one that failed),
then watches them. Any child dying stops the server with a non-zero exit and a log line naming it;
SIGINT/SIGTERM stop it cleanly with exit code 0. Either way every child is gone and the ipc directory
removed. A killed launcher takes its children along (serve/proc.py: die_with_parent).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket as pysocket
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import zmq

from serve.cluster import Layout, bind_address, create_keys
from serve.config import Config, ConfigError
from serve.ipc import OPENED, Endpoints, make_ipc_dir, recv, send, socket
from serve.messages import Crashed, Ready, StageRestarted, StartupFailed, Stopping, Told
from serve.model_files import ModelInfo, resolve_model
from serve.nodes import BEAT_S, HealthServer, Head, Member, NodeLost
from serve.proc import Processes, child_main, janitor

log = logging.getLogger("serve.launcher")


class StartupError(Exception):
    pass


@dataclass
class Child:
    name: str
    target: str
    extra: tuple
    process: BaseProcess
    ready: Ready | None = None
    restarts: list[float] = field(default_factory=list)  # when it was restarted
    last_words: str = ""  # the error it reported before it exited, if it did


# Stages that keep no state a restart cannot rebuild: when one dies, it is started again and ZeroMQ
# reconnects its peers by itself. At most RESTARTS_PER_MINUTE, then the server stops as for any death.
RESTARTABLE = {"tokenizer", "detokenizer"}
RESTARTS_PER_MINUTE = 3
# How long a broken server's api may take to tell its clients why, before it is killed (it says when it has).
STOPPING_GRACE_S = 2.0


def _children(layout: Layout) -> list[tuple]:
    """(name, "module:function", extra args): each child imports its own code, after it has made sure
    it dies with the launcher (serve/proc.py: child_main). A node other than 0 runs only its ranks."""
    workers = [(f"worker-{rank}", "serve.worker.main:main", rank) for rank in layout.ranks]
    if layout.node_rank > 0:
        return workers
    return [("scheduler", "serve.scheduler.main:main"), *workers, ("tokenizer", "serve.tokenizer.main:main"),
            ("detokenizer", "serve.detokenizer.main:main"), ("api", "serve.api.main:main")]


def how_it_ended(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def check_port(host: str, port: int, what: str = "") -> None:
    with pysocket.socket(pysocket.AF_INET6 if ":" in host else pysocket.AF_INET) as s:
        s.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            fix = f"the {what} must be free and an address of this machine" if what else "pass --port with a free port"
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); {fix}") from None


def _rows(rows: list, indent: str = "  ") -> list[str]:
    lines = []
    for name, pid, info, sockets in rows:
        lines.append(f"{indent}serve:{name:<12} pid {pid:<7} {' '.join(f'{k}={v}' for k, v in info.items())}".rstrip())
        lines.append(f"{'':<33}zmq: {', '.join(sockets)}")
    return lines


def _span(layout: Layout, node: int) -> str:
    ranks = range(node * layout.tp_per_node, (node + 1) * layout.tp_per_node)
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


class Launcher:
    def __init__(self, config: Config, model: ModelInfo) -> None:
        self.config, self.model = config, model
        self.eps = Endpoints(make_ipc_dir())
        self.janitor = janitor(self.eps.ipc_dir)
        # prometheus-client's multiprocess mode: every child inherits this and writes its samples there;
        # the api's /metrics adds them up (serve/metrics.py).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(self.eps.ipc_dir, "metrics")
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.ctx = zmq.Context()
        self.inbox = socket(self.ctx, zmq.PULL, self.eps.launcher, bind=True)
        self.events = socket(self.ctx, zmq.PUB, self.eps.events, bind=True)
        self.children: list[Child] = []
        self.stopping = False
        self.failure = ""  # why a broken server stops, for the api's clients and the other nodes
        self.told = False  # the api has told its clients why (after a Stopping)
        # More than one node: node 0 heads the others, each other node follows it (serve/nodes.py).
        self.layout = Layout.of(config)
        self.link: Head | Member | None = None
        self.health: HealthServer | None = None
        if self.layout.node_rank > 0:
            self.link = Member(self.ctx, self.layout, config)
            self.health = HealthServer(config.server.host, config.server.port, self._healthy, self.layout.node_rank)
        elif self.layout.many:
            self.link = Head(self.ctx, self.layout, config, lambda msg: send(self.events, msg))
        self.processes = Processes(os.getpid())
        # Signals only write a byte here; the poll loop below wakes on it.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.stopping = True

    def _healthy(self) -> bool:
        return all(c.ready and c.process.exitcode is None for c in self.children) and not self.stopping

    def _beat(self) -> None:
        """The link's turn: read what the other nodes said, send beats, notice who went quiet."""
        if isinstance(self.link, Member):
            self.link.read()
            self.link.tick(self.processes.snapshot)
        elif self.link is not None:
            self.link.read()
            self.link.tick()

    def start(self) -> None:
        children = _children(self.layout)
        log.info("starting %s; ipc directory %s", ", ".join(name for name, *_ in children), self.eps.ipc_dir)
        for name, target, *extra in children:
            self.children.append(Child(name, target, tuple(extra), self._spawn(name, target, tuple(extra))))

    def _spawn(self, name: str, target: str, extra: tuple) -> BaseProcess:
        proc = mp.get_context("spawn").Process(
            target=child_main, name=f"serve:{name}",
            args=(name, self.config.server.log_level, os.getpid(), self.eps.launcher, target, self.config, self.model,
                  self.eps, *extra),
        )
        proc.start()
        return proc

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        if self.link is not None:
            poller.register(self.link.sock, zmq.POLLIN)
        for child in self.children:
            poller.register(child.process.sentinel, zmq.POLLIN)
        return poller

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.engine.startup_timeout_s
        poller = self._poller()
        while not (all(c.ready for c in self.children) and (self.link is None or self.link.ready)):
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = [c.name for c in self.children if not c.ready]
                if isinstance(self.link, Head):
                    waiting += [f"node rank {p.rank}" for p in self.link.peers.values() if not p.rows]
                raise StartupError(f"timed out after {self.config.engine.startup_timeout_s:g}s waiting for: {', '.join(waiting)}")
            events = dict(poller.poll(int(min(left, BEAT_S if self.link else left) * 1000)))
            self._drain_wakeups(events)
            if self.stopping:
                raise StartupError("interrupted during start-up")
            self._read_inbox()
            try:
                self._beat()
            except NodeLost as e:
                self.failure = str(e)
                raise StartupError(str(e)) from None
            dead = next((c for c in self.children if c.process.exitcode is not None), None)
            if dead is not None:
                # A child that fails says why just before it exits; the message may trail its exit.
                if self.inbox.poll(500):
                    self._read_inbox()
                raise StartupError(f"{dead.name} (pid {dead.process.pid}) {how_it_ended(dead.process)} during start-up")

    def _read_inbox(self) -> None:
        while self.inbox.poll(0):
            msg = recv(self.inbox)
            if isinstance(msg, StartupFailed):
                raise StartupError(f"{msg.name} failed to start: {msg.error}")
            if isinstance(msg, Ready):
                next(c for c in self.children if c.name == msg.name).ready = msg
            if isinstance(msg, Told):
                self.told = True
            if isinstance(msg, Crashed):
                next(c for c in self.children if c.name == msg.name).last_words = msg.error

    def _drain_wakeups(self, events: dict) -> None:
        if self.wake_r in events:
            try:
                os.read(self.wake_r, 512)
            except BlockingIOError:
                pass

    def banner(self) -> str:
        """Every process with its pid, what it reported, and its ZeroMQ sockets (endpoints are files in the ipc directory)."""
        e = self.config.engine
        lines = [f"serve: {self.model.served_name} from {self.model.gguf_file or self.model.hf_dir}",
                 f"  context {self.model.max_model_len} tokens, KV pool {e.kv_pool_tokens} tokens, "
                 f"up to {e.max_running_requests} running requests, tp {e.tp}"
                 + (f" over {self.layout.nnodes} nodes (node 0 at {self.layout.host}:{self.layout.port})" if self.layout.many else "")]
        rows = self.rows()
        lines += _rows(rows)
        if isinstance(self.link, Head):
            for peer in self.link.peers.values():
                lines.append(f"  node {peer.rank} ({peer.host}): ranks {_span(self.layout, peer.rank)}")
                lines += _rows(peer.rows, indent="    ")
        lines.append(f"  ipc: {self.eps.ipc_dir}")
        lines.append(f"ready: http://{self.config.server.host}:{self.config.server.port}/v1")
        return "\n".join(lines)

    def rows(self) -> list[list]:
        """[name, pid, what it reported, its sockets] for the launcher and each child."""
        rows = [["launcher", os.getpid(), {}, OPENED]]
        for c in self.children:
            info = dict(c.ready.info) if c.ready else {}
            rows.append([c.name, c.process.pid, info, info.pop("sockets", [])])
        return rows

    def member_banner(self) -> str:
        l, s = self.layout, self.config.server
        lines = [f"serve: node {l.node_rank} of {l.nnodes}, ranks {_span(l, l.node_rank)} of tp {l.tp}, "
                 f"{self.model.served_name} from {self.model.gguf_file or self.model.hf_dir}", *_rows(self.rows()),
                 f"  ipc: {self.eps.ipc_dir}",
                 f"ready: node {l.node_rank} joined {l.host}:{l.port}; http://{s.host}:{s.port}/health (the API is on node 0)"]
        return "\n".join(lines)

    def supervise(self) -> int:
        """Block until a signal (exit 0) or the death of a child that cannot be restarted (exit 1)."""
        poller = self._poller()
        while not self.stopping:
            events = dict(poller.poll(BEAT_S * 1000 if self.link else None))
            self._drain_wakeups(events)
            try:
                self._read_inbox()  # restarted children report ready (or fail) here
                self._beat()
            except StartupError as e:
                self.failure = str(e)
                log.error("%s; stopping the server", e)
                return 1
            except NodeLost as e:
                self.failure = str(e)
                log.log(logging.INFO if e.clean else logging.ERROR, "%s; stopping %s", e,
                        "this node" if isinstance(self.link, Member) else "the server")
                return 0 if e.clean else 1
            for child in [c for c in self.children if c.process.exitcode is not None]:
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60]
                if child.name not in RESTARTABLE or len(child.restarts) >= RESTARTS_PER_MINUTE:
                    if child.process.exitcode > 0 and self.inbox.poll(500):  # its last words may trail its exit
                        try:
                            self._read_inbox()
                        except StartupError:
                            pass  # a restarted stage's failure: this death stops the server anyway
                    words = f": {child.last_words}" if child.last_words else ""
                    self.failure = f"{child.name} (pid {child.process.pid}) {how_it_ended(child.process)}{words}"
                    where = f" on node {self.layout.node_rank}" if self.layout.many else ""
                    log.error("%s%s; stopping the server", self.failure, where)
                    return 1
                log.error("%s (pid %d) %s; restarting it", child.name, child.process.pid, how_it_ended(child.process))
                child.restarts.append(now)
                child.ready = None
                child.process = self._spawn(child.name, child.target, child.extra)
                send(self.events, StageRestarted(child.name))
                poller = self._poller()
        log.info("stopping")
        return 0

    def stop(self, drain: bool = False) -> None:
        """Stops every child. With `drain` (a clean stop), the api goes first and alone: on SIGTERM it answers
        503 to new requests, lets running ones finish for up to shutdown_timeout_s, aborts the rest, and
        exits; the pipeline behind it is still there to finish them (on every node: the others are told
        only then). Without (a child or a node died), the pipeline is broken and nothing running can finish:
        the api is told why (its clients get that as a 503 error, /health turns 503), then killed, so that
        nobody waits out a drain; the other nodes are told to stop at once."""
        timeout = self.config.server.shutdown_timeout_s
        api = [c for c in self.children if c.name == "api"]
        if drain:
            self._end(api, signal.SIGTERM, timeout + 5)  # the other nodes' ranks still serve the drain
        elif api and api[0].process.is_alive() and api[0].ready:
            # Its clients get an error that says why (not a connection cut off), and /health 503.
            send(self.events, Stopping(self.failure or "a process of the server died"))
            self._wait_told(STOPPING_GRACE_S)
        if self.link is not None:
            self.link.tell_down(self.failure or "its operator stopped it", clean=not self.failure)
        self._end(api, signal.SIGKILL, timeout)
        self._end([c for c in self.children if c.name != "api"], signal.SIGTERM, timeout)
        if self.link is not None:
            self.link.close()
        if self.health is not None:
            self.health.close()
        self.inbox.close()
        self.events.close()
        self.ctx.term()
        shutil.rmtree(self.eps.ipc_dir, ignore_errors=True)
        self.janitor.communicate(b"removed", timeout=5)

    def _wait_told(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.told and (left := deadline - time.monotonic()) > 0:
            if self.inbox.poll(int(left * 1000) + 1):
                try:
                    self._read_inbox()
                except StartupError:
                    pass  # a restarted stage's late failure: the server stops anyway

    @staticmethod
    def _end(children: list[Child], sig: int, timeout: float) -> None:
        for child in children:
            if child.process.is_alive():
                os.kill(child.process.pid, sig)
        deadline = time.monotonic() + timeout
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("%s did not stop in time; killing it", child.name)
                child.process.kill()
                child.process.join()


def run(config: Config) -> int:
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s [launcher] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    try:
        from setproctitle import setproctitle

        setproctitle("serve:launcher")
    except ImportError:
        pass
    check_port(config.server.host, config.server.port)
    layout = Layout.of(config)
    if layout.many and layout.node_rank == 0:
        host = bind_address(layout.host)
        for port in layout.ports:
            check_port(host, port, what=f"cluster port (--dist-init-addr {layout.host}:{layout.port} uses {layout.port}-{layout.port + 3})")
        if create_keys(config.cluster.key_file):
            log.warning("wrote a new cluster key to %s: copy it to every other node (whoever holds it can join)", config.cluster.key_file)
    model = resolve_model(config, log=log.info)
    launcher = Launcher(config, model)
    code = 1
    try:
        launcher.start()
        try:
            launcher.wait_ready()
        except StartupError as e:
            log.error("%s", e)
            if not launcher.stopping:
                launcher.failure = launcher.failure or str(e)  # what the other nodes are told
            return 0 if launcher.stopping else 1
        if isinstance(launcher.link, Member):
            launcher.link.send_ready(launcher.rows())
            print(launcher.member_banner(), flush=True)
        else:
            print(launcher.banner(), flush=True)
        code = launcher.supervise()
        return code
    finally:
        launcher.stop(drain=code == 0)
