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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import zmq

from serve.config import Config, ConfigError
from serve.ipc import OPENED, Endpoints, make_ipc_dir, recv, send, socket
from serve.messages import Ready, StageRestarted, StartupFailed
from serve.model_files import ModelInfo, resolve_model
from serve.proc import child_main

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


# Stages that keep no state a restart cannot rebuild: when one dies, it is started again and ZeroMQ
# reconnects its peers by itself. At most RESTARTS_PER_MINUTE, then the server stops as for any death.
RESTARTABLE = {"tokenizer", "detokenizer"}
RESTARTS_PER_MINUTE = 3


def _children(config: Config) -> list[tuple]:
    """(name, "module:function", extra args): each child imports its own code, after it has made sure
    it dies with the launcher (serve/proc.py: child_main)."""
    workers = [(f"worker-{rank}", "serve.worker.main:main", rank) for rank in range(config.engine.tp)]
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


def check_port(host: str, port: int) -> None:
    with pysocket.socket(pysocket.AF_INET6 if ":" in host else pysocket.AF_INET) as s:
        s.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pass --port with a free port") from None


# Run by a small process of its own beside the launcher: it blocks until the launcher's end of a pipe
# closes, which any death closes, SIGKILL included; then, once the children (killed with the launcher)
# are gone, it removes the ipc directory. Ctrl-C and SIGTERM to the process group do not stop it early.
_JANITOR = """import shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
if sys.stdin.buffer.read() != b"removed":  # what a launcher that cleaned up says before it closes
    time.sleep(1.0)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def janitor(ipc_dir: str) -> subprocess.Popen:
    """The process that removes `ipc_dir` when the launcher is gone, however it went."""
    return subprocess.Popen([sys.executable, "-c", _JANITOR, ipc_dir], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


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
        # Signals only write a byte here; the poll loop below wakes on it.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.stopping = True

    def start(self) -> None:
        children = _children(self.config)
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
        for child in self.children:
            poller.register(child.process.sentinel, zmq.POLLIN)
        return poller

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.engine.startup_timeout_s
        poller = self._poller()
        while not all(c.ready for c in self.children):
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = ", ".join(c.name for c in self.children if not c.ready)
                raise StartupError(f"timed out after {self.config.engine.startup_timeout_s:g}s waiting for: {waiting}")
            events = dict(poller.poll(int(left * 1000)))
            self._drain_wakeups(events)
            if self.stopping:
                raise StartupError("interrupted during start-up")
            self._read_inbox()
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
                 f"up to {e.max_running_requests} running requests, tp {e.tp}"]
        rows = [("launcher", os.getpid(), {}, OPENED)]
        for c in self.children:
            info = dict(c.ready.info) if c.ready else {}
            rows.append((c.name, c.process.pid, info, info.pop("sockets", [])))
        for name, pid, info, sockets in rows:
            lines.append(f"  serve:{name:<12} pid {pid:<7} {' '.join(f'{k}={v}' for k, v in info.items())}".rstrip())
            lines.append(f"{'':<33}zmq: {', '.join(sockets)}")
        lines.append(f"  ipc: {self.eps.ipc_dir}")
        lines.append(f"ready: http://{self.config.server.host}:{self.config.server.port}/v1")
        return "\n".join(lines)

    def supervise(self) -> int:
        """Block until a signal (exit 0) or the death of a child that cannot be restarted (exit 1)."""
        poller = self._poller()
        while not self.stopping:
            events = dict(poller.poll())
            self._drain_wakeups(events)
            try:
                self._read_inbox()  # restarted children report ready (or fail) here
            except StartupError as e:
                log.error("%s; stopping the server", e)
                return 1
            for child in [c for c in self.children if c.process.exitcode is not None]:
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60]
                if child.name not in RESTARTABLE or len(child.restarts) >= RESTARTS_PER_MINUTE:
                    log.error("%s (pid %d) %s; stopping the server", child.name, child.process.pid, how_it_ended(child.process))
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
        exits; the pipeline behind it is still there to finish them. Without (a child died), the pipeline
        is broken and nothing running can finish: the api is killed outright, so its clients see their
        connections close at once instead of waiting out a drain."""
        timeout = self.config.server.shutdown_timeout_s
        api = [c for c in self.children if c.name == "api"]
        if drain:
            self._end(api, signal.SIGTERM, timeout + 5)
        else:
            self._end(api, signal.SIGKILL, timeout)
        self._end([c for c in self.children if c.name != "api"], signal.SIGTERM, timeout)
        self.inbox.close()
        self.events.close()
        self.ctx.term()
        shutil.rmtree(self.eps.ipc_dir, ignore_errors=True)
        self.janitor.communicate(b"removed", timeout=5)

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
    model = resolve_model(config, log=log.info)
    launcher = Launcher(config, model)
    code = 1
    try:
        launcher.start()
        try:
            launcher.wait_ready()
        except StartupError as e:
            log.error("%s", e)
            return 0 if launcher.stopping else 1
        print(launcher.banner(), flush=True)
        code = launcher.supervise()
        return code
    finally:
        launcher.stop(drain=code == 0)
