"""Where a decode step's time goes, against the memory-bandwidth limit: `make bench-profile`.

The default config's model in one in-process engine (no ZeroMQ, no HTTP), decode steps at 1 and 32
streams after a 64-token prompt each, timed three ways:
1. the step as the worker runs it (all layers in one kernel call where the model allows);
2. the same step one op at a time, each kind of op timed around its calls: weight matmuls, attention,
   the small ops (norms, RoPE and the KV write, SiLU, the embedding), sampling; what is left of the step
   is Python and dispatch;
3. a served run (`serve bench` against a launched server, one and 32 streams): its ITL over the
   engine's step is what ZeroMQ, the scheduler and HTTP add.
The limit: the bytes a step must read (every weight once, plus the KV cache of every stream) over the
read bandwidth measured here with two threads.

Prints a markdown table and saves JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from client import CONFIG, ROOT, model_info, save

from tests.server import Server

PROMPT = 64


def read_bandwidth_gbs(kernels) -> float:
    """How fast our matmul streams a 290 MB int8 matrix from memory at one row (far more than any cache):
    the rate a step's weight streaming can hope for. (torch's own reductions read at ~20 GB/s here,
    against ~38 for this.)"""
    import numpy as np
    import torch

    from serve import isa
    from serve.worker import native

    level = native.kernel_level(kernels, isa.chosen())
    N, K = 256 * 1024, 1024
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 127, size=(N, K // 32 * 34), dtype=np.uint8))
    raw.view(N, -1, 34)[:, :, 0:2] = 0  # fp16 scales of 0: a valid Q8_0 matrix
    packed, fmt = kernels.repack(raw, 8, K)
    del raw
    x = torch.randn(1, K)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        kernels.qlinear(x, packed, fmt, None, level)
        runs.append(packed.numel() / (time.perf_counter() - started) / 1e9)
    return max(runs)


class Timers:
    """Wraps callables so that the time spent in each kind adds up; forward is unchanged otherwise."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, kind: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            self.spent[kind] += time.perf_counter() - started
            return out

        return timed


def instrument(model, engine, timers: Timers) -> None:
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, timers.wrap("matmuls", getattr(layer, name)))
    model.lm_head = timers.wrap("matmuls", model.lm_head)
    model.embed = timers.wrap("small ops", model.embed)
    ops = model.ops
    ops.decode_attention = timers.wrap("attention", ops.decode_attention)
    for name in ("rms", "add_rms", "silu_mul", "rope_store"):
        setattr(ops, name, timers.wrap("small ops", getattr(ops, name)))
    engine.sampler.sample = timers.wrap("sampling", engine.sampler.sample)


def steps(engine, runner, B: int, n: int, timers: Timers | None = None) -> float:
    prompts = [[(7 * b + i) % 1000 + 100 for i in range(PROMPT)] for b in range(B)]
    out = runner.generate(prompts, 4)
    if timers is not None:
        timers.spent.clear()  # the decode steps only, not the prefill
    started = time.perf_counter()
    for _ in range(n):
        out = [o + [t] for o, t in zip(out, engine.step(runner.decode_plan(prompts, out))[0])]
    return (time.perf_counter() - started) / n * 1000


def step_bytes(model, engine, B: int) -> int:
    """What a decode step at batch B must read: every weight once, and each stream's KV (at the middle of
    the measured steps' context)."""
    weights = sum(model.linears.used.values())
    kv_per_token = sum(c.element_size() * c.shape[0] * c.shape[2] for c in engine.kv_cache)
    return weights + B * (PROMPT + 24) * kv_per_token


def profile(info, B: int, n: int, kv_cache_dtype: str = "auto") -> dict:
    from serve.device import place
    from serve.worker.engine import Engine
    from serve.worker.model import Model
    from serve.worker.offline import OfflineRunner

    placement = place(0, "auto", "auto", gguf=info.gguf_file is not None)
    model = Model(info.hf_dir, 0, 1, placement.dtype, placement.device, gguf=info.gguf_file, kv_cache_dtype=kv_cache_dtype)
    max_len = PROMPT + 4 * n + 64
    engine = Engine(model, B * max_len, B, max_len, kv_dtype=model.formats.kv)
    runner = OfflineRunner(engine, max_len)
    whole = statistics.median(steps(engine, runner, B, n) for _ in range(3))
    model.fused = None
    timers = Timers()
    instrument(model, engine, timers)
    loose = [steps(engine, runner, B, n, timers) for _ in range(3)]
    parts = {kind: round(t / n * 1000, 3) for kind, t in timers.spent.items()}  # of the last run
    one_op = loose[-1]
    parts["Python and dispatch (one op at a time)"] = round(one_op - sum(parts.values()), 3)
    return {"step_ms": round(whole, 3), "one_op_at_a_time_ms": round(one_op, 3), "parts_ms": parts,
            "bytes": step_bytes(model, engine, B), "describe": model.describe(model.formats.kv),
            "kv_dtype": str(model.formats.kv).removeprefix("torch.")}


def served_itl(B: int) -> float:
    with Server("--config", CONFIG) as server, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "serve.cli", "bench", "--base-url", server.url, "--concurrency", str(B),
                        "--num-prompts", str(max(4, 2 * B)), "--input-len", str(PROMPT), "--output-len", "128", "--ignore-eos",
                        "--temperature", "0", "--warmup", "1", "--no-progress", "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["summary"]["itl_ms"]["p50"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-served", action="store_true", help="skip the served runs (the ZeroMQ/HTTP column)")
    p.add_argument("--kv-cache-dtype", help="the in-process engine's KV cache (default: the config's engine.kv_cache_dtype)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_profile.json"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    from serve import isa

    from serve.worker import native

    from serve.config import load_config

    info = model_info()
    kv = args.kv_cache_dtype or load_config(CONFIG).engine.kv_cache_dtype
    batches = [int(b) for b in args.batches.split(",")]
    # The served runs first: this process's own threads, once it has run a model, slowed the server's
    # 32-stream steps by tens of percent here.
    served = {} if args.no_served else {B: served_itl(B) for B in batches}
    bandwidth = read_bandwidth_gbs(native.load())
    report = {"cpu_isa": isa.chosen(), "read_bandwidth_gbs": round(bandwidth, 1), "batches": {}}
    for B in batches:
        r = profile(info, B, args.steps, kv)
        r["limit_ms"] = round(r["bytes"] / bandwidth / 1e6, 3)
        if B in served:
            r["served_itl_ms"] = served[B]
        report["batches"][str(B)] = r
        print(json.dumps({B: r}), flush=True)
    kinds = ["matmuls", "attention", "small ops", "sampling", "Python and dispatch (one op at a time)"]
    print(f"\nread bandwidth (our matmul, one row, 2 threads): {report['read_bandwidth_gbs']} GB/s; kernels at {report['cpu_isa']}; "
          f"KV cache {report['batches'][str(batches[0])]['kv_dtype']}")
    print("| streams | step (ms) | " + " | ".join(kinds) + " | served ITL p50 (ms) | bytes read per step | bandwidth limit (ms) |")
    print("|---|---|" + "---|" * len(kinds) + "---|---|---|")
    for B, r in report["batches"].items():
        print(f"| {B} | {r['step_ms']} | " + " | ".join(str(r["parts_ms"].get(k, 0)) for k in kinds)
              + f" | {r.get('served_itl_ms', '')} | {r['bytes'] / 1e6:.1f} MB | {r['limit_ms']} |")
    save(report, args.out)


if __name__ == "__main__":
    main()
