"""Soak: thousands of mixed requests against one launched server, then nothing may be left behind.

A warm-up round, then 2,000 requests (by default) at concurrency 32 with random sampling parameters
(temperature, top_p, top_k, min_p, penalties, seed, stop strings, logprobs, n up to 2), chat and
completions, streaming or not; 10% of the clients hang up mid-stream. It checks that:

- every request that stayed connected got a 200 whose `usage` adds up (total = prompt + completion,
  completion <= n * max_tokens, exactly max_tokens for a choice that ended on "length"), with one
  finish_reason per choice, "stop" or "length", and a stream that ends in `data: [DONE]`;
- afterwards `/stats` shows nothing running, nothing waiting and 0 pool_tokens_used (the hung-up
  requests were aborted and their KV freed);
- the resident memory (VmRSS) of every `serve:*` process grew by less than 10% from the end of the
  warm-up to the end of the run.

By default it serves the tiny random model the tests build (tests/tiny_model.py) from a temporary
folder, with a KV pool small enough that the prefix cache is full (and evicting) by the end of the
warm-up; `--config configs/smollm2-135m-instruct.yaml` soaks a real model (add `--server-args
'--kv-pool-tokens N'` for the same effect). Prints markdown tables and
saves JSON to bench/results/soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx

from client import ROOT

from tests.server import Server

PROMPTS = [
    "The quick brown fox", "What is the capital of France?", "Once upon a time there was",
    "Hello, world! This is", "def add(a, b):", "A small server that spoke ZeroMQ",
    "Write a haiku about message queues.", "List three colours:",
]
STOPS = [".", "\n", "the", "e", " a", "!", "ZeroMQ"]
RSS_GROWTH_LIMIT = 0.10


def serve_processes(server: Server) -> dict[str, int]:
    """title -> pid of the launcher and each child whose process title is serve:*."""
    found = {}
    for pid in [server.proc.pid, *server.children]:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
        except OSError:
            continue
        if title.startswith("serve:"):
            found[title] = pid
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def make_request(rng: random.Random, model: str, max_tokens: int, hang_up: bool) -> dict:
    """One random request: where it goes, its body, and after how many chunks its client hangs up."""
    chat = rng.random() < 0.5
    body: dict = {"model": model, "n": rng.choice([1, 1, 2]), "max_tokens": rng.randint(1, max_tokens)}
    if chat:
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You are terse."})
        body["messages"] = messages
    else:
        body["prompt"] = rng.choice(PROMPTS)
    body["temperature"] = 0.0 if rng.random() < 0.3 else round(rng.uniform(0.1, 1.5), 2)
    optional = {
        "top_p": lambda: round(rng.uniform(0.3, 1.0), 2),
        "top_k": lambda: rng.choice([-1, 1, 5, 40]),
        "min_p": lambda: round(rng.uniform(0.0, 0.3), 2),
        "presence_penalty": lambda: round(rng.uniform(-1.0, 1.0), 2),
        "frequency_penalty": lambda: round(rng.uniform(-1.0, 1.0), 2),
        "repetition_penalty": lambda: round(rng.uniform(0.8, 1.5), 2),
        "seed": lambda: rng.randint(0, 2**31),
        "stop": lambda: rng.sample(STOPS, rng.randint(1, 3)),
    }
    for key, value in optional.items():
        if rng.random() < 0.3:
            body[key] = value()
    if rng.random() < 0.3:
        if chat:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
        else:
            body["logprobs"] = rng.randint(0, 5)
    stream = hang_up or rng.random() < 0.5
    if stream:
        body["stream"], body["stream_options"] = True, {"include_usage": True}
    hang_up_after = None
    if hang_up:
        # Long enough to be still running when the client goes.
        body.update(max_tokens=max(48, max_tokens), ignore_eos=True)
        body.pop("stop", None)
        hang_up_after = rng.randint(1, 4)
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "hang_up_after": hang_up_after}


def check_usage(usage: dict, choices: list[dict], body: dict) -> None:
    n, budget = body["n"], body["max_tokens"]
    assert sorted(c["index"] for c in choices) == list(range(n)), f"choices {[c['index'] for c in choices]} for n={n}"
    reasons = [c["finish_reason"] for c in choices]
    assert all(r in ("stop", "length") for r in reasons), f"finish_reason {reasons}"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], f"usage {usage}"
    assert usage["prompt_tokens"] > 0, f"usage {usage}"
    low, high = reasons.count("length") * budget, n * budget
    assert low <= usage["completion_tokens"] <= high, f"completion_tokens {usage['completion_tokens']} not in [{low}, {high}] ({reasons})"


def check_whole(data: dict, body: dict) -> None:
    check_usage(data["usage"], data["choices"], body)


def check_stream(lines: list[str], body: dict, chat: bool) -> None:
    assert lines and lines[-1] == "data: [DONE]", f"stream ends with {lines[-1:]!r}"
    assert all(line.startswith("data: ") for line in lines), "a line that is not data:"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks and chunks[-1]["choices"] == [] and "usage" in chunks[-1], "no usage chunk at the end"
    finished: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for c in chunk["choices"]:
            if c.get("finish_reason"):
                assert c["index"] not in finished, f"choice {c['index']} finished twice"
                finished[c["index"]] = c["finish_reason"]
    if chat:
        roles = {c["index"] for chunk in chunks[:-1] for c in chunk["choices"] if c["delta"].get("role") == "assistant"}
        assert roles == set(range(body["n"])), f"role deltas for {sorted(roles)}"
    check_usage(chunks[-1]["usage"], [{"index": i, "finish_reason": r} for i, r in sorted(finished.items())], body)


async def run_one(client: httpx.AsyncClient, spec: dict) -> dict:
    """Sends one request; its outcome: completed, hung_up or error (with why)."""
    path, body = spec["path"], spec["body"]
    started = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return {"outcome": "error", "why": f"HTTP {r.status_code}: {r.text[:200]}"}
            check_whole(r.json(), body)
            return {"outcome": "completed", "s": time.perf_counter() - started, "usage": r.json()["usage"]}
        lines, content_chunks = [], 0
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"outcome": "error", "why": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if spec["hang_up_after"] is not None and line != "data: [DONE]":
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    content_chunks += bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
                    if content_chunks >= spec["hang_up_after"]:
                        # Leaving the block unread closes the connection: the server sees a disconnect.
                        return {"outcome": "hung_up", "s": time.perf_counter() - started}
        check_stream(lines, body, path.endswith("chat/completions"))
        usage = json.loads(lines[-2][6:])["usage"]
        return {"outcome": "completed", "s": time.perf_counter() - started, "usage": usage,
                "finished_before_hang_up": spec["hang_up_after"] is not None}
    except AssertionError as e:
        return {"outcome": "error", "why": f"check: {e}"}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        return {"outcome": "error", "why": f"{type(e).__name__}: {e}"}


async def run_phase(client: httpx.AsyncClient, specs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """Runs `specs` with `concurrency` clients, each taking the next request when its last one ends."""
    results: list[dict | None] = [None] * len(specs)
    todo = iter(range(len(specs)))

    async def worker() -> None:
        for i in todo:
            results[i] = {**await run_one(client, specs[i]), "path": specs[i]["path"], "body": specs[i]["body"]}

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 30.0) -> tuple[dict, float]:
    """Polls /stats until nothing runs, waits or holds KV; returns the last stats and the wait."""
    started = time.perf_counter()
    while True:
        stats = (await client.get("/stats")).json()
        idle = stats["running"] == 0 and stats["waiting"] == 0 and stats["pool_tokens_used"] == 0
        if idle or time.perf_counter() - started > timeout_s:
            return stats, time.perf_counter() - started
        await asyncio.sleep(0.2)


def summarize(name: str, results: list[dict], seconds: float) -> dict:
    completed = [r for r in results if r["outcome"] == "completed"]
    errors = [r for r in results if r["outcome"] == "error"]
    return {
        "phase": name, "requests": len(results), "completed": len(completed),
        "hung_up": sum(r["outcome"] == "hung_up" for r in results),
        "hung_up_choices": sum(r["body"]["n"] for r in results if r["outcome"] == "hung_up"),  # each one aborted
        "finished_before_hang_up": sum(bool(r.get("finished_before_hang_up")) for r in completed),
        "errors": len(errors), "seconds": round(seconds, 1), "requests_per_s": round(len(results) / seconds, 1),
        "completion_tokens": sum(r["usage"]["completion_tokens"] for r in completed),
        "streamed": sum(bool(r["body"].get("stream")) for r in results),
        "chat": sum(r["path"].endswith("chat/completions") for r in results),
        "error_samples": [{"why": r["why"], "path": r["path"], "body": r["body"]} for r in errors[:20]],
    }


async def soak(server: Server, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=args.request_timeout, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        def specs(count: int) -> list[dict]:
            return [make_request(rng, model, args.max_tokens, rng.random() < args.hang_up) for _ in range(count)]

        processes = serve_processes(server)
        peaks = {title: 0.0 for title in processes}
        done = asyncio.Event()

        async def sample_rss() -> None:
            while not done.is_set():
                for title, pid in processes.items():
                    peaks[title] = max(peaks[title], rss_mib(pid) or 0.0)
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_rss())
        warm, warm_s = await run_phase(client, specs(args.warmup), args.concurrency)
        warm_stats, _ = await wait_idle(client)
        before = {title: rss_mib(pid) for title, pid in processes.items()}
        main, main_s = await run_phase(client, specs(args.requests), args.concurrency)
        final_stats, idle_wait_s = await wait_idle(client)
        after = {title: rss_mib(pid) for title, pid in processes.items()}
        done.set()
        await sampler
    rss = {title: {"pid": processes[title], "after_warmup_mib": round(before[title], 1), "end_mib": round(after[title], 1),
                   "peak_mib": round(max(peaks[title], after[title]), 1), "growth": round(after[title] / before[title] - 1, 4)}
           for title in sorted(processes) if before[title] and after[title]}
    phases = [summarize("warm-up", warm, warm_s), summarize("soak", main, main_s)]
    checks = {
        "no errors": all(p["errors"] == 0 for p in phases),
        "idle afterwards (running 0, waiting 0, pool_tokens_used 0)":
            final_stats["running"] == 0 and final_stats["waiting"] == 0 and final_stats["pool_tokens_used"] == 0,
        f"every serve:* RSS grew < {RSS_GROWTH_LIMIT:.0%}": len(rss) == len(processes) and
            all(r["growth"] < RSS_GROWTH_LIMIT for r in rss.values()),
    }
    return {"phases": phases, "stats_after_warmup": warm_stats, "final_stats": final_stats,
            "idle_wait_s": round(idle_wait_s, 2), "rss": rss, "checks": checks}


def print_report(report: dict) -> None:
    print("\n| phase | requests | completed | hung up | finished before hang-up | errors | streamed | chat | s | req/s | completion tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in report["phases"]:
        print(f"| {p['phase']} | {p['requests']} | {p['completed']} | {p['hung_up']} | {p['finished_before_hang_up']} | "
              f"{p['errors']} | {p['streamed']} | {p['chat']} | {p['seconds']} | {p['requests_per_s']} | {p['completion_tokens']} |")
    print("\n| process | pid | RSS after warm-up (MiB) | RSS at end (MiB) | peak (MiB) | growth |")
    print("|---|---|---|---|---|---|")
    for title, r in report["rss"].items():
        print(f"| {title} | {r['pid']} | {r['after_warmup_mib']} | {r['end_mib']} | {r['peak_mib']} | {r['growth']:+.1%} |")
    stats = report["final_stats"]
    print(f"\nfinal /stats (idle after {report['idle_wait_s']} s): " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    print(f"choices hung up on: {sum(p['hung_up_choices'] for p in report['phases'])} (the scheduler's `aborted` counts them)")
    for p in report["phases"]:
        for e in p["error_samples"][:5]:
            print(f"error ({p['phase']}): {e['why']}\n    POST {e['path']} {json.dumps(e['body'])}")
    print()
    for name, ok in report["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a model config to soak (default: the tests' tiny random model)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=400, help="requests before the RSS baseline")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hang-up", type=float, default=0.10, help="share of clients that leave mid-stream")
    parser.add_argument("--max-tokens", type=int, default=32, help="budgets are drawn from 1..this")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="more `serve launch` flags, e.g. '--kv-pool-tokens 4096'")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        if args.config:
            flags = ["--config", args.config]
        else:
            from tests.tiny_model import build_tiny_llama

            # A pool the prefix cache fills during the warm-up: growth after it is then a leak, not the
            # cache taking the room it is allowed.
            flags = ["--model", str(build_tiny_llama(Path(tmp) / "tiny-llama")), "--served-name", "tiny-llama",
                     "--dtype", "float32", "--kv-pool-tokens", "8192"]
        with Server(*flags, *shlex.split(args.server_args)) as server:
            report = asyncio.run(soak(server, args))
            report["server_log_tail"] = server.read_log()[-2000:]
    report["args"] = vars(args)
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {args.out}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
