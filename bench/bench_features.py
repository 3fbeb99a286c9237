"""Benchmark: the prefix cache and chunked prefill, on SmolLM2 served end to end.

1. Prefix cache: successive chat requests share a ~1,000-token system prompt. TTFT of the first (cold)
   request against the later ones, with the cache on and off.
2. Chunked prefill: 8 streams decode; their inter-token latency (p99) while quiet, then while a
   ~4,000-token prompt arrives, with chunked prefill on and off.

Prints a markdown table and saves everything as JSON (bench/results/features.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from client import CONFIG, ROOT, gaps, model_dir, save, stream, summary_ms

from tests.server import Server

SUBJECTS = ["the router", "a dealer", "the broker", "each worker", "the scheduler", "a subscriber", "the tokenizer", "the api"]
VERBS = ["forwards", "queues", "drops", "batches", "routes", "answers", "retries", "logs"]
OBJECTS = ["every request", "the next message", "a late reply", "the token ids", "an idle peer", "the whole batch"]


def text_of(tokenizer, n_tokens: int, seed: int) -> str:
    """Deterministic English-like rules of about n tokens (filler the model still reads as text)."""
    rules = [f"Rule {seed}.{i}: {SUBJECTS[(i * 3 + seed) % 8]} {VERBS[(i * 5 + seed) % 8]} {OBJECTS[(i * 7 + seed) % 6]}."
             for i in range(n_tokens // 4)]
    ids = tokenizer.encode(" ".join(rules))[:n_tokens]
    return tokenizer.decode(ids)


async def prefix_round(url: str, system: str, questions: list[str]) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream(client, {"prompt": "warm up", "max_tokens": 2})
        ttfts = []
        for q in questions:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            ttfts.append((await stream(client, {"messages": messages, "max_tokens": 8, "ignore_eos": True}, "/v1/chat/completions"))["ttft"])
        stats = (await client.get("/stats")).json()
    first, later = ttfts[0], statistics.median(ttfts[1:])
    return {"first_ttft_ms": round(first * 1000, 1), "later_ttft_ms_p50": round(later * 1000, 1),
            "speedup": round(first / later, 2), "cache_hit_tokens": stats.get("cache_hit_tokens", 0),
            "ttfts_ms": [round(t * 1000, 1) for t in ttfts]}


async def chunk_round(url: str, long_prompt: str, streams: int = 8, quiet_s: float = 4.0) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream(client, {"prompt": "warm up", "max_tokens": 2})
        stamps: list[list[float]] = [[] for _ in range(streams)]
        body = {"max_tokens": 4000, "ignore_eos": True}
        tasks = [asyncio.create_task(stream(client, {"prompt": f"Stream {i}: tell me a long story about the sea.", **body},
                                            stamps=stamps[i])) for i in range(streams)]
        await asyncio.sleep(3.0)  # every stream past its first token
        quiet = (time.perf_counter(), time.perf_counter() + quiet_s)
        await asyncio.sleep(quiet_s)
        long = await stream(client, {"prompt": long_prompt, "max_tokens": 1})
        busy = (long["start"], long["stamps"][-1])
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def within(window: tuple[float, float]) -> list[float]:
        # A gap counts for the window its end falls in: the wait a reader of that stream saw.
        return [g for s in stamps for g, end in zip(gaps(s), s[1:]) if window[0] <= end <= window[1] + 0.5]

    q, b = summary_ms(within(quiet)), summary_ms(within(busy))
    return {"quiet_itl_ms": q, "busy_itl_ms": b, "p99_ratio": round(b["p99"] / q["p99"], 2),
            "long_prompt_ttft_ms": round(long["ttft"] * 1000, 1)}


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print()


def print_table(report: dict) -> None:
    print()
    if "prefix_cache" in report:
        table(["prefix cache", "first TTFT (ms)", "later TTFT p50 (ms)", "first / later"],
              [[m, r["first_ttft_ms"], r["later_ttft_ms_p50"], r["speedup"]] for m, r in report["prefix_cache"].items()])
    if "chunked_prefill" in report:
        table(["prefill", "ITL p99 quiet (ms)", "ITL p99 while a long prompt arrives (ms)", "ratio", "long prompt TTFT (ms)"],
              [[m, r["quiet_itl_ms"]["p99"], r["busy_itl_ms"]["p99"], r["p99_ratio"], r["long_prompt_ttft_ms"]]
               for m, r in report["chunked_prefill"].items()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--long-tokens", type=int, default=4000)
    p.add_argument("--chunk", type=int, default=0, help="chunked_prefill_tokens for the chunked run (0: the config's)")
    p.add_argument("--only", choices=["prefix", "chunked"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "features.json"))
    args = p.parse_args()
    from serve.text import TextTokenizer

    tokenizer = TextTokenizer(model_dir())
    report: dict = {"model": "SmolLM2-135M-Instruct"}
    if args.only != "chunked":
        questions = [f"Question {i}: which socket type fits a work queue, and why?" for i in range(9)]
        report["prefix_cache"] = {}
        for mode, flags in (("on", []), ("off", ["--no-prefix-cache"])):
            with Server("--config", CONFIG, *flags) as server:
                res = asyncio.run(prefix_round(server.url, text_of(tokenizer, args.system_tokens, 1), questions))
            report["prefix_cache"][mode] = res
            print(f"prefix cache {mode}: {res}", flush=True)
    if args.only != "prefix":
        long_prompt = text_of(tokenizer, args.long_tokens, 2)
        report["chunked_prefill"] = {}
        chunk_flags = ["--chunked-prefill-tokens", str(args.chunk)] if args.chunk else []
        for mode, flags in (("chunked", chunk_flags), ("unchunked", ["--chunked-prefill-tokens", "0"])):
            with Server("--config", CONFIG, "--no-prefix-cache", *flags) as server:
                res = asyncio.run(chunk_round(server.url, long_prompt))
            report["chunked_prefill"][mode] = res
            print(f"{mode}: {json.dumps(res)}", flush=True)
    print_table(report)
    save(report, args.out)


if __name__ == "__main__":
    main()
