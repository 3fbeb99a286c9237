"""Drive one Engine in-process, with no scheduler, sockets or HTTP: for parity tests and the engine-only benchmark."""

from __future__ import annotations

from serve.messages import SamplingParams, StepPlan
from serve.worker.engine import Engine


class OfflineRunner:
    """Runs a fixed batch of prompts to completion; slots are handed out contiguously per row."""

    def __init__(self, engine: Engine, max_len: int) -> None:
        self.engine = engine
        self.max_len = max_len
        self.step_no = 0

    def generate(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams | None = None) -> list[list[int]]:
        params = params or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        B = len(prompts)
        rows = list(range(B))
        base = [r * self.max_len for r in rows]
        flat = [t for p in prompts for t in p]
        offsets = [0]
        for p in prompts:
            offsets.append(offsets[-1] + len(p))
        slots = [base[r] + i for r, p in enumerate(prompts) for i in range(len(p))]
        plan = StepPlan(self._next(), rows, [0] * B, offsets, flat, slots, rows, [params] * B)
        out = [[t] for t in self.engine.step(plan)[0]]
        for _ in range(max_new_tokens - 1):
            out = [o + [t] for o, t in zip(out, self.engine.step(self.decode_plan(prompts, out))[0])]
        return out

    def decode_plan(self, prompts: list[list[int]], out: list[list[int]]) -> StepPlan:
        B = len(prompts)
        starts = [len(p) + len(o) - 1 for p, o in zip(prompts, out)]
        return StepPlan(
            self._next(), list(range(B)), starts, list(range(B + 1)), [o[-1] for o in out],
            [r * self.max_len + s for r, s in enumerate(starts)],
        )

    def _next(self) -> int:
        self.step_no += 1
        return self.step_no
