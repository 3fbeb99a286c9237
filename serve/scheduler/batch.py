"""Continuous batching: which tokens of which requests the next step computes, and what its samples mean.

Every running request has positions still to compute (`todo`): its whole uncached prompt when admitted,
one token per step once decoding. A step computes a slice of that for several requests and samples a
token for each request whose slice reaches its end.

- Unchunked: a step is either a prefill of whole prompts or a decode of every running request.
- Chunked: every step decodes all running requests and adds up to a budget of prompt tokens (whole
  short prompts, or a chunk of a long one), so a long prompt never stalls the streams already running.

With the prefix cache on, admission first looks the prompt up in the radix tree and computes only
what is not cached; a prompt enters the tree once prefilled, and a request's whole sequence when it
ends. A decoding request takes its slots RUN at a time and uses them one per step, so that its keys and
values lie together in the pool (the decode attention reads them ~1.6x faster than slots interleaved
with every other request's); the spare ones are the first given back when the pool runs short.
When the pool cannot give every running request one more slot, the newest request is preempted
(its KV goes to the cache, where it may survive) and waits at the front of the queue to be recomputed.
No request fails for lack of room.

Steps may be planned while the previous one is still running (overlap). A token sampled by a step in
flight is not known yet: it appears in `output_ids` as PENDING, and the plan asks the workers to use
the token they sampled last for that row. The planner never preempts with a step in flight.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from typing import Callable

from serve.messages import Logprobs, SamplingParams, StepPlan
from serve.scheduler.pool import KVPool
from serve.scheduler.radix import Node, RadixCache
from serve.stops import CONTEXT_TOKENS, TextStream

PENDING = -1
RUN = 16  # decode slots a request takes at a time


@dataclass(eq=False)  # a request is itself, not its fields: list membership and removal by identity
class Req:
    rid: str
    api_id: bytes
    prompt_ids: list[int]
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    row: int = -1
    slots: list[int] = field(default_factory=list)  # KV slot of each position whose KV is computed or planned
    owned: list[int] = field(default_factory=list)  # slots this request frees itself (the rest are the cache's)
    spare: list[int] = field(default_factory=list)  # taken for its next decode steps, the next one last
    node: Node | None = None  # deepest prefix-cache node this request locks
    cached_tokens: int = 0  # prompt tokens found in the cache at admission
    fresh: bool = False  # admitted, not yet in a plan: the workers must set up its row's sampler
    group: str | None = None  # n samples of one prompt: the first prefills it, the others reuse its cache
    text: TextStream | None = None  # its output as text, when it has stop strings
    prompt_lp: Logprobs | None = None  # prompt logprobs gathered so far, when asked for
    queued_at: float = field(default_factory=time.monotonic)  # until its first admission; then 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_at(self, start: int, n: int) -> list[int]:
        """tokens[start:start + n] without building the whole list (this runs for every request every step)."""
        P = len(self.prompt_ids)
        if start >= P:
            return self.output_ids[start - P:start - P + n]
        return self.prompt_ids[start:start + n] + self.output_ids[:max(0, start + n - P)]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def todo(self) -> int:
        return self.seq_len - len(self.slots)


@dataclass
class Finished:
    req: Req
    token: int  # -1 for an abort (or for the token a max_tokens=0 request samples and drops)
    reason: str | None
    completion_tokens: int = 0
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None  # with a request's first output


@dataclass
class Step:
    plan: StepPlan
    samplers: list[tuple[Req, int]]  # per sampled token: its request and its index in output_ids
    scorers: list[Req] = field(default_factory=list)  # per entry of plan.score


class Batcher:
    def __init__(self, pool: KVPool, max_model_len: int, step_tokens: int, eos_ids: list[int],
                 chunked: bool = True, prefix_cache: bool = True, decode: Callable[[list[int]], str] | None = None) -> None:
        self.pool = pool
        self.step_tokens = step_tokens
        self.chunked = chunked
        self.cache = RadixCache() if prefix_cache else None
        self.eos_ids = set(eos_ids)
        # A sequence may not outgrow the context, nor the pool (it could never be prefilled again).
        self.max_len = min(max_model_len, pool.slots.capacity)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # in admission order
        self.step_no = 0
        self.preemptions = 0
        self.prompt_tokens = 0  # of every request admitted (the prefix cache's hit rate is over these)
        self.decode = decode  # for stop strings
        self.groups: dict[str, Req | None] = {}  # group -> its leader while that prefills, None once cached
        self.cache_lookups = 0  # prompt tokens looked up in the prefix cache (cache.hits of them found)
        self.queue_times: list[float] = []  # seconds each newly admitted request waited; the scheduler takes them

    # --- slots ---------------------------------------------------------------------------------

    def available(self) -> int:
        spare = sum(len(r.spare) for r in self.running)
        return self.pool.slots.free + spare + (self.cache.evictable if self.cache else 0)

    def _take(self, req: Req, n: int) -> None:
        if n == 1 and req.spare:
            new = [req.spare.pop()]
        else:
            self.pool.slots.give(req.spare)
            short = n - self.pool.slots.free
            for other in self.running if short > 0 else ():  # spare slots go back before any cached prefix
                short -= len(other.spare)
                self.pool.slots.give(other.spare)
                other.spare = []
                if short <= 0:
                    break
            if short > 0 and self.cache:
                self.pool.slots.give(self.cache.evict(short))
            extra = min(RUN - 1, self.pool.slots.free - n) if n == 1 else 0
            new = sorted(self.pool.slots.take(n + max(0, extra)))
            new, req.spare = new[:n], new[n:][::-1]
        req.slots.extend(new)
        req.owned.extend(new)

    def _cache_tokens(self, req: Req, n: int) -> None:
        """Hands the first n positions' KV to the cache; the request keeps a lock on them."""
        done, node = self.cache.insert(req.tokens[:n], req.slots[:n])
        given = set(req.slots[done:n])  # now the cache's; [cached, done) duplicates stay ours until release
        req.owned = [s for s in req.owned if s not in given]
        self.cache.lock(node)
        if req.node is not None:
            self.cache.unlock(req.node)
        req.node = node

    def _release(self, req: Req, keep: bool) -> None:
        if self.cache and keep:
            self._cache_tokens(req, min(len(req.slots), req.seq_len))
        self.pool.slots.give(req.owned + req.spare)
        if req.node is not None:
            self.cache.unlock(req.node)
        self.pool.rows.give([req.row])
        req.slots, req.owned, req.spare, req.node, req.row = [], [], [], None, -1

    # --- arrivals and departures ---------------------------------------------------------------

    def add(self, req: Req) -> None:
        self.prompt_tokens += len(req.prompt_ids)
        if req.sampling.stop and self.decode is not None:
            req.text = TextStream(self.decode, req.sampling.stop, req.sampling.include_stop_str_in_output,
                                  req.prompt_ids[-CONTEXT_TOKENS:])
        self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self._leader_done(req)
                if req.group is not None and not any(r.group == req.group for r in self.waiting):
                    self.groups.pop(req.group, None)  # nobody of its group is left to wait
                return req
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self._release(req, keep=False)
                self._leader_done(req)
                return req
        return None

    def _waits_for_group(self, req: Req) -> bool:
        """A sample of an n > 1 request waits while its group's first sample prefills the shared prompt,
        then finds that prompt in the cache."""
        if req.group is None or self.cache is None or req.sampling.prompt_logprobs is not None:
            return False  # nothing to share (prompt logprobs compute the whole prompt anyway)
        leader = self.groups.setdefault(req.group, req)
        if leader is None or leader is req:
            if not any(r.group == req.group for r in self.waiting if r is not req):
                self.groups.pop(req.group, None)  # the last of its group to be admitted
            return False
        return True

    def _leader_done(self, req: Req) -> None:
        """The leader's prompt is cached (or it is gone): the rest of its group may go."""
        if req.group is not None and self.groups.get(req.group) is req:
            self.groups[req.group] = None

    def _admit(self, budget: int, reserve: int) -> Req | None:
        """Moves the head of the queue to running if its prompt fits in the pool, keeping `reserve`
        slots free for the running requests' next tokens."""
        if not self.waiting or not self.pool.rows.free:
            return None
        req = self.waiting[0]
        if self._waits_for_group(req):
            return None
        if self.cache and req.sampling.prompt_logprobs is None:  # prompt logprobs need the whole prompt computed
            # At least the last prompt token is computed: its logits give the first output token.
            slots, node = self.cache.match(req.tokens[:-1])
            self.cache.lock(node)
            if req.todo - len(slots) > self.available() - reserve or (not self.chunked and req.todo - len(slots) > budget):
                self.cache.unlock(node)
                return None
            req.slots, req.node, req.cached_tokens = list(slots), node, len(slots)
            self.cache.hits += len(slots)
            self.cache_lookups += len(req.tokens) - 1
        elif req.todo > self.available() - reserve or (not self.chunked and req.todo > budget):
            return None
        self.waiting.popleft()
        if req.queued_at:
            self.queue_times.append(time.monotonic() - req.queued_at)
            req.queued_at = 0.0
        req.row, req.fresh = self.pool.rows.take(1)[0], True
        self.running.append(req)
        return req

    # --- planning ------------------------------------------------------------------------------

    def next_plan(self, may_preempt: bool) -> Step | None:
        decoding = [r for r in self.running if r.todo == 1 and not self._at_limit(r)]
        if not self.chunked:
            admitted: list[Req] = []
            budget, reserve = self.step_tokens, len(decoding)
            while (req := self._admit(budget if admitted else 1 << 30, reserve)) is not None:
                admitted.append(req)
                budget -= req.todo
                reserve += req.todo + 1
            if admitted:
                return self._plan([(r, r.todo) for r in admitted])
            if not self._room_for(decoding, may_preempt):
                return None
            work = [(r, 1) for r in decoding if r.row >= 0]  # minus any just preempted
            return self._plan(work) if work else None

        if not self._room_for(decoding, may_preempt):
            return None
        work = [(r, 1) for r in decoding if r.row >= 0]
        taken, budget = len(work), self.step_tokens  # slots this step takes; prompt tokens it may still add
        for req in [r for r in self.running if r.todo > 1]:  # a prompt chunked in earlier steps goes on first
            n = min(req.todo, budget, self.available() - taken)
            if n > 0:
                work.append((req, n))
                taken, budget = taken + n, budget - n
        while budget > 0 and (req := self._admit(0, taken)) is not None:
            n = min(req.todo, budget)
            work.append((req, n))
            taken, budget = taken + n, budget - n
        return self._plan(work) if work else None

    def _at_limit(self, req: Req) -> bool:
        """No more tokens needed: the one in flight is its last."""
        return len(req.output_ids) >= req.sampling.max_new_tokens or req.seq_len >= self.max_len

    def _room_for(self, decoding: list[Req], may_preempt: bool) -> bool:
        """Frees slots by preemption until every decoding request can grow by one; False to wait for
        the step in flight first (its samples are not known, so its requests cannot be recomputed)."""
        while decoding and self.available() < sum(1 for r in decoding if r.row >= 0):
            if not may_preempt:
                return False
            self._preempt(self.running[-1])
        return True

    def _preempt(self, req: Req) -> None:
        if not req.output_ids:
            req.prompt_lp = None  # it is scored again from the start
        self.running.remove(req)
        self._release(req, keep=True)
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _plan(self, work: list[tuple[Req, int]]) -> Step:
        # Single-token entries (decodes) first: the engine runs them with its decode attention.
        work.sort(key=lambda w: w[1] > 1)
        rows, starts, offsets, ids, slots, skip, samplers = [], [], [0], [], [], [], []
        new_rows, new_sampling, new_prefix, new_produced, new_history = [], [], [], [], []
        score, score_targets, score_k, scorers = [], [], [], []
        for i, (req, n) in enumerate(work):
            start = len(req.slots)
            self._take(req, n)
            rows.append(req.row)
            starts.append(start)
            ids.extend(req.tokens_at(start, n))
            slots.extend(req.slots[start:start + n])
            offsets.append(len(ids))
            if req.fresh:
                req.fresh = False
                new_rows.append(req.row)
                new_sampling.append(req.sampling)
                new_prefix.append(req.slots[:start])
                new_produced.append(len(req.output_ids))
                new_history.append(req.tokens if req.sampling.penalized else [])
            if req.sampling.prompt_logprobs is not None and not req.output_ids:
                targets = req.prompt_ids[start + 1:start + n + 1]  # the last prompt token's target is sampled
                if targets:
                    score.append(i)
                    score_targets.append(targets)
                    score_k.append(req.sampling.prompt_logprobs)
                    scorers.append(req)
            if req.todo == 0:  # this slice reaches the end of what is known: sample the next token
                req.output_ids.append(PENDING)
                samplers.append((req, len(req.output_ids) - 1))
                if self.cache and len(req.output_ids) == 1:
                    self._cache_tokens(req, len(req.prompt_ids))  # later requests may share this prompt
                    self._leader_done(req)
            else:
                skip.append(i)
        self.step_no += 1
        plan = StepPlan(self.step_no, rows, starts, offsets, ids, slots, new_rows, new_sampling, new_prefix, new_produced,
                        new_history, skip, score, score_targets, score_k)
        return Step(plan, samplers, scorers)

    # --- results -------------------------------------------------------------------------------

    def apply(self, step: Step, tokens: list[int], logprobs: list[Logprobs | None] | None = None,
              prompt_logprobs: list[Logprobs] | None = None) -> list[Finished]:
        """Records the step's sampled tokens; returns every request's news, finished or not."""
        for req, lp in zip(step.scorers, prompt_logprobs or []):
            if req.row >= 0:
                req.prompt_lp = _extend(req.prompt_lp, lp) if req.prompt_lp else _first_prompt_token(req, lp)
        news = []
        for k, ((req, i), token) in enumerate(zip(step.samplers, tokens)):
            if req.row < 0:  # finished, aborted or preempted while the step was in flight
                continue
            req.output_ids[i] = token
            reason = self._finish_reason(req, i, token)
            if reason:
                del req.output_ids[i + 1:]  # a token planned after this one will be dropped
                self.running.remove(req)
                self._release(req, keep=True)
            lp = logprobs[k] if logprobs else None
            first_lp = None
            if i == 0 and req.sampling.prompt_logprobs is not None:
                first_lp = req.prompt_lp or _first_prompt_token(req, Logprobs([], [], [], []))
            if req.sampling.max_new_tokens == 0:  # a prompt scored alone (echo): its one sample is dropped
                news.append(Finished(req, -1, reason, 0, None, first_lp))
            else:
                news.append(Finished(req, token, reason, i + 1, lp, first_lp))
        return news

    def _finish_reason(self, req: Req, i: int, token: int) -> str | None:
        p = req.sampling
        if p.max_new_tokens == 0:  # a prompt scored alone (echo): its one sample is not output
            return "length"
        may_stop = i + 1 >= p.min_tokens
        if may_stop and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"
        if req.text is not None:
            req.text.push([token], may_stop=may_stop)
            if req.text.stopped:
                return "stop"
        if i + 1 >= p.max_new_tokens or len(req.prompt_ids) + i + 1 >= self.max_len:
            return "length"
        return None

    def stats(self) -> dict[str, int]:
        cached = self.cache.evictable if self.cache else 0
        return {
            "running": len(self.running), "waiting": len(self.waiting), "preemptions": self.preemptions,
            "pool_tokens_used": self.pool.slots.used - cached, "pool_tokens_cached": cached,
            "pool_tokens_free": self.pool.slots.free, "cache_hit_tokens": self.cache.hits if self.cache else 0,
            "rows_used": self.pool.rows.used, "rows_free": self.pool.rows.free,
            "waiting_tokens": sum(len(r.prompt_ids) for r in self.waiting), "prompt_tokens": self.prompt_tokens,
        }


def _first_prompt_token(req: Req, lp: Logprobs) -> Logprobs:
    """A prompt's logprobs start with its first token, which has none (OpenAI's echo shows null)."""
    return _extend(Logprobs([req.prompt_ids[0]], [None], [[]], [[]]), lp)


def _extend(a: Logprobs, b: Logprobs) -> Logprobs:
    return Logprobs(a.token_ids + b.token_ids, a.token_logprobs + b.token_logprobs, a.top_ids + b.top_ids,
                    a.top_logprobs + b.top_logprobs)
