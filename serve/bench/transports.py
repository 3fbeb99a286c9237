"""`serve bench-zmq`: ZeroMQ's transports and patterns measured on this machine, next to multiprocessing.Queue.

For each transport (inproc, ipc, tcp) and pattern (REQ/REP, DEALER/ROUTER, PUSH/PULL, PUB/SUB), at 64 B
and 4096 B: round-trip latency (p50, p99; the peer echoes) and one-way throughput (the peer sends as fast
as it can, this process counts, first to last message received).

Both ends are Python (pyzmq), as in the server, so the figures include the interpreter's cost per message.
inproc peers are threads of this process on one zmq.Context: the GIL sits between them. ipc and tcp peers
are one spawned process per transport, handed one case after another over a pipe (zmq_peers.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from serve.bench import zmq_report
from serve.bench.zmq_peers import (
    STOP, SYNC, TIMEOUT_S, Case, ProcessPeer, ThreadPeer, end_process, kinds, make_socket, queue_peer,
)

TRANSPORTS = ("inproc", "ipc", "tcp", "mp-queue")
PATTERNS = ("req-rep", "dealer-router", "push-pull", "pub-sub")
SIZES = (64, 4096)  # a scheduling message; a few KB of token ids
DRAIN_S = 2.0  # after the first message of a throughput run, this much silence means the rest was dropped


@dataclass(frozen=True)
class Counts:
    warmup: int
    round_trips: int
    messages: int  # per throughput run


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
            with (ThreadPeer(ctx) if transport == "inproc" else ProcessPeer()) as peer:
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

def _bind(sock: Any, transport: str, ipc_dir: str, name: str) -> str:
    if transport == "tcp":
        sock.bind("tcp://127.0.0.1:*")
        return sock.last_endpoint.decode()
    endpoint = f"inproc://bench-zmq-{name}" if transport == "inproc" else f"ipc://{os.path.join(ipc_dir, name)}"
    sock.bind(endpoint)
    return endpoint


def _measure_zmq(ctx: Any, peer: ThreadPeer | ProcessPeer, transport: str, pattern: str, size: int, n: Counts) -> Row:
    import zmq

    way_out, way_back = kinds(pattern)
    messages = 0 if pattern == "req-rep" else n.messages
    opened: list[Any] = []  # closed whatever happens, or ctx.term() would wait for them forever (Ctrl-C)
    name = f"{os.getpid()}-{pattern}-{size}"
    try:
        opened.append(out := make_socket(ctx, way_out[0]))
        back = out
        if way_back:
            opened.append(back := make_socket(ctx, way_back[0]))
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


# --- multiprocessing.Queue ----------------------------------------------------------------------------

def _measure_queue(plan: dict[int, Counts]) -> list[Row]:
    """The same two measurements over two multiprocessing.Queues (one each way) to a spawned process."""
    import multiprocessing
    import queue

    mp = multiprocessing.get_context("spawn")
    to_peer, to_main = mp.Queue(), mp.Queue()
    proc = mp.Process(target=queue_peer, args=(to_peer, to_main, os.getpid(), [(s, n.messages) for s, n in plan.items()]),
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
        end_process(proc, now=not ok)
    return rows


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
