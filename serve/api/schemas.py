"""The shapes of our responses, declared for /openapi.json only (the handlers build plain dicts, see
shapes.py). Clients and the fuzzing test check answers against them, errors included."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": what}
    for status, what in [(400, "invalid value (param names it)"), (401, "missing or wrong API key"),
                         (404, "unknown model or route"), (413, "request body too large"),
                         (503, "queue full, draining, stuck stage, or restarted stage (Retry-After)")]
}


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def generation(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation endpoint answers JSON, or server-sent events when `stream` is true."""
    # Events are chunk objects, then the bare "[DONE]"; tests/test_fuzz.py checks them one by one.
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {}}}}, **ERRORS}


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Text(BaseModel):
    prompt: str
    text: str


class Version(BaseModel):
    version: str


class Status(BaseModel):
    status: str


class Aborted(BaseModel):
    aborted: int
