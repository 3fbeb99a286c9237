"""The one place that chooses device, collective backend and dtype. Imported only by workers (it imports torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from serve import isa
from serve.cluster import interface_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    backend: str  # torch.distributed backend: nccl on GPUs, gloo on CPUs
    dtype: torch.dtype


def cpu_has_native_bf16(cpu_isa: str = "auto") -> bool:
    """Native bfloat16 dot products (avx512_bf16 or AMX), at the instruction-set level the worker may use."""
    return isa.native_bf16(isa.chosen(cpu_isa))


def place(local_rank: int, dtype: str, quantization: str = "auto", cpu_isa: str = "auto", gguf: bool = False,
          dist_host: str | None = None) -> Placement:
    """`local_rank`: the rank's place among this machine's ranks. `dist_host`: node 0's address, when the
    ranks span machines."""
    # The collectives' own TCP sockets go out on the interface that reaches node 0 (loopback when all ranks
    # share this machine); gloo and NCCL otherwise pick the one this machine's host name resolves to, a
    # classic multi-node hang. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set by the user win.
    ifname = (interface_for(dist_host) if dist_host else None) or "lo"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        device, backend, native_bf16 = torch.device("cpu"), "gloo", cpu_has_native_bf16(cpu_isa)
    if dtype == "auto":
        # On a CPU, int8 and a GGUF's own blocks run on our kernels, whose activations are float32
        # (config.validate refuses int8 with a half dtype); float checkpoints run bfloat16 where the CPU has
        # native bfloat16 dot products (serve/worker/formats.py).
        blocks = device.type == "cpu" and (quantization == "int8" or (gguf and quantization == "auto"))
        resolved = torch.bfloat16 if native_bf16 and not blocks else torch.float32
    else:
        resolved = DTYPES[dtype]
    return Placement(device, backend, resolved)
