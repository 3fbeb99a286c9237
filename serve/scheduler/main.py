"""The scheduler process: one loop that admits requests, publishes step plans, and routes sampled tokens.

At most one step is in flight: the loop blocks in `zmq.Poller` until rank 0's result (or a new request)
arrives, applies it, and publishes the next plan. An idle scheduler blocks with no timeout.
"""

from __future__ import annotations

import logging
import time

import zmq

from serve.config import Config
from serve.ipc import Endpoints, drain, send, socket
from serve.messages import (
    AbortRequest, ControlReply, ControlRequest, Hello, HelloAck, StepResult, TokenBatch, TokenizedRequest, decode,
)
from serve.model_files import ModelInfo
from serve.proc import Reporter
from serve.scheduler.batch import Batcher, Finished, Req
from serve.scheduler.pool import KVPool

log = logging.getLogger("serve.scheduler")


class Scheduler:
    def __init__(self, config: Config, model: ModelInfo, eps: Endpoints) -> None:
        self.tp = config.engine.tp
        pool = KVPool(config.engine.kv_pool_tokens, config.engine.max_running_requests)
        self.batcher = Batcher(pool, model.max_model_len, config.engine.max_prefill_tokens, model.eos_token_ids)
        ctx = zmq.Context.instance()
        self.requests = socket(ctx, zmq.PULL, eps.scheduler, bind=True)
        self.plans = socket(ctx, zmq.PUB, eps.plan, bind=True)
        self.results = socket(ctx, zmq.PULL, eps.results, bind=True)
        self.control = socket(ctx, zmq.REP, eps.control, bind=True)
        self.outputs = socket(ctx, zmq.PUSH, eps.detokenizer, bind=False)
        self.inflight: tuple[int, list[Req]] | None = None
        self.steps = 0
        self.aborted = 0
        self.news: list[Finished] = []  # for the detokenizer, sent once per loop turn

    def wait_for_workers(self) -> None:
        """Publish Hello until every rank has answered: a SUB that joins late misses what was sent before."""
        nonce = time.monotonic_ns()
        seen: set[int] = set()
        while len(seen) < self.tp:
            send(self.plans, Hello(nonce))
            if self.results.poll(100):
                for msg in drain(self.results):
                    if isinstance(msg, HelloAck) and msg.nonce == nonce:
                        seen.add(msg.rank)
        # Acks to Hellos still queued on the SUB side arrive later; run() ignores them.

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.requests, self.results, self.control):
            poller.register(sock, zmq.POLLIN)
        while True:
            busy = self.inflight is None and (self.batcher.waiting or self.batcher.running)
            ready = dict(poller.poll(0 if busy else None))
            if self.results in ready:
                for msg in drain(self.results):
                    if isinstance(msg, StepResult):
                        self._on_result(msg)
            if self.requests in ready:
                for msg in drain(self.requests):
                    self._on_request(msg)
            if self.control in ready:
                self._on_control(decode(self.control.recv()))
            if self.inflight is None:
                planned = self.batcher.next_plan()
                if planned:
                    plan, batch = planned
                    plan.sent_ns = time.monotonic_ns()
                    send(self.plans, plan)
                    self.inflight = (plan.step, batch)
            # After publishing: the workers' next step need not wait for the detokenizer's message.
            # One message per turn, in order, so a token never trails its request's abort.
            self._emit(self.news)
            self.news = []

    def _on_request(self, msg: object) -> None:
        if isinstance(msg, TokenizedRequest):
            self.batcher.add(Req(msg.rid, msg.api_id, msg.input_ids, msg.sampling))
        elif isinstance(msg, AbortRequest):
            req = self.batcher.abort(msg.rid)
            if req is not None:
                self.aborted += 1
                self.news.append(Finished(req, -1, "abort"))

    def _on_result(self, msg: StepResult) -> None:
        assert self.inflight is not None and msg.step == self.inflight[0], "results arrive in plan order"
        _, batch = self.inflight
        self.inflight = None
        self.steps += 1
        self.news.extend(self.batcher.apply(batch, msg.token_ids))

    def _emit(self, news: list[Finished]) -> None:
        if not news:
            return
        send(self.outputs, TokenBatch(
            rids=[n.req.rid for n in news],
            api_ids=[n.req.api_id for n in news],
            token_ids=[n.token for n in news],
            finish_reasons=[n.reason for n in news],
            prompt_tokens=[len(n.req.prompt_ids) for n in news],
            completion_tokens=[len(n.req.output_ids) for n in news],
            sent_ns=time.monotonic_ns(),
        ))

    def _on_control(self, msg: object) -> None:
        if isinstance(msg, ControlRequest) and msg.kind == "stats":
            data = {**self.batcher.stats(), "steps": self.steps, "aborted": self.aborted}
        else:
            data = {"ok": True}
        send(self.control, ControlReply(getattr(msg, "kind", "?"), data))


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    scheduler = Scheduler(config, model, eps)
    scheduler.wait_for_workers()
    reporter.ready(pool_tokens=config.engine.kv_pool_tokens, max_running=config.engine.max_running_requests)
    scheduler.run()
