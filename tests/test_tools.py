"""Tool calls as agent frameworks make them, through the openai SDK against a launched server: a forced
call (tool_choice required or named) that parses and fits its function's schema, streamed as OpenAI's
deltas, the round trip (call, tool result, answer), finish reasons, and the 400s. The parser itself is
fed the Hermes text a tool-tuned model writes, whole and in every split."""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from serve.api.tools import ToolParser, message
from tests.conftest import TINY_NAME

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def call(server, **kw) -> openai.types.chat.ChatCompletion:
    kw = {"model": TINY_NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 120, "temperature": 1.0, "parallel_tool_calls": False, **kw}
    return client(server).chat.completions.create(**kw)


def assert_valid(calls) -> None:
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in SCHEMAS
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_required_gives_one_valid_call(long_server):
    for seed in range(3):
        reply = call(long_server, tool_choice="required", seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        assert_valid(choice.message.tool_calls)


def test_a_named_function_is_called_and_finishes_with_stop(long_server):
    for seed in range(3):
        reply = call(long_server, tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        assert_valid(choice.message.tool_calls)


def test_parallel_calls_when_allowed(long_server):
    # A logit bias towards the newline between calls and against the end: the model writes several.
    ids = httpx.post(f"{long_server.url}/tokenize", json={"prompt": "\n<", "add_special_tokens": False}).json()["tokens"]
    reply = call(long_server, tool_choice="required", seed=0, parallel_tool_calls=True, max_tokens=400,
                 logit_bias={str(t): 5 for t in ids})
    calls = reply.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls), reply
    assert_valid(calls if reply.choices[0].finish_reason == "tool_calls" else calls[:-1])


def test_a_streamed_call_arrives_as_openai_deltas(long_server):
    stream = call(long_server, tool_choice="required", seed=4, stream=True)
    names, fragments, finish = {}, {}, None
    for chunk in stream:
        for c in chunk.choices:
            assert not c.delta.content
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # the name, once, with the id
                    assert d.index not in names and d.function.name in SCHEMAS and d.type == "function"
                    names[d.index] = d.function.name
                else:
                    assert d.function.name is None and d.index in names
                fragments[d.index] = fragments.get(d.index, "") + (d.function.arguments or "")
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(names) == [0]
    jsonschema.validate(json.loads(fragments[0]), SCHEMAS[names[0]])
    # The same request not streamed gives the same call.
    whole = call(long_server, tool_choice="required", seed=4).choices[0].message.tool_calls[0]
    assert (whole.function.name, whole.function.arguments) == (names[0], fragments[0])


def test_round_trip_call_result_answer(long_server):
    first = call(long_server, tool_choice="required", seed=1).choices[0].message
    result = {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 22 C"}
    conversation = [*ASK, first.model_dump(exclude_none=True), result]
    # The template shows the model its own call and the result.
    ids = httpx.post(f"{long_server.url}/tokenize", json={"messages": conversation, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(f"{long_server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "<tool_response>\nsunny, 22 C\n</tool_response>" in text
    fn = first.tool_calls[0].function
    assert f'<tool_call>\n{{"name": "{fn.name}", "arguments": {json.dumps(json.loads(fn.arguments))}}}\n</tool_call>' in text
    answer = call(long_server, messages=conversation, tool_choice="none", max_tokens=10, temperature=0).choices[0]
    assert answer.finish_reason == "length" and answer.message.content and answer.message.tool_calls is None


def test_none_and_auto_without_a_call_are_plain_text(long_server):
    for choice in ("none", "auto"):
        reply = call(long_server, tool_choice=choice, seed=3, max_tokens=12)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "length", "never tool_calls without a call"


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_requests_are_400(long_server, body, param):
    r = httpx.post(f"{long_server.url}/v1/chat/completions", json={"model": TINY_NAME, "messages": ASK, "max_tokens": 5, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_config_template_replaces_the_models(tiny_model, tmp_path):
    """model.chat_template (--chat-template) names the template every request gets, tools or not."""
    from serve.config import Config, ConfigError, validate
    from serve.text import TextTokenizer

    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if tools %}TOOLS {{ tools | length }}\n{% endif %}>")
    tok = TextTokenizer(tiny_model, template)
    assert tok.decode(tok.apply_chat_template(ASK, TOOLS)) == f"[user] {ASK[0]['content']}\nTOOLS 2\n>"
    assert tok.decode(tok.apply_chat_template(ASK)) == f"[user] {ASK[0]['content']}\n>"
    # Without one, a template that knows no tools (the tiny model's is ChatML) gets ours for tool requests only.
    plain = TextTokenizer(tiny_model)
    assert "<tools>" in plain.decode(plain.apply_chat_template(ASK, TOOLS)) and "<tools>" not in plain.decode(plain.apply_chat_template(ASK))
    config = Config()
    config.model.path, config.model.chat_template = str(tiny_model), str(tmp_path / "missing.jinja")
    with pytest.raises(ConfigError, match="model.chat_template: no such file"):
        validate(config)


# The parser on what a tool-tuned model writes (Hermes format), whole and split at random points.
REPLIES = {
    "two calls after text": ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
                             '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
                             "Let me check.", [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})]),
    "arguments first": ('<tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call>', None, [("get_time", {"zone": "UTC"})]),
    "nested braces": ('<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, {"c": "}"}]}}}\n</tool_call>', None, [("f", {"a": {"b": [1, {"c": "}"}]}})]),
    "no call": ("Just text, with a < and a <tool_c", "Just text, with a < and a <tool_c", []),
    "not a call": ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    # max_tokens can end a reply anywhere after the arguments: the call keeps exactly its arguments.
    "cut in the closing tag": ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
                               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call',
                               None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})]),
    "cut before the tag": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": {"n": 2}}}\n</',
                           None, [("get_weather", {"city": "Rome", "days": {"n": 2}})]),
    "cut before the call's brace": ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}', None, [("get_time", {"zone": "CET"})]),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_the_parser_whole_and_streamed(name):
    text, content, calls = REPLIES[name]
    whole = ToolParser()
    whole.feed(text)
    whole.finish()
    msg = message(whole)
    assert msg["content"] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])] == calls
    rng = random.Random(0)
    for _ in range(30):
        parser, deltas, at = ToolParser(), [], 0
        while at < len(text):
            step = rng.randint(1, 6)
            deltas.append(parser.feed(text[at:at + step]))
            at += step
        deltas.append(parser.finish())
        got: dict[int, list] = {}
        for d in deltas:
            for part in d.get("tool_calls", []):
                if "id" in part:
                    got[part["index"]] = [part["function"]["name"], ""]
                got[part["index"]][1] += part["function"].get("arguments", "")
        assert [(n, json.loads(a)) for n, a in got.values()] == calls
        streamed = "".join(d.get("content", "") for d in deltas)
        assert (streamed.strip() or None) == (content.strip() if content else None)


def test_a_call_cut_inside_its_arguments_keeps_what_was_written():
    """As vLLM and OpenAI do with finish_reason "length": the partial arguments, no tag text in them."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro'
    for step in (1, 3, len(text)):
        parser, sent = ToolParser(), ""
        for at in range(0, len(text), step):
            for part in parser.feed(text[at:at + step]).get("tool_calls", []):
                sent += part["function"].get("arguments", "")
        for part in parser.finish().get("tool_calls", []):
            sent += part["function"].get("arguments", "")
        assert sent == '{"city": "Ro'
        assert message(parser)["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Ro'}
