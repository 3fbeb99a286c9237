"""bench/peers.py as far as it runs without the peers built: holding vLLM to AVX2, where an AVX2 table goes
in the README, and what `run` says when the AVX2 llama-server is missing. (The peers themselves take ~10
minutes to set up: `make bench-peers`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve import isa as serve_isa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402  (bench/ is no package: its scripts import each other by name)


@pytest.mark.parametrize("level, hidden", [("avx2", {"_is_avx512_supported", "_is_avx512_bf16_supported",
                                                      "_is_amx_tile_supported"}),
                                           ("avx512_bf16", {"_is_amx_tile_supported"})])
def test_the_isa_shim_hides_what_lies_above_the_level(level, hidden):
    """vLLM picks its kernel build (_C, _C_AVX512 or _C_AVX2) and its matmul path from these answers; the
    shim must say "no" above the level and leave the rest as torch answers them."""
    names = ["_is_avx2_supported", "_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"]
    ask = f"import torch; print(*[getattr(torch.cpu, n)() for n in {names!r}])"
    truth = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=120)
    held = subprocess.run([sys.executable, "-c", ask], env={**peers.ISA_ENV[level]["vllm"], "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert truth.returncode == 0 and held.returncode == 0, truth.stderr + held.stderr
    expected = ["False" if n in hidden else t for n, t in zip(names, truth.stdout.split())]
    assert held.stdout.split() == expected
    assert expected[0] == "True" or not serve_isa.available()  # the floor itself is never hidden


def test_an_avx2_table_goes_in_its_own_block(tmp_path):
    readme = tmp_path / "README.md"
    native_begin, native_end = peers.markers("native")
    avx2_begin, avx2_end = peers.markers("avx2")
    readme.write_text(f"intro\n{native_begin}\nold native\n{native_end}\nmiddle\n{avx2_begin}\nold avx2\n{avx2_end}\nend\n")
    assert peers.update_readme("| new avx2 table |\n", "avx2", readme)
    text = readme.read_text()
    assert "old native" in text and "old avx2" not in text and "| new avx2 table |" in text
    assert text.index(avx2_begin) < text.index("| new avx2 table |") < text.index(avx2_end)
    # The project's own README has both blocks, so `make bench-peers ISA=avx2` has somewhere to write.
    own = (ROOT / "README.md").read_text().splitlines()
    assert {native_begin, native_end, avx2_begin, avx2_end} <= {line.strip() for line in own}


def test_run_without_the_avx2_build_says_which_setup_to_run(tmp_path):
    env = {"SERVE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "run", "--isa", "avx2", "--only", "llama"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "llama not set up; run `bench/peers.py setup --isa avx2` first" in out.stderr


def test_vllm_gets_float32_when_held_below_native_bfloat16():
    assert peers.vllm_dtype("avx2") == "float32"
    has_bf16 = "avx512_bf16" in peers.machine()["flags"]
    assert peers.vllm_dtype("native") == ("bfloat16" if has_bf16 else "float32")
