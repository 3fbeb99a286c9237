"""One TP rank's engine: the model shard, its KV slot pool, and `step(plan) -> token ids`.

The scheduler owns the bookkeeping (which slots and rows a request holds); the engine only obeys the
plan: it writes each request's slots into its row of `req_to_token`, runs the forward over the flat
batch, and samples one token per request.
"""

from __future__ import annotations

import torch

from serve.messages import StepPlan
from serve.worker.model import AttentionMeta, Model
from serve.worker.sampler import Sampler


class Engine:
    def __init__(self, model: Model, pool_tokens: int, max_rows: int, max_len: int) -> None:
        self.model = model
        dev, dt = model.device, model.dtype
        d = model.args.head_dim
        # Per layer: keys then values, head-major (see AttentionMeta).
        self.kv_cache = [torch.zeros(2 * model.n_kv, pool_tokens, d, device=dev, dtype=dt) for _ in model.layers]
        self.kv_buf = torch.empty(0, d, device=dev, dtype=dt)
        self.req_to_token = torch.zeros(max_rows, max_len, dtype=torch.int64, device=dev)
        # Row offset of each K/V head in a layer's cache viewed as [2kv*pool, d].
        self.head_base = torch.arange(2 * model.n_kv, dtype=torch.int64, device=dev)[:, None] * pool_tokens
        self.sampler = Sampler(dev)
        self.device = dev

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_cache)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> list[int]:
        for row, params in zip(plan.new_rows, plan.new_sampling):
            self.sampler.start(row, params)
        meta = self._meta(plan)
        ids = torch.tensor(plan.input_ids, dtype=torch.int64, device=self.device)
        logits = self.model.forward(ids, meta, self.kv_cache)
        # The only host sync of the step: the sampled ids.
        return self.sampler.sample(logits.float(), plan.rows).tolist()

    def _meta(self, plan: StepPlan) -> AttentionMeta:
        dev = self.device
        B = len(plan.rows)
        lens = [plan.offsets[i + 1] - plan.offsets[i] for i in range(B)]
        ends = [s + n for s, n in zip(plan.starts, lens)]
        N, L, T = max(lens), max(ends), plan.offsets[-1]
        rows = torch.tensor(plan.rows, dtype=torch.int64, device=dev)
        slots = torch.tensor(plan.slots, dtype=torch.int64, device=dev)
        if N == 1:
            positions = torch.tensor(plan.starts, dtype=torch.int64, device=dev)
            self.req_to_token[rows, positions] = slots
        else:
            positions = torch.tensor([p for s, n in zip(plan.starts, lens) for p in range(s, s + n)], dtype=torch.int64, device=dev)
            token_rows = torch.repeat_interleave(rows, torch.tensor(lens, device=dev))
            self.req_to_token[token_rows, positions] = slots
        gather = (self.head_base + self.req_to_token[rows, :L].view(1, -1)).view(-1)
        if self.kv_buf.shape[0] < gather.shape[0]:
            self.kv_buf = torch.empty(gather.shape[0], self.kv_buf.shape[1], device=dev, dtype=self.kv_buf.dtype)
        keys = torch.arange(L, device=dev)
        ends_t = torch.tensor(ends, dtype=torch.int64, device=dev)
        mask = bias = q_index = out_index = None
        if N == 1:
            # One query per request sees its whole sequence; the bias only hides other requests' padding.
            if min(ends) < L:
                bias = torch.zeros(B, L, dtype=self.model.dtype, device=dev).masked_fill_(keys[None, :] >= ends_t[:, None], float("-inf"))
                bias = bias.view(1, B, 1, L).expand(self.model.n_kv, B, 1, L).reshape(-1, 1, L)
        else:
            starts = torch.tensor(plan.starts, dtype=torch.int64, device=dev)
            q_pos = starts[:, None] + torch.arange(N, device=dev)[None, :]
            mask = ((keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < ends_t[:, None, None])).unsqueeze(1)
            # Padded queries repeat the request's last token; their outputs are dropped by out_index.
            q_index = torch.tensor([plan.offsets[b] + min(j, lens[b] - 1) for b in range(B) for j in range(N)], device=dev)
            out_index = torch.tensor([b * N + j for b in range(B) for j in range(lens[b])], device=dev)
        last = None if T == B else torch.tensor(plan.offsets[1:], dtype=torch.int64, device=dev) - 1
        return AttentionMeta(slots, gather, self.kv_buf[:gather.shape[0]], B, L, N, mask, bias, q_index, out_index, self.model.rope_at(positions), last)
