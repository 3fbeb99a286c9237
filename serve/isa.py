"""Which x86 instruction-set level this CPU offers, and which one a worker may use (no torch here).

The levels form a ladder; each includes the ones below it:

| level | CPU flags | what uses it |
|---|---|---|
| avx2 | avx2 fma f16c | the floor of our kernels (serve/worker/csrc/) |
| avx_vnni | + avx_vnni | 256-bit int8 dot products (vpdpbusd, VEX form) |
| avx512 | avx512f/bw/vl/dq + avx512_vnni | 512-bit int8 dot products |
| avx512_bf16 | + avx512_bf16 | native bfloat16 dot products (oneDNN) |
| amx | + amx_tile/amx_int8/amx_bf16 | oneDNN's bfloat16 matmuls on AMX tiles |

Zen 4 has avx512_vnni but not avx_vnni (the VEX form), so its ladder skips that rung: `available()`
lists only the levels whose flags are all present, and `avx512` does not require `avx_vnni`.

`SERVE_CPU_ISA` (or `engine.cpu_isa`) caps the level, so that every kernel path can be tested on a
machine that has a higher one: capped at avx2, a Zen 5 also reports no native bfloat16 (dtype auto is
float32) and oneDNN is told the same (ONEDNN_MAX_CPU_ISA). The flags come from /proc/cpuinfo, where
Linux lists AVX-512 and AMX only when the kernel has enabled their register state.
"""

from __future__ import annotations

import functools
import os

LEVELS = ("avx2", "avx_vnni", "avx512", "avx512_bf16", "amx")
_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx_vnni": {"avx2", "fma", "f16c", "avx_vnni"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "avx512_bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
    "amx": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_int8", "amx_bf16"},
}
# oneDNN's names for the same caps (its ONEDNN_MAX_CPU_ISA): it then picks no kernel above them.
_ONEDNN = {"avx2": "AVX2", "avx_vnni": "AVX2_VNNI", "avx512": "AVX512_CORE_VNNI", "avx512_bf16": "AVX512_CORE_BF16",
           "amx": "AVX512_CORE_AMX"}
ENV = "SERVE_CPU_ISA"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def available() -> tuple[str, ...]:
    """The levels this CPU has, lowest first; empty on a CPU below our floor (or not x86 Linux)."""
    flags = cpu_flags()
    return tuple(level for level in LEVELS if _NEEDS[level] <= flags)


def check(level: str) -> str:
    if level not in ("auto", *LEVELS):
        raise ValueError(f"cpu_isa must be auto or one of {', '.join(LEVELS)}, got {level!r}")
    return level


def chosen(setting: str = "auto") -> str | None:
    """The level a worker uses: the best this CPU has, capped by `setting` (engine.cpu_isa) or, when that
    is auto, by $SERVE_CPU_ISA. A cap above what the CPU has is no cap. None: below our floor."""
    have = available()
    if not have:
        return None
    cap = setting if setting != "auto" else check(os.environ.get(ENV, "auto") or "auto")
    if cap == "auto":
        return have[-1]
    allowed = [level for level in have if LEVELS.index(level) <= LEVELS.index(cap)]
    return allowed[-1] if allowed else None


def at_least(level: str | None, wanted: str) -> bool:
    return level is not None and LEVELS.index(level) >= LEVELS.index(wanted)


def native_bf16(level: str | None) -> bool:
    return at_least(level, "avx512_bf16")


def cap_onednn(level: str | None) -> None:
    """Tells oneDNN (inside torch) not to go above `level`; call before torch first runs a matmul.
    Nothing to cap when the level is this CPU's best."""
    have = available()
    if level is not None and have and level != have[-1]:
        os.environ["ONEDNN_MAX_CPU_ISA"] = _ONEDNN[level]
