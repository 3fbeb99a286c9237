"""`serve bench-zmq`: ZeroMQ's transports and patterns measured on this machine, next to multiprocessing.Queue.

For each transport (inproc, ipc, tcp) and pattern (REQ/REP, DEALER/ROUTER, PUSH/PULL, PUB/SUB), at 64 B
and 4096 B: round-trip latency (p50, p99; the peer echoes) and one-way throughput (the peer sends as fast
as it can, this process counts, first to last message received).

Both ends are Python (pyzmq), as in the server, so the figures include the interpreter's cost per message.
inproc peers are threads of this process on one zmq.Context: the GIL sits between them. ipc and tcp peers
are one spawned process per transport, handed one case after another over a pipe.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from serve.bench import zmq_report

TRANSPORTS = ("inproc", "ipc", "tcp", "mp-queue")
PATTERNS = ("req-rep", "dealer-router", "push-pull", "pub-sub")
SIZES = (64, 4096)  # a scheduling message; a few KB of token ids
STOP = b"stop"  # ends an echo loop (no payload is 4 bytes long)
SYNC = b"sync"  # a PUB/SUB probe, echoed like any payload
TIMEOUT_S = 10.0  # any send or receive stuck this long fails the run instead of hanging it
DRAIN_S = 2.0  # after the first message of a throughput run, this much silence means the rest was dropped


@dataclass(frozen=True)
class Counts:
    warmup: int
    round_trips: int
    messages: int  # per throughput run


@dataclass(frozen=True)
class Case:
    """What the peer needs for one measurement. `back` is empty where one socket carries both ways."""
    pattern: str
    size: int
    messages: int  # 0: no throughput run (REQ/REP is lockstep)
    out: str  # endpoint this process sends on
    back: str  # endpoint the peer sends on


@dataclass
class Row:
    transport: str
    pattern: str
    size: int
    rtt_p50_us: float
    rtt_p99_us: float
    msgs_per_s: float  # REQ/REP: round trips per second (lockstep)
    mb_per_s: float  # 10**6 bytes
    lost: int  # throughput messages that never arrived


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small counts: a few seconds, rough figures")
    p.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS), help="mp-queue: the multiprocessing.Queue baseline")
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS), help="ZeroMQ patterns (mp-queue has one)")
    p.add_argument("--round-trips", type=_count, help="timed round trips per case (default 10,000; --quick 300)")
    p.add_argument("--messages", type=_count, help="messages per throughput run, both sizes (default 200,000 of 64 B and 50,000 of 4 KiB; --quick 20,000 and 5,000)")
    p.add_argument("--json", metavar="FILE", help="write the machine, counts and rows as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart (needs matplotlib)")
    p.set_defaults(run=run)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"not an integer of at least 2: {text}")
    return int(text)


def counts(args: argparse.Namespace, size: int) -> Counts:
    if args.quick:
        default = Counts(50, 300, 20_000 if size < 1024 else 5_000)
    else:
        default = Counts(1_000, 10_000, 200_000 if size < 1024 else 50_000)
    return Counts(default.warmup, args.round_trips or default.round_trips, args.messages or default.messages)


def run(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before the minute of measuring
        print("serve bench-zmq: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    try:
        rows = measure(args)
    except KeyboardInterrupt:
        print("serve bench-zmq: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"serve bench-zmq: error: {e}", file=sys.stderr)
        return 1
    print(zmq_report.table(rows))
    if args.json:
        zmq_report.write_json(args.json, rows, {s: counts(args, s) for s in SIZES})
    if args.plot:
        zmq_report.plot(rows, args.plot)
    return 0


def measure(args: argparse.Namespace) -> list[Row]:
    import zmq

    rows = []
    ctx = zmq.Context()
    try:
        for transport in [t for t in args.transports if t != "mp-queue"]:
            with (_ThreadPeer(ctx) if transport == "inproc" else _ProcessPeer()) as peer:
                for pattern in args.patterns:
                    for size in SIZES:
                        print(f"  {transport} {pattern} {size} B", file=sys.stderr, flush=True)
                        rows.append(_measure_zmq(ctx, peer, transport, pattern, size, counts(args, size)))
        if "mp-queue" in args.transports:
            print("  mp-queue", file=sys.stderr, flush=True)
            rows += _measure_queue({size: counts(args, size) for size in SIZES})
    finally:
        ctx.term()  # our sockets are closed; an inproc peer still blocked gets ETERM and closes its own
    return rows


# --- ZeroMQ -------------------------------------------------------------------------------------------

def _kinds(pattern: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(this side, peer) socket types for the way out and, where it is another pair, the way back."""
    import zmq

    return {
        "req-rep": ((zmq.REQ, zmq.REP), None),
        "dealer-router": ((zmq.DEALER, zmq.ROUTER), None),
        "push-pull": ((zmq.PUSH, zmq.PULL), (zmq.PULL, zmq.PUSH)),
        "pub-sub": ((zmq.PUB, zmq.SUB), (zmq.SUB, zmq.PUB)),
    }[pattern]


def _socket(ctx: Any, kind: int) -> Any:
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


def _bind(sock: Any, transport: str, ipc_dir: str, name: str) -> str:
    if transport == "tcp":
        sock.bind("tcp://127.0.0.1:*")
        return sock.last_endpoint.decode()
    endpoint = f"inproc://bench-zmq-{name}" if transport == "inproc" else f"ipc://{os.path.join(ipc_dir, name)}"
    sock.bind(endpoint)
    return endpoint


def _measure_zmq(ctx: Any, peer: _ThreadPeer | _ProcessPeer, transport: str, pattern: str, size: int, n: Counts) -> Row:
    import zmq

    way_out, way_back = _kinds(pattern)
    messages = 0 if pattern == "req-rep" else n.messages
    opened: list[Any] = []  # closed whatever happens, or ctx.term() would wait for them forever (Ctrl-C)
    name = f"{os.getpid()}-{pattern}-{size}"
    try:
        opened.append(out := _socket(ctx, way_out[0]))
        back = out
        if way_back:
            opened.append(back := _socket(ctx, way_back[0]))
        case = Case(pattern, size, messages, _bind(out, transport, peer.ipc_dir, f"{name}-out"),
                    _bind(back, transport, peer.ipc_dir, f"{name}-back") if way_back else "")
        peer.start(case)
        if pattern == "pub-sub":
            _sync(out, back)
        payload = bytes(size)
        rtts = _round_trips(out.send, back.recv, payload, n)
        out.send(STOP)
        if messages:
            got, seconds = _receive(back.recv, messages, drain=lambda: setattr(back, "rcvtimeo", int(DRAIN_S * 1000)))
        else:
            got, seconds = len(rtts), sum(rtts) / 1e9
        peer.wait()
    except zmq.Again:
        raise RuntimeError(f"{transport} {pattern} {size} B: nothing arrived for {TIMEOUT_S:.0f} s") from None
    finally:
        for sock in opened:
            sock.close()
    return _row(transport, pattern, size, rtts, got, seconds, max(0, messages - got))


def _sync(out: Any, back: Any) -> None:
    """PUB sends nothing to a subscriber whose subscription has not arrived yet (the slow joiner): probe
    until an echo comes back both ways, then let the echoes of the earlier probes drain."""
    deadline = time.monotonic() + TIMEOUT_S
    while not back.poll(10):
        if time.monotonic() > deadline:
            raise RuntimeError("pub-sub: the peer never answered")
        out.send(SYNC)
    while back.poll(100):
        back.recv()


def _peer_side(ctx: Any, case: Case) -> None:
    """Echo until STOP, then send `case.messages` as fast as the socket takes them."""
    import zmq

    way_out, way_back = _kinds(case.pattern)
    inp = _socket(ctx, way_out[1])
    out = _socket(ctx, way_back[1]) if way_back else inp
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


class _ThreadPeer:
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
            _peer_side(self.ctx, case)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def wait(self) -> None:
        assert self.thread is not None
        self.thread.join(TIMEOUT_S)
        if self.thread.is_alive() or self.error:
            raise RuntimeError(f"inproc peer: {self.error or 'stuck'}")

    def __enter__(self) -> _ThreadPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _ProcessPeer:
    """ipc, tcp: the peer is a spawned process that runs the cases it is sent until it is sent None.
    It dies with us (serve.proc.die_with_parent) and ignores Ctrl-C, which is ours to handle."""

    def __init__(self) -> None:
        import multiprocessing
        import tempfile

        mp = multiprocessing.get_context("spawn")
        self.ipc_dir = tempfile.mkdtemp(prefix="serve-bench-zmq-")  # mode 0700: ours alone
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_peer_process, args=(child, os.getpid()), name="bench-zmq-peer", daemon=True)
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

    def __enter__(self) -> _ProcessPeer:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        import shutil

        if exc_type is None:
            self.conn.send(None)
        _end(self.proc, now=exc_type is not None)  # after a failure it may be mid-case, deaf to the pipe
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _peer_process(conn: Any, parent: int) -> None:
    _child_setup(parent)
    import zmq

    ctx = zmq.Context()
    for case in iter(conn.recv, None):
        try:
            _peer_side(ctx, case)
            conn.send(None)
        except Exception as e:
            conn.send(f"{type(e).__name__}: {e}")
    ctx.destroy(linger=0)


def _child_setup(parent: int) -> None:
    from setproctitle import setproctitle

    from serve.proc import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setproctitle("serve:bench-zmq-peer")


def _end(proc: Any, now: bool) -> None:
    """Wait a moment for a child to exit (or none), then kill it."""
    if not now:
        proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join()


# --- multiprocessing.Queue ----------------------------------------------------------------------------

def _measure_queue(plan: dict[int, Counts]) -> list[Row]:
    """The same two measurements over two multiprocessing.Queues (one each way) to a spawned process."""
    import multiprocessing
    import queue

    mp = multiprocessing.get_context("spawn")
    to_peer, to_main = mp.Queue(), mp.Queue()
    proc = mp.Process(target=_queue_peer, args=(to_peer, to_main, os.getpid(), [(s, n.messages) for s, n in plan.items()]),
                      name="bench-zmq-peer", daemon=True)
    proc.start()
    rows = []
    ok = False
    timeout = TIMEOUT_S

    def get() -> bytes:
        return to_main.get(timeout=timeout)

    def drain() -> None:
        nonlocal timeout
        timeout = DRAIN_S

    try:
        for size, n in plan.items():
            timeout = TIMEOUT_S
            rtts = _round_trips(to_peer.put, get, bytes(size), n)
            to_peer.put(STOP)
            got, seconds = _receive(get, n.messages, drain)
            rows.append(_row("mp-queue", "queue", size, rtts, got, seconds, n.messages - got))
        ok = True
    except queue.Empty:
        raise RuntimeError(f"mp-queue: nothing arrived for {TIMEOUT_S:.0f} s") from None
    finally:
        for q in (to_peer, to_main):
            q.cancel_join_thread()  # an unread message must not hold up our exit
        _end(proc, now=not ok)
    return rows


def _queue_peer(inp: Any, out: Any, parent: int, plan: list[tuple[int, int]]) -> None:
    _child_setup(parent)
    for size, messages in plan:
        while (msg := inp.get(timeout=TIMEOUT_S)) != STOP:
            out.put(msg)
        payload = bytes(size)
        for _ in range(messages):
            out.put(payload)


# --- measuring ----------------------------------------------------------------------------------------

def _round_trips(send: Callable[[bytes], Any], recv: Callable[[], Any], payload: bytes, n: Counts) -> list[int]:
    """Nanoseconds per round trip, warm-up excluded."""
    clock = time.perf_counter_ns
    rtts = []
    for i in range(n.warmup + n.round_trips):
        t = clock()
        send(payload)
        recv()
        if i >= n.warmup:
            rtts.append(clock() - t)
    return rtts


def _receive(recv: Callable[[], Any], messages: int, drain: Callable[[], None]) -> tuple[int, float]:
    """How many of `messages` arrived, and the seconds from the first to the last of them. `drain` cuts
    `recv`'s timeout to DRAIN_S once the first has come."""
    import queue

    import zmq

    recv()  # the first one: the clock starts here
    start = time.perf_counter()
    drain()
    got = 1
    try:
        while got < messages:
            recv()
            got += 1
        return got, time.perf_counter() - start
    except (zmq.Again, queue.Empty):
        return got, time.perf_counter() - start - DRAIN_S  # the silence after the last one does not count


def _row(transport: str, pattern: str, size: int, rtts: list[int], got: int, seconds: float, lost: int) -> Row:
    rtts = sorted(rtts)
    rate = got / seconds if pattern == "req-rep" else (got - 1) / seconds  # intervals between first and last
    return Row(transport, pattern, size, _percentile(rtts, 0.50) / 1e3, _percentile(rtts, 0.99) / 1e3, rate, rate * size / 1e6, lost)


def _percentile(ordered: list[int], q: float) -> float:
    """Nearest rank: the smallest value at least q of the samples do not exceed."""
    return float(ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))])
