"""Per-request sampling inside a batched step: greedy, temperature, top-k, top-p, seed.

Each request draws its randomness from its own generator, reseeded for every token from the request's
seed (or a random one) and the token's index in the output, so a seeded request gives the same text
alone, in a busy batch, or preempted and recomputed halfway. Sampling uses the exponential race
(argmax of p / Exp(1) noise), which needs one noise vector per row and nothing batch-dependent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from serve.messages import SamplingParams


@dataclass
class RowSampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int
    produced: int  # tokens sampled so far: the index of the next one
    generator: torch.Generator


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: dict[int, RowSampling] = {}

    def start(self, row: int, params: SamplingParams, produced: int = 0) -> None:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gen = torch.Generator(device=self.device)
        self.rows[row] = RowSampling(params.temperature, params.top_p, params.top_k, seed, produced, gen)

    def sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One token id per row of `logits` [B, V] (float32)."""
        params = [self.rows[r] for r in rows]
        for p in params:
            p.produced += 1
        greedy = logits.argmax(dim=-1)
        if all(p.temperature <= 0 for p in params):
            return greedy
        V = logits.shape[1]
        temps = self._tensor([max(p.temperature, 1e-5) for p in params], torch.float32)
        x = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            x = self._truncate(x, params)
        probs = torch.softmax(x, dim=-1)
        noise = torch.stack([torch.empty(V, device=logits.device).exponential_(generator=self._reseed(p)) for p in params])
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = self._tensor([p.temperature <= 0 for p in params], torch.bool)
        return torch.where(is_greedy, greedy, sampled)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Through pinned memory on CUDA, so the upload does not stall the host (see Engine._tensor)."""
        pinned = self.device.type == "cuda"
        t = torch.tensor(values, dtype=dtype, pin_memory=pinned)
        return t.to(self.device, non_blocking=True) if pinned else t

    @staticmethod
    def _reseed(p: RowSampling) -> torch.Generator:
        p.generator.manual_seed((p.seed + p.produced * 0x9E3779B97F4A7C15) % (1 << 63))
        return p.generator

    def _truncate(self, x: torch.Tensor, params: list[RowSampling]) -> torch.Tensor:
        V = x.shape[1]
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=x.device)[None, :]
        top_k = self._tensor([p.top_k if p.top_k > 0 else V for p in params], torch.int64)
        top_p = self._tensor([p.top_p for p in params], torch.float32)
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token: the most likely token always survives.
        before = probs.cumsum(dim=-1) - probs
        drop = (rank >= top_k[:, None]) | (before > top_p[:, None])
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)
