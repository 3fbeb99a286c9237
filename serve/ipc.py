"""ZeroMQ plumbing shared by every process: the endpoints of one server instance and a socket factory.

All endpoints are `ipc://` files inside one private directory per instance (mode 0700, unique name),
so two servers on one machine never collide and other local users cannot connect.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import zmq

from serve.messages import decode, encode

MAX_MESSAGE_BYTES = 64 << 20

# This process's sockets, as "PUSH connect scheduler": the launcher's start-up banner lists them.
OPENED: list[str] = []


@dataclass(frozen=True)
class Endpoints:
    ipc_dir: str

    def _ep(self, name: str) -> str:
        return f"ipc://{os.path.join(self.ipc_dir, name)}"

    @property
    def launcher(self) -> str:  # children -> launcher: readiness (PUSH/PULL)
        return self._ep("launcher")

    @property
    def tokenizer(self) -> str:  # api <-> tokenizer (DEALER/ROUTER)
        return self._ep("tokenizer")

    @property
    def scheduler(self) -> str:  # tokenizer -> scheduler (PUSH/PULL)
        return self._ep("scheduler")

    @property
    def plan(self) -> str:  # scheduler -> every worker rank (PUB/SUB)
        return self._ep("plan")

    @property
    def results(self) -> str:  # worker rank 0 -> scheduler (PUSH/PULL)
        return self._ep("results")

    @property
    def detokenizer(self) -> str:  # scheduler -> detokenizer (PUSH/PULL)
        return self._ep("detokenizer")

    @property
    def outputs(self) -> str:  # detokenizer <-> api (ROUTER/DEALER)
        return self._ep("outputs")

    @property
    def control(self) -> str:  # api -> scheduler: ping, stats (REQ/REP)
        return self._ep("control")

    @property
    def events(self) -> str:  # launcher -> api, scheduler: a stage was restarted (PUB/SUB)
        return self._ep("events")

    @property
    def dist_init(self) -> str:  # torch.distributed rendezvous file: no TCP port to collide on
        return f"file://{os.path.join(self.ipc_dir, 'dist-rendezvous')}"


def make_ipc_dir() -> str:
    # mkdtemp creates the directory with mode 0700 and a unique name. /tmp keeps the socket
    # paths short: a unix socket path must fit in ~107 bytes.
    return tempfile.mkdtemp(prefix="serve-", dir="/tmp")


def socket(ctx: zmq.Context, kind: int, endpoint: str | None, *, bind: bool, identity: bytes | None = None) -> zmq.Socket:
    """A socket with our options, bound or connected to `endpoint` (None: not yet; see serve/cluster.py)."""
    sock = ctx.socket(kind)
    # Never block process exit on undelivered messages: a stopping server drops them on purpose.
    sock.setsockopt(zmq.LINGER, 0)
    # No message of ours comes near this (request bodies are capped at the api, 8 MB by default); a peer
    # that sends more is broken or hostile, and gets disconnected instead of making us allocate it.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.PUB:
        # The plan must reach every rank or the collective ops deadlock; the scheduler keeps at most
        # one step in flight, so the queue cannot grow without bound.
        sock.setsockopt(zmq.SNDHWM, 0)
    if kind == zmq.ROUTER:
        # An unroutable reply (its api process is gone) raises instead of vanishing silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 0)
    if endpoint is None:
        return sock
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    OPENED.append(f"{zmq.SocketType(kind).name} {'bind' if bind else 'connect'} {os.path.basename(endpoint)}")
    return sock


def send(sock: zmq.Socket, msg: object, flags: int = 0) -> None:
    sock.send(encode(msg), flags)


def recv(sock: zmq.Socket, flags: int = 0) -> object:
    return decode(sock.recv(flags))


def drain(sock: zmq.Socket) -> list[object]:
    """Every message waiting on `sock`, without blocking."""
    out = []
    while True:
        try:
            out.append(decode(sock.recv(zmq.NOBLOCK)))
        except zmq.Again:
            return out
