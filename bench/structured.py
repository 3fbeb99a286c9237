"""What structured outputs cost: compile time, the mask's cost per step, and served throughput with grammars.

`make bench-structured`. Three parts:
- compile: a small and a large JSON schema turned into a grammar and checked (the tokenizer's work), then a
  matcher built (the scheduler's pool thread), first and from the cache (a copy);
- mask per step at 1 and 32 constrained rows: llguidance's compute_bitmask for each row (the scheduler) and
  our apply_bitmask on the batch's logits (the worker's sampler);
- served: the default config at 32 streams, all free text, then half of them with a JSON schema; output
  tokens/s of each load, with overlap off (the default config) and on.
Prints markdown tables and saves JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from client import CONFIG, NAME, model_info, save

from tests.server import Server

SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                          "city": {"type": "string", "maxLength": 40}}, "required": ["name", "age", "city"], "additionalProperties": False}


def large_schema(n: int = 80) -> dict:
    """~n properties of every kind: nested objects, enums, patterns, arrays, optional fields."""
    props = {}
    for i in range(n):
        kind = i % 5
        props[f"field_{i}"] = [
            {"type": "string", "maxLength": 20 + i},
            {"enum": [f"v{i}_{j}" for j in range(8)]},
            {"type": "string", "pattern": f"[a-z]{{{1 + i % 7}}}-[0-9]{{2,4}}"},
            {"type": "array", "items": {"type": "integer", "minimum": -i, "maximum": 1000 + i}, "maxItems": 5},
            {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "boolean"}, "tag": {"enum": ["a", "b", "c"]}},
             "required": ["x"], "additionalProperties": False},
        ][kind]
    return {"type": "object", "properties": props, "required": [f"field_{i}" for i in range(0, n, 2)], "additionalProperties": False}


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, value


def compile_costs(vocab) -> list[dict]:
    from llguidance import LLMatcher

    from serve.constraints import Constraint, check

    rows = []
    for name, schema in [("small (3 fields)", SMALL), ("large (80 fields)", large_schema())]:
        c = Constraint("json_schema", schema, "response_format")
        check_ms, grammar = timed(lambda: check(c, vocab))
        first_ms, matcher = timed(lambda: _first_mask(LLMatcher(vocab, grammar, log_level=0)))
        cached_ms, _ = timed(lambda: _first_mask(matcher.deep_copy()), repeat=5)
        rows.append({"schema": name, "spec_bytes": len(json.dumps(schema)), "check_ms": round(check_ms, 2),
                     "first_build_and_mask_ms": round(first_ms, 2), "cached_copy_and_mask_ms": round(cached_ms, 3)})
    return rows


def _first_mask(matcher):
    matcher.compute_bitmask()
    return matcher


def mask_costs(vocab, hf_dir: str) -> list[dict]:
    """Per step, the masks of R rows writing the same JSON (the worst case: every row constrained)."""
    import torch
    from llguidance import LLMatcher
    from tokenizers import Tokenizer

    from serve.constraints import Constraint, check
    from serve.worker import native

    kernels = native.load() if native.cpu_supported() else None
    grammar = check(Constraint("json_schema", SMALL, "response_format"), vocab)
    text = json.dumps({"name": "Ada Lovelace", "age": 36, "city": "London"}, separators=(",", ":"))
    tokens = Tokenizer.from_file(f"{hf_dir}/tokenizer.json").encode(text, add_special_tokens=False).ids
    rows = []
    for r in (1, 32):
        matchers = [LLMatcher(vocab, grammar, log_level=0) for _ in range(r)]
        per_step = []
        masks = None
        for token in tokens:
            t = time.perf_counter()
            masks = [m.compute_bitmask() for m in matchers]
            per_step.append(time.perf_counter() - t)
            for m in matchers:
                m.consume_token(token)
        V = vocab.vocab_size
        logits = torch.randn(r, V)
        bits = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.uint8).view(r, -1)
        rows_t = torch.arange(r)
        apply_ms = float("nan")
        if kernels is not None:
            apply_ms, _ = timed(lambda: kernels.apply_bitmask(logits, rows_t, bits), repeat=50)
        rows.append({"rows": r, "compute_bitmask_ms_p50": round(statistics.median(per_step) * 1e3, 3),
                     "compute_bitmask_ms_max": round(max(per_step) * 1e3, 3), "apply_bitmask_ms": round(apply_ms, 3),
                     "steps": len(tokens)})
    return rows


# Sized to end within the 128-token budget most of the time (~4 characters a token).
STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string", "minLength": 80, "maxLength": 280},
                                          "moral": {"type": "string", "maxLength": 60}}, "required": ["title", "story", "moral"], "additionalProperties": False}


async def load(url: str, streams: int, rounds: int, grammar_share: float) -> dict:
    """`streams` clients, each sending `rounds` requests back to back; the first grammar_share of them ask
    for JSON that fits STORY. Output tokens/s over the whole run."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int, k: int) -> dict:
            body = {"model": NAME, "prompt": f"Tale {i}-{k}. Write a short story about a lighthouse keeper.", "max_tokens": 128, "temperature": 0.7, "seed": i * 100 + k}
            if i < grammar_share * streams:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY}}
            else:
                body["ignore_eos"] = True
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()

        async def worker(i: int) -> list[dict]:
            return [await one(i, k) for k in range(rounds)]

        await one(0, -1)  # warm up (and compile STORY once)
        start = time.perf_counter()
        replies = [r for rs in await asyncio.gather(*(worker(i) for i in range(streams))) for r in rs]
        elapsed = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    constrained = [r for i, r in enumerate(replies) if i // rounds < grammar_share * streams]
    valid = sum(1 for r in constrained if _parses(r["choices"][0]["text"]))
    return {"output_tok_s": round(tokens / elapsed, 1), "tokens": tokens, "seconds": round(elapsed, 1),
            "json_replies": len(constrained), "json_valid": valid,
            "json_cut_by_max_tokens": sum(1 for r in constrained if r["choices"][0]["finish_reason"] == "length")}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def served(streams: int, rounds: int, overlaps: list[bool]) -> list[dict]:
    rows = []
    for overlap in overlaps:
        with Server("--config", CONFIG, "--set", f"engine.overlap={str(overlap).lower()}") as server:
            free = asyncio.run(load(server.url, streams, rounds, 0.0))
            half = asyncio.run(load(server.url, streams, rounds, 0.5))
        rows.append({"overlap": overlap, "free": free, "half_json": half, "ratio": round(half["output_tok_s"] / free["output_tok_s"], 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="requests per stream")
    p.add_argument("--overlap", default="false,true", help="overlap settings to serve with")
    p.add_argument("--out", default="bench/results/structured.json")
    args = p.parse_args()

    from serve.constraints import vocabulary

    info = model_info()
    vocab = vocabulary(info.hf_dir, info.eos_token_ids)
    report = {"compile": compile_costs(vocab), "mask": mask_costs(vocab, info.hf_dir),
              "served": served(args.streams, args.rounds, [o == "true" for o in args.overlap.split(",")])}
    print("\n| schema | bytes | check (tokenizer) | first build + mask | cached copy + mask |\n|---|---|---|---|---|")
    for r in report["compile"]:
        print(f"| {r['schema']} | {r['spec_bytes']:,} | {r['check_ms']} ms | {r['first_build_and_mask_ms']} ms | {r['cached_copy_and_mask_ms']} ms |")
    print("\n| constrained rows | compute_bitmask per step p50 (max) | apply_bitmask per step |\n|---|---|---|")
    for r in report["mask"]:
        print(f"| {r['rows']} | {r['compute_bitmask_ms_p50']} ms ({r['compute_bitmask_ms_max']} ms) | {r['apply_bitmask_ms']} ms |")
    print(f"\n| overlap | {args.streams} streams free text, output tok/s | half with a JSON schema, output tok/s | ratio | JSON replies valid / cut by max_tokens |\n|---|---|---|---|---|")
    for r in report["served"]:
        h = r["half_json"]
        print(f"| {'on' if r['overlap'] else 'off'} | {r['free']['output_tok_s']} | {h['output_tok_s']} | {r['ratio']:.2f} | "
              f"{h['json_valid']}/{h['json_replies']} valid, {h['json_cut_by_max_tokens']} cut |")
    save(report, args.out)


if __name__ == "__main__":
    main()
