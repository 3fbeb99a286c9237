"""The OpenAI request shapes we accept and the error envelope we answer with.

Validation happens here, at the edge: a bad field becomes a 400 naming the `param`, never a 500.
Fields a client may send that we do not use (`user`, `metadata`, ...) are ignored, as OpenAI does.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Callable, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve import constraints
from serve.constraints import Constraint


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own errors (unknown route, wrong method, an unparsable body) in OpenAI's envelope."""
    status = getattr(exc, "status_code", 500)
    if status == 400:
        message = "the request body is not valid JSON"
    else:
        message = f"{request.method} {request.url.path[:200]}: {getattr(exc, 'detail', 'error')}"
    return APIError(status, message, type="invalid_request_error" if status < 500 else "server_error").response()


async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried ("str", "list[int]", ...): not a field name."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part)


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif first.get("type") == "missing" and param is None:
        message = "the request body is missing"
    elif first.get("type") == "missing":
        message = f"missing required parameter: {param}"
    else:
        # pydantic's message, without the offending input: it may be huge.
        message = f"invalid value for {param or 'the request body'}: {first.get('msg', 'invalid')}"
    return APIError(400, message, param).response()


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 in OpenAI's envelope before any of it
    is parsed (by its Content-Length, or by counting when it comes chunked)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        body, more = [], True
        while more:  # read it all here (FastAPI would anyway), counting
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_bytes:
                return await self._reject(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(body), "more_body": False}], receive), send)

    async def _reject(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)


class Gate:
    """ASGI middleware in front of everything: the API key, and a draining server's 503.

    /health and /version stay open (probes carry no key); so do the OpenAPI schema and docs, the web
    page (which asks for the key itself) and /metrics (as in vLLM and SGLang: scrapers carry no key).
    """

    OPEN = {"/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/", "/metrics"}

    def __init__(self, app, api_key: str, draining: Callable[[], bool]) -> None:
        self.app, self.draining = app, draining
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = None
            if self.draining() and scope["path"] != "/version":
                error = APIError(503, "the server is shutting down", type="service_unavailable", headers={"Retry-After": "5"})
            elif self.expected is not None and scope["path"] not in self.OPEN:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    error = APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")
            if error is not None:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _replay(messages: list[dict], then=None):
    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        return await then() if then else {"type": "http.disconnect"}
    return receive


INT32 = 2**31 - 1  # token ids and lengths; also keeps every int inside MessagePack's 64 bits
TokenId = Annotated[int, Field(ge=0, le=INT32)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's clients send null for options they leave unset: null means the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(default=None, ge=0, le=INT32)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=INT32)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-2**62, le=2**62)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # vLLM/SGLang extension
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    # vLLM/SGLang extensions
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    min_tokens: int = Field(default=0, ge=0, le=INT32)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (vLLM): for bytes that are no text
    # Structured outputs (serve/constraints.py checks their shapes): OpenAI's, vLLM's and SGLang's fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None

    def constraint(self) -> Constraint | None:
        try:
            return constraints.parse(self.model_dump(include={"response_format", "structured_outputs", "json_schema", "regex", "ebnf"}))
        except constraints.ConstraintError as e:
            raise APIError(400, str(e), e.param) from None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}", "stop")
        if any(not s or len(s) > 512 for s in stops):
            raise APIError(400, "a stop sequence must have 1 to 512 characters", "stop")
        return stops

    def bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token <= INT32:
                raise APIError(400, f"logit_bias keys must be token ids, got {key[:40]!r}", "logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias values must be between -100 and 100, got {value}", "logit_bias")
            out[token] = value
        return out


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, sent back by the client
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """The message as the chat template reads it (serve/api/tools.py turns tool calls' arguments into objects)."""
        extra = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id, "name": self.name}
        return {"role": self.role, "content": self.text(), **{k: v for k, v in extra.items() if v is not None}}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=0, le=INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class TokenizeBody(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeBody(_Base):
    model: str | None = None
    tokens: list[TokenId]


class AbortBody(_Base):
    rid: str
