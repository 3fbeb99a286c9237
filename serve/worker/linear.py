"""The weight matmuls of the model, y = x @ W.T + b, in the forms that measured fastest on CPU here.

`Linear` is the default; `Int8Linear` is the opt-in `quantization: int8`. model.py picks one per model.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F


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


class Int8Linear:
    """The opt-in `quantization: int8` (CPU, float32 only): weights quantized per output channel once.

    Up to 4 rows (a decode step of a few streams) go through our kernel (csrc/int8_linear.cpp, when it
    is built), which streams the int8 weights at about twice fbgemm's rate here: SmolLM2's weight matmuls
    at batch 1 take ~7 ms instead of ~14. More rows go through fbgemm's dynamic int8 linear, whose
    vpmaddubsw GEMM wins once there are enough rows to reuse each weight. Both round the activations to
    8 bits (ours per block of 32 values, fbgemm 7 bits per tensor), so outputs drift slightly from
    float32's; parity tests keep to float32."""

    SMALL_ROWS = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: ModuleType | None = None) -> None:
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError("quantization: int8 runs on CPU in float32 only; use quantization: none here")
        scale = weight.abs().amax(dim=1).clamp(min=1e-12).double() / 127
        with warnings.catch_warnings():  # torch marks its quantized-tensor constructors deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)
        self.weight = torch.ops.quantized.linear_prepack(q, bias)
        self.kernels = kernels if kernels is not None and weight.shape[1] % 32 == 0 else None
        if self.kernels is not None:
            # A second copy of the int8 weights, in the plain [N, K] layout our kernel reads (fbgemm's is
            # its own): 135 MB more for SmolLM2, for twice the weight streaming rate at batch 1.
            self.int8, self.scale, self.bias = q.int_repr().contiguous(), scale.float(), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and 0 < x.shape[0] <= self.SMALL_ROWS:  # 0 rows: a step that samples nothing
            return self.kernels.int8_linear(x.contiguous(), self.int8, self.scale, self.bias)
        # reduce_range: 7-bit activations, so that AVX2's 16-bit pairwise sums cannot saturate.
        return torch.ops.quantized.linear_dynamic(x, self.weight, True)
