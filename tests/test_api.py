"""The OpenAI API of a launched server, driven through the `openai` SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import os
import time
import subprocess

import openai
import pytest

from tests.conftest import TINY_NAME


def test_processes_have_titles(tiny_server):
    titles = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, tiny_server.children))],
                            capture_output=True, text=True).stdout.split("\n")
    # multiprocessing's own resource tracker is a child too; the pipeline is the serve:* ones.
    names = sorted(t.strip() for t in titles if t.startswith("serve:"))
    assert names == ["serve:api", "serve:detokenizer", "serve:scheduler", "serve:tokenizer", "serve:worker-0"]


def test_health_and_models(tiny_server):
    with tiny_server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    assert models.data[0].model_extra["max_model_len"] == 512


def test_chat_non_streaming_usage_and_length(tiny_server):
    r = tiny_server.client().chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "Hello, world!"}], max_tokens=7, temperature=0,
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    else:
        assert choice.finish_reason == "stop" and r.usage.completion_tokens <= 7


def test_streaming_matches_non_streaming(tiny_server):
    client = tiny_server.client()
    kwargs = dict(model=TINY_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
                  max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_ends_with_done(tiny_server):
    with tiny_server.http() as http:
        body = {"model": TINY_NAME, "prompt": "The quick brown", "max_tokens": 5, "stream": True, "temperature": 0}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = [l for l in r.iter_lines() if l]
    assert r.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert all(l.startswith("data: ") for l in lines)


def test_completions_text_and_token_ids_agree(tiny_server, tiny_model):
    from tokenizers import Tokenizer

    client = tiny_server.client()
    a = client.completions.create(model=TINY_NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    ids = client.completions.create(model=TINY_NAME, prompt=[0], max_tokens=1)  # a token-id prompt works
    assert ids.usage.prompt_tokens == 1
    b = client.completions.create(model=TINY_NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text  # greedy is deterministic
    assert a.usage.completion_tokens == 12 or a.choices[0].finish_reason == "stop"
    # The same prompt as token ids gives the same completion as the text.
    prompt_ids = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode("Once upon a time").ids
    c = client.completions.create(model=TINY_NAME, prompt=prompt_ids, max_tokens=12, temperature=0)
    assert c.choices[0].text == a.choices[0].text and c.usage.prompt_tokens == a.usage.prompt_tokens


def test_seed_makes_sampling_repeatable(tiny_server):
    client = tiny_server.client()
    kw = dict(model=TINY_NAME, prompt="Hello", max_tokens=16, temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1, "different seeds never changed the sample"


def test_concurrent_streams_each_get_their_own_answer(tiny_server):
    prompts = [f"Question number {i}: what is the quick brown fox?" for i in range(16)]
    client = tiny_server.client()
    alone = [client.completions.create(model=TINY_NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in prompts]

    async def stream(aclient, prompt):
        out = await aclient.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in out])

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    together = asyncio.run(all_at_once())
    assert together == alone


BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": ', 400, None),
    ("body not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": TINY_NAME}, 400, "messages"),
    ("missing prompt", "/v1/completions", {"model": TINY_NAME}, 400, "prompt"),
    ("max_tokens not an int", "/v1/completions", {"model": TINY_NAME, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {"model": TINY_NAME, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("bad role", "/v1/chat/completions", {"model": TINY_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("empty messages", "/v1/chat/completions", {"model": TINY_NAME, "messages": []}, 400, "messages"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("prompt beyond context", "/v1/completions", {"model": TINY_NAME, "prompt": "fox " * 600}, 400, "prompt"),
    ("budget beyond context", "/v1/completions", {"model": TINY_NAME, "prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("token id out of vocabulary", "/v1/completions", {"model": TINY_NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": TINY_NAME, "prompt": ""}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error(tiny_server, name, path, body, status, param):
    with tiny_server.http() as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["param"] == param
        # ... and the server is still fine afterwards.
        assert http.get("/health").status_code == 200


def test_context_error_gives_the_numbers(tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_server.client().completions.create(model=TINY_NAME, prompt="a", max_tokens=1000)
    msg = e.value.body["message"]
    assert "512" in msg and "1000" in msg


def test_ignore_eos_generates_exactly_max_tokens(tiny_server):
    r = tiny_server.client().completions.create(model=TINY_NAME, prompt="Hello", max_tokens=40, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_server_uses_no_cpu(tiny_server):
    pids = tiny_server.children + [tiny_server.proc.pid]
    time.sleep(0.5)  # let the previous test's request settle
    before = sum(_cpu_seconds(p) for p in pids)
    time.sleep(3.0)
    used = sum(_cpu_seconds(p) for p in pids) - before
    assert used < 0.15, f"an idle server burned {used:.2f} CPU seconds in 3 s: something busy-waits"


def test_client_that_leaves_mid_stream_aborts_its_request(long_server):
    # The 8k-context model: a 4,000-token stream outlives the abort even on a busy machine (480 tokens of
    # the 512-token model could finish before the abort landed).
    with long_server.http() as http:
        before = http.get("/stats").json()["aborted"]
        body = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # The connection is closed; the scheduler must drop the request and free its KV.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = http.get("/stats").json()
            if stats["aborted"] > before and stats["running"] == 0:
                break
            time.sleep(0.05)
        assert stats["aborted"] == before + 1, stats
        assert stats["running"] == 0 and stats["pool_tokens_used"] == 0, stats
