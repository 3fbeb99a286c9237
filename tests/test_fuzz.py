"""Schemathesis against the tiny model's own /openapi.json: every operation, bounded and seeded examples,
no 5xx, and every answer in the shape a client relies on.

The app declares its responses (serve/api/schemas.py): every status it may send, JSON or an event
stream, and their schemas, errors included. Schemathesis checks each answer against them (no 5xx,
declared status, declared content type, schema); the checks below add what the README promises beyond a
schema: errors in OpenAI's envelope; a completion's choices, finish reasons and usage; a stream's `data:`
lines ending in `[DONE]`.

Generation is kept cheap: the model is always the served one (an unknown model is a 404 before anything
else is looked at, which would hide the rest of the request), and budgets, `n` and the number of prompts
are capped, so fuzzing spends its time on inputs, not on generating tokens (see `bound`).

No generator sends an integer past 64 bits to a field whose schema has no maximum, so a second test
does: every integer field at 2**63, 2**64 and -2**63-1.
"""

from __future__ import annotations

import json

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from tests.conftest import TINY_NAME  # noqa: E402

MAX_EXAMPLES = 30  # random valid bodies per operation
MAX_TOKENS = 8  # a generated budget above this (but inside the context) is cut to it
MAX_N = 2
MAX_PROMPTS = 3
GENERATE = {"/v1/completions", "/v1/chat/completions"}


@pytest.fixture(scope="module")
def fuzz_server(tiny_server):
    return tiny_server  # the shared one: whatever the fuzzer sends must not harm the requests after it


@pytest.fixture(scope="module")
def max_model_len(fuzz_server) -> int:
    return httpx.get(f"{fuzz_server.url}/v1/models").json()["data"][0]["max_model_len"]


@pytest.fixture(scope="module")
def vocab(tiny_model) -> int:
    return json.loads((tiny_model / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    config = schemathesis.Config.from_dict({
        "seed": 20261124,  # each operation's examples derive from it: a failure repeats
        "generation": {"database": "none"},
        # Read whole streams (the default stops after 20 events), so every stream is checked to its end.
        "max-stream-events": 1000,
        "phases": {
            # Boundary and invalid values, a few cases per field, come from the coverage phase; the
            # random phase makes valid bodies, which reach the model.
            "fuzzing": {"generation": {"mode": "positive", "max-examples": MAX_EXAMPLES}},
            "stateful": {"enabled": False},
        },
    })
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _legacy_nodeid(request):
    """schemathesis 4.32's fixture loader reads and renames `node._nodeid`, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _int(value) -> int | None:
    """The integer pydantic would read from a JSON value (it takes 8.0 and "8" as 8), or None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number.is_integer() else None


def bound(case, max_model_len: int, vocab: int) -> None:
    """Keeps a generated request cheap to answer and lets a valid one reach the model.

    Cheap: the served model, budgets of at most MAX_TOKENS (those beyond the context stay: they are
    refused before anything runs), at most MAX_N samples and MAX_PROMPTS prompts. Reaching the model:
    the rules across fields that the schema cannot state (at least one token unless echoing,
    top_logprobs needs logprobs, min_tokens within the budget, stream_options needs stream, 1 to 4
    non-empty stop strings, token ids inside the vocabulary, a non-empty prompt; /tokenize takes one
    of prompt or messages). Without them nearly every generated body stops at the same few 400s;
    those 400s are tested in test_api.py and test_openai_api.py.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = TINY_NAME

    def in_vocab(ids):
        return [i % vocab if (i := _int(t)) is not None and i >= 0 else t for t in ids] if isinstance(ids, list) else ids

    if case.path == "/detokenize" and "tokens" in body:
        body["tokens"] = in_vocab(body["tokens"])
    if case.path == "/tokenize" and (body.get("prompt") is None) == (not body.get("messages")):
        if body.get("prompt") is None:
            body["prompt"] = "Hello"
        else:
            del body["messages"]
    if case.path not in GENERATE:
        return
    chat = case.path == "/v1/chat/completions"
    for key in ["max_tokens", "max_completion_tokens"] if chat else ["max_tokens"]:
        value = _int(body.get(key))
        if body.get(key) is None and key == "max_tokens" or value is not None and MAX_TOKENS < value <= max_model_len:
            body[key] = MAX_TOKENS
        elif value == 0 and not (body.get("echo") is True and key == "max_tokens"):
            body[key] = 1
    if (n := _int(body.get("n"))) is not None and n > MAX_N:
        body["n"] = MAX_N
    if chat and body.get("top_logprobs") is not None and not body.get("logprobs"):
        body["logprobs"] = True
    budget = _budget(body, case.path)
    if budget is not None and (min_tokens := _int(body.get("min_tokens"))) is not None and min_tokens > budget:
        body["min_tokens"] = budget
    if body.get("stream_options") is not None and not body.get("stream"):
        body["stream"] = True
    if isinstance(body.get("stop"), list):
        body["stop"] = [s for s in body["stop"] if s != ""][:4]
    elif body.get("stop") == "":
        del body["stop"]
    if "stop_token_ids" in body:
        body["stop_token_ids"] = in_vocab(body["stop_token_ids"])
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(i % vocab) if (i := _int(k)) is not None and i >= 0 else k: v
                              for k, v in body["logit_bias"].items()}
    prompt = body.get("prompt")
    if prompt == "" or prompt == []:
        body["prompt"] = "Hello"
    elif isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
        body["prompt"] = [in_vocab(p) for p in prompt[:MAX_PROMPTS]]
    elif isinstance(prompt, list):
        body["prompt"] = in_vocab(prompt)


def openai_errors(ctx, response, case) -> None:
    """A refused request says why, in OpenAI's envelope, with a status the README names."""
    if response.status_code < 400:
        return
    # 405: schemathesis also tries methods a path does not have.
    assert response.status_code in {400, 404, 405, 413}, f"unexpected status {response.status_code}"
    error = response.json().get("error")
    assert isinstance(error, dict), f"no error envelope: {response.text[:300]}"
    assert isinstance(error.get("message"), str) and error["message"], error
    assert isinstance(error.get("type"), str), error
    assert error.get("param") is None or isinstance(error["param"], str), error
    assert error.get("code") is None or isinstance(error["code"], str), error


def _choices_expected(body: dict, path: str) -> int:
    prompt = body.get("prompt")
    listed = path == "/v1/completions" and isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    prompts = len(prompt) if listed else 1
    return prompts * (_int(body.get("n")) or 1)  # null means the default


def _budget(body: dict, path: str) -> int | None:
    if path == "/v1/chat/completions" and body.get("max_completion_tokens") is not None:
        return _int(body["max_completion_tokens"])
    return _int(body.get("max_tokens"))


def _check_usage(usage: dict, choices: int, budget: int | None) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert usage["prompt_tokens"] >= 1 and usage["completion_tokens"] >= 0, usage
    if budget is not None:
        assert usage["completion_tokens"] <= budget * choices, (usage, budget, choices)


def completion_shape(ctx, response, case) -> None:
    """A generated answer has one choice per prompt and sample, ends for a reason, and counts its tokens."""
    if case.path not in GENERATE or response.status_code != 200:
        return
    body = case.body
    expected, budget = _choices_expected(body, case.path), _budget(body, case.path)
    if not body.get("stream"):
        data = response.json()
        assert [c["index"] for c in data["choices"]] == list(range(expected)), data["choices"]
        assert all(c["finish_reason"] in {"stop", "length"} for c in data["choices"]), data["choices"]
        _check_usage(data["usage"], expected, budget)
        return
    lines = [line for line in response.content.decode().split("\n") if line]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    assert all(line.startswith("data: ") for line in lines), lines[:3]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    finished = {c["index"]: c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")}
    assert sorted(finished) == list(range(expected)), finished
    assert set(finished.values()) <= {"stop", "length"}, finished
    if (body.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [], chunks[-1]
        _check_usage(chunks[-1]["usage"], expected, budget)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_fuzz(case, max_model_len, vocab):
    bound(case, max_model_len, vocab)
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
                openai_errors, completion_shape],
        timeout=60,  # a hang is a failure, not a stuck suite
    )


# Just past what MessagePack and torch's int64 carry, and the negative side: a field without a maximum
# in the schema gets these from no generator, and one of them reaching a worker stops the server.
HUGE = [2**63, 2**64, -(2**63) - 1]
MINIMAL = {
    "/v1/completions": {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 1},
    "/v1/chat/completions": {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
    "/tokenize": {"prompt": "Hello"},
    "/detokenize": {"tokens": [1]},
    "/abort_request": {"rid": "none"},
}


def _integer_fields(spec: dict, body_schema: dict) -> dict[str, bool]:
    """The body's integer fields, each mapped to whether it is a list of integers."""
    def resolve(s: dict) -> dict:
        return spec["components"]["schemas"][s["$ref"].rsplit("/", 1)[1]] if "$ref" in s else s

    fields = {}
    for name, prop in resolve(body_schema).get("properties", {}).items():
        for option in prop.get("anyOf", [prop]):
            if option.get("type") == "integer":
                fields[name] = False
            elif option.get("type") == "array" and option.get("items", {}).get("type") == "integer":
                fields.setdefault(name, True)
    return fields


def test_huge_integers_are_refused_not_fatal(fuzz_server):
    """Every integer field of every request body, at 2**63, 2**64 and -2**63-1: a 4xx (or a 200 that
    clamps it), never a 5xx, and the server still healthy after each."""
    failures = []
    with fuzz_server.http() as http:
        spec = http.get("/openapi.json").json()
        for path, minimal in MINIMAL.items():
            body_schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for field, is_list in _integer_fields(spec, body_schema).items():
                for value in HUGE:
                    body = {**minimal, field: [value] if is_list else value}
                    try:
                        status = http.post(path, json=body).status_code
                    except httpx.TransportError as e:
                        status = type(e).__name__
                    try:
                        healthy = http.get("/health").status_code == 200
                    except httpx.TransportError:
                        healthy = False
                    if not isinstance(status, int) or status >= 500 or not healthy:
                        failures.append(f"POST {path} {json.dumps(body)} -> {status}, healthy after: {healthy}")
                    if not healthy:
                        pytest.fail("the server stopped answering:\n" + "\n".join(failures))
    assert not failures, "\n".join(failures)
