"""`serve bench`, run as a user runs it: against a launched server, a server without /tokenize or usage,
a wrong model name and an address where nothing listens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy
import pytest

from serve.bench.load import percentile
from tests.conftest import TINY_NAME
from tests.server import free_port


def bench(url: str, *flags: str, out=None) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = [sys.executable, "-m", "serve.cli", "bench", "--base-url", url, "--no-progress", *flags]
    if out is not None:
        cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc, json.loads(out.read_text()) if out is not None and out.exists() else None


def test_completions_at_a_concurrency(tiny_server, tmp_path):
    proc, report = bench(tiny_server.url, "--num-prompts", "12", "--concurrency", "4", "--input-len", "32",
                         "--output-len", "8", "--ignore-eos", out=tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (12, 0)
    assert s["mean_output_tokens"] == 8
    # The tiny model's tokenizer makes several tokens of most words: only the cut through /tokenize lands here.
    assert abs(s["mean_prompt_tokens"] - 32) <= 2
    assert sum(r["prompt_tokens"] == 32 for r in report["requests"]) >= 10
    assert "/tokenize" in report["config"]["prompts"] and report["config"]["model"] == TINY_NAME
    assert len(report["requests"]) == 12
    for r in report["requests"]:
        assert r["error"] is None and r["output_tokens"] == 8
        assert 0 < r["ttft"] <= r["e2e"] and all(g >= 0 for g in r["itl"])
    in_flight = [sum(r["start"] <= q["start"] < r["start"] + r["e2e"] for r in report["requests"]) for q in report["requests"]]
    assert max(in_flight) == 4  # the cap, reached
    assert s["itl_ms"]["p50"] > 0  # a chunk may carry several tokens, but not each request's 8 in one
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"] and s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"] * 1.001
    assert s["output_throughput"] == pytest.approx(96 / s["duration_s"], rel=0.01)
    assert "completed / failed                12 / 0" in proc.stdout
    assert all(row in proc.stdout for row in ("TTFT", "ITL", "TPOT", "E2E", "req/s", "tok/s"))
    assert "Traceback" not in proc.stderr


def test_chat_at_a_request_rate(tiny_server, tmp_path):
    proc, report = bench(f"{tiny_server.url}/v1", "--endpoint", "chat", "--num-prompts", "8", "--request-rate", "10",
                         "--input-len", "32", "--output-len", "8", "--ignore-eos", "--seed", "3", "--warmup", "2",
                         out=tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (8, 0)
    assert s["mean_output_tokens"] == 8
    # Counted with the chat template (our /tokenize takes messages), as the server's usage counts it.
    assert abs(s["mean_prompt_tokens"] - 32) <= 2 and "messages" in report["config"]["prompts"]
    # Poisson arrivals at 10/s: 8 requests spread over about 0.7 s, not sent at once.
    starts = [r["start"] for r in report["requests"]]
    assert starts == sorted(starts) and starts[-1] - starts[0] > 0.2


def test_a_wrong_model_is_errors(tiny_server, tmp_path):
    proc, report = bench(tiny_server.url, "--model", "no-such-model", "--num-prompts", "5", "--concurrency", "2",
                         "--input-len", "16", "--output-len", "4", out=tmp_path / "r.json")
    assert proc.returncode == 1
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (0, 5)
    assert len(s["errors"]) == 1 and s["errors"][0]["count"] == 5
    assert "HTTP 404" in s["errors"][0]["message"] and "no-such-model" in s["errors"][0]["message"]
    assert "5 failed requests" in proc.stdout and "HTTP 404" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_nothing_listening_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    proc, _ = bench(url, "--num-prompts", "2")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"serve bench: error: cannot reach {url}")


class Plain(BaseHTTPRequestHandler):
    """A server with no /tokenize and no usage in its stream, that sends two tokens per chunk and ends
    with a chunk without text."""

    def do_GET(self) -> None:
        self.reply(200, b'{"data": [{"id": "plain"}]}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/v1/completions":
            return self.reply(404, b'{"error": {"message": "not found"}}', "application/json")
        Plain.prompts.append(body["prompt"])
        chunks = [{"choices": [{"index": 0, "text": f" t{i} t{i}"}]} for i in range(3)]
        chunks.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self.reply(200, sse.encode(), "text/event-stream")

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_server_without_tokenize_or_usage(tmp_path):
    Plain.prompts = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        proc, report = bench(f"http://127.0.0.1:{httpd.server_port}", "--num-prompts", "6", "--concurrency", "3",
                             "--input-len", "20", out=tmp_path / "r.json")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "no usable /tokenize" in proc.stderr
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (6, 0) and report["config"]["model"] == "plain"
    assert s["mean_output_tokens"] == 3  # chunks with text, for want of usage
    assert s["mean_prompt_tokens"] is None and "n/a" in proc.stdout
    assert len(Plain.prompts) == 6 and len(set(Plain.prompts)) == 6  # a prefix cache finds nothing to share
    assert all(len(p.split()) == 20 for p in Plain.prompts)


def test_percentiles_interpolate_as_numpy():
    values = [0.5, 3.0, 1.0, 7.5, 2.0, 9.0, 4.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(numpy.percentile(values, q))
    assert percentile([4.0], 99) == 4.0
