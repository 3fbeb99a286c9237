"""The scheduler process: one loop that admits requests, publishes step plans, and routes sampled tokens.

With overlap on, two steps may be in flight: while the workers run step N, step N+1 already waits in
their SUB queue, planned with placeholders for N's samples (see batch.py), so the workers never wait
for the scheduler's round trip. The loop blocks in `zmq.Poller` until rank 0's result (or a new
request) arrives, applies it, and tops the queue up. An idle scheduler blocks with no timeout.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq

from serve import metrics
from serve.cluster import PLAN, RESULTS, Layout, bind_secure, start_auth
from serve.config import Config
from serve.ipc import Endpoints, drain, send, socket
from serve.messages import (
    AbortRequest, ControlReply, ControlRequest, Hello, HelloAck, Probe, StageRestarted, StepResult, TokenBatch,
    TokenizedRequest, decode,
)
from serve.model_files import ModelInfo
from serve.proc import Reporter
from serve.scheduler.batch import PENDING, Batcher, Finished, Req, Step
from serve.scheduler.grammars import Grammars
from serve.scheduler.pool import KVPool
from serve.stops import CONTEXT_TOKENS
from serve.text import TextTokenizer

log = logging.getLogger("serve.scheduler")

GRAMMAR_POLL_MS = 5  # how often the loop looks for a finished grammar compile while one runs


class Scheduler:
    def __init__(self, config: Config, model: ModelInfo, eps: Endpoints) -> None:
        self.tp = config.engine.tp
        e = config.engine
        pool = KVPool(e.kv_pool_tokens, e.max_running_requests)
        self.batcher = Batcher(
            pool, model.max_model_len, e.chunked_prefill_tokens or e.max_prefill_tokens, model.eos_token_ids,
            chunked=e.chunked_prefill_tokens > 0, prefix_cache=e.prefix_cache,
            decode=TextTokenizer(model.hf_dir).decode,
        )
        self.depth = 2 if e.overlap else 1
        self.grammars = Grammars(model.hf_dir, model.eos_token_ids)
        self.max_waiting = e.max_waiting_requests
        self.health_timeout_ns = int(config.server.health_timeout_s * 1e9)
        self.rejected = 0
        ctx = zmq.Context.instance()
        self.requests = socket(ctx, zmq.PULL, eps.scheduler, bind=True)
        self.plans = socket(ctx, zmq.PUB, eps.plan, bind=True)
        self.results = socket(ctx, zmq.PULL, eps.results, bind=True)
        layout = Layout.of(config)
        if layout.many:  # the other nodes' ranks reach the same two sockets over tcp, with CURVE
            keys = layout.keys()
            self.auth = start_auth(ctx, keys)
            bind_secure(self.plans, layout.endpoint(PLAN, bind=True), keys)
            bind_secure(self.results, layout.endpoint(RESULTS, bind=True), keys)
        self.control = socket(ctx, zmq.REP, eps.control, bind=True)
        self.events = socket(ctx, zmq.SUB, eps.events, bind=False)
        self.outputs = socket(ctx, zmq.PUSH, eps.detokenizer, bind=False)
        self.inflight: deque[Step] = deque()
        self.steps = 0
        # Tokens sampled, and the time with a step in flight: what a replica generates per second while it
        # works (the gen_throughput routers divide queued work by), not per second of wall time.
        self.gen_tokens, self.busy_ns, self.last_result_ns = 0, 0, 0
        self.aborted = 0
        self.news: list[Finished] = []  # for the detokenizer, sent once per loop turn
        name = model.served_name
        self.from_tokenizer, self.from_rank0 = metrics.Hop("tokenizer->scheduler", name), metrics.Hop("rank0->scheduler", name)
        self.queue_time = metrics.QUEUE.labels(name)
        self.gauges = [g.labels(name) for g in (metrics.RUNNING, metrics.WAITING, metrics.KV_USAGE, metrics.PREFIX_HIT)]
        self.shown: tuple = ()
        self._show()

    def wait_for_workers(self) -> None:
        """Publish Hello until every rank has answered: a SUB that joins late misses what was sent before."""
        nonce = time.monotonic_ns()
        seen: set[int] = set()
        while len(seen) < self.tp:
            send(self.plans, Hello(nonce, time.time_ns() - time.monotonic_ns()))
            if self.results.poll(100):
                for msg in drain(self.results):
                    if isinstance(msg, HelloAck) and msg.nonce == nonce:
                        seen.add(msg.rank)
        # Acks to Hellos still queued on the SUB side arrive later; run() ignores them.

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.requests, self.results, self.control, self.events):
            poller.register(sock, zmq.POLLIN)
        planned = False
        while True:
            # Only a turn that just planned may have more to plan; otherwise wait for news (and, while a
            # grammar compiles, look again every few milliseconds).
            busy = planned and len(self.inflight) < self.depth
            idle_since = time.monotonic_ns()
            ready = dict(poller.poll(0 if busy else GRAMMAR_POLL_MS if self.grammars.compiling else None))
            if self.results in ready:
                for msg in drain(self.results):
                    if isinstance(msg, StepResult):
                        self.from_rank0.observe(msg.sent_ns, idle_since)
                        self._on_result(msg)
            if self.requests in ready:
                for msg in drain(self.requests):
                    if isinstance(msg, TokenizedRequest):
                        self.from_tokenizer.observe(msg.sent_ns, idle_since)
                    self._on_request(msg)
            if self.control in ready:
                self._on_control(decode(self.control.recv()))
            if self.events in ready:
                for msg in drain(self.events):
                    if isinstance(msg, StageRestarted):
                        self._abort_all(msg.name)
            for req, error in self.grammars.ready():
                if error is None:
                    self.batcher.add(req)
                else:  # the api answers 400: the tokenizer's check passed, but the build hit a limit
                    self.news.append(Finished(req, -1, "bad_grammar"))
            planned = False
            # A constrained request's mask needs its last token: with one, no step is planned ahead.
            if len(self.inflight) < (1 if self.grammars.active else self.depth):
                step = self.batcher.next_plan(may_preempt=not self.inflight)
                if step is not None:
                    if self.grammars.active:
                        step.plan.mask_of, step.plan.masks = self.grammars.masks(step)
                    step.plan.sent_ns = time.monotonic_ns()
                    send(self.plans, step.plan)
                    self.inflight.append(step)
                    planned = True
            # After publishing: the workers' next step need not wait for the detokenizer's message.
            # One message per turn, in order, so a token never trails its request's abort.
            self._emit(self.news)
            self.news = []
            self._show()

    def _show(self) -> None:
        """The gauges and queue times of /metrics; written only when they change (an mmap write each)."""
        for seconds in self.batcher.queue_times:
            self.queue_time.observe(seconds)
        self.batcher.queue_times.clear()
        b = self.batcher
        hits = b.cache.hits if b.cache else 0
        now = (len(b.running), len(b.waiting), b.pool.slots.used - (b.cache.evictable if b.cache else 0), hits, b.cache_lookups)
        if now != self.shown:
            self.shown = now
            running, waiting, used, hits, lookups = now
            for gauge, value in zip(self.gauges, (running, waiting, used / b.pool.slots.capacity, hits / max(1, lookups))):
                gauge.set(value)

    def _on_request(self, msg: object) -> None:
        if isinstance(msg, TokenizedRequest):
            req = Req(msg.rid, msg.api_id, msg.input_ids, msg.sampling, group=msg.group)
            if len(self.batcher.waiting) >= self.max_waiting:
                self.rejected += 1  # the api answers 503: try again later
                self.news.append(Finished(req, -1, "overloaded"))
            elif msg.grammar is not None:
                self.grammars.add(req, msg.grammar)  # admitted once its matcher is built
            else:
                self.batcher.add(req)
        elif isinstance(msg, Probe):
            # Answered (through the detokenizer) only while the workers keep up: a step in flight for
            # longer than the health timeout means a stuck rank, and /health turns 503.
            if not self.inflight or time.monotonic_ns() - self.inflight[0].plan.sent_ns < self.health_timeout_ns:
                send(self.outputs, msg)
        elif isinstance(msg, AbortRequest):
            self._abort(msg.rid, "abort")

    def _abort(self, rid: str, reason: str) -> None:
        pending = next((r for r, _ in self.grammars.pending if r.rid == rid), None)
        self.grammars.drop(rid)
        req = self.batcher.abort(rid) or pending
        if req is not None:
            self.aborted += 1
            self.news.append(Finished(req, -1, reason, sum(1 for t in req.output_ids if t != PENDING)))

    def _abort_all(self, stage: str) -> None:
        """A restarted stage may have lost any request's message: the api fails them all, and we free them.
        Their last output says "restarted", so the api fails them the same way if it hears from us before it
        hears from the launcher."""
        reqs = list(self.batcher.waiting) + list(self.batcher.running) + [r for r, _ in self.grammars.pending]
        for req in reqs:
            self._abort(req.rid, "restarted")
        log.warning("the %s restarted: dropped %d requests in flight", stage, len(reqs))

    def _on_result(self, msg: StepResult) -> None:
        step = self.inflight.popleft()
        assert msg.step == step.plan.step, "results arrive in plan order"
        self.steps += 1
        now = time.monotonic_ns()
        self.busy_ns += now - max(step.plan.sent_ns, self.last_result_ns)  # overlapping steps count once
        self.last_result_ns = now
        self.gen_tokens += len(msg.token_ids)
        if self.grammars.active:
            self.grammars.accept(step, msg.token_ids)
        news = self.batcher.apply(step, msg.token_ids, msg.logprobs, msg.prompt_logprobs)
        for n in news:
            if n.reason is not None:
                self.grammars.drop(n.req.rid)
        self.news.extend(news)

    def _emit(self, news: list[Finished]) -> None:
        if not news:
            return
        send(self.outputs, TokenBatch(
            rids=[n.req.rid for n in news],
            api_ids=[n.req.api_id for n in news],
            token_ids=[n.token for n in news],
            finish_reasons=[n.reason for n in news],
            prompt_tokens=[len(n.req.prompt_ids) for n in news],
            completion_tokens=[n.completion_tokens for n in news],
            cached_tokens=[n.req.cached_tokens for n in news],
            # What the detokenizer needs to cut a request's text: sent with its first output only.
            stop=[n.req.sampling.stop if n.completion_tokens <= 1 else [] for n in news],
            include_stop=[n.req.sampling.include_stop_str_in_output for n in news],
            min_tokens=[n.req.sampling.min_tokens for n in news],
            prompt_tail=[n.req.prompt_ids[-CONTEXT_TOKENS:] if n.completion_tokens <= 1 else [] for n in news],
            logprobs=[n.logprobs for n in news] if any(n.logprobs for n in news) else [],
            prompt_logprobs=[n.prompt_logprobs for n in news] if any(n.prompt_logprobs for n in news) else [],
            sent_ns=time.monotonic_ns(),
        ))

    def _on_control(self, msg: object) -> None:
        if isinstance(msg, ControlRequest) and msg.kind == "stats":
            data = {**self.batcher.stats(), "steps": self.steps, "aborted": self.aborted, "rejected": self.rejected,
                    "generated_tokens": self.gen_tokens, "busy_s": round(self.busy_ns / 1e9, 6)}
        else:
            data = {"ok": True}
        send(self.control, ControlReply(getattr(msg, "kind", "?"), data))


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    scheduler = Scheduler(config, model, eps)
    scheduler.wait_for_workers()
    reporter.ready(pool_tokens=config.engine.kv_pool_tokens, max_running=config.engine.max_running_requests)
    scheduler.run()
