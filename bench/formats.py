"""Each way of running the default model, side by side: memory, perplexity, an answer, a step's time.

`make bench-formats`. For each format a launched server (the default config plus the format's flags):
- the worker's resident memory once loaded (its banner's `rss_mb`, the KV pool included) and the
  weights' bytes (`weights=`);
- perplexity on a fixed English text, scored through the API (`echo` with `logprobs`, as
  lm-evaluation-harness does), and its ratio to the float32 reference's;
- the greedy completion of "The capital of France is";
- inter-token latency at one stream (`serve bench`, 64-token prompts, 128 tokens).
Prints a markdown table and saves JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from client import CONFIG, NAME, ROOT, save

from tests.server import Server
from tests.test_smollm2 import TEXT

FORMATS = {
    "default (GGUF Q4_1 + Q8_0 blocks, int8 KV)": [],
    "default with a float16 KV cache": ["--kv-cache-dtype", "float16"],
    "float32 reference (dequantized, float32 KV)": ["--dtype", "float32", "--quantization", "none"],
    "int8 (Q8_0 blocks made from the dequantized weights)": ["--quantization", "int8"],
    "bfloat16 weights (dequantized), float32 activations": ["--dtype", "bfloat16", "--quantization", "none"],
    "default, kernels capped at AVX2": ["--cpu-isa", "avx2"],
}


def perplexity(server: Server) -> float:
    reply = server.client().completions.create(model=NAME, prompt=TEXT, max_tokens=0, echo=True, logprobs=0)
    logprobs = [lp for lp in reply.choices[0].logprobs.token_logprobs if lp is not None]
    return math.exp(-sum(logprobs) / len(logprobs))


def itl_ms(server: Server) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "serve.cli", "bench", "--base-url", server.url, "--concurrency", "1", "--num-prompts", "4",
                        "--input-len", "64", "--output-len", "128", "--ignore-eos", "--temperature", "0", "--warmup", "1", "--no-progress", "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["summary"]["itl_ms"]["p50"]


def measure(flags: list[str]) -> dict:
    with Server("--config", CONFIG, *flags) as server:
        banner = next(line for line in server.read_log().splitlines() if "serve:worker-0" in line)
        fields = dict(re.findall(r"(\w+)=(\S+)", banner))
        answer = server.client().completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
        return {"flags": flags, "rss_mb": int(fields["rss_mb"]), "kv_mb": int(fields["kv_mb"]), "weights": fields["weights"],
                "matmul": fields["matmul"], "isa": fields["isa"], "perplexity": round(perplexity(server), 3),
                "answer": answer.choices[0].text.strip().splitlines()[0], "itl_ms_p50": itl_ms(server)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "formats.json"))
    args = p.parse_args()
    results = {}
    for name, flags in FORMATS.items():
        results[name] = measure(flags)
        print(name, results[name], flush=True)
    reference = results["float32 reference (dequantized, float32 KV)"]["perplexity"]
    print("\n| format | weights | worker RSS (MiB), KV pool incl. | perplexity | vs float32 | \"The capital of France is\" | ITL p50 at 1 stream (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['weights']} | {r['rss_mb']} ({r['kv_mb']} KV) | {r['perplexity']} | {r['perplexity'] / reference - 1:+.2%} | "
              f"{r['answer']} | {r['itl_ms_p50']} |")
    save(results, args.out)


if __name__ == "__main__":
    main()
