"""Benchmark: the engine alone, then the same engine served through the whole ZeroMQ pipeline.

1. Engine-only decode step time at batch 1/8/32: one in-process Engine, no ZeroMQ, no HTTP.
2. Served: a launched server, N concurrent streaming clients over HTTP, driven by `serve bench`
   (serve/bench/load.py): TTFT, inter-token latency (ITL), output tokens/s.
3. The control plane's cost: served ITL / engine step at concurrency 1 and 8, with the scheduler's
   overlap on (the next plan waits in the workers' queue while a step runs) and off.
Optionally (--hf) HF transformers' own decode loop on the same weights and dtype, for comparison.

Prints a markdown table and saves everything as JSON (bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client import CONFIG, ROOT, model_info, save

from tests.server import Server  # the same launcher wrapper the tests use

PROMPT_TOKENS = 64  # engine-only runs
SERVED_PROMPT_TOKENS = 20  # served runs: prompts of this many tokens, from `serve bench`

def load_engine_model(info, dtype_name: str, quantization: str, cpu_kernels: bool = True, kv_cache_dtype: str = "auto"):
    """The model as a worker of the server loads it, with the same settings."""
    from serve.device import place
    from serve.worker.model import Model

    placement = place(0, dtype_name, quantization, gguf=info.gguf_file is not None)
    return Model(info.hf_dir, 0, 1, placement.dtype, placement.device, quantization, cpu_kernels=cpu_kernels,
                 gguf=info.gguf_file, kv_cache_dtype=kv_cache_dtype)


def engine_step_ms(model, B: int, steps: int, repeats: int = 3) -> float:
    """Median over `repeats` runs of the mean decode step at batch B: this machine's speed drifts."""
    from serve.worker.engine import Engine
    from serve.worker.offline import OfflineRunner

    max_len = PROMPT_TOKENS + (repeats + 1) * steps + 16
    engine = Engine(model, B * max_len, B, max_len, kv_dtype=model.formats.kv)
    runner = OfflineRunner(engine, max_len)
    prompts = [[(7 * b + i) % 1000 + 100 for i in range(PROMPT_TOKENS)] for b in range(B)]
    out = runner.generate(prompts, steps // 2)  # prefill + warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            out = [o + [t] for o, t in zip(out, engine.step(runner.decode_plan(prompts, out))[0])]
        runs.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(runs)


def engine_steps(model, batches: list[int], steps: int) -> dict:
    results = {"dtype": str(model.dtype).removeprefix("torch.")}
    for B in batches:
        ms = engine_step_ms(model, B, steps)
        results[str(B)] = {"step_ms": round(ms, 2), "tokens_per_s": round(B * 1000 / ms, 1)}
        print(f"engine  batch {B:>2}: {ms:7.2f} ms/step  {B * 1000 / ms:7.1f} tokens/s", flush=True)
    return results


def control_plane_cost(model, url: str, batch: int, steps: int, max_tokens: int, turns: int = 3) -> dict:
    """Served ITL over engine step at one batch size, measured in alternation (engine, served, engine, ...)
    so that both see the same machine: on this shared 2-core VM the speed drifts by tens of percent."""
    engine, served = [], []
    for _ in range(turns):
        engine.append(engine_step_ms(model, batch, steps, repeats=1))
        served.append(served_round(url, batch, batch if batch > 1 else 2, max_tokens)["itl_ms_p50"])
    e, s = statistics.median(engine), statistics.median(served)
    return {"engine_step_ms": round(e, 2), "served_itl_ms": round(s, 2), "ratio": round(s / e, 3),
            "engine_runs_ms": [round(x, 2) for x in engine], "served_runs_ms": served}


def hf_steps(folder: str, dtype_name: str, batches: list[int], steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    results = {}
    for B in batches:
        ids = torch.tensor([[(7 * b + i) % 1000 + 100 for i in range(PROMPT_TOKENS)] for b in range(B)])

        def run(n: int) -> float:
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - started

        run(2)
        # Decode steps only (the prefill cancels out); the median of three, as for our engine.
        ms = statistics.median((run(steps + 1) - run(1)) / steps * 1000 for _ in range(3))
        results[str(B)] = {"step_ms": round(ms, 2), "tokens_per_s": round(B * 1000 / ms, 1)}
        print(f"hf      batch {B:>2}: {ms:7.2f} ms/step  {B * 1000 / ms:7.1f} tokens/s", flush=True)
    return results


def served_round(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """One `serve bench` run (the CLI users run): ~20-token prompts, `max_tokens` each with ignore_eos."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "serve.cli", "bench", "--base-url", url, "--concurrency", str(concurrency),
                        "--num-prompts", str(requests), "--input-len", str(SERVED_PROMPT_TOKENS), "--output-len", str(max_tokens),
                        "--ignore-eos", "--temperature", "0", "--warmup", "1", "--no-progress", "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        s = json.loads(out.read_text())["summary"]
    assert s["failed"] == 0, s["errors"]
    return {
        "requests": s["completed"],
        "ttft_ms_p50": s["ttft_ms"]["p50"], "ttft_ms_p90": s["ttft_ms"]["p90"],
        "itl_ms_p50": s["itl_ms"]["p50"], "itl_ms_p90": s["itl_ms"]["p90"],
        "output_tokens_per_s": s["output_throughput"],
        # Steady-state decode rate, prefill excluded: what HF's batch-N decode loop is compared with.
        "decode_tokens_per_s": round(concurrency * 1000 / s["itl_ms"]["p50"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "float32", "int8"])
    p.add_argument("--no-cpu-kernels", action="store_true", help="plain torch ops (the engine before serve/worker/csrc/)")
    p.add_argument("--concurrency", default="1,8,16,32,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hf", action="store_true", help="also time HF transformers' decode loop (slow)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    info = model_info()

    flags = ["--config", CONFIG, "--dtype", args.dtype, "--quantization", args.quantization, "--kv-cache-dtype", args.kv_cache_dtype]
    if args.no_cpu_kernels:
        flags.append("--no-cpu-kernels")
    report: dict = {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype, "cpu_kernels": not args.no_cpu_kernels, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "python": platform.python_version()}, "model": "SmolLM2-135M-Instruct"}
    model = load_engine_model(info, args.dtype, args.quantization, not args.no_cpu_kernels, args.kv_cache_dtype)
    report["engine"] = engine_steps(model, levels, args.steps)
    dtype = report["engine"]["dtype"]
    if args.hf:
        from serve.model_files import gguf_to_hf

        report["hf"] = hf_steps(str(gguf_to_hf(Path(info.gguf_file), weights=True)), dtype, levels, max(8, args.steps // 3))
    report["served"] = {}
    report["overlap"] = {"on": {}, "off": {}}
    with Server(*flags) as server:
        for c in levels:
            res = served_round(server.url, c, 4 if c == 1 else 2 * c, args.max_tokens)
            report["served"][str(c)] = res
            print(f"served  conc. {c:>2}: {res}", flush=True)
        for c in (1, 8):
            report["overlap"]["on"][str(c)] = control_plane_cost(model, server.url, c, args.steps, args.max_tokens)
    with Server(*flags, "--no-overlap") as server:
        for c in (1, 8):
            report["overlap"]["off"][str(c)] = control_plane_cost(model, server.url, c, args.steps, args.max_tokens)
    print(json.dumps(report["overlap"]), flush=True)

    print()
    print(f"SmolLM2-135M-Instruct, {dtype}, quantization {args.quantization}, KV cache {args.kv_cache_dtype}, "
          f"{'plain torch ops' if args.no_cpu_kernels else 'our CPU kernels'}, {report['machine']['cores']} cores")
    print("| batch / concurrency | engine step (ms) | engine tok/s | " + ("HF step (ms) | HF tok/s | " if args.hf else "")
          + "served TTFT p50 (ms) | served ITL p50 (ms) | served decode tok/s | served output tok/s |")
    print("|---|---|---|" + ("---|---|" if args.hf else "") + "---|---|---|---|")
    for c in levels:
        e, s = report["engine"].get(str(c), {}), report["served"].get(str(c), {})
        hf = report.get("hf", {}).get(str(c), {})
        print(f"| {c} | {e.get('step_ms')} | {e.get('tokens_per_s')} | "
              + (f"{hf.get('step_ms')} | {hf.get('tokens_per_s')} | " if args.hf else "")
              + f"{s.get('ttft_ms_p50')} | {s.get('itl_ms_p50')} | {s.get('decode_tokens_per_s')} | {s.get('output_tokens_per_s')} |")
    print("\n| served ITL / engine step (alternated) | overlap off | overlap on |")
    print("|---|---|---|")
    for c in ("1", "8"):
        off, on = report["overlap"]["off"][c], report["overlap"]["on"][c]
        print(f"| concurrency {c} | {off['served_itl_ms']} / {off['engine_step_ms']} ms = {off['ratio']} | "
              f"{on['served_itl_ms']} / {on['engine_step_ms']} ms = {on['ratio']} |")
    save(report, args.out)


if __name__ == "__main__":
    main()
