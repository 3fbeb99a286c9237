"""What the benchmarks share: the default model's folder and a streaming client that stamps every token."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = str(ROOT / "configs" / "smollm2-135m-instruct.yaml")
NAME = "SmolLM2-135M-Instruct"


def model_info():
    """The default model as the launcher resolves it (its HF folder of config and tokenizer, its GGUF)."""
    from serve.config import load_config
    from serve.model_files import resolve_model

    return resolve_model(load_config(CONFIG))


def model_dir() -> str:
    return model_info().hf_dir


def save(report: dict, out: str) -> None:
    """A benchmark's figures as JSON (bench/results/ is git-ignored: results are not committed)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def stream(client, body: dict, path: str = "/v1/completions", stamps: list[float] | None = None) -> dict:
    """One streaming request; returns its start time, the arrival time of every text delta (also
    appended to `stamps` as they come, for a caller that cancels the request), and usage."""
    body = {"model": NAME, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    started = time.perf_counter()
    stamps = [] if stamps is None else stamps
    usage = None
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
    return {"start": started, "stamps": stamps, "ttft": stamps[0] - started if stamps else None, "usage": usage}


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def summary_ms(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values) * 1000, 1), "p99": round(percentile(values, 0.99) * 1000, 1),
            "max": round(max(values) * 1000, 1), "n": len(values)}
