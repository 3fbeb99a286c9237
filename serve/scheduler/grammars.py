"""Structured outputs in the scheduler: a grammar matcher (llguidance's) per constrained request, built off
the loop; the token mask each plan carries for those requests; the sampled tokens fed back.

Why here and not in the workers: the scheduler already sees every sampled token before it plans the
next step (with overlap on it waits for them whenever a constrained request runs, so its answer is the
same with overlap on or off), it holds one matcher per request where TP ranks would each need their own,
and a mask is 6 KB per request per step on the plan's socket. The workers only apply the masks, in the
batched sampler; rows without a constraint pay nothing.

Ending right: the vocabulary's stop tokens are every EOS id of the model, so a finished grammar allows
exactly those (and the request's own stop_token_ids), and the request ends with "stop"; a reply cut by
max_tokens ends with "length"; JSON comes out compact, so whitespace cannot fill the budget; the
sampler lets the mask win over min_tokens when the grammar allows nothing but a stop.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from serve import constraints
from serve.scheduler.batch import Req, Step

log = logging.getLogger("serve.scheduler")

CACHED_GRAMMARS = 64  # built matchers kept, by grammar text: a repeated schema costs a copy, not a compile


class Grammars:
    def __init__(self, hf_dir: str, eos_ids: list[int]) -> None:
        self.vocab = constraints.vocabulary(hf_dir, eos_ids)
        self.eos_ids = list(eos_ids)
        # Building a matcher compiles its grammar's lexer (llguidance drops the GIL meanwhile): one
        # thread, so the loop never waits on it.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.pending: list[tuple[Req, Future]] = []
        self.matchers: dict[str, object] = {}  # request id -> its LLMatcher
        self.built: OrderedDict[str, object] = OrderedDict()  # grammar -> a fresh matcher (the pool thread's)

    @property
    def compiling(self) -> bool:
        return bool(self.pending)

    @property
    def active(self) -> bool:
        """Some admitted request is constrained: plans must wait for the last step's tokens."""
        return bool(self.matchers)

    def add(self, req: Req, grammar: str) -> None:
        self.pending.append((req, self.pool.submit(self._build, grammar)))

    def _build(self, grammar: str):
        """A new matcher for `grammar` (on the pool's thread): a copy of a cached one, or compiled."""
        from llguidance import LLMatcher

        fresh = self.built.get(grammar)
        if fresh is None:
            fresh = LLMatcher(self.vocab, grammar, log_level=0)
            if fresh.is_error():
                return fresh
            self.built[grammar] = fresh
            if len(self.built) > CACHED_GRAMMARS:
                self.built.popitem(last=False)
        self.built.move_to_end(grammar)
        return fresh.deep_copy()

    def ready(self) -> list[tuple[Req, str | None]]:
        """Requests whose matcher is built, with an error message when it could not be."""
        done = [(req, future) for req, future in self.pending if future.done()]
        self.pending = [(req, future) for req, future in self.pending if not future.done()]
        out = []
        for req, future in done:
            error = str(future.exception()) if future.exception() else None
            matcher = future.result() if error is None else None
            if matcher is not None and matcher.is_error():
                error = matcher.get_error()
            if error is None:
                self.matchers[req.rid] = matcher
            else:
                log.warning("request %s: its grammar failed to build: %s", req.rid, error[:200])
            out.append((req, error))
        return out

    def masks(self, step: Step) -> tuple[list[int], list[bytes]]:
        """For the plan: which of its sampling requests are constrained, and the tokens each may sample."""
        mask_of, masks = [], []
        for i, (req, _) in enumerate(step.samplers):
            matcher = self.matchers.get(req.rid)
            if matcher is None:
                continue
            if matcher.is_error():  # cannot happen with the masks applied; if it does, the row may only stop
                log.warning("request %s: its grammar failed: %s", req.rid, matcher.get_error()[:200])
                mask = self._stop_only(req)
            else:
                mask = matcher.compute_bitmask()
            if req.sampling.stop_token_ids and matcher.is_accepting():
                mask = bytearray(mask)
                for t in req.sampling.stop_token_ids:
                    mask[t // 8] |= 1 << (t % 8)
                mask = bytes(mask)
            mask_of.append(i)
            masks.append(mask)
        return mask_of, masks

    def _stop_only(self, req: Req) -> bytes:
        mask = bytearray(4 * ((self.vocab.vocab_size + 31) // 32))
        for t in [*self.eos_ids, *req.sampling.stop_token_ids]:
            mask[t // 8] |= 1 << (t % 8)
        return bytes(mask)

    def accept(self, step: Step, token_ids: list[int]) -> None:
        """The tokens a step sampled, fed to their requests' matchers (in the plan's sampling order)."""
        for (req, _), token in zip(step.samplers, token_ids):
            matcher = self.matchers.get(req.rid)
            if matcher is not None and not matcher.is_stopped():
                matcher.consume_token(token)

    def drop(self, rid: str) -> None:
        self.matchers.pop(rid, None)
        self.pending = [(req, f) for req, f in self.pending if req.rid != rid]
