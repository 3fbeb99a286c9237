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
        self.k_cache = [torch.zeros(pool_tokens, model.n_kv, d, device=dev, dtype=dt) for _ in model.layers]
        self.v_cache = [torch.zeros(pool_tokens, model.n_kv, d, device=dev, dtype=dt) for _ in model.layers]
        self.req_to_token = torch.zeros(max_rows, max_len, dtype=torch.int64, device=dev)
        self.sampler = Sampler(dev)
        self.device = dev

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> list[int]:
        for row, params in zip(plan.new_rows, plan.new_sampling):
            self.sampler.start(row, params)
        meta = self._meta(plan)
        ids = torch.tensor(plan.input_ids, dtype=torch.int64, device=self.device)
        logits = self.model.forward(ids, meta, self.k_cache, self.v_cache)
        # The only host sync of the step: the sampled ids.
        return self.sampler.sample(logits.float(), plan.rows).tolist()

    def _meta(self, plan: StepPlan) -> AttentionMeta:
        dev = self.device
        B = len(plan.rows)
        lens = [plan.offsets[i + 1] - plan.offsets[i] for i in range(B)]
        N = max(lens)
        rows = torch.tensor(plan.rows, dtype=torch.int64, device=dev)
        starts = torch.tensor(plan.starts, dtype=torch.int64, device=dev)
        slots = torch.tensor(plan.slots, dtype=torch.int64, device=dev)
        ends = starts + torch.tensor(lens, dtype=torch.int64, device=dev)
        L = max(s + n for s, n in zip(plan.starts, lens))
        if N == 1:
            positions = starts
            self.req_to_token[rows, starts] = slots
        else:
            positions = torch.tensor([p for s, n in zip(plan.starts, lens) for p in range(s, s + n)], dtype=torch.int64, device=dev)
            token_rows = torch.repeat_interleave(rows, torch.tensor(lens, device=dev))
            self.req_to_token[token_rows, positions] = slots
        kv_table = self.req_to_token[rows, :L]
        keys = torch.arange(L, device=dev)
        if N == 1:
            mask = (keys[None, :] < ends[:, None]).view(B, 1, 1, L)
            q_index = out_index = None
        else:
            q_pos = starts[:, None] + torch.arange(N, device=dev)[None, :]
            mask = ((keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < ends[:, None, None])).unsqueeze(1)
            # Padded queries repeat the request's last token; their outputs are dropped by out_index.
            q_index = torch.tensor([plan.offsets[b] + min(j, lens[b] - 1) for b in range(B) for j in range(N)], device=dev)
            out_index = torch.tensor([b * N + j for b in range(B) for j in range(lens[b])], device=dev)
        last = torch.tensor(plan.offsets[1:], dtype=torch.int64, device=dev) - 1
        cos = self.model.cos.index_select(0, positions).unsqueeze(1)
        sin = self.model.sin.index_select(0, positions).unsqueeze(1)
        return AttentionMeta(slots, kv_table, mask, q_index, out_index, cos, sin, last)
