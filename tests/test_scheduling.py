"""The scheduler's ideas, seen from a client: every mode gives the same answers.

One workload (64 concurrent requests, most sharing a long system prompt) runs on a plain server (no
prefix cache, no chunking, no overlap, a pool with room for all) and on servers with each idea on,
some with a pool that holds only ~8 requests. Greedy answers must match exactly; /stats must show
that the idea really worked (cache hits, preemptions) and that the pool is back to empty afterwards.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import TINY_NAME
from tests.server import Server

SYSTEM = "You are a small server that speaks ZeroMQ. "
PROMPTS = [SYSTEM + f"Question {i}: what is the capital of France?" for i in range(56)] + [
    f"Once upon a time there was server number {i}." for i in range(8)
]
NEW_TOKENS = 20
SMALL_POOL = 8 * 60  # a request here is ~35 prompt + 20 new tokens; less than the tiny model's context (512)


def run_workload(server: Server) -> tuple[list[str], list[openai.types.Completion]]:
    async def together():
        kw = dict(model=TINY_NAME, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True})
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            # Odd requests sample with a seed (varied text that any wrong KV would change), even ones are greedy.
            return await asyncio.gather(*(
                client.completions.create(prompt=p, temperature=i % 2, seed=i, **kw) for i, p in enumerate(PROMPTS)
            ))

    replies = asyncio.run(together())
    assert [r.usage.completion_tokens for r in replies] == [NEW_TOKENS] * len(PROMPTS)
    return [r.choices[0].text for r in replies], replies


def launch(tiny_model, *flags: str) -> Server:
    return Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", *flags)


def stats(server: Server) -> dict:
    with server.http() as http:
        return http.get("/stats").json()


def assert_pool_empty(s: dict, pool: int) -> None:
    """Nothing held by requests; what is not free is cached prefixes, which any request may evict."""
    assert s["running"] == s["waiting"] == s["pool_tokens_used"] == 0, s
    assert s["pool_tokens_free"] + s["pool_tokens_cached"] == pool, s


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[str]:
    with launch(tiny_model, "--kv-pool-tokens", "8192", "--no-prefix-cache", "--no-overlap", "--chunked-prefill-tokens", "0") as server:
        texts, replies = run_workload(server)
        assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in replies)
        # Each answer is what the request gets alone, too.
        client = server.client()
        for i in range(0, len(PROMPTS), 13):
            alone = client.completions.create(model=TINY_NAME, prompt=PROMPTS[i], max_tokens=NEW_TOKENS, temperature=i % 2, seed=i, extra_body={"ignore_eos": True})
            assert alone.choices[0].text == texts[i]
        assert len(set(texts)) > 32  # answers differ, so a mix-up between requests would show
        s = stats(server)
        assert s["preemptions"] == 0 and s["cache_hit_tokens"] == 0, s
        assert_pool_empty(s, 8192)
        assert s["pool_tokens_cached"] == 0
    return texts


def test_prefix_cache_reuses_shared_prompts_with_identical_answers(tiny_model, reference):
    with launch(tiny_model, "--kv-pool-tokens", "8192") as server:
        texts, replies = run_workload(server)
        assert texts == reference
        s = stats(server)
        assert s["cache_hit_tokens"] > 40 * 20, s  # most of 56 shared system prompts came from the cache
        assert sum(r.usage.prompt_tokens_details.cached_tokens > 0 for r in replies) > 40
        assert_pool_empty(s, 8192)
        # The same request again is served from the cache up to its last prompt token.
        again = server.client().completions.create(model=TINY_NAME, prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert again.choices[0].text == reference[0]


@pytest.mark.parametrize("flags, preempts", [
    ([], True),
    (["--no-prefix-cache", "--chunked-prefill-tokens", "0"], True),
    # Small chunks admit prompts slowly enough that waiting alone keeps the pool in bounds.
    (["--no-prefix-cache", "--chunked-prefill-tokens", "16"], False),
], ids=["all-on", "plain", "chunk16"])
def test_small_pool_preempts_but_never_fails(tiny_model, reference, flags, preempts):
    with launch(tiny_model, "--kv-pool-tokens", str(SMALL_POOL), *flags) as server:
        texts, _ = run_workload(server)
        assert texts == reference
        s = stats(server)
        if preempts:
            assert s["preemptions"] > 0, s  # the pool really was too small
        assert_pool_empty(s, SMALL_POOL)
        # A prompt longer than the whole pool can never run: refused up front, with the numbers.
        with server.http() as http:
            r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": [5] * (SMALL_POOL + 1), "max_tokens": 1})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert f"KV pool holds {SMALL_POOL} tokens" in message and f"prompt has {SMALL_POOL + 1} tokens" in message
