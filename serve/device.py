"""The one place that chooses device, collective backend and dtype. Imported only by workers (it imports torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    backend: str  # torch.distributed backend: nccl on GPUs, gloo on CPUs
    dtype: torch.dtype


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def place(rank: int, dtype: str) -> Placement:
    # The ranks of one server share a machine: their collectives' own TCP sockets stay on loopback
    # (gloo and NCCL otherwise pick the interface the host name resolves to). A user may override.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        device, backend, native_bf16 = torch.device("cpu"), "gloo", cpu_has_native_bf16()
    if dtype == "auto":
        resolved = torch.bfloat16 if native_bf16 else torch.float32
    else:
        resolved = DTYPES[dtype]
    return Placement(device, backend, resolved)
