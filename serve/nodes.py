"""The launchers' link across nodes: node R joins node 0, says when its ranks are up, and both sides beat
once a second, so that each learns within seconds that the other is gone (serve/cluster.py has the ports).

    node R (DEALER)                           node 0 (ROUTER)
      NodeBeat (join, then every second) -->   records it; a node that never joins is named after join_timeout_s
      NodeReady (its banner rows)         -->   node 0 is ready once every node is
                                          <--   NodeBeat every second
      NodeDown (why it stops)            <-->   the other side stops too

Only the launchers talk here; plans and results go between scheduler and ranks on their own sockets.
A node also answers `/health` on its `--port` (HealthServer), as SGLang's non-zero nodes do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket as pysocket
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import zmq

from serve.cluster import LINKS, Layout, bind_secure, connect_secure, start_auth
from serve.config import Config
from serve.ipc import MAX_MESSAGE_BYTES, decode, encode
from serve.messages import RemoteProcesses, message

log = logging.getLogger("serve.launcher")

BEAT_S = 1.0
LOST_AFTER_S = 5.0  # no beat for this long: the other node is gone (dead, or cut off)


# --- the link's messages (MessagePack, through serve/messages.py's one codec) -------------------------


@message(50)
class NodeBeat:
    """Sent every second both ways; the first one from node R is its join. `config` is a digest of what
    must agree across nodes (model, engine, tp)."""

    node_rank: int
    host: str = ""
    config: str = ""
    processes: list[dict[str, Any]] = field(default_factory=list)
    hops: list[dict[str, Any]] = field(default_factory=list)  # its ranks' tcp hop: count, sum, p50, p99


@message(51)
class NodeReady:
    """Node R's processes have all started: what each reported, for node 0's banner."""

    node_rank: int
    rows: list[list[Any]]  # [name, pid, info, sockets]


@message(52)
class NodeDown:
    """A node is stopping, and why: the others stop too (the ranks cannot run without it)."""

    node_rank: int
    reason: str
    clean: bool = False  # stopped by its operator (Ctrl-C, SIGTERM), not by a fault


class NodeLost(Exception):
    def __init__(self, message: str, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean  # node 0 was stopped by its operator: the other nodes exit with 0


def config_digest(config: Config) -> str:
    """What must be the same on every node for their ranks to fit together."""
    same = {"model": asdict(config.model), "engine": asdict(config.engine), "nnodes": config.cluster.nnodes}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """Our options, less serve.ipc.socket's ROUTER_MANDATORY: a beat to a node that is gone must be dropped, not raise."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


@dataclass
class Peer:
    rank: int
    identity: bytes = b""
    host: str = ""
    last_heard: float | None = None
    rows: list = field(default_factory=list)  # from NodeReady
    processes: list = field(default_factory=list)


class Head:
    """Node 0's side: who has joined, who is ready, who went quiet."""

    def __init__(self, ctx: zmq.Context, layout: Layout, config: Config, publish: Callable[[object], None]) -> None:
        self.layout, self.digest, self.publish = layout, config_digest(config), publish
        self.join_timeout_s = config.cluster.join_timeout_s
        keys = layout.keys()
        self.auth = start_auth(ctx, keys)
        self.sock = _socket(ctx, zmq.ROUTER)
        bind_secure(self.sock, layout.endpoint(LINKS, bind=True), keys)
        self.peers = {r: Peer(r) for r in range(1, layout.nnodes)}
        self.started = self.last_beat = time.monotonic()

    @property
    def ready(self) -> bool:
        return all(p.rows for p in self.peers.values())

    def read(self) -> None:
        while self.sock.poll(0):
            identity, payload = self.sock.recv_multipart()
            msg = decode(payload)
            peer = self.peers.get(getattr(msg, "node_rank", -1))
            if peer is None:
                continue  # a node rank this server does not have (a wrong --nnodes there): it times out
            if isinstance(msg, NodeBeat):
                if msg.config != self.digest:
                    raise NodeLost(f"node rank {peer.rank} ({msg.host}) runs another model or engine config than node 0: "
                                   f"give every node the same command, only --node-rank differs")
                if peer.last_heard is None:
                    log.info("node rank %d joined from %s", peer.rank, msg.host)
                peer.identity, peer.host, peer.last_heard, peer.processes = identity, msg.host, time.monotonic(), msg.processes
                self.publish(RemoteProcesses(peer.rank, peer.host, msg.processes, msg.hops))
            elif isinstance(msg, NodeReady):
                peer.rows = msg.rows
            elif isinstance(msg, NodeDown):
                raise NodeLost(f"node rank {peer.rank} ({peer.host}) stopped: {msg.reason}")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_beat >= BEAT_S:
            self.last_beat = now
            for peer in self.peers.values():
                if peer.identity:
                    self.sock.send_multipart([peer.identity, encode(NodeBeat(0))])
        for peer in self.peers.values():
            if peer.last_heard is None and now - self.started > self.join_timeout_s:
                lo, hi = self.layout.ports[0], self.layout.ports[-1]
                raise NodeLost(f"node rank {peer.rank} of {self.layout.nnodes} did not join within {self.join_timeout_s:g}s: "
                               f"run the same command there with --node-rank {peer.rank}; it must reach "
                               f"{self.layout.host} on ports {lo}-{hi} and hold the same --cluster-key file")
            if peer.last_heard is not None and now - peer.last_heard > LOST_AFTER_S:
                raise NodeLost(f"node rank {peer.rank} ({peer.host}) has not been heard from for {LOST_AFTER_S:g}s")

    def tell_down(self, reason: str, clean: bool) -> None:
        for peer in self.peers.values():
            if peer.identity:
                self.sock.send_multipart([peer.identity, encode(NodeDown(0, reason, clean))])

    def close(self) -> None:
        self.sock.close()
        self.auth.stop()


class Member:
    """Node R's side: joins node 0 and follows it."""

    def __init__(self, ctx: zmq.Context, layout: Layout, config: Config) -> None:
        self.layout, self.digest = layout, config_digest(config)
        self.join_timeout_s = config.cluster.join_timeout_s
        self.host = pysocket.gethostname()
        self.sock = _socket(ctx, zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"node-{layout.node_rank}".encode())
        connect_secure(self.sock, layout.endpoint(LINKS), layout.keys())
        self.started = time.monotonic()
        self.last_beat = 0.0
        self.last_heard: float | None = None
        self.ready = True  # nothing to wait for from node 0 before this node's ranks are up

    def read(self) -> None:
        while self.sock.poll(0):
            msg = decode(self.sock.recv())
            if isinstance(msg, NodeBeat):
                if self.last_heard is None:
                    log.info("node 0 answered at %s", self.layout.endpoint(LINKS))
                self.last_heard = time.monotonic()
            elif isinstance(msg, NodeDown):
                raise NodeLost(f"node 0 stopped: {msg.reason}", clean=msg.clean)

    def tick(self, processes: Callable[[], list[dict[str, Any]]]) -> None:
        now = time.monotonic()
        if now - self.last_beat >= BEAT_S:
            self.last_beat = now
            self.sock.send(encode(NodeBeat(self.layout.node_rank, self.host, self.digest, processes(), tcp_hops())))
        if self.last_heard is None and now - self.started > self.join_timeout_s:
            raise NodeLost(f"node 0 did not answer at {self.layout.endpoint(LINKS)} within {self.join_timeout_s:g}s: "
                           f"is it running, with the same --dist-init-addr, and is this --cluster-key file a copy of its own?")
        if self.last_heard is not None and now - self.last_heard > LOST_AFTER_S:
            raise NodeLost(f"node 0 has not been heard from for {LOST_AFTER_S:g}s")

    def send_ready(self, rows: list[list[Any]]) -> None:
        self.sock.send(encode(NodeReady(self.layout.node_rank, rows)))

    def tell_down(self, reason: str, clean: bool) -> None:
        self.sock.send(encode(NodeDown(self.layout.node_rank, reason, clean)))

    def close(self) -> None:
        self.sock.close()


def tcp_hops() -> list[dict[str, Any]]:
    """This node's ranks' view of the plans' tcp hop (from the metrics files of this node's processes)."""
    from serve.api.pipeline import from_metrics
    from serve.metrics import TCP_HOP

    return [h for h in from_metrics((TCP_HOP,))["hops"] if h["count"]]


class HealthServer:
    """`GET /health` on a node R: 200 while its ranks are up and node 0 is heard from, else 503."""

    def __init__(self, host: str, port: int, healthy: Callable[[], bool], node_rank: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/health":
                    self._answer(404, {"error": {"message": f"node {node_rank} serves only /health; the API is on node 0",
                                                 "type": "not_found", "param": None, "code": None}})
                    return
                ok = healthy()
                self._answer(200 if ok else 503, {"status": "ok" if ok else "unavailable", "node_rank": node_rank})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
