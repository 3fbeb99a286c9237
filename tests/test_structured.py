"""Structured outputs as clients ask for them: OpenAI's response_format (through the SDK's own `parse`),
vLLM's structured_outputs and SGLang's json_schema/regex/ebnf, streamed and not, on chat and completions.
The tiny model's weights are random, so whatever it writes inside the constraint is noise: a reply that
parses and validates can only come from the grammar."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import TINY_NAME
from tests.server import Server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=150)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def stream_text(chunks) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in chunks:
        for c in chunk.choices:
            part = c.delta.content if hasattr(c, "delta") else c.text
            text += part or ""
            finish = c.finish_reason or finish
    return text, finish


def test_sdk_parse_with_pydantic(tiny_server):
    """The openai SDK's parse(): it sends the model's strict schema and parses the reply into it."""
    for seed in range(3):
        reply = client(tiny_server).chat.completions.parse(model=TINY_NAME, messages=CHAT, response_format=Person,
                                                           temperature=1.0, seed=seed, max_tokens=200)
        person = reply.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 150, reply
        assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_chat_validates(tiny_server, stream):
    for seed in range(3):
        kw = dict(model=TINY_NAME, messages=CHAT, response_format=schema_format(PERSON), temperature=1.0, seed=seed, max_tokens=200)
        if stream:
            text, finish = stream_text(client(tiny_server).chat.completions.create(stream=True, **kw))
        else:
            reply = client(tiny_server).chat.completions.create(**kw)
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        jsonschema.validate(json.loads(text), PERSON)
        assert finish == "stop"
        assert " " not in text.replace(json.loads(text)["name"], ""), "JSON comes out compact"


def closers(server) -> dict[str, float]:
    """A logit bias toward '"' and '}': a random model inside a free JSON string would otherwise hardly
    ever close it (the grammar decides what may come, not when a string ends)."""
    ids = httpx.post(f"{server.url}/tokenize", json={"model": TINY_NAME, "prompt": '"}', "add_special_tokens": False}).json()["tokens"]
    return {str(t): 6.0 for t in ids}


@pytest.mark.parametrize("stream", [False, True])
def test_completions_json_object_and_sglang_schema(tiny_server, stream):
    c = client(tiny_server)
    for body in ({"response_format": {"type": "json_object"}, "logit_bias": closers(tiny_server)}, {"json_schema": json.dumps(PERSON)}):
        kw = dict(model=TINY_NAME, prompt="JSON:", temperature=1.0, seed=7, max_tokens=200, extra_body=body)
        if stream:
            text, finish = stream_text(c.completions.create(stream=True, **kw))
        else:
            reply = c.completions.create(**kw)
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert finish == "stop", text
        value = json.loads(text)
        assert isinstance(value, dict), text
        if "json_schema" in body:
            jsonschema.validate(value, PERSON)


def test_regex_choice_and_grammar_through_extra_body(tiny_server):
    c = client(tiny_server)

    def chat(extra: dict, **kw) -> openai.types.chat.ChatCompletion:
        return c.chat.completions.create(model=TINY_NAME, messages=CHAT, temperature=1.0, max_tokens=50, extra_body=extra, **kw)

    for seed in range(4):
        assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", chat({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, seed=seed).choices[0].message.content)
        assert chat({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, seed=seed).choices[0].message.content in ("yes", "no", "maybe")
        assert re.fullmatch(r"x(yz)+", chat({"regex": "x(yz)+"}, seed=seed).choices[0].message.content)  # SGLang's field
        assert chat({"ebnf": 'root ::= "up" | "down"'}, seed=seed).choices[0].message.content in ("up", "down")
        assert chat({"structured_outputs": {"grammar": 'start: "left" | "right"'}}, seed=seed).choices[0].message.content in ("left", "right")


def test_ending_right(tiny_server):
    """A finished grammar stops the request even when min_tokens asks for more; max_tokens cuts with length."""
    c = client(tiny_server)
    reply = c.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=50, temperature=1.0, seed=1,
                                      extra_body={"structured_outputs": {"choice": ["yes", "no"]}, "min_tokens": 30})
    assert reply.choices[0].message.content in ("yes", "no") and reply.choices[0].finish_reason == "stop"
    reply = c.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=5, temperature=1.0, seed=1,
                                      extra_body={"regex": "a{200}"})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert set(reply.choices[0].message.content) == {"a"}
    # With ignore_eos a finished grammar still ends the reply: only stop tokens are left to sample.
    reply = c.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=40, temperature=1.0, seed=2,
                                      extra_body={"regex": "(ab){3}", "ignore_eos": True})
    assert reply.choices[0].message.content == "ababab"


def post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": TINY_NAME, "messages": CHAT, "max_tokens": 20, **body}, timeout=60)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}, "regex": "a+"}, "regex"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"response_format": schema_format({"type": "nonsense"})}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": schema_format({"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 100}
                                                                         for i in range(1000)}})}, "response_format"),
    ({"regex": "(unclosed"}, "regex"),
    ({"ebnf": "root ::= missing_rule"}, "ebnf"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
])
def test_bad_constraints_are_400(tiny_server, body, param):
    r = post(tiny_server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    # The server is unharmed: the next request is served.
    assert post(tiny_server, {"response_format": {"type": "json_object"}}).status_code == 200


def constrained_under_load(server) -> list[str]:
    """Seeded constrained replies, each alone and then beside 12 unconstrained streams."""
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            def constrained(seed):
                return c.chat.completions.create(model=TINY_NAME, messages=CHAT, response_format=schema_format(PERSON),
                                                 temperature=1.0, seed=seed, max_tokens=200)

            alone = [(await constrained(s)).choices[0].message.content for s in range(3)]
            free = [c.completions.create(model=TINY_NAME, prompt=f"story {i}", max_tokens=60, temperature=1.0, seed=i,
                                         extra_body={"ignore_eos": True}) for i in range(12)]
            busy = await asyncio.gather(*free, *(constrained(s) for s in range(3)))
            return alone + [r.choices[0].message.content for r in busy[12:]]

    return asyncio.run(run())


def test_same_answer_with_overlap_on_and_off_alone_and_busy(tiny_model, tiny_server):
    """tiny_server plans ahead (overlap on); a second server does not. Every reply must be the same."""
    on = constrained_under_load(tiny_server)
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", "--no-overlap") as server:
        off = constrained_under_load(server)
    assert on[:3] == on[3:], "a busy batch changed a constrained reply"
    assert on == off, "overlap changed a constrained reply"
    for text in on:
        jsonschema.validate(json.loads(text), PERSON)
