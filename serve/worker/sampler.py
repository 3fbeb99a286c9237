"""Per-request sampling inside a batched step, and the logprobs reported with it.

Each row's logits go through these steps, in vLLM's order:
  1. logit_bias is added.
  2. min_tokens: until the request has produced min_tokens tokens, its EOS ids and stop_token_ids get -inf.
  3. repetition_penalty, on every token seen in the prompt or the output: a positive logit is divided
     by it, any other is multiplied (so both move away from being picked).
  4. frequency_penalty times the token's count in the output is subtracted,
  5. and presence_penalty from every token present in the output at all.
  6. Greedy rows (temperature <= 0) take the argmax here; the others are divided by their temperature,
  7. cut by top-k and top-p, then by min_p, which drops tokens less likely than min_p times the most
     likely one. The most likely token survives every cut, so min_p's ratio is the same before or
     after top-k/top-p.
  8. The token is drawn with one uniform number u per row: the first token, in vocabulary order, where
     the running sum of the surviving probabilities passes u. On a CPU with our kernels steps 6-8 are one
     call (csrc/sample.cpp: torch took 35 ms for 32 rows at temperature 1, 107 ms with top-p, here);
     elsewhere torch does them, drawing by the exponential race (argmax of p / Exp(1) noise). Either
     way a row's token depends on nothing else in the batch.
A batch in which no row needs steps 1-5 skips them without copying the logits.

Each request draws its randomness from its own seed (or a random one) and the token's index in the
output (a hash of the two for u; a generator reseeded from them for the noise), so a seeded request
gives the same text alone, in a busy batch, or preempted and recomputed halfway (the engine restarts it with `produced` and,
when penalized, its `history`, from which the penalty counts are rebuilt).

Logprobs are those of the raw logits handed in, before any step above, as vLLM reports them by default.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from types import ModuleType

import torch

from serve.messages import Logprobs, SamplingParams


@dataclass
class RowSampling:
    params: SamplingParams
    seed: int
    produced: int  # tokens sampled so far: the index of the next one
    generator: torch.Generator
    slot: int | None  # its row in the penalty pool (Sampler.counts), only when params.penalized


class Sampler:
    def __init__(self, device: torch.device, vocab_size: int, eos_ids: list[int], kernels: ModuleType | None = None) -> None:
        """`vocab_size`: the width of the logits that `sample` gets. `kernels`: our CPU kernels, whose
        argmax and sampling take float32 rows on the CPU (torch's argmax is a scalar loop: 1.1 ms for 32 rows
        of 49,152 logits here, ours 0.24)."""
        self.device = device
        self.kernels = kernels if device.type == "cpu" else None
        self.argmax = self.kernels.argmax_rows if self.kernels is not None else (lambda x: x.argmax(dim=-1))
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.rows: dict[int, RowSampling] = {}
        # Penalized requests only, one slot each: how often each token was sampled, and which tokens the
        # prompt holds. A pool rather than a tensor per request so that a step reads and updates all the
        # penalized rows with one gather and one scatter.
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.free: list[int] = []

    def start(self, row: int, params: SamplingParams, produced: int = 0, history: list[int] | None = None) -> None:
        """`history`: the prompt then the `produced` tokens generated before a preemption (penalized only)."""
        self.finish(row)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        slot = None
        if params.penalized:
            slot = self._slot()
            history = history or []
            cut = len(history) - produced
            self.counts[slot] = 0
            self.in_prompt[slot] = False
            if cut > 0:
                self.in_prompt[slot, self._tensor(history[:cut], torch.int64)] = True
            if produced:
                counted = Counter(history[cut:])
                index = self._tensor(list(counted), torch.int64)
                self.counts[slot, index] = self._tensor(list(counted.values()), torch.float32)
        gen = torch.Generator(device=self.device)
        self.rows[row] = RowSampling(params, seed, produced, gen, slot)

    def finish(self, row: int) -> None:
        state = self.rows.pop(row, None)
        if state is not None and state.slot is not None:
            self.free.append(state.slot)

    def sample(self, logits: torch.Tensor, rows: list[int], masks: tuple[list[int], list[bytes]] | None = None
               ) -> tuple[torch.Tensor, list[Logprobs | None]]:
        """One token id per row of `logits` [B, V] (float32), and the logprobs of the rows that ask for them.
        `masks`: structured outputs, (row indices, llguidance bitmasks) of the constrained rows."""
        states = [self.rows[r] for r in rows]
        params = [s.params for s in states]
        x, penalized = self._adjust(logits, states)
        if masks and masks[0]:
            x = self._constrain(x, logits, *masks)
        for s in states:
            s.produced += 1
        greedy = [p.temperature <= 0 for p in params]
        if not states:  # a step of prompt chunks that samples nothing (torch.stack below needs a row)
            ids = torch.empty(0, dtype=torch.int64, device=x.device)
        elif not any(greedy):
            ids = self._draw(x, states)
        else:
            ids = self.argmax(x if x.is_contiguous() else x.contiguous())
            if not all(greedy):
                ids = torch.where(self._tensor(greedy, torch.bool), ids, self._draw(x, states))
        if penalized is not None:
            pos, slots = penalized
            self.counts[slots, ids[pos]] += 1  # slots are distinct, so no accumulate needed
        return ids, self._logprobs(logits, ids, params)

    def score(self, logits: torch.Tensor, targets: list[int], k: int) -> Logprobs:
        """Logprobs of `targets[i]` at each of the n positions of `logits` [n, V], with the top k of each."""
        k = min(k, logits.shape[1])
        table = self._table(logits.float(), self._tensor(targets, torch.int64), k)
        return Logprobs(token_ids=list(targets), token_logprobs=[t[1] for t in table],
                        top_ids=[[int(i) for i in t[2:2 + k]] for t in table], top_logprobs=[t[2 + k:] for t in table])

    def _adjust(self, logits: torch.Tensor, states: list[RowSampling]) -> tuple[torch.Tensor, tuple | None]:
        """Steps 1-5. Returns the logits themselves when no row needs them, else a modified copy; and, when
        some rows are penalized, their batch positions and pool slots (to count the tokens sampled)."""
        V = logits.shape[1]
        # Bias and the min_tokens ban as one {(batch row, token): value}, added in one index_put. A dict so
        # that each index comes once (a plain index_put, no sort on the device); the ban overrides a bias.
        added: dict[tuple[int, int], float] = {}
        for i, s in enumerate(states):
            p = s.params
            for t, b in (p.logit_bias or {}).items():
                added[i, t] = b
            if s.produced < p.min_tokens:
                for t in self.eos_ids + p.stop_token_ids:
                    added[i, t] = float("-inf")
        entries = [(i, t, v) for (i, t), v in added.items() if 0 <= t < V]  # ids outside the vocabulary: never sampled
        pen = [i for i, s in enumerate(states) if s.slot is not None]
        if not entries and not pen:
            return logits, None
        x = logits.clone()
        if entries:
            r, t, v = zip(*entries)
            x[self._tensor(list(r), torch.int64), self._tensor(list(t), torch.int64)] += self._tensor(list(v), torch.float32)
        if not pen:
            return x, None
        pos = self._tensor(pen, torch.int64)
        slots = self._tensor([states[i].slot for i in pen], torch.int64)
        pp = [states[i].params for i in pen]
        rep = self._tensor([p.repetition_penalty for p in pp], torch.float32)[:, None]
        freq = self._tensor([p.frequency_penalty for p in pp], torch.float32)[:, None]
        pres = self._tensor([p.presence_penalty for p in pp], torch.float32)[:, None]
        counts = self.counts[slots]
        in_output = counts > 0
        y = x[pos]
        y = torch.where(self.in_prompt[slots] | in_output, torch.where(y > 0, y / rep, y * rep), y)
        x[pos] = y - freq * counts - pres * in_output
        return x, (pos, slots)

    def _constrain(self, x: torch.Tensor, logits: torch.Tensor, mask_of: list[int], masks: list[bytes]) -> torch.Tensor:
        """Tokens a row's grammar does not allow get -inf, after bias and penalties. Where that leaves
        nothing (a finished grammar allows only stop tokens, which min_tokens or a bias banned), the
        grammar wins: the row keeps the raw logits of what it allows."""
        x = x.clone() if x is logits else x  # the raw logits stay for logprobs
        rows = self._tensor(mask_of, torch.int64)
        bits = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.uint8).view(len(masks), -1).to(x.device)
        self._apply(x, rows, bits)
        dead = torch.isneginf(x[rows].amax(dim=-1))
        if bool(dead.any()):
            fix = rows[dead]
            raw = logits[fix].clone()
            self._apply(raw, torch.arange(len(fix), device=x.device), bits[dead])
            x[fix] = raw
        return x

    def _apply(self, x: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
        if self.kernels is not None:
            self.kernels.apply_bitmask(x, rows.cpu(), bits.cpu())
            return
        V = x.shape[1]
        allowed = ((bits[:, :, None] >> torch.arange(8, device=x.device, dtype=torch.uint8)) & 1).view(len(rows), -1)[:, :V].bool()
        x[rows] = x[rows].masked_fill(~allowed, float("-inf"))

    def _draw(self, x: torch.Tensor, states: list[RowSampling]) -> torch.Tensor:
        """Steps 6-8 for every row (greedy rows' draws are discarded by the caller)."""
        params = [s.params for s in states]
        temps = self._tensor([max(p.temperature, 1e-5) for p in params], torch.float32)
        if self.kernels is not None:
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
            u = torch.tensor([self._uniform(s) for s in states], dtype=torch.float64)
            return self.kernels.sample_rows(x.contiguous(), temps, top_k, top_p, min_p, u)
        x = x / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            x = self._truncate(x, params)
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = self._tensor([p.min_p for p in params], torch.float32)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        V = x.shape[1]
        noise = torch.stack([torch.empty(V, device=x.device).exponential_(generator=self._reseed(s)) for s in states])
        return self.argmax((probs / noise).contiguous())

    def _logprobs(self, logits: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams]) -> list[Logprobs | None]:
        out: list[Logprobs | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return out
        k = min(max(params[i].logprobs for i in want), logits.shape[1])
        pos = self._tensor(want, torch.int64)
        for i, t in zip(want, self._table(logits[pos], ids[pos], k)):
            n = min(params[i].logprobs, k)  # this row's own k: the first n of the batch's top k
            out[i] = Logprobs(token_ids=[int(t[0])], token_logprobs=[t[1]],
                              top_ids=[[int(j) for j in t[2:2 + n]]], top_logprobs=[t[2 + k:2 + k + n]])
        return out

    @staticmethod
    def _table(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[list[float]]:
        """Per row of `logits`: [`chosen`, its logprob, top k ids, top k logprobs] (k <= V), in one host
        transfer: float64 holds both the float32 logprobs and the token ids exactly, so one tensor, one sync."""
        lp = torch.log_softmax(logits, dim=-1)
        top = lp.topk(k, dim=-1)
        columns = [chosen[:, None], lp.gather(1, chosen[:, None]), top.indices, top.values]
        return torch.cat([c.double() for c in columns], 1).tolist()

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Through pinned memory on CUDA, so the upload does not stall the host (see Engine._tensor)."""
        pinned = self.device.type == "cuda"
        t = torch.tensor(values, dtype=dtype, pin_memory=pinned)
        return t.to(self.device, non_blocking=True) if pinned else t

    def _slot(self) -> int:
        if not self.free:  # grow the pool by doubling
            n = self.counts.shape[0]
            more = max(n, 8)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(more, self.vocab_size)])
            self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(more, self.vocab_size)])
            self.free = list(range(n + more - 1, n - 1, -1))  # pop() hands out the lowest first
        return self.free.pop()

    @staticmethod
    def _uniform(s: RowSampling) -> float:
        """A number in [0, 1) from the request's seed and the token's index: splitmix64's finalizer."""
        z = (s.seed + s.produced * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    @staticmethod
    def _reseed(s: RowSampling) -> torch.Generator:
        s.generator.manual_seed((s.seed + s.produced * 0x9E3779B97F4A7C15) % (1 << 63))
        return s.generator

    def _truncate(self, x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        V = x.shape[1]
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=x.device)[None, :]
        top_k = self._tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], torch.int64)
        top_p = self._tensor([p.top_p for p in params], torch.float32)
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token: the most likely token always survives.
        before = probs.cumsum(dim=-1) - probs
        drop = (rank >= top_k[:, None]) | (before > top_p[:, None])
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)
