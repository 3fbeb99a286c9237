"""A worker process: one tensor-parallel rank. Receives every step plan over SUB, runs its shard, and
(rank 0 only) pushes the sampled tokens back to the scheduler."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

import zmq

from serve import isa
from serve.cluster import PLAN, RESULTS, Layout, connect_secure
from serve.config import Config
from serve.ipc import Endpoints, recv, send, socket
from serve.messages import Hello, HelloAck, Shutdown, StepPlan, StepResult
from serve.metrics import TCP_HOP, Hop
from serve.model_files import ModelInfo
from serve.proc import Reporter

log = logging.getLogger("serve.worker")


def resident_mb() -> int:
    """This process's resident memory: weights, KV pool (written through at start), torch and the rest."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def keep_step_buffers() -> None:
    """Fixed glibc malloc thresholds, so that a step's tensors of a few MB (32 rows of logits are 6 MB)
    are reused from the heap. With glibc's moving thresholds they were handed back to the kernel when
    freed and the next step's faulted their pages in again, zeroed: measured in a served 32-stream run on
    a Zen 4 EPYC, the kernel's share of the worker's time went from 4.0% (mostly clear_page) to 0.8%.
    Blocks above 64 MB (a long unchunked prompt's) are still mapped apart and given back when freed, and
    the heap's top is still trimmed past 128 MB free, so resident memory keeps following the load."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:  # glibc; other C libraries keep their own policy
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_MMAP_THRESHOLD, 64 << 20)
        mallopt(M_TRIM_THRESHOLD, 128 << 20)


def main(reporter: Reporter, config: Config, model_info: ModelInfo, eps: Endpoints, rank: int) -> None:
    # Before torch is imported: its CPU allocator then backs large tensors (weights, the KV cache) with 2 MB
    # pages. Decode attention reads cached rows scattered over the pool, and on 4 KB pages that is mostly
    # TLB misses: measured here, 32 streams' attention took 1.1 ms per layer on 4 KB pages, 0.86 on 2 MB.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_step_buffers()
    isa.cap_onednn(isa.chosen(config.engine.cpu_isa))  # read by oneDNN when torch first uses it
    import torch
    import torch.distributed as dist

    from serve.device import place
    from serve.worker.engine import Engine
    from serve.worker.model import Model

    tp = config.engine.tp
    layout = Layout.of(config)  # which ranks run on this node, and how the others are reached
    threads = config.engine.threads_per_rank or max(1, (os.cpu_count() or 1) // layout.tp_per_node)
    torch.set_num_threads(threads)
    placement = place(rank - layout.ranks[0], config.model.dtype, config.model.quantization, config.engine.cpu_isa,
                      model_info.gguf_file is not None, layout.host if layout.many else None)
    if tp > 1:
        # One node: a rendezvous file in the ipc directory (no port to collide on). Several: node 0's store.
        init = layout.dist_init if layout.many else eps.dist_init
        dist.init_process_group(placement.backend, init_method=init, rank=rank, world_size=tp)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:  # rank 0 speaks for all: they load in step
        if rank == 0 and (done * 4 // total > (done - 1) * 4 // total):
            name = os.path.basename(model_info.gguf_file or model_info.hf_dir)
            log.info("loading %s: %d/%d layers (%.1fs)", name, done, total, time.monotonic() - started)

    if rank == 0:
        log.info("loading %s (%s, %s)", model_info.gguf_file or model_info.hf_dir, str(placement.dtype).removeprefix("torch."), placement.device)
    model = Model(model_info.hf_dir, rank, tp, placement.dtype, placement.device, config.model.quantization, progress,
                  config.engine.cpu_kernels, config.engine.cpu_isa, model_info.gguf_file, config.engine.kv_cache_dtype)
    if rank == 0 and model.no_kernel:
        log.warning("dequantized at load (no kernel for it here): %s", ", ".join(model.no_kernel))
    kv_dtype = model.formats.kv
    engine = Engine(model, config.engine.kv_pool_tokens, config.engine.max_running_requests, model_info.max_model_len,
                    model_info.eos_token_ids, kv_dtype)
    load_s = time.monotonic() - started

    ctx = zmq.Context.instance()
    if layout.node_rank == 0:
        plans = socket(ctx, zmq.SUB, eps.plan, bind=False)
        results = socket(ctx, zmq.PUSH, eps.results, bind=False)
    else:  # the scheduler is on node 0: tcp, with CURVE (serve/cluster.py)
        keys = layout.keys()
        plans = socket(ctx, zmq.SUB, None, bind=False)
        connect_secure(plans, layout.endpoint(PLAN), keys)
        results = socket(ctx, zmq.PUSH, None, bind=False)
        connect_secure(results, layout.endpoint(RESULTS), keys)
    reporter.ready(
        device=str(placement.device), dtype=str(model.dtype).removeprefix("torch."), **model.describe(kv_dtype),
        kv_dtype=str(kv_dtype).removeprefix("torch."), threads=threads,
        load_s=round(load_s, 1), kv_mb=engine.kv_bytes() // 2**20, rss_mb=resident_mb(),
    )
    hop = Hop("scheduler->workers" if layout.node_rank == 0 else TCP_HOP, model_info.served_name)
    shift = 0  # from the scheduler's monotonic clock to ours: 0 on its machine, through the wall clocks on another
    last_step = 0
    while True:
        idle_since = time.monotonic_ns()
        msg = recv(plans)
        if isinstance(msg, StepPlan):
            if msg.step != last_step + 1:
                # A rank that skips a plan would wait forever in a collective the others never enter.
                raise RuntimeError(f"rank {rank} missed step plans {last_step + 1} to {msg.step - 1}: its connection "
                                   f"to the scheduler dropped messages")
            last_step = msg.step
            hop.observe(msg.sent_ns + shift, idle_since)
            tokens, logprobs, prompt_logprobs = engine.step(msg)
            if rank == 0:
                send(results, StepResult(msg.step, tokens, logprobs, prompt_logprobs, time.monotonic_ns()))
        elif isinstance(msg, Hello):
            if layout.node_rank > 0:
                shift = msg.clock_ns - (time.time_ns() - time.monotonic_ns())
            send(results, HelloAck(rank, msg.nonce))
        elif isinstance(msg, Shutdown):
            break
