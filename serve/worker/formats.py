"""What a model's numbers are stored and computed in, from the settings and the machine.

The settings name a wish (`model.dtype`, `model.quantization`, `engine.kv_cache_dtype`, each `auto` by
default); this resolves it for one worker, once, and the banner prints the result. On a CPU with our
kernels the activations are float32 whatever the weights are (the kernels take float32), and:

| weights on disk | quantization | matrices run as | KV cache (auto) |
|---|---|---|---|
| GGUF | auto | their own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); other formats dequantized, with a warning | int8 |
| any | int8 | int8 blocks of 32 with an fp16 scale each (Q8_0), quantized at load | float16 |
| any | none | float, in `dtype` (auto: bfloat16 where the CPU has native bfloat16 dot products, else float32) | float32 for float32, else float16 |

`dtype: float32` with `quantization: none` is the exact reference the parity tests compare against
transformers. On CUDA, and on a CPU without our kernels, everything runs in `dtype` through torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Formats:
    compute: torch.dtype  # activations, norms, biases
    matrices: torch.dtype  # weight matrices kept as float
    blocks: bool  # GGUF matrices run from their own blocks
    int8: bool  # float matrices quantized to int8 blocks at load
    kv: torch.dtype  # the KV cache
    kernels: bool  # our CPU kernels run the layers' small ops and the quantized matmuls

    @property
    def reference(self) -> bool:
        return self.matrices == torch.float32 and not self.blocks and not self.int8


class FormatError(ValueError):
    """A combination of settings that cannot run here; the message says which one can."""


def resolve(dtype: torch.dtype, device: torch.device, quantization: str, gguf: bool, kernels: bool,
            kv_cache_dtype: str = "auto") -> Formats:
    """`dtype` is already resolved from auto by serve.device.place, which knows about quantization."""
    on_cpu = device.type == "cpu"
    kernels = kernels and on_cpu and dtype in (torch.float32, torch.bfloat16)
    if quantization == "int8" and not kernels:
        where = "on CUDA" if not on_cpu else "without our CPU kernels (engine.cpu_kernels, AVX2)"
        raise FormatError(f"quantization: int8 runs on our CPU kernels only, not {where}; use quantization: none")
    if quantization == "auto" and gguf and kernels and dtype != torch.float32:
        kernels_for_blocks = False  # an explicit half dtype: the GGUF is dequantized into it
    else:
        kernels_for_blocks = kernels
    blocks = gguf and quantization == "auto" and kernels_for_blocks
    compute = torch.float32 if kernels else dtype
    int8 = quantization == "int8"
    if kv_cache_dtype == "float16":
        kv = torch.float16
    elif kv_cache_dtype == "float32":
        kv = torch.float32
    elif kv_cache_dtype == "int8":
        kv = torch.int8  # a row per token and head: its values as int8 and their scale (serve/worker/ops.py)
    elif on_cpu and blocks:
        # A GGUF run from its own blocks: int8 rows, half float16's bytes again (the default model's
        # perplexity within 0.3% of float16's; README, "Each format").
        kv = torch.int8
    elif on_cpu and (int8 or dtype != torch.float32):
        kv = torch.float16  # llama.cpp's default: half the bytes decode attention reads
    else:
        kv = compute
    return Formats(compute, dtype, blocks, int8, kv, kernels)
