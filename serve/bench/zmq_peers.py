"""The far end of `serve bench-zmq`'s measurements: the peer that echoes and streams, as a thread (inproc)
or a spawned process (ipc, tcp, multiprocessing.Queue) that dies with the run and ignores Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

STOP = b"stop"  # ends an echo loop (no payload is 4 bytes long)
SYNC = b"sync"  # a PUB/SUB probe, echoed like any payload
TIMEOUT_S = 10.0  # any send or receive stuck this long fails the run instead of hanging it


@dataclass(frozen=True)
class Case:
    """What the peer needs for one measurement. `back` is empty where one socket carries both ways."""
    pattern: str
    size: int
    messages: int  # 0: no throughput run (REQ/REP is lockstep)
    out: str  # endpoint this process sends on
    back: str  # endpoint the peer sends on


def kinds(pattern: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(this side, peer) socket types for the way out and, where it is another pair, the way back."""
    import zmq

    return {
        "req-rep": ((zmq.REQ, zmq.REP), None),
        "dealer-router": ((zmq.DEALER, zmq.ROUTER), None),
        "push-pull": ((zmq.PUSH, zmq.PULL), (zmq.PULL, zmq.PUSH)),
        "pub-sub": ((zmq.PUB, zmq.SUB), (zmq.SUB, zmq.PUB)),
    }[pattern]


def make_socket(ctx: Any, kind: int) -> Any:
    import zmq

    s = ctx.socket(kind)
    try:
        s.linger = 0
        s.rcvtimeo = s.sndtimeo = int(TIMEOUT_S * 1000)
        # No high-water mark: PUB drops what goes past it, and a pipe's writer learns of reads only in batches
        # of half the mark, so even a mark above the run's size dropped messages. Every pattern gets the same,
        # so PUSH and DEALER/ROUTER never block either: a sender may queue a whole run in memory.
        s.sndhwm = s.rcvhwm = 0
        if kind == zmq.SUB:
            s.subscribe(b"")
        if kind == zmq.ROUTER:
            s.router_mandatory = 1
    except BaseException:  # Ctrl-C included: an open socket would hold up ctx.term() forever
        s.close(linger=0)
        raise
    return s


def peer_side(ctx: Any, case: Case) -> None:
    """Echo until STOP, then send `case.messages` as fast as the socket takes them."""
    import zmq

    way_out, way_back = kinds(case.pattern)
    inp = make_socket(ctx, way_out[1])
    out = make_socket(ctx, way_back[1]) if way_back else inp
    out.linger = int(TIMEOUT_S * 1000)  # what is still queued at close goes out after it
    try:
        inp.connect(case.out)
        if case.back:
            out.connect(case.back)
        payload = bytes(case.size)
        if way_out[1] == zmq.ROUTER:  # frames are [identity, payload]
            while (frames := inp.recv_multipart())[1] != STOP:
                inp.send_multipart(frames)
            for _ in range(case.messages):
                inp.send_multipart([frames[0], payload])
        else:
            while (msg := inp.recv()) != STOP:
                out.send(msg)
            for _ in range(case.messages):
                out.send(payload)
    finally:
        out.close()
        inp.close()


class ThreadPeer:
    """inproc: the peer is a thread of this process on the same Context."""

    ipc_dir = ""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.thread: threading.Thread | None = None
        self.error = ""

    def start(self, case: Case) -> None:
        self.error = ""
        self.thread = threading.Thread(target=self._run, args=(case,), name="bench-zmq-peer", daemon=True)
        self.thread.start()

    def _run(self, case: Case) -> None:
        try:
            peer_side(self.ctx, case)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def wait(self) -> None:
        assert self.thread is not None
        self.thread.join(TIMEOUT_S)
        if self.thread.is_alive() or self.error:
            raise RuntimeError(f"inproc peer: {self.error or 'stuck'}")

    def __enter__(self) -> ThreadPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class ProcessPeer:
    """ipc, tcp: the peer is a spawned process that runs the cases it is sent until it is sent None.
    It dies with us (serve.proc.die_with_parent) and ignores Ctrl-C, which is ours to handle."""

    def __init__(self) -> None:
        import multiprocessing
        import tempfile

        mp = multiprocessing.get_context("spawn")
        self.ipc_dir = tempfile.mkdtemp(prefix="serve-bench-zmq-")  # mode 0700: ours alone
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=peer_process, args=(child, os.getpid()), name="bench-zmq-peer", daemon=True)
        self.proc.start()
        child.close()

    def start(self, case: Case) -> None:
        self.conn.send(case)

    def wait(self) -> None:
        if not self.conn.poll(TIMEOUT_S):
            raise RuntimeError("peer process: no answer")
        try:
            error = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"peer process died (exit code {self.proc.exitcode})") from None
        if error:
            raise RuntimeError(f"peer process: {error}")

    def __enter__(self) -> ProcessPeer:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        import shutil

        if exc_type is None:
            self.conn.send(None)
        end_process(self.proc, now=exc_type is not None)  # after a failure it may be mid-case, deaf to the pipe
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def peer_process(conn: Any, parent: int) -> None:
    child_setup(parent)
    import zmq

    ctx = zmq.Context()
    for case in iter(conn.recv, None):
        try:
            peer_side(ctx, case)
            conn.send(None)
        except Exception as e:
            conn.send(f"{type(e).__name__}: {e}")
    ctx.destroy(linger=0)


def child_setup(parent: int) -> None:
    from setproctitle import setproctitle

    from serve.proc import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setproctitle("serve:bench-zmq-peer")


def end_process(proc: Any, now: bool) -> None:
    """Wait a moment for a child to exit (or none), then kill it."""
    if not now:
        proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join()


def queue_peer(inp: Any, out: Any, parent: int, plan: list[tuple[int, int]]) -> None:
    child_setup(parent)
    for size, messages in plan:
        while (msg := inp.get(timeout=TIMEOUT_S)) != STOP:
            out.put(msg)
        payload = bytes(size)
        for _ in range(messages):
            out.put(payload)
