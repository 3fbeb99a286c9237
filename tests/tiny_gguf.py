"""A tiny model as a GGUF file, written the way llama.cpp's convert_hf_to_gguf.py writes one.

From one of tests/tiny_model.py's Hugging Face models: its weights quantized with gguf-py's own
quantizers (llama.cpp's algorithms), Llama's query and key rows interleaved per head as llama.cpp stores
them, its tokenizer as `tokenizer.ggml.*` metadata, so that `serve launch --model tiny.gguf` reads it
as it reads a real one. gguf-py cannot quantize to K-quants; `raw_blocks` makes valid random ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import GGML_QUANT_SIZES, quantize

T = GGMLQuantizationType

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows (i, i + d/2) become rows (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def raw_blocks(rows: int, cols: int, qtype: T, seed: int) -> np.ndarray:
    """Random but valid blocks of a type gguf-py cannot quantize to: random quants, modest fp16 scales."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, size=(rows, cols // elems, nbytes), dtype=np.uint8)
    scales = lambda: np.float16(g.uniform(0.0005, 0.004, size=(rows, cols // elems))).view(np.uint8).reshape(rows, -1, 2)  # noqa: E731
    if qtype == T.Q6_K:
        raw[:, :, 208:210] = scales()
    else:  # Q4_K, Q5_K: d and dmin first (IQ4_NL: d, then quants)
        raw[:, :, 0:2], raw[:, :, 2:4] = scales(), scales()
    return raw.reshape(rows, -1)


def write_gguf(hf_model, folder: Path, path: Path, qtype: T, overrides: dict[str, T] | None = None, seed: int = 0) -> Path:
    """`hf_model` (saved in `folder` with its tokenizer) as GGUF file `path`: 2-D weights in `qtype`
    (or the type `overrides` gives a tensor by its GGUF name), vectors in float32."""
    config = hf_model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}[config.model_type]
    w = GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    _tokenizer(w, folder, config)
    overrides = overrides or {}
    for i, (hf, tensor) in enumerate(hf_model.state_dict().items()):
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(hf)
        data = tensor.float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = interleave(data, config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads)
        kind = overrides.get(name, qtype) if data.ndim == 2 else T.F32
        if kind in (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL):
            w.add_tensor(name, raw_blocks(*data.shape, kind, seed + i), raw_dtype=kind)
        elif kind == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tokenizer(w: GGUFWriter, folder: Path, config) -> None:
    """The tiny byte-level BPE as llama.cpp's 'gpt2' tokenizer model, chat template included."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(config.vocab_size - len(tokens))]
    specials = {t["content"] for t in tok.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    w.add_bos_token_id(vocab[tc["bos_token"]])
    w.add_eos_token_id(vocab[tc["eos_token"]])
    w.add_chat_template(tc["chat_template"])
