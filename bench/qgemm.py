"""The quantized matmul alone, at each instruction-set level this CPU runs, on the default model's shapes.

`make bench-qgemm`. SmolLM2-135M's matrices (random GGUF blocks of the same types: Q4_1 layers, the Q8_0
LM head), one decode step's worth (30 layers and the head) at each row count, every kernel level this
machine can run (csrc/qlinear.cpp's table), with two threads unless --threads. Rows of 16 and more
reach the AMX tiles where the CPU has them (csrc/qgemm_amx.cpp); each level's output is checked to be
the AVX2 kernel's, bit for bit. Prints a markdown table and saves JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import time

from client import ROOT, save
from peers import machine

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K), Q4_1
HEAD = (49152, 576)  # Q8_0, the tied embedding


def timed(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "qgemm.json"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from serve.worker import native

    torch.set_num_threads(args.threads)
    k = native.load()
    if k is None:
        raise SystemExit("the CPU kernels are not available here")
    names = k.qgemm_levels()
    levels = [n for n in range(len(names)) if k.qgemm_runs(n)]
    rng = np.random.default_rng(0)
    mats = {}
    for name, (N, K) in {**SHAPES, "head": HEAD}.items():
        qtype = T.Q8_0 if name == "head" else T.Q4_1
        raw = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, qtype)
        mats[name] = (*k.repack(torch.from_numpy(raw), int(qtype), K), N, K)

    results = []
    for M in (int(r) for r in args.rows.split(",")):
        row = {"rows": M}
        for level in levels:
            layers = 0.0
            for name, (packed, fmt, N, K) in mats.items():
                x = torch.randn(M, K)
                got = k.qlinear(x, packed, fmt, None, level)
                assert torch.equal(got, k.qlinear(x, packed, fmt, None, 0)), f"{names[level]} differs from avx2 on {name}"
                seconds = timed(lambda: k.qlinear(x, packed, fmt, None, level), args.runs)
                if name == "head":
                    row[f"{names[level]}_head_ms"] = seconds * 1e3
                else:
                    layers += seconds * LAYERS
            macs = M * (LAYERS * sum(N * K for N, K in SHAPES.values()) + HEAD[0] * HEAD[1])
            row[f"{names[level]}_layers_ms"] = layers * 1e3
            row[f"{names[level]}_gmacs"] = macs / (layers + row[f"{names[level]}_head_ms"] / 1e3) / 1e9
        results.append(row)
        print(row, flush=True)

    head = "| rows | " + " | ".join(f"{names[n]}: layers + head (ms), GMAC/s" for n in levels) + " |"
    cpu = machine()
    print(f"\n{cpu['cpu']} ({', '.join(cpu['flags'])}), {args.threads} threads; one step's matmuls ({LAYERS} layers of Q4_1, the Q8_0 head)\n")
    print(head)
    print("|---" * (len(levels) + 1) + "|")
    for row in results:
        cells = [f"{row[f'{names[n]}_layers_ms']:.2f} + {row[f'{names[n]}_head_ms']:.2f}, {row[f'{names[n]}_gmacs']:.0f}" for n in levels]
        print(f"| {row['rows']} | " + " | ".join(cells) + " |")
    save({"machine": cpu, "threads": args.threads, "results": results}, args.out)


if __name__ == "__main__":
    main()
