"""Replicas behind an existing router: the SGLang model gateway (`smg`, in a venv of its own: `make router`)
in front of two launched servers, unchanged. Plain and streamed requests go through it; power_of_two reads
our /v1/loads and sends work to the idle replica; cache_aware keeps requests that share a long prefix on one
replica, where the prefix cache hits; a SIGKILLed replica loses no later request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve.model_files import cache_root
from tests.conftest import TINY_NAME
from tests.server import Server, free_port

SMG = Path(os.environ.get("SERVE_SMG") or cache_root() / "routers" / "smg" / "bin" / "smg")
pytestmark = pytest.mark.skipif(not SMG.is_file(), reason=f"{SMG} is missing: `make router` installs smg")


class Router:
    """smg in front of the given servers, its metrics on 127.0.0.1 (its default 0.0.0.0:29000 would clash)."""

    def __init__(self, servers: list[Server], policy: str, *flags: str) -> None:
        self.port, self.workers = free_port(), len(servers)
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [str(SMG), "launch", "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *[s.url for s in servers],
                     "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *flags]

    def __enter__(self) -> Router:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # up, and every worker registered and healthy
            try:
                workers = httpx.get(f"{self.url}/workers", timeout=2).json()
                if len([w for w in workers.get("workers", []) if w.get("is_healthy")]) == self.workers:
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"smg did not come up: {self.read_log()[-2000:]}")

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


def admitted(server: Server) -> int:
    """Prompt tokens of every request the replica has admitted (its scheduler's count)."""
    return httpx.get(f"{server.url}/stats").json()["prompt_tokens"]


@pytest.fixture(scope="module")
def replicas(long_model):
    """Replica a runs at most two requests at once, so that a few long streams give it a queue: the load
    smg's power_of_two weighs (the expected wait) is queued work, not running requests."""
    with Server("--model", str(long_model), "--served-name", TINY_NAME, "--dtype", "float32", "--set", "engine.max_running_requests=2") as a, \
            Server("--model", str(long_model), "--served-name", TINY_NAME, "--dtype", "float32") as b:
        yield a, b


def test_the_router_reads_what_it_needs(replicas):
    a, _ = replicas
    loads = httpx.get(f"{a.url}/v1/loads").json()
    assert loads["dp_rank_count"] == 1 and loads["loads"][0]["dp_rank"] == 0
    assert {"num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens", "token_usage"} <= set(loads["loads"][0])
    assert httpx.get(f"{a.url}/get_load").json()[0].keys() == {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(f"{a.url}{path}").json()
        assert info["dp_size"] == 1 and info["tp_size"] == 1 and info["served_model_name"] == TINY_NAME
    for path in ("/model_info", "/get_model_info"):
        assert httpx.get(f"{a.url}{path}").json()["is_generation"] is True
    # Fields routers add to bodies are ignored.
    r = httpx.post(f"{a.url}/v1/chat/completions", json={"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                          "data_parallel_rank": 0, "no_stop_trim": True, "return_hidden_states": False})
    assert r.status_code == 200, r.text


def test_plain_and_streamed_requests_through_smg(replicas):
    a, b = replicas
    before = admitted(a), admitted(b)
    with Router([a, b], "round_robin") as router:
        client = router.client()
        for i in range(4):
            # ignore_eos: at the default temperature the random test model can sample its EOS within 5
            # tokens (1 suite run in ~20 here), and then the answer ends with "stop"
            reply = client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5,
                                                   extra_body={"ignore_eos": True})
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
            chunks = list(client.completions.create(model=TINY_NAME, prompt=f"story {i}", max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
            assert "".join(c.choices[0].text for c in chunks if c.choices) and chunks[-1].choices[0].finish_reason == "length"
    assert admitted(a) > before[0] and admitted(b) > before[1], "round robin used both replicas"


def test_power_of_two_follows_our_load(replicas):
    """smg's power_of_two (expected wait) divides a replica's queued work by its gen_throughput, and adds
    ~512 tokens for each request it routed there until the next load report. So: one request per report
    (1 s), each of which must go to the idle replica. With a gen_throughput per second of wall time an
    idle replica that answered a two-token request looked slower than the busy one, and some went there."""
    a, b = replicas

    async def run() -> tuple[int, int, int]:
        async with httpx.AsyncClient(timeout=300) as http:
            async def long_stream(i: int) -> None:
                body = {"model": TINY_NAME, "prompt": f"busy {i} " + "the keeper of the light " * 200, "max_tokens": 4000,
                        "ignore_eos": True, "stream": True}
                async with http.stream("POST", f"{a.url}/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

            # Two run at a time and the rest wait: 7 rounds of 4,000 tokens (~4 s each) before the queue runs
            # dry, where the test needs ~10 s; 12 still waited at its end here. With 6 streams of 3,000 tokens
            # (2 rounds) it ran dry in a suite run on a faster day.
            busy = [asyncio.create_task(long_stream(i)) for i in range(16)]
            try:
                while (await http.get(f"{a.url}/v1/loads")).json()["loads"][0]["num_waiting_reqs"] < 14:
                    await asyncio.sleep(0.1)
                with Router([a, b], "power_of_two", "--load-monitor-interval", "1") as router:
                    await asyncio.sleep(2.5)  # the router's load monitor polls /v1/loads every second
                    before = admitted(a), admitted(b)
                    for i in range(4):
                        r = await http.post(f"{router.url}/v1/completions", json={"model": TINY_NAME, "prompt": f"q{i}", "max_tokens": 2})
                        assert r.status_code == 200, r.text
                        await asyncio.sleep(1.2)
                    waiting = (await http.get(f"{a.url}/v1/loads")).json()["loads"][0]["num_waiting_reqs"]
                    return admitted(a) - before[0], admitted(b) - before[1], waiting
            finally:
                for task in busy:
                    task.cancel()
                await asyncio.gather(*busy, return_exceptions=True)

    to_busy, to_idle, still_waiting = asyncio.run(run())
    assert still_waiting > 0, "the busy replica's queue ran dry during the test: make its streams longer"
    assert to_busy == 0 and to_idle > 0, f"{to_busy} prompt tokens went to the busy replica, {to_idle} to the idle one"


def test_cache_aware_keeps_a_shared_prefix_on_one_replica(replicas):
    a, b = replicas
    system = "You are the operator of a lighthouse on a small island. " * 12
    before = admitted(a), admitted(b)
    with Router([a, b], "cache_aware") as router:
        client = router.client()
        replies = [client.chat.completions.create(model=TINY_NAME, max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]) for i in range(6)]
    moved = admitted(a) - before[0], admitted(b) - before[1]
    assert min(moved) == 0 and max(moved) > 0, f"the shared prefix went to both replicas: {moved}"
    assert all(r.usage.prompt_tokens_details.cached_tokens > 0 for r in replies[1:]), "the prefix cache did not hit"


def test_a_killed_replica_loses_no_later_request(replicas):
    """Last in this module: it kills replica b."""
    a, b = replicas
    with Router([a, b], "round_robin") as router:
        client = router.client()
        assert client.completions.create(model=TINY_NAME, prompt="warm", max_tokens=2).choices
        b.stop(signal.SIGKILL)  # its children die with it; its janitor removes the ipc directory
        for i in range(10):
            reply = client.completions.create(model=TINY_NAME, prompt=f"after {i}", max_tokens=3, extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 3
