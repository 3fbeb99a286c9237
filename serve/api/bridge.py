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
from typing import AsyncIterator

import zmq
import zmq.asyncio

from serve.ipc import Endpoints, socket
from serve.messages import (
    AbortRequest, ControlReply, ControlRequest, GenerateRequest, OutputBatch, Probe, RequestError, RequestOutput,
    StageRestarted, TokenizeReply, TokenizeRequest, decode, encode,
)

log = logging.getLogger("serve.api")


class Bridge:
    def __init__(self, eps: Endpoints) -> None:
        self.eps = eps
        self.identity = f"api-{os.getpid()}".encode()
        self.ctx = zmq.asyncio.Context.instance()
        self.to_tokenizer = socket(self.ctx, zmq.DEALER, eps.tokenizer, bind=False, identity=self.identity)
        self.from_detokenizer = socket(self.ctx, zmq.DEALER, eps.outputs, bind=False, identity=self.identity)
        self.events = socket(self.ctx, zmq.SUB, eps.events, bind=False)
        self.control: zmq.asyncio.Socket | None = None
        self.control_lock = asyncio.Lock()
        self.queues: dict[str, asyncio.Queue] = {}
        self.live: set[str] = set()  # generation requests not finished yet
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read(s)) for s in (self.to_tokenizer, self.from_detokenizer, self.events)]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            msg = decode(await sock.recv())
            if isinstance(msg, OutputBatch):
                for out in msg.outputs:
                    q = self.queues.get(out.rid)
                    if q is not None:  # else: aborted here already; late outputs are dropped quietly
                        q.put_nowait(out)
            elif isinstance(msg, StageRestarted):
                # Any request in flight may have lost a message in the dead stage: fail them all now.
                for rid in list(self.live):
                    self.queues[rid].put_nowait(RequestError(
                        rid, 503, f"the {msg.name} restarted while this request was running; send it again",
                        code="stage_restarted"))
            elif isinstance(msg, (RequestError, TokenizeReply, Probe)):
                q = self.queues.get(msg.rid)
                if q is not None:
                    q.put_nowait(msg)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput | RequestError]:
        """Yields outputs until the request finishes; aborts it if the consumer stops early."""
        q: asyncio.Queue = asyncio.Queue()
        self.queues[req.rid] = q
        self.live.add(req.rid)
        finished = False
        try:
            req.sent_ns = time.monotonic_ns()
            await self.to_tokenizer.send(encode(req))
            while True:
                item = await q.get()
                yield item
                if isinstance(item, RequestError) or item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self.queues.pop(req.rid, None)
            self.live.discard(req.rid)
            if not finished:
                await self.to_tokenizer.send(encode(AbortRequest(req.rid)))

    async def tokenize(self, req: TokenizeRequest) -> TokenizeReply | RequestError:
        return await self._round_trip(req.rid, req)

    async def probe(self, timeout_s: float) -> bool:
        """True if a probe made it through tokenizer, scheduler and detokenizer back to us in time."""
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
