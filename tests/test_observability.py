"""What a person sees of a running server: /metrics, /pipeline, the start-up banner and the request log."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_NAME

HOPS = ["api->tokenizer", "tokenizer->scheduler", "scheduler->workers", "rank0->scheduler", "scheduler->detokenizer",
        "detokenizer->api"]


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels without model_name): value}; every sample must carry our model's name."""
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("serve:"):
                assert s.labels.get("model_name") == TINY_NAME, s
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def stream_tokens(server, max_tokens: int, **extra) -> dict:
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
        "model": TINY_NAME, "prompt": "The metrics of a stream", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra,
    }) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    return json.loads(lines[-1][6:])["usage"]


def test_metrics_count_a_request_in_every_family(tiny_server):
    before = scrape(tiny_server)
    for name in ["serve:num_requests_running", "serve:num_requests_waiting", "serve:kv_cache_usage_perc",
                 "serve:prefix_cache_hit_rate", "serve:time_to_first_token_seconds_count",
                 "serve:inter_token_latency_seconds_count", "serve:e2e_request_latency_seconds_count",
                 "serve:request_queue_time_seconds_count", "serve:prompt_tokens_total", "serve:generation_tokens_total"]:
        assert any(k[0] == name for k in before), f"{name} missing from /metrics before any request"
    usage = stream_tokens(tiny_server, 12)
    after = scrape(tiny_server)
    assert usage["completion_tokens"] == 12
    assert delta(before, after, "serve:time_to_first_token_seconds_count") == 1
    assert delta(before, after, "serve:e2e_request_latency_seconds_count") == 1
    assert delta(before, after, "serve:request_queue_time_seconds_count") == 1
    assert delta(before, after, "serve:inter_token_latency_seconds_count") == 11  # between 12 tokens
    assert delta(before, after, "serve:generation_tokens_total") == 12
    assert delta(before, after, "serve:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(before, after, "serve:request_success_total", finished_reason="length") == 1
    e2e = delta(before, after, "serve:e2e_request_latency_seconds_sum")
    ttft = delta(before, after, "serve:time_to_first_token_seconds_sum")
    assert 0 < ttft < e2e < 30
    for hop in HOPS:
        # Every hop carried this request's messages: a plan and a result per step (one token each); the
        # outputs of steps that end in one scheduler turn travel together.
        count = delta(before, after, "serve:zmq_hop_seconds_count", hop=hop)
        seconds = delta(before, after, "serve:zmq_hop_seconds_sum", hop=hop)
        assert count >= (12 if hop in ("scheduler->workers", "rank0->scheduler") else 1), (hop, count)
        assert 0 < seconds / count < 1.0, (hop, seconds, count)
        assert after[("serve:zmq_hop_seconds_bucket", (("hop", hop), ("le", "+Inf")))] == \
            after[("serve:zmq_hop_seconds_count", (("hop", hop),))]


def test_gauges_follow_a_running_request_and_fall_back(long_server):
    # The 8k-context model, so that the stream surely outlives the scrapes: the tiny 512-token model now
    # finishes 480 tokens in well under a second.
    with httpx.stream("POST", f"{long_server.url}/v1/completions", timeout=60, json={
        "model": TINY_NAME, "prompt": "keep running", "max_tokens": 8000, "ignore_eos": True, "stream": True,
    }) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        deadline = time.monotonic() + 3  # the scheduler writes its gauges at the end of its loop turn
        while (running := scrape(long_server))[("serve:num_requests_running", ())] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = httpx.get(f"{long_server.url}/stats").json()
    assert running[("serve:num_requests_running", ())] == 1, stats
    assert 0 < running[("serve:kv_cache_usage_perc", ())] <= 1
    deadline = time.monotonic() + 10  # the stream was closed: the request is aborted and freed
    while (idle := scrape(long_server))[("serve:num_requests_running", ())] != 0:
        assert time.monotonic() < deadline, "num_requests_running stayed at 1"
        time.sleep(0.05)
    assert idle[("serve:num_requests_waiting", ())] == 0 and idle[("serve:kv_cache_usage_perc", ())] == 0


def test_prefix_cache_hit_rate_rises_on_a_repeated_prompt(tiny_server):
    prompt = "a shared system prompt " * 20
    rates = []
    for _ in range(3):
        tiny_server.client().completions.create(model=TINY_NAME, prompt=prompt, max_tokens=1)
        rates.append(scrape(tiny_server)[("serve:prefix_cache_hit_rate", ())])
    assert 0 <= rates[0] < rates[1] < rates[2] <= 1


def test_an_abandoned_stream_counts_as_abort_and_is_logged(tiny_server):
    before = scrape(tiny_server)
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", timeout=60, json={
        "model": TINY_NAME, "prompt": "leave early", "max_tokens": 400, "ignore_eos": True, "stream": True,
    }) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    deadline = time.monotonic() + 10
    while True:
        after = scrape(tiny_server)
        if delta(before, after, "serve:request_success_total", finished_reason="abort") == 1:
            break
        assert time.monotonic() < deadline, "the abandoned request was not counted as aborted"
        time.sleep(0.05)
    assert delta(before, after, "serve:request_success_total", finished_reason="length") == 0
    lines = re.findall(r"request (cmpl-\w+): (\d+) prompt \+ (\d+) completion tokens, first token (\d+)ms, (\d+)ms, abort",
                       tiny_server.read_log())
    assert lines, tiny_server.read_log()[-2000:]
    _, prompt, completion, ttft, duration = lines[-1]
    assert int(prompt) > 0 and 0 < int(completion) < 400 and int(ttft) <= int(duration)


def test_request_log_line_per_finished_request(tiny_server):
    r = tiny_server.client().completions.create(model=TINY_NAME, prompt="log me", max_tokens=5, temperature=0,
                                                extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 5
    while r.id not in tiny_server.read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in tiny_server.read_log().splitlines() if r.id in line)
    assert f"{r.usage.prompt_tokens} prompt + 5 completion tokens" in line and line.endswith("length")


def test_banner_lists_every_process_with_pid_and_sockets(tiny_server):
    log = tiny_server.read_log()
    banner = log[log.index("serve: tiny-llama"):log.index("ready: ")]
    pids = dict(re.findall(r"serve:(\S+)\s+pid (\d+)", banner))
    assert set(pids) == {"launcher", "scheduler", "worker-0", "tokenizer", "detokenizer", "api"}
    assert int(pids["launcher"]) == tiny_server.proc.pid
    assert sorted(int(p) for name, p in pids.items() if name != "launcher") == sorted(
        p for p in tiny_server.children if open(f"/proc/{p}/cmdline").read().startswith("serve:"))
    assert "KV pool 4096 tokens" in banner
    for socket in ["PUB bind plan", "ROUTER bind tokenizer", "PUSH connect scheduler", "SUB connect plan", "PUSH connect results",
                   "ROUTER bind outputs", "DEALER connect tokenizer", "REP bind control"]:
        assert socket in banner, socket
    assert f"ready: {tiny_server.url}/v1" in log


def test_pipeline_view_shows_processes_queues_and_hops(tiny_server):
    tiny_server.client().completions.create(model=TINY_NAME, prompt="hello", max_tokens=4)
    view = httpx.get(f"{tiny_server.url}/pipeline").json()
    procs = {p["name"]: p for p in view["processes"]}
    assert set(procs) == {"launcher", "scheduler", "worker-0", "tokenizer", "detokenizer", "api"}
    assert procs["launcher"]["pid"] == tiny_server.proc.pid
    assert all(p["rss_bytes"] > 1 << 20 and p["state"] in ("running", "sleeping", "disk-sleep") for p in procs.values())
    assert view["scheduler"]["running"] == 0 and view["api"]["in_flight"] == 0
    assert view["tokens"]["generation"] >= 4
    hops = {h["hop"]: h for h in view["hops"]}
    assert list(hops) == HOPS
    assert all(h["count"] > 0 and 0 < h["p50_s"] <= h["p99_s"] < 1 for h in hops.values())
    # A stopped process shows as stopped (and /health would time out): the view reads it live.
    pid = procs["detokenizer"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        state = {p["name"]: p["state"] for p in httpx.get(f"{tiny_server.url}/pipeline").json()["processes"]}
    finally:
        os.kill(pid, signal.SIGCONT)
    assert state["detokenizer"] == "stopped"
