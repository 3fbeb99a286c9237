"""Builds and loads our CPU kernels (serve/worker/csrc/) with torch's C++ extension tooling.

Compiled once per machine, torch version and source (~40 s here), into ~/.cache/serve/native (under
$SERVE_CACHE_DIR when set); later loads take milliseconds. `make native` (a step of `make serve` and
`make test`) builds them ahead, so that no server start waits for the compiler.
Where there is no compiler or no AVX2/FMA/F16C, `load()` returns None and the model runs on plain torch ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from serve import isa
from serve.model_files import cache_root

log = logging.getLogger("serve.worker")

CSRC = Path(__file__).with_name("csrc")
# The quantized matmul's dispatch table (csrc/qlinear.cpp), by number, for each level of serve/isa.py:
# AVX-512 without VNNI is no level of ours, and bfloat16 adds nothing to integer dot products; AMX's
# int8 tile products do (csrc/qgemm_amx.cpp).
KERNEL_NAMES = ("avx2", "avx_vnni", "avx512", "amx")
KERNEL_LEVEL = {"avx2": 0, "avx_vnni": 1, "avx512": 2, "avx512_bf16": 2, "amx": 3}
SOURCES = sorted(CSRC.glob("*.cpp"))


def cpu_supported() -> bool:
    return bool(isa.available())  # our floor, avx2 + fma + f16c


def kernel_level(kernels: ModuleType, level: str) -> int:
    """The quantized matmul's level for an instruction-set level: AMX where Linux also grants the tiles'
    state to this process (it may refuse), else the AVX-512 kernels."""
    n = KERNEL_LEVEL.get(level, 0)
    while n > 0 and not kernels.qgemm_runs(n):
        n -= 1
    return n


def build_dir() -> Path:
    import torch

    code = b"".join(path.read_bytes() for path in sorted(CSRC.iterdir()) if path.suffix in (".cpp", ".h", ".inc"))
    digest = hashlib.sha256(code + torch.__version__.encode()).hexdigest()[:12]
    return cache_root() / "native" / digest


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels, building them first if needed; None where they cannot run here."""
    module = None
    if cpu_supported():
        try:
            from torch.utils.cpp_extension import load as load_extension

            # The ninja that pip put beside this interpreter, when the venv is not on PATH.
            os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

            folder = build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            # Our own lock, which the kernel drops when its holder dies: two ranks starting together build
            # once. torch's lock file is only removed by a clean exit, so one left by a build that was
            # killed (a stopped server) would make every later start wait for it forever.
            with open(folder / "serve.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                (folder / "lock").unlink(missing_ok=True)
                module = load_extension(
                    name="serve_native", sources=[str(p) for p in SOURCES], build_directory=str(folder),
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
                )
        except Exception as e:  # no compiler, or it failed: say so once and run on torch ops
            log.warning("CPU kernels unavailable (%s); running on plain torch ops", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    return module


if __name__ == "__main__":  # `python -m serve.worker.native`: build ahead (make native does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = load() is not None
    print(f"serve CPU kernels: {'built in ' + str(build_dir()) if ok else 'not available, plain torch ops will be used'}")
    sys.exit(0)
