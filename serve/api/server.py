"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models; /health and /stats;
and what SGLang and vLLM users script against: /tokenize, /detokenize, /version, /abort_request.

A response may hold several choices (`n` samples of each of several prompts). Each choice is its own
request through the pipeline; the choices of one prompt share a group, so its prompt is prefilled once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import metrics
from serve.api import schemas as S
from serve.api import tools
from serve.api.bridge import Bridge
from serve.api.loads import Loads, add_load_routes
from serve.api.pipeline import snapshot as pipeline_snapshot
from serve.api.protocol import (
    AbortBody, APIError, BodyLimit, ChatCompletionRequest, CompletionRequest, DetokenizeBody, Gate, TokenizeBody,
    api_error_handler, http_error_handler, internal_error_handler, validation_error_handler,
)
from serve.api.shapes import ChatShape, Choice, CompletionShape
from serve.constraints import Constraint
from serve.messages import (
    AbortRequest, GenerateRequest, RequestError, RequestOutput, SamplingParams, TokenizeReply, TokenizeRequest, encode,
)
from serve.config import EngineConfig, ServerConfig
from serve.model_files import ModelInfo
from serve.proc import Processes

try:
    VERSION = version("serve")
except PackageNotFoundError:
    VERSION = "0.0.0"

Shape = ChatShape | CompletionShape
STATIC = Path(__file__).parent / "static"


class Drain:
    """SIGTERM: answer 503 to new requests, let the running ones finish for up to `timeout_s`, then
    abort what is left (its clients see finish_reason "abort") and let the api exit."""

    def __init__(self, bridge: Bridge, timeout_s: float) -> None:
        self.bridge, self.timeout_s = bridge, timeout_s
        self.active = False

    async def run(self) -> None:
        self.active = True
        deadline = time.monotonic() + self.timeout_s
        while self.bridge.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.bridge.live):
            await self.bridge.to_tokenizer.send(encode(AbortRequest(rid)))
        deadline = time.monotonic() + 2.0  # the aborts' last chunks on their way to the clients
        while self.bridge.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def create_app(bridge: Bridge, model: ModelInfo, server: ServerConfig | None = None, engine: EngineConfig | None = None,
               model_path: str = "") -> FastAPI:
    server = server or ServerConfig()
    loads = Loads(model, engine or EngineConfig(), model_path or model.hf_dir, VERSION)
    app = FastAPI(title="serve", version=VERSION)
    app.state.drain = drain = Drain(bridge, server.shutdown_timeout_s)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    app.add_middleware(BodyLimit, max_bytes=int(server.max_body_mb * 2**20))
    app.add_middleware(Gate, api_key=server.api_key, draining=lambda: drain.active)
    created = int(time.time())
    started = time.time()

    def check_model(name: str | None) -> None:
        if name is not None and name != model.served_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves '{model.served_name}'",
                           "model", "model_not_found")

    def sampling(body: ChatCompletionRequest | CompletionRequest, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        budget = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens else body.max_tokens
        if budget is not None and body.min_tokens > budget:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({budget})", "min_tokens")
        return SamplingParams(
            temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p, seed=body.seed,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=body.bias(), min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, stop=body.stops(), stop_token_ids=list(body.stop_token_ids or []),
            include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    def fan_out(rid: str, n: int, prompts: list[dict], max_tokens: int | None, params: SamplingParams,
                constraint: Constraint | None = None, offered: list[dict] | None = None) -> list[GenerateRequest]:
        """One request per choice; choice p*n + i is sample i of prompt p. Seeded samples of one prompt
        get seeds seed, seed+1, ... so that they differ from each other and still repeat."""
        wire = constraint.to_wire() if constraint is not None else None
        reqs = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seeded = dataclasses.replace(params, seed=params.seed + i if params.seed is not None else None)
                choice_rid = rid if len(prompts) * n == 1 else f"{rid}-{p * n + i}"
                reqs.append(GenerateRequest(choice_rid, prompt.get("text"), prompt.get("messages"), prompt.get("ids"),
                                            max_tokens, seeded, f"{rid}-p{p}" if n > 1 else None, constraint=wire,
                                            tools=offered))
        return reqs

    @app.get("/health", responses={200: {"model": S.Status}, 503: {"model": S.Status}})
    async def health() -> JSONResponse:
        if not await bridge.probe(server.health_timeout_s):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def scheduler_stats() -> dict:
        data = await bridge.ask("stats", timeout_s=2.0)
        if data is None:
            raise APIError(503, "the scheduler did not answer in time", type="service_unavailable")
        return data

    @app.get("/stats", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **S.ERRORS})
    async def stats() -> JSONResponse:
        """The scheduler's own numbers (running, waiting, KV pool use), asked over the control channel."""
        return JSONResponse(await scheduler_stats())

    add_load_routes(app, loads, scheduler_stats)  # what routers read to balance replicas

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> Response:
        """Prometheus exposition of every process's samples (serve/metrics.py)."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    processes = Processes()

    @app.get("/pipeline", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **S.ERRORS})
    async def get_pipeline() -> JSONResponse:
        """What the web page's pipeline view shows: processes, queues, token counts, ZeroMQ hop latencies."""
        return JSONResponse(await pipeline_snapshot(bridge, processes, model.served_name, started))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        """The web page: a chat playground and the live pipeline view (plain HTML and JS, no build step)."""
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/version", response_model=S.Version)
    async def get_version() -> dict:
        return {"version": VERSION}

    @app.get("/v1/models", response_model=S.ModelList, responses=S.ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model.served_name, "object": "model", "created": created, "owned_by": "serve",
            "max_model_len": model.max_model_len,
        }]}

    @app.post("/tokenize", response_model=S.Tokens, responses=S.ERRORS)
    async def tokenize(body: TokenizeBody) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (not body.messages):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        messages = tools.template_messages([m.as_dict() for m in body.messages]) if body.messages else None
        offered, _ = tools.check(body.tools, None)
        reply = await ask_tokenizer(TokenizeRequest(uuid.uuid4().hex, body.prompt, messages, body.add_special_tokens, tools=offered))
        return {"tokens": reply.token_ids, "count": len(reply.token_ids), "max_model_len": model.max_model_len}

    @app.post("/detokenize", response_model=S.Text, responses=S.ERRORS)
    async def detokenize(body: DetokenizeBody) -> dict:
        check_model(body.model)
        reply = await ask_tokenizer(TokenizeRequest(uuid.uuid4().hex, token_ids=body.tokens))
        return {"prompt": reply.text, "text": reply.text}  # vLLM's name and SGLang's

    async def detokenize_prompt(ids: list[int]) -> str:
        try:
            return (await ask_tokenizer(TokenizeRequest(uuid.uuid4().hex, token_ids=ids))).text
        except APIError as e:
            e.param = "prompt"  # the ids came as the prompt
            raise

    async def ask_tokenizer(req: TokenizeRequest) -> TokenizeReply:
        reply = await bridge.tokenize(req)
        if isinstance(reply, RequestError):
            raise APIError(reply.status, reply.message, reply.param, reply.code)
        return reply

    @app.post("/abort_request", response_model=S.Aborted, responses=S.ERRORS)
    async def abort_request(body: AbortBody) -> dict:
        """Ends a running response (all its choices) with finish_reason "abort", as SGLang's endpoint does."""
        rids = [r for r in list(bridge.live) if r == body.rid or r.startswith(body.rid + "-")]
        for r in rids:
            await bridge.to_tokenizer.send(encode(AbortRequest(r)))
        return {"aborted": len(rids)}

    @app.post("/v1/chat/completions", response_model=None, responses=S.generation(S.ChatCompletion))
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = sampling(body, (body.top_logprobs or 0) if body.logprobs else None, None)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{param} must be at least 1", param)
        messages = tools.template_messages([m.as_dict() for m in body.messages])
        offered, choice = tools.check(body.tools, body.tool_choice)
        constraint = body.constraint()
        call_grammar = tools.constraint(offered, choice, body.parallel_tool_calls) if offered else None
        if constraint is not None and call_grammar is not None:
            raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} and "
                           f"{constraint.param} are two constraints; a request may have one", constraint.param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = fan_out(rid, body.n, [{"messages": messages}], max_tokens, params, constraint or call_grammar,
                       offered if choice != "none" else None)
        shape = ChatShape(rid, model.served_name, body.logprobs, body.return_tokens_as_token_ids,
                          tool_calls="off" if choice == "none" else "named" if isinstance(choice, dict) else "on")
        return await respond(request, reqs, shape, body, [])

    @app.post("/v1/completions", response_model=None, responses=S.generation(S.Completion))
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed with echo, to score the prompt)", "max_tokens")
        params = sampling(body, body.logprobs, body.logprobs if body.echo and body.logprobs is not None else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs = fan_out(rid, body.n, prompts, body.max_tokens, params, body.constraint())
        echoes = []
        if body.echo:
            for p in prompts:
                echoes.append(p["text"] if "text" in p else await detokenize_prompt(p["ids"]))
        return await respond(request, reqs, CompletionShape(rid, model.served_name, body.logprobs, body.return_tokens_as_token_ids), body, echoes)

    async def respond(request: Request, reqs: list[GenerateRequest], shape: Shape, body, echoes: list[str]):
        streams = [bridge.generate(r) for r in reqs]
        # Wait for every choice's first output before answering, so a rejected request gets a real 4xx;
        # a client that leaves while its prompt waits or prefills aborts it.
        started = asyncio.ensure_future(asyncio.gather(*(anext(s) for s in streams)))
        if not await _unless_disconnected(request, started):
            await asyncio.gather(*(s.aclose() for s in streams))
            return Response(status_code=499)
        firsts = started.result()
        error = next((f for f in firsts if isinstance(f, RequestError)), None)
        overloaded = any(isinstance(f, RequestOutput) and f.finish_reason == "overloaded" for f in firsts)
        if error is not None or overloaded:
            await asyncio.gather(*(s.aclose() for s in streams))
            if overloaded:
                raise APIError(503, "the server's queue is full; retry later", type="service_unavailable",
                               code="overloaded", headers={"Retry-After": "1"})
            raise _api_error(error)
        choices = [Choice(i) for i in range(len(reqs))]
        echo = [echoes[i // body.n] if echoes else "" for i in range(len(reqs))]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(shape, choices, firsts, streams, echo, body.n, usage), media_type="text/event-stream")
        gathered = asyncio.ensure_future(asyncio.gather(*(
            collect(shape, c, f, s, e) for c, f, s, e in zip(choices, firsts, streams, echo))))
        if not await _unless_disconnected(request, gathered):
            return Response(status_code=499)  # nobody is listening; the requests were aborted
        return shape.final(choices, body.n)

    async def collect(shape: Shape, choice: Choice, out: RequestOutput, stream: AsyncIterator, echo: str) -> None:
        try:
            shape.update(choice, out, echo)
            while out.finish_reason is None:
                out = await anext(stream)
                if isinstance(out, RequestError):  # failed midway (a stage restarted): the response fails
                    raise _api_error(out)
                shape.update(choice, out)
        finally:
            await stream.aclose()  # aborts the request if it has not finished (client gone)

    async def sse(shape: Shape, choices: list[Choice], firsts: list[RequestOutput], streams: list[AsyncIterator],
                  echo: list[str], n: int, include_usage: bool) -> AsyncIterator[str]:
        merged = _merged(firsts, streams)
        try:
            for c in choices:
                if (head := shape.head(c.index)) is not None:
                    yield f"data: {json.dumps(head)}\n\n"
            first = set(range(len(choices)))
            async for i, out in merged:
                if isinstance(out, RequestError):  # failed midway: an error event, as OpenAI streams them
                    yield f"data: {json.dumps(_api_error(out).body())}\n\n"
                    return
                chunk = shape.update(choices[i], out, echo[i] if i in first else "")
                first.discard(i)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(choices, n))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away mid-stream lands here too: closing the streams aborts their requests.
            await merged.aclose()  # its readers first: a stream cannot be closed while one waits on it
            for stream in streams:
                await stream.aclose()

    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI declares a 422 for every body; our validation errors are 400s (declared above)."""
        if app.openapi_schema is None:
            for operation in (op for path in default_openapi()["paths"].values() for op in path.values()):
                operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _merged(firsts: list[RequestOutput], streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(choice, output) pairs from every choice's stream as they come, each up to its end or an error.
    One choice, the common case, is read directly: no task and no queue per token."""
    if len(streams) == 1:
        out = firsts[0]
        yield 0, out
        while isinstance(out, RequestOutput) and out.finish_reason is None:
            out = await anext(streams[0])
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        out = firsts[i]
        await queue.put((i, out))
        while isinstance(out, RequestOutput) and out.finish_reason is None:
            out = await anext(streams[i])
            await queue.put((i, out))

    pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        left = len(streams)
        while left:
            i, out = await queue.get()
            yield i, out
            left -= not isinstance(out, RequestOutput) or out.finish_reason is not None
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def _api_error(e: RequestError) -> APIError:
    return APIError(e.status, e.message, e.param, e.code, type="service_unavailable" if e.status == 503 else "invalid_request_error")


def _prompts(prompt: str | list) -> list[dict]:
    """A completions prompt is a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [{"ids": prompt}]
    return [{"text": p} if isinstance(p, str) else {"ids": p} for p in prompt]


async def _unless_disconnected(request: Request, work: asyncio.Future) -> bool:
    """Awaits `work` unless the client disconnects first, in which case it is cancelled: False."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        work.result()
        return True
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False
