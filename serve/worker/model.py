"""Our model code for the Llama family (Llama, SmolLM2, Mistral, Qwen2/2.5, Qwen3), one TP shard of it.

Tensor parallelism follows Megatron: the fused QKV and gate/up projections are column-parallel (each rank
holds some heads and some of the MLP width), o_proj and down_proj are row-parallel and end in an
all-reduce. Heads are split by key/value group, so a model with 9 query and 3 kv heads runs on 2 ranks
as 6+3 query heads. Embeddings are replicated; the LM head is split by vocabulary and all-gathered.

The forward works on a flat list of new tokens from several requests (prefill and decode alike);
only attention needs the per-request view, which `AttentionMeta` gives it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from serve import isa
from serve.worker import native
from serve.worker.formats import resolve
from serve.worker.linear import Embedding, Linears, QuantEmbedding, QuantLinear
from serve.worker.ops import NativeOps, TorchOps, from_cache_rows
from serve.worker.weights import GGUFWeights, QuantRows, SafetensorsWeights


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama's and Qwen3's attention_bias biases o_proj too (Qwen2's built-in qkv bias does not)
    mlp_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        c = json.loads((Path(folder) / "config.json").read_text())
        heads = c["num_attention_heads"]
        # transformers 5 keeps rope settings in "rope_parameters"; older configs use rope_theta/rope_scaling.
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            model_type=c["model_type"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=c["model_type"] == "qwen2" or c.get("attention_bias", False),
            o_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            qk_norm=c["model_type"] == "qwen3",
            max_position_embeddings=c.get("max_position_embeddings", 2048),
        )


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and position scale, as transformers' rope initialisers compute them."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv, 1.0
    if s["rope_type"] == "linear":
        return inv, 1.0 / s["factor"]
    if s["rope_type"] == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(is_mid, mid, scaled), 1.0
    raise ValueError(f"rope scaling type {s['rope_type']!r} is not supported (supported: default, linear, llama3)")


@dataclass
class DecodeView:
    """The requests of a step that have one new token each (decodes), which come first in the batch.

    A layer's KV cache is [2 * kv_heads, pool_tokens, row] (row: head_dim values, and an int8 cache's
    scale, ops.py): keys then values, head-major, so that the gathered K/V of one head is contiguous in
    L (measured: attention over it runs ~2x faster than over the token-major [pool, heads, d] layout)."""

    rows: torch.Tensor  # [B] request rows
    B: int
    L: int  # keys per request, padded to the longest
    # TorchOps gathers every request's K/V into a padded copy:
    gather: torch.Tensor | None = None  # [2*kv * B*L] rows of the cache viewed as [2*kv*pool, row]: every head of every request's sequence
    kv_buf: torch.Tensor | None = None  # [2*kv * B*L, row] scratch the gather writes into (reused, so big gathers don't fault in fresh pages)
    bias: torch.Tensor | None = None  # [kv*B, 1, L] additive, -inf on other requests' padding; None if there is none
    # NativeOps reads the cache in place:
    table: torch.Tensor | None = None  # the engine's req_to_token [rows, max_len]: slot of each position
    lens: torch.Tensor | None = None  # [B] keys of each request


@dataclass
class PrefillView:
    """The requests of a step with several new tokens (prompts or prompt chunks), after the decodes."""

    gather: torch.Tensor  # as in DecodeView
    kv_buf: torch.Tensor
    B: int
    L: int  # keys per request, padded to the longest
    N: int  # queries per request, padded to the longest
    mask: torch.Tensor  # [B, 1, N, L] bool, which keys each padded query sees (B == 1: a lower-right causal bias)
    q_index: torch.Tensor | None  # [B*N] index of each padded query among these requests' new tokens; None if B == 1
    out_index: torch.Tensor | None  # [T] padded row of each real token; None if B == 1


@dataclass
class AttentionMeta:
    """Per-step view of the batch, built once by the engine and used by every layer."""

    slots: torch.Tensor  # [T] KV slot of each new token
    rope: torch.Tensor  # RoPE rows of the new tokens' positions, from Model.rope_at
    last: torch.Tensor | None  # flat index of each sampled request's last new token; None when that is every token
    decode: DecodeView | None
    prefill: PrefillView | None
    sample_rows: list[int]  # row of each request that samples, in plan order
    sample_rows_t: torch.Tensor


class Shard:
    """Which slice of the heads, MLP width and vocabulary this rank owns."""

    def __init__(self, args: ModelArgs, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        group = args.num_heads // args.num_kv_heads
        self.kv = self._range(args.num_kv_heads)
        self.q = (self.kv[0] * group, self.kv[1] * group)
        self.mlp = self._range(args.intermediate_size)
        self.vocab = self._range(args.vocab_size)

    def _range(self, n: int) -> tuple[int, int]:
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


def pair_layout(t: torch.Tensor | QuantRows, d: int) -> torch.Tensor | QuantRows:
    """Reorders each head's rows (or, for a [d] norm weight, its entries) from RoPE's half-split pairing
    (i, i + d/2) to adjacent pairs (2i, 2i + 1), so that RoPE is one complex multiply.

    Queries and keys get the same order, so their dot products, and so attention, are unchanged; values
    and o_proj are untouched. Norm weights over the head dim are permuted alike. Quantized rows move
    whole, blocks and all.
    """
    half = torch.arange(d // 2)
    order = torch.stack([half, half + d // 2], dim=1).flatten()
    if isinstance(t, QuantRows):
        return t.take((torch.arange(t.N // d)[:, None] * d + order).flatten())
    return t.view(-1, d, *t.shape[1:])[:, order].reshape(t.shape)


class Layer:
    def __init__(self, w: SafetensorsWeights | GGUFWeights, args: ModelArgs, shard: Shard, i: int, linear: Linears) -> None:
        p = f"model.layers.{i}."
        d = args.head_dim
        q_rows = (shard.q[0] * d, shard.q[1] * d)
        kv_rows = (shard.kv[0] * d, shard.kv[1] * d)
        a = p + "self_attn."
        # The 1/sqrt(d) attention scale is folded into the queries (their projection, or their norm when
        # there is one), saving a scaling per layer. Exact where sqrt(d) is a power of two (d = 64, 256);
        # elsewhere (d = 128) it rounds each weight once, within float32's last bit. Quantized blocks
        # keep their scales: RoPE applies it to the queries instead (q_scale).
        scale = d ** -0.5
        mat = lambda key, rows=None, cols=None: linear.stored(w.matrix(key, rows, cols))  # noqa: E731
        q, k, v = mat(a + "q_proj.weight", q_rows), mat(a + "k_proj.weight", kv_rows), mat(a + "v_proj.weight", kv_rows)
        fold = 1.0 if args.qk_norm else scale
        self.q_scale = 1.0
        if isinstance(q, QuantRows):
            fold, self.q_scale = 1.0, fold
        qkv_bias = None
        if args.qkv_bias:
            qb, kb, vb = w.get(a + "q_proj.bias", q_rows), w.get(a + "k_proj.bias", kv_rows), w.get(a + "v_proj.bias", kv_rows)
            qkv_bias = torch.cat([pair_layout(qb, d) * fold, pair_layout(kb, d), vb])
        q = pair_layout(q, d) if isinstance(q, QuantRows) else pair_layout(q, d) * fold
        self.qkv = linear([q, pair_layout(k, d), v], qkv_bias)
        self.q_norm = self.k_norm = None
        if args.qk_norm:
            self.q_norm = pair_layout(w.get(a + "q_norm.weight"), d) * scale
            self.k_norm = pair_layout(w.get(a + "k_norm.weight"), d)
        # o_proj and down_proj are row-parallel: the all-reduce sums the ranks' partial outputs, so only
        # rank 0 adds their bias.
        row_bias = shard.rank == 0
        self.o = linear(mat(a + "o_proj.weight", cols=q_rows), w.get(a + "o_proj.bias") if args.o_bias and row_bias else None)
        m = p + "mlp."
        gate_up_bias = None
        if args.mlp_bias:
            gate_up_bias = torch.cat([w.get(m + "gate_proj.bias", shard.mlp), w.get(m + "up_proj.bias", shard.mlp)])
        self.gate_up = linear([mat(m + "gate_proj.weight", shard.mlp), mat(m + "up_proj.weight", shard.mlp)], gate_up_bias)
        self.down = linear(mat(m + "down_proj.weight", cols=shard.mlp), w.get(m + "down_proj.bias") if args.mlp_bias and row_bias else None)
        self.in_norm = w.get(p + "input_layernorm.weight")
        self.post_norm = w.get(p + "post_attention_layernorm.weight")


class Model:
    def __init__(self, folder: str | Path, rank: int, tp: int, dtype: torch.dtype, device: torch.device,
                 quantization: str = "auto", progress: Callable[[int, int], None] | None = None, cpu_kernels: bool = True,
                 cpu_isa: str = "auto", gguf: str | None = None, kv_cache_dtype: str = "auto") -> None:
        self.args = args = ModelArgs.from_folder(folder)
        if args.num_kv_heads < tp or args.num_heads % args.num_kv_heads:
            raise ValueError(f"cannot split {args.num_kv_heads} kv heads / {args.num_heads} query heads over {tp} ranks")
        self.tp, self.device = tp, device
        self.shard = shard = Shard(args, rank, tp)
        # Our fused CPU kernels (native.py) where they apply and build; else plain torch ops.
        self.isa = isa.chosen(cpu_isa) if device.type == "cpu" else None
        wanted = cpu_kernels and self.isa is not None and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.kernels = native.load() if wanted else None
        self.formats = f = resolve(dtype, device, quantization, gguf is not None, self.kernels is not None, kv_cache_dtype)
        self.dtype = f.compute
        if gguf is not None:
            w = GGUFWeights(gguf, f.compute, device, args.num_heads, args.num_kv_heads, f.matrices)
        else:
            w = SafetensorsWeights(folder, f.compute, device, f.matrices)
        self.linears = linear = Linears(f, device, self.kernels, native.kernel_level(self.kernels, self.isa) if self.kernels else 0, isa.native_bf16(self.isa))
        self.layers = []
        for i in range(args.num_layers):
            self.layers.append(Layer(w, args, shard, i, linear))
            if progress is not None:
                progress(i + 1, args.num_layers)
        self.norm = w.get("model.norm.weight")
        tied = args.tie_word_embeddings or not w.has("lm_head.weight")
        embed = w.matrix("model.embed_tokens.weight")
        head = embed if tied and tp == 1 else w.matrix("model.embed_tokens.weight" if tied else "lm_head.weight", rows=shard.vocab)
        self.lm_head = linear(head)
        if isinstance(embed, QuantRows) and f.blocks:
            # One copy of a tied quantized embedding serves both; otherwise it gets tiles of its own.
            shared = head is embed and isinstance(self.lm_head, QuantLinear)
            self.embed = QuantEmbedding(self.lm_head if shared else linear.quantized(embed))
        else:
            self.embed = Embedding(linear.stored(embed).to(device=device, dtype=f.compute), f.compute)
        # Formats that had to be dequantized although the model runs from blocks (the worker warns).
        self.no_kernel = sorted(getattr(w, "no_kernel", ())) if f.blocks else []
        w.close()
        self.n_q, self.n_kv = shard.q[1] - shard.q[0], shard.kv[1] - shard.kv[0]
        self.init_rope(complex_rope=f.compute in (torch.float32, torch.float64))
        self.fused = self._fuse()

    def _fuse(self):
        """All layers in one kernel call (csrc/decode_layers.cpp) where every matmul is our quantized one,
        on one rank (no all-reduce between them) and without q/k norms; else None."""
        matrices = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if not self.ops.native or self.tp > 1 or self.args.qk_norm or not all(isinstance(m, QuantLinear) for m in matrices):
            return None
        fused = self.kernels.DecodeLayers(self.n_q, self.n_kv, self.args.head_dim, self.args.rms_norm_eps, self.linears.level)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm
            fused.add(*(a for m in (layer.qkv, layer.o, layer.gate_up, layer.down) for a in (m.packed, m.format, m.bias)),
                      layer.post_norm, nxt, layer.q_scale)
        return fused

    def describe(self, kv_dtype: torch.dtype = torch.float16) -> dict[str, str]:
        """What the banner says of this model: how its weights are stored and which path each kind of op takes
        (decode attention's depends on the KV cache's dtype)."""
        f, used = self.formats, self.linears.used
        floats = {"float32", "bfloat16", "float16"}
        quantized = [name for name in used if name not in floats]
        mode = ("int8" if f.int8 else "gguf") if quantized else "none"
        weights = "+".join(f"{name}:{size / 2**20:.1f}MB" for name, size in sorted(used.items(), key=lambda kv: -kv[1]))
        paths = []
        if quantized:
            paths.append(f"qgemm-{native.KERNEL_NAMES[self.linears.level]}")
        if "float32" in used:
            paths.append("onednn-f32" if self.device.type == "cpu" else "torch")
        if "bfloat16" in used or "float16" in used:
            native_bf16 = "amx" if isa.at_least(self.isa, "amx") else "native" if isa.native_bf16(self.isa) else "emulated"
            paths.append(f"onednn-bf16-{native_bf16}" if self.device.type == "cpu" and "bfloat16" in used else "torch")
        # RoPE, norms and SiLU: our AVX2 kernels at every level (not where the time goes); decode attention
        # on AVX-512 from that level on, for float16 and int8 caches of 64-value heads (attention_avx512.cpp).
        ops = "torch"
        if self.ops.native:
            wide = self.linears.level >= native.KERNEL_LEVEL["avx512"] and kv_dtype in (torch.float16, torch.int8) and self.args.head_dim == 64
            ops = "native-avx2" + ("+attention-avx512" if wide else "") + ("+one-call" if self.fused is not None else "")
        return {"quantization": mode, "weights": weights, "matmul": "+".join(paths), "ops": ops, "isa": self.isa or "none"}

    def init_rope(self, complex_rope: bool) -> None:
        """Per-position RoPE tables, for queries and keys in `pair_layout`.

        In float32/64 the rotation is a complex multiply (one op, ~5x cheaper than the real-valued form).
        Other dtypes have no usable complex type, so there it is x*cos + swap_pairs(x)*sin, with the
        sign of sin folded in; both are the same products as transformers' x*cos + rotate_half(x)*sin.
        """
        args = self.args
        inv_freq, scale = rope_inv_freq(args)
        pos = torch.arange(args.max_position_embeddings, dtype=torch.float32) * scale
        freqs = torch.outer(pos, inv_freq)  # [P, d/2]
        cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        self.complex_rope = complex_rope
        eps = self.args.rms_norm_eps
        self.ops = NativeOps(eps, self.kernels, self.linears.level) if complex_rope and self.kernels else TorchOps(eps, complex_rope)
        if complex_rope:
            self.rope_table = torch.complex(cos, sin).to(self.device)
        else:
            self.rope_table = torch.stack([cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(1)]).to(self.device)

    def rope_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The RoPE rows for these positions, shaped to broadcast over [T, heads, ...]; goes into AttentionMeta."""
        if self.ops.native:
            return torch.view_as_real(self.rope_table.index_select(0, positions))  # [T, d/2, 2]: cos, sin
        if self.complex_rope:
            return self.rope_table.index_select(0, positions).unsqueeze(1)  # [T, 1, d/2]
        return self.rope_table.index_select(1, positions).unsqueeze(2)  # [2, T, 1, d]: cos, signed sin

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x)
        return x

    def forward(self, input_ids: torch.Tensor, meta: AttentionMeta, kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, vocab] of each request's last new token. Writes the new tokens' K/V into the caches.

        At batch 1 a decode step is mostly weight streaming plus per-op dispatch (30 layers), so the
        layer loop is kept to few calls: each residual add is fused with the norm after it, and where the
        model allows it the whole loop is one kernel call (`fused`).
        """
        h = self.embed(input_ids)
        x = self.ops.rms(h, self.layers[0].in_norm)
        dec = meta.decode
        if self.fused is not None and meta.prefill is None and dec is not None and dec.table is not None:
            x = self.fused.run(h, x, kv_cache, meta.rope, meta.slots, dec.table, dec.rows, dec.lens)
        else:
            x = self._layers(h, x, meta, kv_cache)
        if meta.last is not None:
            x = x.index_select(0, meta.last)
        logits = self.lm_head(x)
        if self.tp > 1:
            logits = self._gather_vocab(logits)
        return logits

    def _layers(self, h: torch.Tensor, x: torch.Tensor, meta: AttentionMeta, kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """The layer loop, one op at a time: h is the residual stream, x its input norm; returns the final norm."""
        d, n_q, n_kv, ops = self.args.head_dim, self.n_q, self.n_kv, self.ops
        for i, (layer, cache) in enumerate(zip(self.layers, kv_cache)):
            qkv = layer.qkv(x).view(-1, n_q + 2 * n_kv, d)
            if layer.q_norm is not None:
                qkv[:, :n_q] = ops.rms(qkv[:, :n_q], layer.q_norm)
                qkv[:, n_q:n_q + n_kv] = ops.rms(qkv[:, n_q:n_q + n_kv], layer.k_norm)
            ops.rope_store(qkv, meta.rope, cache, meta.slots, n_q, layer.q_scale)  # in place: K and V stay side by side in qkv
            attn = self._attention(qkv[:, :n_q], cache, meta)
            h, x = ops.add_rms(h, self._all_reduce(layer.o(attn)), layer.post_norm)
            down = layer.down(ops.silu_mul(layer.gate_up(x)))
            h, x = ops.add_rms(h, self._all_reduce(down), self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm)
        return x

    def _attention(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """Queries are pre-scaled (see Layer), hence plain q @ k and scale=1 below."""
        d, n_kv = self.args.head_dim, self.n_kv
        dec, pre = meta.decode, meta.prefill
        parts = []
        if dec is not None:
            parts.append(self.ops.decode_attention(q[:dec.B], cache, dec))
        if pre is not None:
            # Prompts: SDPA over each request's keys (cached prefix included), padded to the longest.
            B, L, N = pre.B, pre.L, pre.N
            rows = torch.index_select(cache.view(-1, cache.shape[2]), 0, pre.gather, out=pre.kv_buf)
            kv = from_cache_rows(rows, d, q.dtype).view(2 * n_kv, B, L, d)
            rest = q[dec.B:] if dec is not None else q
            if pre.q_index is not None:
                rest = rest.index_select(0, pre.q_index)
            queries = rest.view(B, N, self.n_q, d).transpose(1, 2)
            keys, values = kv[:n_kv].transpose(0, 1), kv[n_kv:].transpose(0, 1)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=pre.mask, scale=1.0, enable_gqa=self.n_q != n_kv)
            out = out.transpose(1, 2).reshape(B * N, self.n_q * d)
            parts.append(out if pre.out_index is None else out.index_select(0, pre.out_index))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # Vocabulary slices can differ in size by one; all_gather needs equal shapes, so pad and trim.
        V = self.args.vocab_size
        width = -(-V // self.tp)
        padded = F.pad(logits, (0, width - logits.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp)]
        dist.all_gather(parts, padded)
        sizes = [V * (r + 1) // self.tp - V * r // self.tp for r in range(self.tp)]
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)
