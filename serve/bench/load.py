"""`serve bench`: load on any OpenAI-compatible endpoint (ours, vLLM, SGLang, llama.cpp's server).

Streaming requests at a concurrency cap and/or a Poisson request rate, as vLLM's `bench serve` and SGLang's
bench_serving send them, with the same measures: TTFT, ITL, TPOT and end-to-end latency, request and
token throughput. The prompts (random words cut to an exact token length, or lines of a file) come from
prompts.py; this file sends the requests, times them and reports.

The client is aiohttp on uvloop, as vLLM's `bench serve` sends with aiohttp: it shares the two cores with
the server it measures, and every CPU second it takes is one the server's workers wait for. At 32 streams
on a 2-vCPU Xeon httpx on asyncio took 2.25 s of CPU for 128 requests of 128 streamed tokens, aiohttp
on uvloop 0.9 s, and the server we measured gave 3-5% more tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from serve.bench.prompts import BenchError, file_prompts, synthetic_prompts

if TYPE_CHECKING:
    import aiohttp

ERRORS_SHOWN = 5


@dataclasses.dataclass
class Record:
    """One timed request. Times in seconds; `start` from the beginning of the run."""
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None


def _positive_int(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def _count(s: str) -> int:
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count (0 or more), got {s!r}")
    return int(s)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or inf, got {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, with or without /v1 (default %(default)s)")
    p.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions (default %(default)s)")
    p.add_argument("--num-prompts", type=_positive_int, help="requests to time (default 100, or one per prompt of --prompt-file)")
    p.add_argument("--concurrency", type=_positive_int, help="at most this many requests in flight (default: no cap)")
    p.add_argument("--request-rate", type=_positive_float, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends all at once, within --concurrency (default inf)")
    p.add_argument("--input-len", type=_positive_int, default=128,
                   help="prompt tokens of the synthetic prompts, as the server counts them (for chat, the templated prompt) "
                        "when it has /tokenize (default %(default)s)")
    p.add_argument("--output-len", type=_positive_int, default=128, help="max_tokens of every request (default %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (ours, vLLM, SGLang), so every answer has --output-len tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--prompt-file", type=Path, help="prompts instead of synthetic ones: one per line, or JSONL with a \"prompt\" field")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and the arrival times (default %(default)s)")
    p.add_argument("--warmup", type=_count, default=0, metavar="N",
                   help="untimed requests before the run, synthetic ones with prompts of their own (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds a request may take (default %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="save the config, summary and every request's record")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    p.epilog = ("TTFT: until the first chunk with text. ITL: the gaps between chunks with text, pooled over all requests "
                "(vLLM's convention: a chunk holding several tokens is one gap). TPOT: per request, (E2E - TTFT) / "
                "(output tokens - 1). Token counts come from the stream's usage (stream_options.include_usage), else "
                "from the chunks with text. The exit code is 1 when the server is unreachable or every request failed.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop  # here, not at the top: every `serve` command builds this parser

        return uvloop.run(bench(args))
    except BenchError as e:
        print(f"serve bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serve bench: interrupted", file=sys.stderr)
        return 130


async def bench(args: argparse.Namespace) -> int:
    import aiohttp
    from tqdm import tqdm

    base = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # A connection per request (force_close): aiohttp, unlike httpx, does not retry a request on a pooled
    # connection the server has just closed, and llama-server closes idle ones ("Can not write request
    # body" for ~10% of its requests at 16 and 32 streams). A new localhost connection costs ~0.1 ms.
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8 if args.concurrency else 0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=min(args.timeout, 10.0))
    # read_bufsize: the longest line (one SSE event) aiohttp takes, 1 MiB
    async with aiohttp.ClientSession(base, headers=headers, connector=connector, timeout=timeout,
                                     read_bufsize=1 << 20) as client:
        model = await pick_model(client, base, args.model)
        if args.prompt_file:
            prompts = file_prompts(args.prompt_file, args.num_prompts, args.warmup)
        else:
            prompts = await synthetic_prompts(client, model, args, (args.num_prompts or 100) + args.warmup)
        n = len(prompts.texts) - args.warmup
        send = Sender(client, model, args)
        if args.warmup:
            print(f"serve bench: warming up: {args.warmup} untimed requests", file=sys.stderr)
            await dispatch(prompts.texts[n:], send, math.inf, args.concurrency, random.Random(), lambda _: None)
        bar = tqdm(total=n, unit="req", file=sys.stderr, disable=args.no_progress or not sys.stderr.isatty())
        send.t0 = started = time.perf_counter()
        records = await dispatch(prompts.texts[:n], send, args.request_rate, args.concurrency,
                                 random.Random(args.seed + 1), lambda _: bar.update())
        duration = time.perf_counter() - started
        bar.close()
    for r, count in zip(records, prompts.counts or []):  # a server that gives no usage: /tokenize's counts
        if r.error is None and r.prompt_tokens is None:
            r.prompt_tokens = count
    summary = summarize(records, duration)
    print(table(summary, base, model, args, n))
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("run", "api_key", "command")}
        config.update(base_url=base, model=model, num_prompts=n, prompts=prompts.source,
                      request_rate="inf" if math.isinf(args.request_rate) else args.request_rate)
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config, "summary": summary,
                                             "requests": [dataclasses.asdict(r) for r in records]}, indent=1))
        except OSError as e:
            raise BenchError(f"cannot save {args.json}: {e}") from None
        print(f"saved {args.json}")
    return 0 if summary["completed"] else 1


async def pick_model(client: aiohttp.ClientSession, base: str, model: str | None) -> str:
    """GET /v1/models, which also tells whether the server is there at all."""
    import aiohttp

    try:
        async with client.get("/v1/models") as r:
            status, body = r.status, await r.read()
    except aiohttp.ClientError as e:
        raise BenchError(f"cannot reach {base}: {str(e) or type(e).__name__}") from None
    if model:
        return model
    try:
        if status != 200:
            raise ValueError
        return json.loads(body)["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET /v1/models gave no model (HTTP {status}: {error_text(body)}); pass --model") from None


class Sender:
    """Sends one streaming request and times it."""

    def __init__(self, client, model: str, args: argparse.Namespace) -> None:
        self.client, self.timeout, self.t0 = client, args.timeout, time.perf_counter()
        self.chat = args.endpoint == "chat"
        self.path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "stream": True,
                                     "stream_options": {"include_usage": True}}
        if args.ignore_eos:
            self.body["ignore_eos"] = True
        if args.temperature is not None:
            self.body["temperature"] = args.temperature

    async def __call__(self, prompt: str) -> Record:
        import aiohttp

        rec = Record()
        content = {"messages": [{"role": "user", "content": prompt}]} if self.chat else {"prompt": prompt}
        try:
            await asyncio.wait_for(self._stream({**self.body, **content}, rec), self.timeout)
        except asyncio.TimeoutError:
            rec.error = f"timed out after {self.timeout:g} s"
        except aiohttp.ClientError as e:
            rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except (ValueError, TypeError, AttributeError) as e:  # a chunk that is not JSON, or not shaped as OpenAI's
            rec.error = f"bad stream: {type(e).__name__}: {e}"
        except RequestFailed as e:
            rec.error = str(e)
        return rec

    async def _stream(self, body: dict, rec: Record) -> None:
        sent = time.perf_counter()
        rec.start = sent - self.t0
        last, chunks, usage = sent, 0, None
        async with self.client.post(self.path, json=body) as r:
            if r.status != 200:
                raise RequestFailed(f"HTTP {r.status}: {error_text(await r.read())}")
            async for line in r.content:  # aiohttp's stream yields whole lines
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RequestFailed(f"error event: {error_text(chunk)}")
                usage = chunk.get("usage") or usage
                if has_text(chunk):
                    now = time.perf_counter()
                    if rec.ttft is None:
                        rec.ttft = now - sent
                    else:
                        rec.itl.append(now - last)
                    last, chunks = now, chunks + 1
        rec.e2e = time.perf_counter() - sent
        if usage is None and chunks == 0:
            raise RequestFailed("the stream carried neither text nor usage")
        rec.output_tokens = (usage.get("completion_tokens") or chunks) if usage else chunks
        rec.prompt_tokens = usage.get("prompt_tokens") if usage else None


class RequestFailed(Exception):
    pass


def has_text(chunk: dict) -> bool:
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return bool(choices[0].get("text") or delta.get("content") or delta.get("reasoning_content"))


def error_text(body: bytes | dict) -> str:
    """The message of an OpenAI-shaped error, else the start of the body."""
    try:
        parsed = json.loads(body) if isinstance(body, bytes) else body
        err = parsed.get("error", parsed)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:300].strip() or "(empty body)"


async def dispatch(prompts: list[str], send: Sender, rate: float, concurrency: int | None,
                   rng: random.Random, done: Callable[[Record], None]) -> list[Record]:
    """Requests arrive as a Poisson process at `rate` (all at once when infinite); at most `concurrency` run."""
    gate = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(prompt: str) -> Record:
        if gate is None:
            rec = await send(prompt)
        else:
            async with gate:
                rec = await send(prompt)
        done(rec)
        return rec

    tasks = []
    for i, prompt in enumerate(prompts):
        if i and not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(one(prompt)))
    return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as numpy.percentile (and vLLM) compute it."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": round(sum(values) / len(values) * 1000, 2),
            **{f"p{q}": round(percentile(values, q) * 1000, 2) for q in (50, 90, 99)}}


def summarize(records: list[Record], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    output = [r.output_tokens or 0 for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(sum(output) / duration, 2),
        "total_token_throughput": round((sum(prompt) + sum(output)) / duration, 2),
        "total_prompt_tokens": sum(prompt), "total_output_tokens": sum(output),
        "mean_prompt_tokens": mean(prompt), "mean_output_tokens": mean(output),
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.itl]),
        "tpot_ms": distribution_ms([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
                                    if r.ttft is not None and r.e2e is not None and (r.output_tokens or 0) > 1]),
        "e2e_ms": distribution_ms([r.e2e for r in ok if r.e2e is not None]),
        "errors": [{"message": m, "count": n} for m, n in list(errors.items())[:ERRORS_SHOWN]],
        "distinct_errors": len(errors),
    }


def table(s: dict[str, Any], base: str, model: str, args: argparse.Namespace, n: int) -> str:
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
    num = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
    rule = "-" * 64
    lines = [
        f"serve bench  {base}  {model}  /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}",
        f"{n} requests  concurrency {args.concurrency or 'no cap'}  rate {rate}  max_tokens {args.output_len}"
        + ("  ignore_eos" if args.ignore_eos else ""),
        rule,
        f"{'completed / failed':<34}{s['completed']} / {s['failed']}",
        f"{'duration (s)':<34}{s['duration_s']:.2f}",
        f"{'request throughput (req/s)':<34}{s['request_throughput']:.2f}",
        f"{'output token throughput (tok/s)':<34}{s['output_throughput']:.1f}",
        f"{'total token throughput (tok/s)':<34}{s['total_token_throughput']:.1f}",
        f"{'mean prompt / output tokens':<34}{num(s['mean_prompt_tokens'], '{:.1f}')} / {num(s['mean_output_tokens'], '{:.1f}')}",
        rule,
        f"{'(ms)':<10}" + "".join(f"{h:>12}" for h in ("mean", "p50", "p90", "p99")),
    ]
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")):
        lines.append(f"{name:<10}" + "".join(f"{num(s[key][k], '{:.1f}'):>12}" for k in ("mean", "p50", "p90", "p99")))
    lines.append(rule)
    if s["failed"]:
        lines.append(f"errors: {s['failed']} failed requests, {s['distinct_errors']} distinct messages")
        lines += [f"  {e['count']:>5} x {e['message']}" for e in s["errors"]]
        lines.append(rule)
    return "\n".join(lines)
