"""The OpenAI API as clients use it: stop conditions, lengths, sampling options, n, logprobs, streaming
details, input forms, the extra endpoints, errors and aborts. Every test drives a launched server
through the `openai` SDK (sync or async) or raw HTTP, as a client would."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import TINY_NAME
from tests.server import Server

PROMPT = "Once upon a time"


def greedy(client, **kw) -> openai.types.Completion:
    kw = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, **kw}
    kw.setdefault("extra_body", {}).setdefault("ignore_eos", True)
    return client.completions.create(**kw)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(http: httpx.Client) -> dict:
    """The scheduler's stats once nothing runs (within 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        stats = http.get("/stats").json()
        if stats["running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


# --- 1. stop conditions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_server) -> tuple[str, str, int]:
    """A greedy 40-token text, a stop string cut from its middle (so it spans token boundaries, most
    likely), and how many tokens it takes to complete that stop string."""
    client = tiny_server.client()
    text = greedy(client).choices[0].text
    printable = [i for i in range(12, len(text) - 12) if text[i:i + 5].isprintable() and text[i:i + 5].strip()]
    assert printable, f"no usable stop string in {text!r}"
    stop = text[printable[0]:printable[0] + 5]
    lo, hi = 1, 40  # the fewest greedy tokens whose text contains the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in greedy(client, max_tokens=mid).choices[0].text:
            hi = mid
        else:
            lo = mid + 1
    return text, stop, lo


def test_stop_string_ends_generation_at_that_token(tiny_server, reference):
    text, stop, needed = reference
    r = greedy(tiny_server.client(), stop=stop)
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == needed  # no token computed past the one completing the stop
    kept = greedy(tiny_server.client(), stop=["never-there", stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


def test_streaming_never_shows_part_of_a_stop_string(tiny_server, reference):
    text, stop, _ = reference

    async def run() -> list[str]:
        stream = await aclient(tiny_server).completions.create(
            model=TINY_NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], stream=True,
            extra_body={"ignore_eos": True})
        return [c.choices[0].text async for c in stream if c.choices]

    chunks = asyncio.run(run())
    assert "".join(chunks) == text[:text.index(stop)]
    assert len(chunks) > 3  # it did stream, token by token, up to the held-back text


def first_token_id(client, **kw) -> int:
    lp = greedy(client, max_tokens=1, logprobs=0, extra_body={"return_tokens_as_token_ids": True}, **kw).choices[0].logprobs
    return int(lp.tokens[0].removeprefix("token_id:"))


def test_stop_token_ids_and_min_tokens(tiny_server):
    client = tiny_server.client()
    token = 100
    bias = {str(token): 100}  # every step samples this token...
    r = greedy(client, logit_bias=bias, extra_body={"stop_token_ids": [token]})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (1, "stop")  # ...and it stops at once
    r = greedy(client, logit_bias=bias, extra_body={"stop_token_ids": [token], "min_tokens": 6})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "stop")
    eos = {"2": 100}  # <|im_end|>, the tiny model's EOS
    r = greedy(client, logit_bias=eos, extra_body={"ignore_eos": False})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason, r.choices[0].text) == (1, "stop", "")
    r = greedy(client, logit_bias=eos, extra_body={"ignore_eos": False, "min_tokens": 4})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (5, "stop")


# --- 2. lengths -------------------------------------------------------------------------------------


def test_max_completion_tokens_and_the_default_budget(tiny_server):
    client = tiny_server.client()
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=TINY_NAME, messages=messages, max_completion_tokens=9, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (9, "length")
    # No budget: whatever the 512-token context has left.
    r = client.chat.completions.create(model=TINY_NAME, messages=messages, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 512 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=TINY_NAME, messages=messages, max_completion_tokens=600)
    assert e.value.body["param"] == "max_tokens" and "512" in e.value.body["message"] and "600" in e.value.body["message"]


# --- 3. sampling ------------------------------------------------------------------------------------


def test_truncation_to_one_token_is_greedy(tiny_server):
    client = tiny_server.client()
    want = greedy(client).choices[0].text
    assert greedy(client, temperature=1.0, seed=3, extra_body={"min_p": 1.0, "ignore_eos": True}).choices[0].text == want
    assert greedy(client, temperature=1.0, seed=3, extra_body={"top_k": 1, "ignore_eos": True}).choices[0].text == want


def test_penalties_and_bias_change_what_is_generated(tiny_server):
    client = tiny_server.client()
    base = greedy(client, max_tokens=60, logprobs=0).choices[0].logprobs.tokens
    assert len(set(base)) < len(base), "the greedy text never repeats a token; the penalties would have nothing to do"
    for kw in [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8, "ignore_eos": True}}]:
        tokens = greedy(client, max_tokens=60, logprobs=0, **kw).choices[0].logprobs.tokens
        assert tokens != base, kw
        assert len(set(tokens)) > len(set(base)), f"{kw} did not make the text less repetitive"
    first = first_token_id(client)
    assert first_token_id(client, logit_bias={str(first): -100}) != first


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(tiny_server):
    kw = dict(model=TINY_NAME, prompt="Hello", max_tokens=24, temperature=1.0, seed=11, frequency_penalty=0.5,
              logit_bias={"5": 3.0}, extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True})
    alone = tiny_server.client().completions.create(**kw).choices[0].text

    async def busy() -> list[str]:
        client = aclient(tiny_server)
        noise = [client.completions.create(model=TINY_NAME, prompt=f"Noise {i}", max_tokens=30, temperature=0.8,
                                           presence_penalty=1.0, extra_body={"ignore_eos": True}) for i in range(6)]
        results = await asyncio.gather(client.completions.create(**kw), *noise)
        return [r.choices[0].text for r in results]

    assert asyncio.run(busy())[0] == alone


def test_n_samples_share_one_prefill(tiny_server):
    client = tiny_server.client()
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    hits = tiny_server.http().get("/stats").json()["cache_hit_tokens"]
    r = client.completions.create(model=TINY_NAME, prompt=prompt, n=4, max_tokens=12, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) > 1  # different samples
    assert r.usage.completion_tokens == 48
    single = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    # Three of the four found the first one's prompt in the cache (all but its last token); usage counts
    # the prompt, and its cached part, once.
    assert tiny_server.http().get("/stats").json()["cache_hit_tokens"] - hits >= 3 * (single.usage.prompt_tokens - 1)
    assert r.usage.prompt_tokens_details.cached_tokens == single.usage.prompt_tokens - 1
    again = client.completions.create(model=TINY_NAME, prompt=prompt, n=4, max_tokens=12, temperature=1.0, seed=5,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded n is repeatable too
    g = client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=8, temperature=0)
    assert len({c.message.content for c in g.choices}) == 1  # greedy samples agree

    async def streamed() -> dict[int, str]:
        stream = await aclient(tiny_server).completions.create(
            model=TINY_NAME, prompt=prompt, n=4, max_tokens=12, temperature=1.0, seed=5, stream=True,
            extra_body={"ignore_eos": True})
        texts, finished = {}, []
        async for c in stream:
            for choice in c.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finished.append(choice.index)
        assert sorted(finished) == [0, 1, 2, 3]
        return texts

    assert asyncio.run(streamed()) == {c.index: c.text for c in r.choices}


# --- 4. logprobs ------------------------------------------------------------------------------------


def test_chat_logprobs(tiny_server):
    r = tiny_server.client().chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    plain = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None

    async def streamed() -> list:
        stream = await aclient(tiny_server).chat.completions.create(
            model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logprobs=True,
            top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
        return [e async for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]

    assert [(e.token, e.logprob) for e in asyncio.run(streamed())] == [(e.token, e.logprob) for e in content]


def hf_prompt_logprobs(folder, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_echo_scores_the_prompt_like_transformers(tiny_server, tiny_model):
    """The loglikelihood lm-evaluation-harness asks for: echo, max_tokens 0, logprobs of the prompt."""
    ids = [5, 77, 120, 9, 300, 41, 18, 250]
    r = tiny_server.client().completions.create(model=TINY_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert lp.token_logprobs[1:] == pytest.approx(hf_prompt_logprobs(tiny_model, ids), abs=1e-3)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    detok = tiny_server.http().post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert r.choices[0].text == detok and lp.text_offset[0] == 0


def test_prompt_logprobs_survive_chunks_and_the_prefix_cache(tiny_model):
    """A 70-token prompt prefilled 16 tokens per step, after the same prompt has been cached: scored whole."""
    ids = [(37 * i) % 370 + 3 for i in range(70)]
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", "--chunked-prefill-tokens", "16") as server:
        client = server.client()
        client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=2)  # now in the prefix cache
        r = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 73 and r.usage.prompt_tokens_details.cached_tokens == 0
    assert lp.token_logprobs[1:70] == pytest.approx(hf_prompt_logprobs(tiny_model, ids), abs=1e-3)


def test_echo_with_a_completion(tiny_server):
    r = greedy(tiny_server.client(), max_tokens=5, echo=True, logprobs=1)
    choice = r.choices[0]
    prompt_tokens = r.usage.prompt_tokens
    assert choice.text.startswith(PROMPT) and len(choice.logprobs.tokens) == prompt_tokens + 5
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# --- 5. streaming details ---------------------------------------------------------------------------


def test_stream_usage_chunk_and_abort(long_server):
    async def run() -> tuple[list, list]:
        client = aclient(long_server)
        stream = await client.chat.completions.create(
            model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=7, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage_chunks = [c async for c in stream]
        # No max_tokens: the rest of the 8k context, far more than the 3 chunks read before the abort.
        long = await client.completions.create(model=TINY_NAME, prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
        chunks = []
        async for c in long:
            chunks.append(c)
            if len(chunks) == 3:
                async with httpx.AsyncClient(base_url=long_server.url) as http:
                    answer = (await http.post("/abort_request", json={"rid": c.id})).json()
                    assert answer == {"aborted": 1}, (c.id, answer)
        return usage_chunks, chunks

    usage_chunks, aborted = asyncio.run(run())
    assert usage_chunks[0].choices[0].delta.role == "assistant"
    last = usage_chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7
    assert aborted[-2].choices[0].finish_reason == "abort", aborted[-2:]
    # What it had generated when aborted: at least the 3 chunks read, short of the ~8,000 it would have made.
    assert 3 <= aborted[-1].usage.completion_tokens < 8000 - aborted[-1].usage.prompt_tokens, aborted[-1].usage


# --- 6. inputs and extra endpoints ------------------------------------------------------------------


def test_completions_take_lists_of_prompts(tiny_server, tiny_model):
    client = tiny_server.client()
    prompts = ["Hello, world!", "What is the capital", "def add(a, b):"]
    alone = [greedy(client, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    r = greedy(client, prompt=prompts, max_tokens=6)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == alone
    ids = [tiny_server.http().post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    r = greedy(client, prompt=ids, max_tokens=6)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == alone
    assert r.usage.completion_tokens == 18


def test_chat_content_parts_and_ignored_fields(tiny_server):
    client = tiny_server.client()
    kw = dict(model=TINY_NAME, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again"}], **kw)
    parts = client.chat.completions.create(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again"}],
        user="someone", metadata={"k": "v"}, **kw)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_tokenize_detokenize_version(tiny_server):
    with tiny_server.http() as http:
        t = http.post("/tokenize", json={"model": TINY_NAME, "prompt": "Hello, world!"}).json()
        assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 512
        assert http.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello, world!"
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        r = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        assert chat["count"] == r.usage.prompt_tokens
        assert http.get("/version").json()["version"]
        bad = http.post("/detokenize", json={"tokens": [10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# --- 7. errors --------------------------------------------------------------------------------------


BAD = [
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("n of zero", {"n": 0}, "n"),
    ("top_logprobs too many", {"logprobs": 30}, "logprobs"),
    ("logit_bias key", {"logit_bias": {"fox": 3}}, "logit_bias"),
    ("logit_bias value", {"logit_bias": {"5": 300}}, "logit_bias"),
    ("logit_bias token", {"logit_bias": {"99999": 3}}, "logit_bias"),
    ("stop token", {"stop_token_ids": [99999]}, "stop_token_ids"),
    ("max_tokens 0 without echo", {"max_tokens": 0}, "max_tokens"),
    ("min_p", {"min_p": 2}, "min_p"),
    ("presence_penalty", {"presence_penalty": 5}, "presence_penalty"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("huge wrong-typed input", {"temperature": "x" * 200_000}, "temperature"),
]


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_invalid_values_name_their_param(tiny_server, name, extra, param):
    with tiny_server.http() as http:
        r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and len(r.content) < 2000  # never echoes a huge input back
        assert http.get("/health").status_code == 200


def test_chat_top_logprobs_needs_logprobs(tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_server.client().chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_oversized_body_gets_413(tiny_server):
    with tiny_server.http() as http:
        big = json.dumps({"model": TINY_NAME, "prompt": "x" * (9 << 20)}).encode()
        r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + 1 << 20]

        r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.get("/health").status_code == 200


# --- 8. aborts --------------------------------------------------------------------------------------


def test_non_streaming_client_that_leaves_aborts_its_request(long_server):
    async def leave_while_running() -> None:
        async with httpx.AsyncClient(base_url=long_server.url, timeout=120) as http:
            # The rest of an 8k context: seconds of work, so the request still runs when the client leaves.
            body = {"model": TINY_NAME, "prompt": PROMPT, "ignore_eos": True}
            request = asyncio.ensure_future(http.post("/v1/completions", json=body))
            while (await http.get("/stats")).json()["running"] == 0 and not request.done():
                await asyncio.sleep(0.02)
            assert not request.done(), "the request finished before it was seen running"
            request.cancel()  # the client gives up: its connection closes
            await asyncio.gather(request, return_exceptions=True)

    with long_server.http() as http:
        before = http.get("/stats").json()["aborted"]
        asyncio.run(leave_while_running())
        stats = wait_idle(http)
        assert stats["aborted"] == before + 1 and stats["running"] == 0 and stats["pool_tokens_used"] == 0, stats


def test_null_means_default_and_params_are_named_plainly(tiny_server):
    r = tiny_server.client().completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=3, temperature=None, n=None,
                                                extra_body={"logprobs": None, "seed": None})
    assert r.usage.completion_tokens <= 3
    with tiny_server.http() as http:
        for body, param in [({"prompt": 5}, "prompt"), ({"prompt": "a", "stop": 5}, "stop"),
                            ({"prompt": [10**30]}, "prompt"), ({"prompt": "a", "seed": 2**64}, "seed"),
                            ({"prompt": "a", "max_tokens": 10**30}, "max_tokens"),
                            ({"prompt": "a", "logit_bias": {str(10**30): 1}}, "logit_bias"),
                            ({"prompt": "a", "min_tokens": 9, "max_tokens": 3}, "min_tokens")]:
            r = http.post("/v1/completions", json={"model": TINY_NAME, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        r = http.get("/v1/nope")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/v1/completions", json={"model": "x" * 100_000, "prompt": "a"})
        assert r.status_code == 404 and len(r.content) < 1000
