"""The weight matmuls of the model, y = x @ W.T + b, and the embedding lookup, in the forms that measured
fastest on CPU here. `Linears` builds each one in the form the model's `Formats` chose (formats.py).
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from serve.worker.formats import Formats
from serve.worker.weights import QuantRows, cat_rows

log = logging.getLogger("serve.worker")

Q8_0 = 8  # ggml_type of int8 blocks of 32 with an fp16 scale


class Linear:
    """y = x @ W.T + b. On CPU the weight is prepacked once into oneDNN's blocked layout: measured here,
    that halves a batch-1 decode matmul in float32 (weights streamed at ~22 GB/s instead of ~12) and is
    still faster at batch 32. A bfloat16 weight on CPU takes float32 activations (our kernels' dtype) and
    runs oneDNN's bfloat16 matmul, prepacked too where the CPU has native bfloat16 dot products (2-3x
    F.linear's speed here, AMX included). Elsewhere it is plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compute: torch.dtype | None = None,
                 native_bf16: bool = False) -> None:
        self.bias = bias
        cpu = weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.packed = cpu and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and native_bf16)
        # float32 activations against lower-precision weights (CPU, our kernels' dtype)
        self.cast = weight.dtype if compute is not None and compute != weight.dtype else None
        if self.cast is not None and bias is not None:
            self.bias = bias.to(weight.dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast is not None:
            x = x.to(self.cast)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y.float() if self.cast is not None else y


class QuantLinear:
    """y = x @ W.T + b over quantized blocks (a GGUF's own, or int8 ones made at load), by our kernel
    (csrc/qlinear.cpp): activations quantized per block of 32, integer dot products, the blocks' scales
    applied per block. Every row count takes the same arithmetic, so a row's result never depends on
    the rest of the batch."""

    def __init__(self, rows: QuantRows, bias: torch.Tensor | None, kernels: ModuleType, level: int) -> None:
        self.packed, self.format = kernels.repack(rows.raw, rows.type, rows.K)
        self.bias = bias.float().contiguous() if bias is not None else None
        self.k, self.level, self.name = kernels, level, rows.name

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.k.qlinear(x if x.stride(-1) == 1 else x.contiguous(), self.packed, self.format, self.bias, self.level)


class Parts:
    """Row blocks in different formats (a GGUF may mix them in one fused projection): one matmul each."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Embedding:
    def __init__(self, table: torch.Tensor, compute: torch.dtype) -> None:
        self.table, self.compute = table, compute

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).to(self.compute)


class QuantEmbedding:
    """Rows of a quantized embedding, dequantized as they are looked up (from the LM head's own blocks when
    the two are tied: one copy for both)."""

    def __init__(self, matrix: QuantLinear) -> None:
        self.m = matrix

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m.k.dequant_rows(self.m.packed, self.m.format, ids)


def to_q8_0(weight: torch.Tensor) -> QuantRows:
    """int8 blocks of 32 with an fp16 scale (GGUF's Q8_0, quantized as llama.cpp does)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(weight.float().numpy(), GGMLQuantizationType.Q8_0)
    return QuantRows(torch.from_numpy(np.ascontiguousarray(raw)), Q8_0, "Q8_0", weight.shape[1])


class Linears:
    """Builds a model's matmuls in its formats, and remembers what it built (for the banner)."""

    def __init__(self, formats: Formats, device: torch.device, kernels: ModuleType | None, level: int, native_bf16: bool = False) -> None:
        self.f, self.device, self.kernels, self.level, self.native_bf16 = formats, device, kernels, level, native_bf16
        self.used: dict[str, int] = {}  # format name -> bytes of weights in it

    def _note(self, name: str, nbytes: int) -> None:
        self.used[name] = self.used.get(name, 0) + nbytes

    def stored(self, weight: torch.Tensor | QuantRows) -> torch.Tensor | QuantRows:
        """A matrix as this model keeps it until its matmul is built: blocks only where they run as blocks."""
        return self._float(weight) if isinstance(weight, QuantRows) and not self.f.blocks else weight

    def quantized(self, rows: QuantRows, bias: torch.Tensor | None = None) -> QuantLinear:
        q = QuantLinear(rows, bias, self.kernels, self.level)
        self._note(rows.name, q.nbytes)
        return q

    def __call__(self, weight: torch.Tensor | QuantRows | list, bias: torch.Tensor | None = None):
        if isinstance(weight, list):  # the parts of one fused projection
            blocks = [w for w in weight if isinstance(w, QuantRows)]
            if self.f.blocks and len(blocks) == len(weight):
                joined = cat_rows(blocks)
                if joined is None:  # formats differ: one matmul each
                    sizes = [w.N for w in blocks]
                    biases = bias.split(sizes) if bias is not None else [None] * len(blocks)
                    return Parts([self.quantized(w, b) for w, b in zip(blocks, biases)])
                weight = joined
            else:
                weight = torch.cat([self._float(w) for w in weight])
        if isinstance(weight, QuantRows):
            if self.f.blocks:
                return self.quantized(weight, bias)
            weight = self._float(weight)
        if self.f.int8 and weight.shape[1] % 32 == 0:
            return self.quantized(to_q8_0(weight), bias)
        self._note(str(weight.dtype).removeprefix("torch."), weight.numel() * weight.element_size())
        return Linear(weight, bias, self.f.compute if self.f.kernels else None, self.native_bf16)

    def _float(self, w: torch.Tensor | QuantRows) -> torch.Tensor:
        return w if isinstance(w, torch.Tensor) else w.dequantize().to(device=self.device, dtype=self.f.matrices)
