"""One TP rank's engine: the model shard, its KV slot pool, and `step(plan) -> token ids`.

The scheduler owns the bookkeeping (which slots and rows a request holds); the engine only obeys the
plan: it writes each request's slots into its row of `req_to_token`, runs the forward over the flat
batch, and samples one token per request.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from serve.messages import Logprobs, StepPlan
from serve.worker.model import AttentionMeta, DecodeView, Model, PrefillView
from serve.worker.ops import kv_row_width
from serve.worker.sampler import Sampler


# Prompt chunks up to this many tokens go through our attention kernel, one query at a time like decodes;
# longer ones through SDPA, whose blocked kernel reads each key once per block of queries instead of once
# per query.
NATIVE_PREFILL_TOKENS = 256


class Engine:
    def __init__(self, model: Model, pool_tokens: int, max_rows: int, max_len: int, eos_ids: list[int] = (),
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        dev, dt = model.device, kv_dtype or model.dtype
        d = model.args.head_dim
        # Per layer: keys then values, head-major (see AttentionMeta).
        # Written through once now (zero_ touches every page: ~1.1 s for 755 MB here), so that the worker's
        # resident memory is its whole size from the start and any later growth is a leak.
        # An int8 cache's rows carry their scale (kv_row_width, serve/worker/ops.py).
        row = kv_row_width(d, dt)
        self.kv_cache = [torch.empty(2 * model.n_kv, pool_tokens, row, device=dev, dtype=dt).zero_() for _ in model.layers]
        self.kv_buf = torch.empty(0, row, device=dev, dtype=dt)
        self.req_to_token = torch.zeros(max_rows, max_len, dtype=torch.int64, device=dev)
        # Row offset of each K/V head in a layer's cache viewed as [2kv*pool, row].
        self.head_base = torch.arange(2 * model.n_kv, dtype=torch.int64, device=dev)[:, None] * pool_tokens
        self.sampler = Sampler(dev, model.args.vocab_size, list(eos_ids), model.kernels)
        self.last_token = torch.zeros(max_rows, dtype=torch.int64, device=dev)  # per row, for -1 placeholders
        self.device = dev
        self.pinned = dev.type == "cuda"

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A host list as a device tensor. On CUDA it goes through pinned memory, so that the copy does not
        block the host: the step's only sync stays the sampled ids."""
        t = torch.tensor(values, dtype=torch.int64, pin_memory=self.pinned)
        return t.to(self.device, non_blocking=True) if self.pinned else t

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_cache)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[list[int], list[Logprobs | None], list[Logprobs]]:
        """Runs one plan. Returns the token sampled for each request not in `plan.skip`, their logprobs
        (an empty list when no request asked), and the prompt logprobs of each request in `plan.score`."""
        fresh = len(plan.new_rows)
        for row, params, prefix, produced, history in zip(
            plan.new_rows, plan.new_sampling, plan.new_prefix or [[]] * fresh, plan.new_produced or [0] * fresh,
            plan.new_history or [[]] * fresh,
        ):
            self.sampler.start(row, params, produced, history or None)
            if prefix:  # KV found in the prefix cache
                self.req_to_token[row, :len(prefix)] = self._tensor(prefix)
        meta = self._meta(plan)
        ids = self._tensor(plan.input_ids)
        if meta.decode is not None and min(plan.input_ids[:meta.decode.B]) < 0:
            # Placeholders (-1) for tokens sampled by the previous step, planned before it finished.
            head = ids[:meta.decode.B]
            head.copy_(torch.where(head < 0, self.last_token[meta.decode.rows], head))
        logits = self.model.forward(ids, meta, self.kv_cache).float()
        n = len(meta.sample_rows)
        sampled, logprobs = self.sampler.sample(logits[:n], meta.sample_rows, (plan.mask_of, plan.masks))
        self.last_token[meta.sample_rows_t] = sampled
        scores, start = [], n
        for targets, k in zip(plan.score_targets, plan.score_k):  # prompt logprobs, after the sampled rows
            scores.append(self.sampler.score(logits[start:start + len(targets)], targets, k))
            start += len(targets)
        # The only host sync of the step: the sampled ids (and logprobs, when a request asks for them).
        return sampled.tolist(), logprobs if any(lp is not None for lp in logprobs) else [], scores

    def _meta(self, plan: StepPlan) -> AttentionMeta:
        B = len(plan.rows)
        lens = [plan.offsets[i + 1] - plan.offsets[i] for i in range(B)]
        T = plan.offsets[-1]
        rows = self._tensor(plan.rows)
        slots = self._tensor(plan.slots)
        if T == B:
            positions = self._tensor(plan.starts)
            token_rows = rows
            self.req_to_token[rows, positions] = slots
        else:
            positions = self._tensor([p for s, n in zip(plan.starts, lens) for p in range(s, s + n)])
            token_rows = torch.repeat_interleave(rows, self._tensor(lens), output_size=T)
            self.req_to_token[token_rows, positions] = slots
        # Requests with one new token come first in a plan: decodes, then prompt chunks.
        Bd = next((i for i, n in enumerate(lens) if n > 1), B)
        if self.model.ops.native and max(lens) <= NATIVE_PREFILL_TOKENS:
            # Every new token, of a decode or of a prompt chunk, is one query over its own sequence up to
            # itself, computed alike: a prompt's last token gives the same result whether it came in a
            # long chunk or alone after a prefix-cache hit.
            decode = DecodeView(token_rows, T, max(s + n for s, n in zip(plan.starts, lens)), table=self.req_to_token, lens=positions + 1)
            prefill = None
        else:
            decode = self._decode_view(rows[:Bd], plan.starts[:Bd]) if Bd else None
            prefill = self._prefill_view(rows[Bd:], plan.starts[Bd:], lens[Bd:]) if Bd < B else None
        skip = set(plan.skip)
        sample = [i for i in range(B) if i not in skip]
        last = [plan.offsets[i + 1] - 1 for i in sample]
        for e, targets in zip(plan.score, plan.score_targets):  # the positions whose prompt logprobs are wanted
            last.extend(range(plan.offsets[e], plan.offsets[e] + len(targets)))
        last = None if T == B and not skip and not plan.score else self._tensor(last)
        sample_rows = [plan.rows[i] for i in sample]
        return AttentionMeta(
            slots, self.model.rope_at(positions), last, decode, prefill,
            sample_rows, rows if not skip else self._tensor(sample_rows),
        )

    def _gather(self, rows: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows of every K/V head of these requests' first L positions, and scratch to gather into."""
        gather = (self.head_base + self.req_to_token[rows, :L].view(1, -1)).view(-1)
        if self.kv_buf.shape[0] < gather.shape[0]:
            self.kv_buf = torch.empty(gather.shape[0], self.kv_buf.shape[1], device=self.device, dtype=self.kv_buf.dtype)
        return gather, self.kv_buf[:gather.shape[0]]

    def _decode_view(self, rows: torch.Tensor, starts: list[int]) -> DecodeView:
        B, L = len(starts), max(starts) + 1
        if self.model.ops.native:  # its decode attention reads the cache in place through req_to_token
            return DecodeView(rows, B, L, table=self.req_to_token, lens=self._tensor([s + 1 for s in starts]))
        gather, buf = self._gather(rows, L)
        bias = None
        if min(starts) + 1 < L:
            # One query per request sees its whole sequence; the bias only hides other requests' padding.
            ends = self._tensor(starts) + 1
            keys = torch.arange(L, device=self.device)
            bias = torch.zeros(B, L, dtype=self.model.dtype, device=self.device).masked_fill_(keys[None, :] >= ends[:, None], float("-inf"))
            bias = bias.view(1, B, 1, L).expand(self.model.n_kv, B, 1, L).reshape(-1, 1, L)
        return DecodeView(rows, B, L, gather, buf, bias)

    def _prefill_view(self, rows: torch.Tensor, starts: list[int], lens: list[int]) -> PrefillView:
        B, N = len(lens), max(lens)
        ends = [s + n for s, n in zip(starts, lens)]
        L = max(ends)
        gather, buf = self._gather(rows, L)
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        if B == 1:
            # One prompt (or chunk) after its cached prefix: plain causal attention aligned to the last key,
            # which lets SDPA skip the masked half (measured 2x faster than an explicit mask at 4k tokens).
            return PrefillView(gather, buf, 1, L, N, causal_lower_right(N, L), None, None)
        keys = torch.arange(L, device=self.device)
        q_pos = self._tensor(starts)[:, None] + torch.arange(N, device=self.device)[None, :]
        ends_t = self._tensor(ends)
        mask = ((keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < ends_t[:, None, None])).unsqueeze(1)
        # Padded queries repeat the request's last token; their outputs are dropped by out_index.
        q_index = self._tensor([offsets[b] + min(j, lens[b] - 1) for b in range(B) for j in range(N)])
        out_index = self._tensor([b * N + j for b in range(B) for j in range(lens[b])])
        return PrefillView(gather, buf, B, L, N, mask, q_index, out_index)
