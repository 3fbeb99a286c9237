"""The quantized matmul alone, at each instruction-set level this CPU runs, on the default model's shapes.

`make bench-qgemm`. SmolLM2-135M's matrices (random GGUF blocks of the same types: Q4_1 layers, the Q8_0
LM head), one decode step's worth (30 layers and the head) at each row count, every kernel level this
machine can run (csrc/qlinear.cpp's table), with two threads unless --threads. Rows of 16 and more
reach the AMX tiles where the CPU has them (csrc/qgemm_amx.cpp); each level's output is checked to be
the AVX2 kernel's, bit for bit. Prints a markdown table and saves JSON in bench/results/.

`--zentorch` also times AMD's zentorch (its PyTorch plugin for EPYCs with AVX-512) on the same
blocks, where it imports: it is not a dependency of ours, so install it beside torch without letting pip
resolve torch (`.venv/bin/pip install --no-deps zentorch==2.13.0.1 deprecated wrapt`; it is built for
torch 2.13.0+cpu and needs AVX-512). It has no Q4_1 or Q8_0 block format, so each Q4_1 block is given
to it exactly as signed int4 with the block's scale (q - 8) plus a per-block term (m + 8d) times the
block's sum of activations, a small float matmul of our own; the Q8_0 head as int8 per output channel
(requantized: coarser than the blocks). Its two int4 ops: `dynamic_qlinear` (activations quantized to
int8 per row, as we and llama.cpp do per block) and `woq_linear` (bfloat16 activations).
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


def zentorch_ops(raw, qtype, N: int, K: int):
    """zentorch's forms of one GGUF matrix: {op name: fn(x float32 [M, K]) -> float32 [M, N]}."""
    import numpy as np
    import torch
    import zentorch  # noqa: F401  (registers torch.ops.zentorch)
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    z = torch.ops.zentorch
    if qtype == T.Q8_0:  # the head: int8 per output channel, prepacked
        w = torch.from_numpy(dequantize(raw, qtype).reshape(N, K).astype(np.float32))
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        q8 = z.zentorch_weight_prepack_for_dynamic_qlinear(torch.round(w / scale[:, None]).to(torch.int8))
        return {"dynamic_qlinear": lambda x: z.zentorch_dynamic_qlinear(x, q8, scale, is_weight_prepacked=True)}
    blocks = raw.reshape(N, K // 32, 20)  # Q4_1: f16 d, f16 m, 16 bytes of nibbles (low: 0-15, high: 16-31)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(N, K).astype(np.int8)
    packed = z.zentorch_woq_repack_weight(torch.from_numpy(q - 8))  # [N, K/8] int32
    scales = torch.from_numpy(d).t().contiguous()  # [K/32, N]
    term = torch.from_numpy(m + 8 * d).t().contiguous()  # what (q - 8) * d leaves out of d * q + m

    def add_term(y, x):
        return torch.addmm(y.float(), x.view(x.shape[0], K // 32, 32).sum(-1), term)

    return {
        "dynamic_qlinear": lambda x: add_term(z.zentorch_dynamic_qlinear(x.bfloat16(), packed, scales), x),
        "woq_linear": lambda x: add_term(z.zentorch_woq_linear(x.bfloat16(), packed.t(), scales, None), x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--zentorch", action="store_true", help="also time zentorch's int4/int8 ops (see above)")
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
    mats, zen = {}, {}
    for name, (N, K) in {**SHAPES, "head": HEAD}.items():
        qtype = T.Q8_0 if name == "head" else T.Q4_1
        raw = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, qtype)
        mats[name] = (*k.repack(torch.from_numpy(raw), int(qtype), K), N, K)
        if args.zentorch:
            zen[name] = zentorch_ops(raw, qtype, N, K)
    zen_ops = ["dynamic_qlinear", "woq_linear"] if args.zentorch else []

    def one_step(row: dict, column: str, M: int, matmul, check) -> None:
        """One step's matmuls through matmul(name, x, packed, fmt), each checked by check(name, got, ours)."""
        layers = 0.0
        for name, (packed, fmt, N, K) in mats.items():
            x = torch.randn(M, K)
            check(name, matmul(name, x, packed, fmt), k.qlinear(x, packed, fmt, None, 0))
            seconds = timed(lambda: matmul(name, x, packed, fmt), args.runs)
            if name == "head":
                row[f"{column}_head_ms"] = seconds * 1e3
            else:
                layers += seconds * LAYERS
        macs = M * (LAYERS * sum(N * K for N, K in SHAPES.values()) + HEAD[0] * HEAD[1])
        row[f"{column}_layers_ms"] = layers * 1e3
        row[f"{column}_gmacs"] = macs / (layers + row[f"{column}_head_ms"] / 1e3) / 1e9

    def same_bits(column: str):
        def check(name, got, ours):
            assert torch.equal(got, ours), f"{column} differs from avx2 on {name}"
        return check

    def close(column: str):  # zentorch against our AVX2 kernel: the same blocks, both within int8 rounding
        def check(name, got, ours):
            err = ((got.float() - ours).norm() / ours.norm()).item()
            assert err < 0.05, f"{column} is {err:.3f} away from our kernel on {name}"
        return check

    results = []
    for M in (int(r) for r in args.rows.split(",")):
        row = {"rows": M}
        for level in levels:
            one_step(row, names[level], M, lambda name, x, packed, fmt: k.qlinear(x, packed, fmt, None, level),
                     same_bits(names[level]))
        for op in zen_ops:
            one_step(row, f"zentorch_{op}", M, lambda name, x, packed, fmt: zen[name].get(op, zen[name]["dynamic_qlinear"])(x),
                     close(f"zentorch {op}"))
        results.append(row)
        print(row, flush=True)

    columns = [names[n] for n in levels] + [f"zentorch_{op}" for op in zen_ops]
    head = "| rows | " + " | ".join(f"{c}: layers + head (ms), GMAC/s" for c in columns) + " |"
    cpu = machine()
    print(f"\n{cpu['cpu']} ({', '.join(cpu['flags'])}), {args.threads} threads; one step's matmuls ({LAYERS} layers of Q4_1, the Q8_0 head)\n")
    print(head)
    print("|---" * (len(columns) + 1) + "|")
    for row in results:
        cells = [f"{row[f'{c}_layers_ms']:.2f} + {row[f'{c}_head_ms']:.2f}, {row[f'{c}_gmacs']:.0f}" for c in columns]
        print(f"| {row['rows']} | " + " | ".join(cells) + " |")
    save({"machine": cpu, "threads": args.threads, "results": results}, args.out)


if __name__ == "__main__":
    main()
