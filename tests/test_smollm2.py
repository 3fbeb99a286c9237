"""The real default model, SmolLM2-135M-Instruct, served end to end in float32.

Greedy output must be token-for-token what HF transformers' `generate` gives on the same weights,
TP 2 must give what TP 1 gives, and 16 concurrent streams must each get what they get alone.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.server import Server

CONFIG = "configs/smollm2-135m-instruct.yaml"
NAME = "SmolLM2-135M-Instruct"
NEW_TOKENS = 40
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
]
CHAT = [{"role": "user", "content": "Name three animals that live in the ocean."}]


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    from serve.config import load_config
    from serve.model_files import resolve_model

    return resolve_model(load_config(CONFIG)).hf_dir  # converts the GGUF once, then reads the cache


def test_gguf_is_converted_once_then_cached(tmp_path, monkeypatch):
    from serve.config import load_config
    from serve.model_files import cache_root, resolve_model

    real_cache = cache_root()
    monkeypatch.setenv("SERVE_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    first = resolve_model(load_config(CONFIG), log=said.append)
    assert len(said) == 1 and "converting" in said[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(first.hf_dir).iterdir()}
    assert not list(tmp_path.glob("gguf/*.tmp*"))  # no half-written cache left behind
    said.clear()
    started = time.monotonic()
    second = resolve_model(load_config(CONFIG), log=said.append)
    assert second == first and said == []
    assert time.monotonic() - started < 5
    # On a fresh machine the other tests would convert it again into the real cache: hand this one over.
    dest = real_cache / Path(first.hf_dir).relative_to(tmp_path)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(first.hf_dir, dest.with_name(dest.name + ".tmp-test"))
        os.replace(dest.with_name(dest.name + ".tmp-test"), dest)


def served(server: Server) -> list[str]:
    """The greedy answers to PROMPTS and CHAT, asked all at once (one batch: a TP 2 step is slow here, and
    greedy answers do not depend on the batch, as test_16_concurrent_streams_match_alone checks)."""
    client = server.client()

    def complete(prompt: str) -> str:
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0).choices[0].text

    def chat() -> str:
        return client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        texts = [pool.submit(complete, p) for p in PROMPTS] + [pool.submit(chat)]
        return [t.result() for t in texts]


@pytest.fixture(scope="module")
def tp1_server(smollm2_dir):
    with Server("--config", CONFIG, "--dtype", "float32", "--kv-pool-tokens", "16384") as server:
        yield server


@pytest.fixture(scope="module")
def tp1_outputs(tp1_server) -> list[str]:
    return served(tp1_server)


def test_greedy_matches_hf_generate(smollm2_dir, tp1_outputs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = [tok(p).input_ids for p in PROMPTS]
    inputs.append(tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids)
    expected = []
    for ids in inputs:
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
        expected.append(tok.decode(out, skip_special_tokens=True))
    assert tp1_outputs == expected


def test_tp2_matches_tp1(smollm2_dir, tp1_outputs):
    with Server("--config", CONFIG, "--dtype", "float32", "--kv-pool-tokens", "8192", "--tp", "2") as server:
        assert served(server) == tp1_outputs


def test_16_concurrent_streams_match_alone(tp1_server):
    questions = [f"Give me one fact about the number {i}." for i in range(16)]
    server = tp1_server  # the greedy tests' server: one SmolLM2 start less
    client = server.client()
    alone = [
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0)
        .choices[0].message.content
        for q in questions
    ]

    async def one(aclient, q):
        stream = await aclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(aclient, q) for q in questions))

    batched = asyncio.run(together())
    differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    if differ:
        # A batch of 16 multiplies matrices in a different order than a batch of 1; in float32 that can
        # flip a near-tie between two tokens. Say so, and bound it: rare, and only after a shared start.
        warnings.warn(f"{len(differ)}/16 streams diverged from their solo run (float32 near-tie): {differ}")
        assert len(differ) <= 1
        for i in differ:
            shared = next((k for k, (x, y) in enumerate(zip(alone[i], batched[i])) if x != y), 0)
            assert shared >= 20, (alone[i], batched[i])
