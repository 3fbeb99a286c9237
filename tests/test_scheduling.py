"""Continuous batching under a KV pool too small for the load: requests wait or are preempted and
recomputed, and every one of them still gets exactly the answer it gets alone."""

from __future__ import annotations

import asyncio

import openai

from tests.conftest import TINY_NAME
from tests.server import Server


def test_small_pool_preempts_but_never_fails(tiny_model):
    prompts = [f"Once upon a time there was server number {i}." for i in range(12)]
    # 12 requests of ~15 prompt + 48 new tokens need ~750 slots at once; the pool holds 160.
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", "--kv-pool-tokens", "160") as server:
        client = server.client()
        kw = dict(model=TINY_NAME, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
        alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

        async def together():
            aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            replies = await asyncio.gather(*(aclient.completions.create(prompt=p, **kw) for p in prompts))
            return [r.choices[0].text for r in replies], [r.usage.completion_tokens for r in replies]

        texts, counts = asyncio.run(together())
        assert counts == [48] * len(prompts)
        assert texts == alone
        with server.http() as http:
            stats = http.get("/stats").json()
        assert stats["preemptions"] > 0, stats  # the pool really was too small
        assert stats["running"] == stats["waiting"] == stats["pool_tokens_used"] == 0, stats
        assert stats["pool_tokens_free"] == 160
