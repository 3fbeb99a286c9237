"""Continuous batching: which requests run in the next step, and what their sampled tokens mean.

Each step is either a prefill (new requests, or preempted ones recomputed) or a decode of every
running request. New requests join between steps. When the pool cannot give every running request
one more slot, the most recently admitted request is preempted: its KV is freed and it waits at the
front of the queue to be prefilled again with the tokens it already produced. No request fails for
lack of room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serve.messages import SamplingParams, StepPlan
from serve.scheduler.pool import KVPool


@dataclass
class Req:
    rid: str
    api_id: bytes
    prompt_ids: list[int]
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    row: int = -1
    slots: list[int] = field(default_factory=list)  # KV slot of each position that has KV

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Finished:
    req: Req
    token: int  # -1 for an abort
    reason: str | None


class Batcher:
    def __init__(self, pool: KVPool, max_model_len: int, max_prefill_tokens: int, eos_ids: list[int]) -> None:
        self.pool = pool
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = set(eos_ids)
        # A sequence may not outgrow the context, nor the pool (it could never be prefilled again).
        self.max_len = min(max_model_len, pool.slots.capacity)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # in admission order
        self.step_no = 0
        self.preemptions = 0

    # --- arrivals and departures ---------------------------------------------------------------

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return req
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self._release(req)
                return req
        return None

    def _release(self, req: Req) -> None:
        self.pool.slots.give(req.slots)
        self.pool.rows.give([req.row])
        req.slots, req.row = [], -1

    # --- planning ------------------------------------------------------------------------------

    def next_plan(self) -> tuple[StepPlan, list[Req]] | None:
        return self._prefill() or self._decode()

    def _prefill(self) -> tuple[StepPlan, list[Req]] | None:
        chosen: list[Req] = []
        budget = self.max_prefill_tokens
        while self.waiting and self.pool.rows.free:
            req = self.waiting[0]
            n = req.seq_len
            # Keep one slot per running request in hand, so admission never starves their next decode.
            spare = self.pool.slots.free - len(self.running) - len(chosen)
            if n > spare or (chosen and n > budget):
                break
            self.waiting.popleft()
            req.row = self.pool.rows.take(1)[0]
            req.slots = self.pool.slots.take(n)
            chosen.append(req)
            budget -= n
        if not chosen:
            return None
        plan = self._plan(chosen, [r.tokens for r in chosen], [0] * len(chosen))
        plan.new_rows = [r.row for r in chosen]
        plan.new_sampling = [r.sampling for r in chosen]
        self.running.extend(chosen)
        return plan, chosen

    def _decode(self) -> tuple[StepPlan, list[Req]] | None:
        while self.running and self.pool.slots.free < len(self.running):
            self._preempt(self.running[-1])
        if not self.running:
            return None
        batch = list(self.running)
        starts = [r.seq_len - 1 for r in batch]
        for req in batch:
            req.slots.extend(self.pool.slots.take(1))
        return self._plan(batch, [[r.output_ids[-1]] for r in batch], starts), batch

    def _preempt(self, req: Req) -> None:
        self.running.remove(req)
        self._release(req)
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _plan(self, batch: list[Req], new_tokens: list[list[int]], starts: list[int]) -> StepPlan:
        offsets, ids, slots = [0], [], []
        for req, toks, start in zip(batch, new_tokens, starts):
            ids.extend(toks)
            slots.extend(req.slots[start:start + len(toks)])
            offsets.append(len(ids))
        self.step_no += 1
        return StepPlan(self.step_no, [r.row for r in batch], starts, offsets, ids, slots)

    # --- results -------------------------------------------------------------------------------

    def apply(self, batch: list[Req], tokens: list[int]) -> list[Finished]:
        """Record one sampled token per request; return every request's news, finished or not."""
        news = []
        for req, token in zip(batch, tokens):
            if req.row < 0:  # aborted or preempted while the step was in flight
                continue
            req.output_ids.append(token)
            reason = None
            if token in self.eos_ids and not req.sampling.ignore_eos:
                reason = "stop"
            elif len(req.output_ids) >= req.sampling.max_new_tokens or req.seq_len >= self.max_len:
                reason = "length"
            if reason:
                self.running.remove(req)
                self._release(req)
            news.append(Finished(req, token, reason))
        return news

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "preemptions": self.preemptions, **self.pool.stats()}
