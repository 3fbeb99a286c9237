"""The small per-layer operations of the forward, in two interchangeable forms.

`TorchOps` is plain torch: any device, any dtype. `NativeOps` runs the same operations as our fused CPU
kernels (csrc/) and is used for float32 on CPU when they are built: at batch 1 the torch form is
~20 ops of 5-40 us each per layer, more than the layer's matmuls. Model.forward calls one `ops` object and
does not know which it has.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from serve.worker.model import DecodeView

# An int8 cache row (engine.kv_cache_dtype: int8) is one head's d values of one token as int8, then their
# scale as 4 bytes of float32: value i is row[i] * scale, scale = the row's largest magnitude / 127. Half a
# float16 cache's bytes, which is what decode attention at many streams waits for. csrc/common.h's
# kv_quantize writes the same bytes.
KV_SCALE_BYTES = 4


def kv_row_width(d: int, dtype: torch.dtype) -> int:
    """Elements per cache row for heads of d values."""
    return d + KV_SCALE_BYTES if dtype == torch.int8 else d


def to_cache_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values [..., d] as a cache of `dtype` stores them."""
    if dtype != torch.int8:
        return x.to(dtype)
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.cat([torch.round(x * inv).to(torch.int8), (amax / 127.0).view(torch.int8)], dim=-1)


def from_cache_rows(rows: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., row] back to keys or values [..., d] in `dtype`."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    return (rows[..., :d].float() * rows[..., d:].contiguous().view(torch.float32)).to(dtype)


class TorchOps:
    native = False

    def __init__(self, eps: float, complex_rope: bool) -> None:
        self.eps = eps
        self.complex_rope = complex_rope

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x, weight.shape, weight, self.eps)

    def add_rms(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the next norm: returns (h + delta, rms(h + delta))."""
        h = h + delta
        return h, self.rms(h, weight)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_store(self, qkv: torch.Tensor, rope: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, n_q: int,
                   q_scale: float = 1.0) -> None:
        """Rotates the query and key heads of qkv [T, heads, d] in place (the queries also scaled by
        q_scale, the attention scale where the weights could not take it) and writes keys and values
        (side by side in qkv) to their cache slots."""
        n_kv = (qkv.shape[1] - n_q) // 2
        if q_scale != 1.0:
            qkv[:, :n_q] *= q_scale
        qk = qkv[:, :n_q + n_kv]
        pairs = qk.unflatten(-1, (-1, 2))
        if self.complex_rope:
            torch.mul(torch.view_as_complex(pairs), rope, out=torch.view_as_complex(pairs))
        else:
            torch.addcmul(qk * rope[0], pairs.flip(-1).flatten(-2), rope[1], out=qk)  # flip copies: no aliasing
        cache.index_copy_(1, slots, to_cache_rows(qkv[:, n_q:].transpose(0, 1), cache.dtype))

    def decode_attention(self, q: torch.Tensor, cache: torch.Tensor, dec: DecodeView) -> torch.Tensor:
        """q [B, n_q, d] (pre-scaled) against each request's cached keys and values -> [B, n_q * d].

        Batched matmuls over (kv head, request), each kv head shared by its group of query heads without
        repeating K/V: measured ~2x faster than SDPA at batch 32 (SDPA's CPU kernel is built for long
        query blocks), and no slower at batch 1."""
        B, n_q, d = q.shape
        n_kv, L = cache.shape[0] // 2, dec.L
        rows = torch.index_select(cache.view(-1, cache.shape[2]), 0, dec.gather, out=dec.kv_buf)
        kv = from_cache_rows(rows, d, q.dtype).view(2 * n_kv, B, L, d)
        g = n_q // n_kv
        qg = q.reshape(B, n_kv, g, d).transpose(0, 1).reshape(n_kv * B, g, d)
        keys, values = kv[:n_kv].view(n_kv * B, L, d), kv[n_kv:].view(n_kv * B, L, d)
        scores = torch.bmm(qg, keys.transpose(1, 2))
        if dec.bias is not None:
            scores += dec.bias
        out = torch.bmm(torch.softmax(scores, dim=-1), values)
        return out.view(n_kv, B, g * d).transpose(0, 1).reshape(B, n_q * d)


class NativeOps(TorchOps):
    """The same operations through our CPU kernels; float32 on CPU only. Decode attention reads the cache
    in place through req_to_token (DecodeView.table, .lens), so the engine builds no gather for it."""

    native = True

    def __init__(self, eps: float, kernels: ModuleType, level: int = 0) -> None:
        super().__init__(eps, complex_rope=True)
        self.k = kernels
        self.level = level  # the quantized matmul's (native.kernel_level): from 2 on, attention runs on AVX-512

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.k.rms_norm(x, weight, self.eps) if x.is_contiguous() else super().rms(x, weight)

    def add_rms(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, self.k.add_rms_norm(h, delta.contiguous(), weight, self.eps)  # h is updated in place

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gate_up)

    def rope_store(self, qkv: torch.Tensor, rope: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, n_q: int,
                   q_scale: float = 1.0) -> None:
        self.k.rope_store(qkv, rope, cache, slots, n_q, q_scale)

    def decode_attention(self, q: torch.Tensor, cache: torch.Tensor, dec: DecodeView) -> torch.Tensor:
        B = q.shape[0]
        return self.k.decode_attention(q, cache, dec.table, dec.rows, dec.lens, self.level).view(B, -1)
