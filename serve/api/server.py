"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from serve.api.bridge import Bridge
from serve.api.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, api_error_handler, validation_error_handler,
)
from serve.messages import GenerateRequest, RequestError, RequestOutput, SamplingParams
from serve.model_files import ModelInfo


def create_app(bridge: Bridge, model: ModelInfo) -> FastAPI:
    app = FastAPI(title="serve", version="0.1.0")
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    created = int(time.time())

    def check_model(name: str) -> None:
        if name != model.served_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model.served_name}'",
                           "model", "model_not_found")

    def sampling(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        if body.stop:
            raise APIError(400, "stop sequences are not supported yet", "stop")
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), seed=body.seed,
                              ignore_eos=body.ignore_eos)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await bridge.ask("ping", timeout_s=2.0)
        if ok is None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/stats")
    async def stats() -> JSONResponse:
        """The scheduler's own numbers (running, waiting, KV pool use), asked over the control channel."""
        data = await bridge.ask("stats", timeout_s=2.0)
        if data is None:
            raise APIError(503, "the scheduler did not answer in time", type="service_unavailable")
        return JSONResponse(data)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model.served_name, "object": "model", "created": created, "owned_by": "serve",
            "max_model_len": model.max_model_len,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        check_model(body.model)
        params = sampling(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        req = GenerateRequest(f"chatcmpl-{uuid.uuid4().hex}", None, messages, None, max_tokens, params)
        return await respond(req, body.stream, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        params = sampling(body)
        prompt, ids = body.prompt, None
        if isinstance(prompt, list):
            if prompt and isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise APIError(400, "a list of several prompts is not supported yet; send one prompt per request", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, list):
                prompt, ids = None, prompt
        req = GenerateRequest(f"cmpl-{uuid.uuid4().hex}", prompt, None, ids, body.max_tokens, params)
        return await respond(req, body.stream, chat=False)

    async def respond(req: GenerateRequest, stream: bool, chat: bool):
        outputs = bridge.generate(req)
        # Wait for the first output before answering, so a request the tokenizer rejects gets a real 4xx.
        first = await anext(outputs)
        if isinstance(first, RequestError):
            raise APIError(first.status, first.message, first.param, first.code)
        shape = ChatShape(req.rid, model.served_name) if chat else CompletionShape(req.rid, model.served_name)
        if stream:
            return StreamingResponse(sse(shape, first, outputs), media_type="text/event-stream")
        text, last = first.text, first
        async for out in outputs:
            text += out.text
            last = out
        return shape.final(text, last)

    async def sse(shape, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        try:
            for chunk in shape.head():
                yield f"data: {json.dumps(chunk)}\n\n"
            out = first
            while True:
                if out.text or out.finish_reason:
                    yield f"data: {json.dumps(shape.chunk(out.text, out.finish_reason))}\n\n"
                if out.finish_reason is not None:
                    break
                out = await anext(outputs)
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away mid-stream lands here too: closing `outputs` aborts the request.
            await outputs.aclose()

    return app


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


class ChatShape:
    def __init__(self, rid: str, model: str) -> None:
        self.base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def head(self) -> list[dict]:
        # OpenAI's first chunk carries the role alone.
        return [{**self.base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]

    def chunk(self, text: str, reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    def final(self, text: str, out: RequestOutput) -> dict:
        return {**self.base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish_reason,
        }], "usage": _usage(out)}


class CompletionShape:
    def __init__(self, rid: str, model: str) -> None:
        self.base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}

    def head(self) -> list[dict]:
        return []

    def chunk(self, text: str, reason: str | None) -> dict:
        return {**self.base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    def final(self, text: str, out: RequestOutput) -> dict:
        return {**self.base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": _usage(out)}
