"""Where the weights come from: a folder of safetensors, or a GGUF file read as it ships.

Both present tensors by their Hugging Face names and in Hugging Face's row order, so the model code
(model.py) does not know which it has. `get` returns a float tensor; `matrix` returns a weight matrix
as it is stored: a float tensor, or the GGUF's quantized blocks (`QuantRows`) for our kernels to run.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

Rows = tuple[int, int] | None


class SafetensorsWeights:
    """Reads tensors from a folder of safetensors, sliced for one shard, straight into the target dtype."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device, matrix_dtype: torch.dtype | None = None) -> None:
        self.dtype, self.device = dtype, device
        self.matrix_dtype = matrix_dtype or dtype
        self.files = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            handle = safe_open(path, framework="pt")
            for key in handle.keys():
                self.files[key] = handle

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, rows: Rows = None, cols: Rows = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.files:
            raise KeyError(f"weight {key} missing from the checkpoint")
        part = self.files[key].get_slice(key)
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        t = part[r, c] if cols is not None else part[r]
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def matrix(self, key: str, rows: Rows = None, cols: Rows = None) -> torch.Tensor:
        return self.get(key, rows, cols, self.matrix_dtype)

    def close(self) -> None:
        self.files.clear()


# ggml_type numbers of the formats our kernels run from their own blocks (csrc/qlinear.cpp: repack):
# Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
KERNEL_TYPES = {2, 3, 6, 7, 8, 12, 13, 14}


@dataclass
class QuantRows:
    """Rows of a GGUF weight matrix in their own blocks: raw [N, bytes per row] of ggml type `type`."""

    raw: torch.Tensor
    type: int
    name: str  # the format's name, for log lines (Q4_1, ...)
    K: int  # values per row

    @property
    def N(self) -> int:
        return self.raw.shape[0]

    def take(self, index: torch.Tensor) -> QuantRows:
        return QuantRows(self.raw.index_select(0, index), self.type, self.name, self.K)

    def dequantize(self) -> torch.Tensor:
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(self.raw.numpy(), self.type).astype(np.float32, copy=False)).view(self.N, self.K)


def cat_rows(parts: list[QuantRows]) -> QuantRows | None:
    """One matrix of these row blocks, when they share a format (None when they do not)."""
    if any(p.type != parts[0].type for p in parts):
        return None
    return QuantRows(torch.cat([p.raw for p in parts]), parts[0].type, parts[0].name, parts[0].K)


_GGUF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
]


def gguf_name(hf: str) -> str:
    for pattern, repl in _GGUF_NAMES:
        if re.fullmatch(pattern, hf):
            return re.sub(pattern, repl, hf)
    raise KeyError(f"weight {hf} has no GGUF name")


class GGUFWeights:
    """The tensors of a GGUF file, memory-mapped, by their Hugging Face names.

    llama.cpp's converter stores a Llama's query and key rows of each head interleaved ((i, i + d/2) as
    rows 2i, 2i + 1, its RoPE layout); they are handed out in Hugging Face's order here, as transformers
    reads them. (That is the order model.pair_layout turns back into the interleaved one: for these
    files the two permutations cancel.) Qwen's are stored in Hugging Face's order already.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int,
                 matrix_dtype: torch.dtype | None = None) -> None:
        from gguf import GGUFReader

        self.dtype, self.device = dtype, device
        self.matrix_dtype = matrix_dtype or dtype
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        field = self.reader.fields["general.architecture"]
        self.interleaved = bytes(field.parts[field.data[0]]).decode() in ("llama", "mistral")
        self.heads = {"attn_q": heads, "attn_k": kv_heads}
        self.no_kernel: set[str] = set()  # formats of matrices that had to be dequantized

    def has(self, key: str) -> bool:
        return gguf_name(key) in self.tensors

    def _row_order(self, name: str, n: int) -> torch.Tensor | None:
        """GGUF row of each Hugging Face row, for interleaved query/key matrices; None: the same."""
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if not self.interleaved or kind not in self.heads:
            return None
        d = n // self.heads[kind]
        i = torch.arange(n)
        head, rest = i // d, i % d
        return head * d + 2 * (rest % (d // 2)) + rest // (d // 2)  # HF row (s, i) of a head <- GGUF row 2i + s

    def _tensor(self, key: str):
        name = gguf_name(key)
        if name not in self.tensors:
            raise KeyError(f"weight {key} ({name}) missing from the GGUF file")
        return name, self.tensors[name]

    def matrix(self, key: str, rows: Rows = None, cols: Rows = None) -> torch.Tensor | QuantRows:
        """The matrix in its own blocks where our kernels run its format and the slice falls on block
        boundaries; otherwise as float (`get`)."""
        name, t = self._tensor(key)
        K = int(t.shape[0])
        if int(t.tensor_type) not in KERNEL_TYPES or len(t.data.shape) != 2:
            if int(t.tensor_type) not in (0, 1, 30):  # quantized, in a format our kernels do not run
                self.no_kernel.add(t.tensor_type.name)
            return self.get(key, rows, cols, self.matrix_dtype)
        from gguf import GGML_QUANT_SIZES

        elems, nbytes = GGML_QUANT_SIZES[t.tensor_type]  # values and bytes per block
        if cols is not None and (cols[0] % elems or cols[1] % elems):
            self.no_kernel.add(f"{t.tensor_type.name} split off its block boundaries")
            return self.get(key, rows, cols, self.matrix_dtype)
        with warnings.catch_warnings():  # a read-only memory map: only ever read from
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(t.data)
        order = self._row_order(name, raw.shape[0])
        if order is not None:
            raw = raw.index_select(0, order)
        if rows is not None:
            raw = raw[rows[0]:rows[1]]
        if cols is not None:
            raw = raw[:, cols[0] // elems * nbytes:cols[1] // elems * nbytes]
            K = cols[1] - cols[0]
        return QuantRows(raw.contiguous(), int(t.tensor_type), t.tensor_type.name, K)

    def get(self, key: str, rows: Rows = None, cols: Rows = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        name, t = self._tensor(key)
        values = dequantize(t.data, t.tensor_type) if int(t.tensor_type) not in (0, 1, 30) else np.asarray(t.data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = torch.from_numpy(values)
        if full.dtype == torch.uint8:  # bfloat16 arrives as raw pairs of bytes
            full = full.view(torch.bfloat16)
        full = full.reshape([int(n) for n in reversed(t.shape)])
        order = self._row_order(name, full.shape[0])
        if order is not None:
            full = full.index_select(0, order)
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        part = full[r, c] if cols is not None else full[r]
        return part.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def close(self) -> None:
        """Drops the memory map (its pages would otherwise count in the worker's resident memory)."""
        self.tensors.clear()
        self.reader = None
