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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open


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
class AttentionMeta:
    """Per-step view of the batch, built once and used by every layer."""

    slots: torch.Tensor  # [T] KV slot of each new token
    kv_table: torch.Tensor  # [B, L] KV slots of each request's whole sequence (padded)
    mask: torch.Tensor  # [B, 1, N, L] bool: which keys each padded query sees
    q_index: torch.Tensor | None  # [B*N] flat token index of each padded query; None when N == 1
    out_index: torch.Tensor | None  # [T] padded row of each real token; None when N == 1
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor
    last: torch.Tensor  # [B] flat index of each request's last new token


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


class Weights:
    """Reads tensors from a folder of safetensors, sliced for one shard, straight into the target dtype."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.files = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            handle = safe_open(path, framework="pt")
            for key in handle.keys():
                self.files[key] = handle

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        if key not in self.files:
            raise KeyError(f"weight {key} missing from the checkpoint")
        part = self.files[key].get_slice(key)
        if rows is not None and cols is not None:
            t = part[rows[0]:rows[1], cols[0]:cols[1]]
        elif rows is not None:
            t = part[rows[0]:rows[1]]
        elif cols is not None:
            t = part[:, cols[0]:cols[1]]
        else:
            t = part[:]
        return t.to(device=self.device, dtype=self.dtype).contiguous()


class Linear:
    """y = x @ W.T + b. On CPU in float32 the weight is prepacked once into oneDNN's blocked layout:
    measured here, that halves a batch-1 decode matmul (weights streamed from memory at ~22 GB/s instead
    of ~12) and is still faster at batch 32. Elsewhere (CUDA, other dtypes) it is plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.packed = weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Layer:
    def __init__(self, w: Weights, args: ModelArgs, shard: Shard, i: int) -> None:
        p = f"model.layers.{i}."
        d = args.head_dim
        q_rows = (shard.q[0] * d, shard.q[1] * d)
        kv_rows = (shard.kv[0] * d, shard.kv[1] * d)
        self.n_q = shard.q[1] - shard.q[0]
        self.n_kv = shard.kv[1] - shard.kv[0]
        a = p + "self_attn."
        qkv = torch.cat([w.get(a + "q_proj.weight", q_rows), w.get(a + "k_proj.weight", kv_rows), w.get(a + "v_proj.weight", kv_rows)])
        qkv_bias = None
        if args.qkv_bias:
            qkv_bias = torch.cat([w.get(a + "q_proj.bias", q_rows), w.get(a + "k_proj.bias", kv_rows), w.get(a + "v_proj.bias", kv_rows)])
        self.qkv = Linear(qkv, qkv_bias)
        self.q_norm = w.get(a + "q_norm.weight") if args.qk_norm else None
        self.k_norm = w.get(a + "k_norm.weight") if args.qk_norm else None
        self.o = Linear(w.get(a + "o_proj.weight", cols=q_rows))
        m = p + "mlp."
        self.gate_up = Linear(torch.cat([w.get(m + "gate_proj.weight", shard.mlp), w.get(m + "up_proj.weight", shard.mlp)]))
        self.down = Linear(w.get(m + "down_proj.weight", cols=shard.mlp))
        self.in_norm = w.get(p + "input_layernorm.weight")
        self.post_norm = w.get(p + "post_attention_layernorm.weight")


class Model:
    def __init__(self, folder: str | Path, rank: int, tp: int, dtype: torch.dtype, device: torch.device) -> None:
        self.args = args = ModelArgs.from_folder(folder)
        if args.num_kv_heads < tp or args.num_heads % args.num_kv_heads:
            raise ValueError(f"cannot split {args.num_kv_heads} kv heads / {args.num_heads} query heads over {tp} ranks")
        self.tp, self.dtype, self.device = tp, dtype, device
        self.shard = shard = Shard(args, rank, tp)
        w = Weights(folder, dtype, device)
        self.embed = w.get("model.embed_tokens.weight")
        self.layers = [Layer(w, args, shard, i) for i in range(args.num_layers)]
        self.norm = w.get("model.norm.weight")
        head = "model.embed_tokens.weight" if args.tie_word_embeddings or not w.has("lm_head.weight") else "lm_head.weight"
        self.lm_head = Linear(w.get(head, rows=shard.vocab))
        inv_freq, scale = rope_inv_freq(args)
        pos = torch.arange(args.max_position_embeddings, dtype=torch.float32) * scale
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.n_q, self.n_kv = shard.q[1] - shard.q[0], shard.kv[1] - shard.kv[0]

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x)
        return x

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, self.args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMeta, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, vocab] of each request's last new token. Writes the new tokens' K/V into the caches."""
        d = self.args.head_dim
        n_q, n_kv = self.n_q, self.n_kv
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = self._rms(h, layer.in_norm)
            qkv = layer.qkv(x)
            qk, v = qkv.split([(n_q + n_kv) * d, n_kv * d], dim=-1)
            qk = qk.view(-1, n_q + n_kv, d)
            if layer.q_norm is not None:
                qk = torch.cat([self._rms(qk[:, :n_q], layer.q_norm), self._rms(qk[:, n_q:], layer.k_norm)], dim=1)
            # RoPE on query and key heads at once: x*cos + rotate_half(x)*sin.
            x1, x2 = qk.chunk(2, dim=-1)
            qk = qk * meta.cos + torch.cat([-x2, x1], dim=-1) * meta.sin
            q, k = qk.split([n_q, n_kv], dim=1)
            k_cache[i].index_copy_(0, meta.slots, k)
            v_cache[i].index_copy_(0, meta.slots, v.view(-1, n_kv, d))
            attn = self._attention(q, k_cache[i], v_cache[i], meta)
            h = h + self._all_reduce(layer.o(attn))
            x = self._rms(h, layer.post_norm)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + self._all_reduce(layer.down(F.silu(gate) * up))
        x = self._rms(h[meta.last], self.norm)
        logits = self.lm_head(x)
        if self.tp > 1:
            logits = self._gather_vocab(logits)
        return logits

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        B, L = meta.kv_table.shape
        N = meta.mask.shape[2]
        d = self.args.head_dim
        # [B, L, kv, d] -> [B, kv, L, d]: each request's keys and values, gathered from the slot pool.
        flat = meta.kv_table.view(-1)  # index_select: half the cost of advanced indexing here
        keys = k_cache.index_select(0, flat).view(B, L, self.n_kv, d).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(B, L, self.n_kv, d).transpose(1, 2)
        if meta.q_index is not None:
            q = q[meta.q_index]
        queries = q.view(B, N, self.n_q, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, enable_gqa=self.n_q != self.n_kv)
        out = out.transpose(1, 2).reshape(B * N, self.n_q * d)
        if meta.out_index is not None:
            out = out[meta.out_index]
        return out

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # Vocabulary slices can differ in size by one; all_gather needs equal shapes, so pad and trim.
        V = self.args.vocab_size
        width = -(-V // self.tp)
        padded = F.pad(logits, (0, width - logits.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp)]
        dist.all_gather(parts, padded)
        sizes = [V * (r + 1) // self.tp - V * r // self.tp for r in range(self.tp)]
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)
