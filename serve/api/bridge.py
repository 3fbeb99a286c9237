"""The api process's side of the pipeline: requests out over DEALER, outputs back into per-request queues.

Each api process has its own ZeroMQ identity, so the tokenizer and detokenizer ROUTERs send its
replies to it and to no other api process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio

from serve import metrics
from serve.ipc import Endpoints, socket
from serve.messages import (
    AbortRequest, ControlReply, ControlRequest, GenerateRequest, OutputBatch, Probe, RequestError, RequestOutput,
    RemoteProcesses, StageRestarted, Stopping, TokenizeReply, TokenizeRequest, decode, encode,
)

log = logging.getLogger("serve.api")


class RequestMetrics:
    """This api process's request metrics, made up front so /metrics lists them (at 0) from the start."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.ttft, self.itl, self.e2e = (h.labels(model_name) for h in (metrics.TTFT, metrics.ITL, metrics.E2E))
        self.prompt_tokens = metrics.PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = metrics.GENERATION_TOKENS.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success(reason)

    def success(self, reason: str):
        return metrics.SUCCESS.labels(self.model_name, reason)


class Trace:
    """One request as the api sees it: feeds the request metrics and the --log-requests line."""

    def __init__(self, rid: str, m: RequestMetrics) -> None:
        self.rid, self.m = rid, m
        self.start = self.last = time.monotonic()
        self.ttft: float | None = None
        self.prompt_tokens = self.completion_tokens = 0

    def output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        n = len(out.token_ids)
        if n:
            if self.ttft is None:
                self.ttft = now - self.start
                self.m.ttft.observe(self.ttft)
                self.m.prompt_tokens.inc(out.prompt_tokens)
            else:
                for _ in range(n):  # several tokens in one output (a stop string held back) share its gap
                    self.m.itl.observe((now - self.last) / n)
            self.m.generation_tokens.inc(n)
            self.last = now
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens

    def end(self, reason: str, log_it: bool) -> None:
        duration = time.monotonic() - self.start
        self.m.e2e.observe(duration)
        self.m.success(reason).inc()
        if log_it:
            ttft = f"{self.ttft * 1000:.0f}ms" if self.ttft is not None else "-"
            log.info("request %s: %d prompt + %d completion tokens, first token %s, %.0fms, %s", self.rid,
                     self.prompt_tokens, self.completion_tokens, ttft, duration * 1000, reason)


class Bridge:
    def __init__(self, eps: Endpoints, model_name: str = "", log_requests: bool = False) -> None:
        self.eps = eps
        self.metrics, self.log_requests = RequestMetrics(model_name), log_requests
        self.hop = metrics.Hop("detokenizer->api", model_name)
        self.identity = f"api-{os.getpid()}".encode()
        self.ctx = zmq.asyncio.Context.instance()
        self.to_tokenizer = socket(self.ctx, zmq.DEALER, eps.tokenizer, bind=False, identity=self.identity)
        self.from_detokenizer = socket(self.ctx, zmq.DEALER, eps.outputs, bind=False, identity=self.identity)
        self.events = socket(self.ctx, zmq.SUB, eps.events, bind=False)
        self.control: zmq.asyncio.Socket | None = None
        self.control_lock = asyncio.Lock()
        self.queues: dict[str, asyncio.Queue] = {}
        self.live: set[str] = set()  # generation requests not finished yet
        self.stopping: str | None = None  # why the launcher is stopping a broken server (a Stopping event)
        self.remote: dict[int, RemoteProcesses] = {}  # the other nodes' processes, by node rank
        self.on_told: Callable[[], None] | None = None  # called once the clients have had a Stopping's error
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read(s)) for s in (self.to_tokenizer, self.from_detokenizer, self.events)]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            idle_since = time.monotonic_ns()
            msg = decode(await sock.recv())
            if isinstance(msg, OutputBatch):
                self.hop.observe(msg.sent_ns, idle_since)
                for out in msg.outputs:
                    q = self.queues.get(out.rid)
                    if q is None:  # aborted here already; late outputs are dropped quietly
                        continue
                    if out.finish_reason == "restarted":  # freed by the scheduler after a stage restart
                        q.put_nowait(RequestError(out.rid, 503, "a stage of the pipeline restarted while this request "
                                                  "was running; send it again", code="stage_restarted"))
                    elif out.finish_reason == "bad_grammar":  # the scheduler could not build its constraint
                        q.put_nowait(RequestError(out.rid, 400, "the request's constraint (response_format, "
                                                  "structured_outputs, ...) exceeds this server's grammar limits"))
                    else:
                        q.put_nowait(out)
            elif isinstance(msg, StageRestarted):
                # Any request in flight may have lost a message in the dead stage: fail them all now.
                self._fail_all(f"the {msg.name} restarted while this request was running; send it again", "stage_restarted")
            elif isinstance(msg, Stopping):
                self.stopping = msg.reason
                self._fail_all(f"the server is stopping: {msg.reason}", "server_stopping")
                asyncio.ensure_future(self._when_told())
            elif isinstance(msg, RemoteProcesses):
                self.remote[msg.node_rank] = msg
            elif isinstance(msg, (RequestError, TokenizeReply, Probe)):
                q = self.queues.get(msg.rid)
                if q is not None:
                    q.put_nowait(msg)

    def _fail_all(self, message: str, code: str) -> None:
        """Every request in flight ends with a 503 error that says why."""
        for rid in list(self.live):
            self.queues[rid].put_nowait(RequestError(rid, 503, message, code=code))

    async def _when_told(self) -> None:
        """Once every request in flight has answered its error (or after 2 s), the launcher may kill us."""
        for _ in range(200):
            if not self.live:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the last bytes leave for the clients
        if self.on_told is not None:
            self.on_told()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput | RequestError]:
        """Yields outputs until the request finishes; aborts it if the consumer stops early."""
        q: asyncio.Queue = asyncio.Queue()
        self.queues[req.rid] = q
        self.live.add(req.rid)
        trace = Trace(req.rid, self.metrics)
        finished = None  # the finish reason; an error or an overload is no finished request
        try:
            req.sent_ns = time.monotonic_ns()
            await self.to_tokenizer.send(encode(req))
            while True:
                item = await q.get()
                if isinstance(item, RequestOutput):
                    trace.output(item)
                    finished = item.finish_reason
                else:
                    finished = "error"
                # Decided before yielding: a consumer may close us right after taking the last item.
                yield item
                if finished is not None:
                    return
        finally:
            self.queues.pop(req.rid, None)
            self.live.discard(req.rid)
            if finished is None:
                await self.to_tokenizer.send(encode(AbortRequest(req.rid)))
            if finished not in ("error", "overloaded"):
                trace.end(finished or "abort", self.log_requests)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeReply | RequestError:
        return await self._round_trip(req.rid, req)

    async def probe(self, timeout_s: float) -> bool:
        """True if a probe made it through tokenizer, scheduler and detokenizer back to us in time."""
        if self.stopping is not None:
            return False
        rid = f"probe-{uuid.uuid4().hex}"
        try:
            await asyncio.wait_for(self._round_trip(rid, Probe(rid)), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _round_trip(self, rid: str, msg: object) -> object:
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        try:
            await self.to_tokenizer.send(encode(msg))
            return await q.get()
        finally:
            self.queues.pop(rid, None)

    async def ask(self, kind: str, timeout_s: float = 2.0) -> dict | None:
        """One control request to the scheduler; None on timeout. A REQ that timed out is closed and made
        anew (the lazy pirate pattern), since it is stuck waiting for a reply that may never come."""
        async with self.control_lock:
            if self.control is None:
                self.control = socket(self.ctx, zmq.REQ, self.eps.control, bind=False)
            await self.control.send(encode(ControlRequest(kind)))
            if await self.control.poll(int(timeout_s * 1000)):
                reply = decode(await self.control.recv())
                return reply.data if isinstance(reply, ControlReply) else None
            self.control.close(linger=0)
            self.control = None
            return None
