"""Run a function as every rank of a CPU tensor-parallel group (gloo), each rank a spawned process.

Rank 0's return value comes back through a queue. A rank that raises sends its traceback instead, so the
test fails at once with the real error rather than waiting out the timeout while the other rank sits
in a collective. Whatever happens, every rank is joined or killed before `run_ranks` returns.
"""

from __future__ import annotations

import queue
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init_file: str, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    from serve.proc import die_with_parent

    # A killed pytest must not leave ranks blocked in a collective.
    die_with_parent()
    import torch
    import torch.distributed as dist

    # The ranks share the test machine's cores (two, on the CI boxes): more threads each would only fight.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        out.put((rank, None, result if rank == 0 else None))
    except BaseException:
        out.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, workdir: Path, world: int = 2, timeout: float = 60.0) -> Any:
    """Calls `fn(rank, world, *args)` in `world` spawned processes, all in one gloo group; returns rank 0's
    result. `fn` must be importable by name (a module-level function) and its result picklable;
    `workdir` is a fresh folder for the group's rendezvous file."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = Path(workdir) / f"tp-init-{time.monotonic_ns()}"  # file:// rendezvous wants a file not yet there
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(init_file), fn, args, out), daemon=True) for r in range(world)]
    finished = False
    try:
        for p in procs:
            p.start()
        result = _collect(out, procs, time.monotonic() + timeout)
        finished = True
        return result
    finally:
        for p in procs:
            if p.pid is None:
                continue
            if finished:
                p.join(timeout=5)  # all reported: they are on their way out
            if p.is_alive():
                p.kill()  # a failed or stuck group: no rank is worth waiting for
            p.join()
        out.close()
        out.cancel_join_thread()


def _collect(out: Any, procs: list, deadline: float) -> Any:
    done: dict[int, Any] = {}
    while len(done) < len(procs):
        try:
            rank, error, result = out.get(timeout=0.2)
        except queue.Empty:
            # A rank that died without a word (segfault, OOM kill) would otherwise cost the whole timeout.
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in done]
            if dead and out.empty():
                time.sleep(0.5)  # its last message may still be in the pipe
                if out.empty():
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before reporting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(len(procs))) - set(done))} did not finish in time")
            continue
        if error is not None:
            raise RuntimeError(f"rank {rank} failed:\n{error}")
        done[rank] = result
    return done[0]
