"""Our CPU kernels (serve/worker/csrc/) against plain torch, one kernel at a time.

The model-level checks (logits within 1e-4 of transformers, greedy tokens) run through these kernels in
tests/test_model_parity.py and test_model_families.py; here each kernel meets odd shapes, strided inputs
and scattered cache slots, where a wrong index would hide in a whole model's noise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize, quantize

from serve import isa
from serve.worker import native
from serve.worker.ops import from_cache_rows, to_cache_rows
from tests.tiny_gguf import T, raw_blocks

pytestmark = pytest.mark.skipif(not native.cpu_supported(), reason="this CPU has no AVX2/FMA; the kernels are not used here")


@pytest.fixture(scope="module")
def k():
    module = native.load()
    assert module is not None, "the kernels failed to build on a CPU that supports them (see the warning above)"
    return module


# The quantized matmul's instruction-set levels this CPU can run (serve/isa.py), each tested: one machine
# checks the AVX2 path of a Zen 3 as well as its own.
LEVELS = sorted({native.KERNEL_LEVEL[level] for level in isa.available()})
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def gguf_blocks(qtype: T, N: int, K: int, seed: int) -> np.ndarray:
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):  # gguf-py cannot quantize to these
        return raw_blocks(N, K, qtype, seed)
    return quantize(np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_repacked_blocks_hold_exactly_the_gguf_values(k, qtype):
    N, K = 37, 512  # N not a multiple of the 16-row tiles
    raw = gguf_blocks(qtype, N, K, seed=1)
    packed, fmt = k.repack(torch.from_numpy(raw), int(qtype), K)
    expected = torch.from_numpy(dequantize(raw, qtype).astype(np.float32))
    assert torch.equal(k.dequant_rows(packed, fmt, torch.arange(N)), expected)
    assert torch.equal(k.dequant_rows(packed, fmt, torch.tensor([36, 0, 17])), expected[[36, 0, 17]])


@pytest.mark.parametrize("level", LEVELS, ids=lambda n: native.KERNEL_NAMES[n])
@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("N", [45, 300], ids=["half-tile", "tile-groups"])
def test_qlinear_matches_the_dequantized_matmul(k, qtype, level, N):
    # 45 rows: a last tile of 13, whose second half is partly empty on AVX2; 300: several tasks of tiles.
    K = 512
    raw = gguf_blocks(qtype, N, K, seed=2)
    packed, fmt = k.repack(torch.from_numpy(raw), int(qtype), K)
    w = torch.from_numpy(dequantize(raw, qtype).astype(np.float64))
    bias = torch.randn(N)
    for M in (1, 3, 8, 70):  # one row, a register block, a full one, several with a remainder
        x = torch.randn(M, K)
        q, d, _ = k.quantize_acts(x, level)
        assert q.abs().max().item() <= 127
        # The reference: the activations as the kernel rounds them (per block of 32), in float64.
        xq = (q.double().view(M, -1, 32) * d.double()[:, :, None]).view(M, K)
        expected = xq @ w.T + bias.double()
        got = k.qlinear(x, packed, fmt, bias, level)
        assert got.shape == (M, N)
        assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
        # And the activations' rounding itself stays near float32's: ~0.5% of the output's norm.
        exact = x.double() @ w.T + bias.double()
        assert ((got.double() - exact).norm() / exact.norm()).item() < 0.02
        # A row's result is the same, bit for bit, whatever else is in the batch, and from a strided view.
        alone = torch.stack([k.qlinear(x[i:i + 1], packed, fmt, bias, level)[0] for i in range(M)])
        assert torch.equal(alone, got)
        wide = torch.zeros(M, K + 64)
        wide[:, 32:32 + K] = x
        assert torch.equal(k.qlinear(wide[:, 32:32 + K], packed, fmt, bias, level), got)


@pytest.mark.skipif(native.KERNEL_LEVEL["amx"] not in LEVELS, reason="this CPU has no AMX")
@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_amx_tiles_give_the_vnni_kernels_bits(k, qtype):
    # 16-row groups go through tile products (and Q6_K's 16-value blocks through VNNI): the same sums and
    # the same float epilogue, so a request's logits do not change when a batch grows past 16 rows.
    N, K = 45, 512
    raw = gguf_blocks(qtype, N, K, seed=3)
    packed, fmt = k.repack(torch.from_numpy(raw), int(qtype), K)
    x, bias = torch.randn(150, K), torch.randn(N)
    amx, vnni = native.KERNEL_LEVEL["amx"], native.KERNEL_LEVEL["avx512"]
    assert torch.equal(k.qlinear(x, packed, fmt, bias, amx), k.qlinear(x, packed, fmt, bias, vnni))
    assert torch.equal(k.qlinear(x, packed, fmt, None, amx), k.qlinear(x, packed, fmt, None, vnni))


def test_qlinear_rejects_what_it_cannot_do(k):
    raw = gguf_blocks(T.Q8_0, 8, 64, seed=0)
    packed, fmt = k.repack(torch.from_numpy(raw), int(T.Q8_0), 64)
    assert k.qlinear(torch.empty(0, 64), packed, fmt, None, 0).shape == (0, 8)  # a step that samples nothing
    with pytest.raises(RuntimeError, match=r"x must be float32 \[M, 64\]"):
        k.qlinear(torch.randn(2, 32), packed, fmt, None, 0)
    with pytest.raises(RuntimeError, match="no kernel for GGUF type"):
        k.repack(torch.zeros(8, 64, dtype=torch.uint8), int(T.Q2_K), 256)
    with pytest.raises(RuntimeError, match="row length does not match"):
        k.repack(torch.from_numpy(raw), int(T.Q8_0), 32)
    missing = [n for n, level in enumerate(native.KERNEL_NAMES) if n not in LEVELS]
    for n in missing:  # a level this CPU lacks is an error, not an illegal instruction
        with pytest.raises(RuntimeError, match="this CPU cannot run"):
            k.qlinear(torch.randn(1, 64), packed, fmt, None, n)


def reference_attention(q, cache, table, rows, lens):
    n_kv, n_q = cache.shape[0] // 2, q.shape[1]
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        slots = table[rows[b], :lens[b]]
        for h in range(n_q):
            kv = h // (n_q // n_kv)
            p = torch.softmax(q[b, h] @ cache[kv, slots].T, dim=-1)
            out[b, h] = p @ cache[n_kv + kv, slots]
    return out.view(q.shape[0], -1)


# Every level this CPU runs: from avx512 on, a float16 or int8 cache with 64-value heads takes
# csrc/attention_avx512.cpp (groups of 1 to 4 query heads), everything else the AVX2 loop.
@pytest.mark.parametrize("level", LEVELS, ids=[native.KERNEL_NAMES[n] for n in LEVELS])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("n_q,n_kv,d", [(9, 3, 64), (4, 4, 64), (8, 2, 64), (16, 4, 64), (4, 4, 32), (8, 2, 40)])
def test_decode_attention_reads_scattered_slots(k, n_q, n_kv, d, cache_dtype, level):
    g = torch.Generator().manual_seed(n_q)
    pool, max_len = 500, 200
    # engine.kv_cache_dtype: float16 rounded, int8 rows of values and their scale (ops.to_cache_rows)
    cache = to_cache_rows(torch.randn(2 * n_kv, pool, d, generator=g), cache_dtype)
    table = torch.randint(0, pool, (6, max_len), generator=g)
    # A length 1, a full row, lengths on and either side of the 16 keys scored together.
    rows, lens = torch.tensor([4, 0, 5, 2, 1, 3]), torch.tensor([1, 7, 200, 33, 16, 17])
    # q as the model passes it: a slice of the fused qkv, so its rows are strided.
    qkv = torch.randn(6, n_q + 2 * n_kv, d, generator=g) * 0.3
    q = qkv[:, :n_q]
    got = k.decode_attention(q, cache, table, rows, lens, level).view(6, -1)
    assert (got - reference_attention(q, from_cache_rows(cache, d, torch.float32), table, rows, lens)).abs().max().item() < 1e-5


def test_an_int8_cache_row_holds_its_values_to_half_a_step():
    x = torch.randn(50, 64) * torch.logspace(-3, 2, 50)[:, None]
    x[7] = 0  # an all-zero row keeps a zero scale, not a NaN
    back = from_cache_rows(to_cache_rows(x, torch.int8), 64, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(back[7], torch.zeros(64))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_rope_store_rotates_and_writes_the_cache(k, cache_dtype):
    g = torch.Generator().manual_seed(1)
    T, n_q, n_kv, d, pool = 5, 6, 2, 16, 40
    qkv = torch.randn(T, n_q + 2 * n_kv, d, generator=g)
    angles = torch.randn(T, d // 2, generator=g)
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [T, d/2, 2]
    cache = torch.zeros(2 * n_kv, pool, d + 4 if cache_dtype == torch.int8 else d, dtype=cache_dtype)
    slots = torch.tensor([3, 39, 0, 17, 8])
    before = qkv.clone()
    k.rope_store(qkv, rope, cache, slots, n_q, 0.125)  # and the queries scaled, as for quantized weights
    rotated = torch.view_as_real(torch.view_as_complex(before[:, :n_q + n_kv].reshape(T, -1, d // 2, 2).contiguous())
                                 * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(T, -1, d)
    rotated[:, :n_q] *= 0.125
    assert (qkv[:, :n_q + n_kv] - rotated).abs().max().item() < 1e-5
    assert torch.equal(qkv[:, n_q + n_kv:], before[:, n_q + n_kv:])  # values untouched
    # The same bytes as the torch form writes (int8: the same rounding, the same scale).
    assert torch.equal(cache[:n_kv, slots].transpose(0, 1), to_cache_rows(qkv[:, n_q:n_q + n_kv], cache_dtype))
    assert torch.equal(cache[n_kv:, slots].transpose(0, 1), to_cache_rows(qkv[:, n_q + n_kv:], cache_dtype))
    untouched = torch.ones(pool, dtype=torch.bool)
    untouched[slots] = False
    assert cache[:, untouched].abs().sum().item() == 0


@pytest.mark.parametrize("shape", [(1, 576), (37, 100), (3, 5, 64)])
def test_norms_and_silu_mul(k, shape):
    x, w, eps = torch.randn(shape), torch.randn(shape[-1]), 1e-5
    assert (k.rms_norm(x, w, eps) - torch.rms_norm(x, (shape[-1],), w, eps)).abs().max().item() < 1e-5
    h, delta = torch.randn(shape), torch.randn(shape)
    expected_h = h + delta
    normed = k.add_rms_norm(h, delta, w, eps)
    assert torch.equal(h, expected_h)  # the residual is added in place
    assert (normed - torch.rms_norm(expected_h, (shape[-1],), w, eps)).abs().max().item() < 1e-5
    gate_up = torch.randn(shape[0], 2 * 100) * 6
    expected = F.silu(gate_up[:, :100]) * gate_up[:, 100:]
    assert (k.silu_mul(gate_up) - expected).abs().max().item() < 1e-4


def test_without_a_compiler_the_model_runs_on_torch_ops(tmp_path, monkeypatch):
    # A machine with no C++ compiler gets a warning and plain torch ops, not a failed start. The build
    # folder also holds the lock file of a build that was killed: it must not make the start wait forever.
    env = {**os.environ, "SERVE_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"}
    monkeypatch.setenv("SERVE_CACHE_DIR", str(tmp_path))
    native.build_dir().mkdir(parents=True)
    (native.build_dir() / "lock").touch()
    code = "from serve.worker import native; print('kernels:', native.load())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kernels: None" in out.stdout
    assert "CPU kernels unavailable" in out.stderr


# Instructions beyond our AVX2 + FMA + F16C floor, and the objects (csrc/*.cpp) whose own functions may
# hold them: the kernels that run only where dispatch picked them.
BEYOND_AVX2 = {
    "AVX-512 (EVEX)": {"qgemm_avx512.o", "qgemm_amx.o", "attention_avx512.o"},
    "AVX-VNNI": {"qgemm_avx_vnni.o"},
    "AMX": {"qgemm_amx.o"},
}
AMX_OPS = ("ldtilecfg", "sttilecfg", "tilerelease", "tilezero", "tileloadd", "tilestored", "tdpb")


def beyond_avx2(raw: str, op: str) -> str | None:
    """Which set beyond AVX2 one disassembled instruction needs: EVEX starts with 0x62 in 64-bit code
    (after an optional 0x67), AVX-VNNI is VEX-encoded vpdpbusd/vpdpwssd (objdump: `{vex}`), AMX by name."""
    first = raw.split()[:2]
    if first[:1] == ["62"] or first == ["67", "62"]:
        return "AVX-512 (EVEX)"
    if op.startswith("{vex} vpdp"):
        return "AVX-VNNI"
    if op.startswith(AMX_OPS):
        return "AMX"
    return None


def test_no_instruction_beyond_avx2_outside_the_dispatched_kernels(k):
    # SERVE_CPU_ISA=avx2 caps what dispatch picks, but cannot show that an AVX2-only CPU (a Zen 3) never
    # meets a wider instruction: a helper inlined into an AVX-512 file and merged by the linker with the
    # AVX2 copy of the same inline function (qgemm_kernels.inc says why it uses no std:: template) would
    # die there of an illegal instruction and pass everywhere else. So read the built library: every
    # function that holds an instruction beyond AVX2 must be a strong symbol of one of the objects that
    # set may appear in.
    if not (shutil.which("objdump") and shutil.which("nm")):
        pytest.skip("needs binutils' objdump and nm")
    folder = os.path.dirname(k.__file__)
    strong: dict[str, set[str]] = {}
    for obj in {o for allowed in BEYOND_AVX2.values() for o in allowed}:
        symbols = subprocess.run(["nm", "-C", "--defined-only", os.path.join(folder, obj)], capture_output=True, text=True, check=True).stdout
        strong[obj] = {line.split(" ", 2)[2] for line in symbols.splitlines() if line.split(" ")[1:2] in (["t"], ["T"])}
    listing = subprocess.run(["objdump", "-d", "-C", "--wide", k.__file__], capture_output=True, text=True, check=True).stdout
    found: dict[str, set[str]] = {kind: set() for kind in BEYOND_AVX2}
    function = None
    for line in listing.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line[line.index(" <") + 2:-2]
            continue
        parts = line.split("\t")
        if len(parts) == 3 and function is not None:
            kind = beyond_avx2(parts[1], parts[2].strip())
            if kind:
                found[kind].add(function)
    # The parser sees what the kernel files must hold (this library holds every level, whatever the CPU).
    assert all(found.values()), {kind: len(names) for kind, names in found.items()}
    stray = {kind: sorted(f for f in names if not any(f in strong[obj] for obj in BEYOND_AVX2[kind])) for kind, names in found.items()}
    assert not any(stray.values()), f"instructions an AVX2-only CPU lacks, outside the kernels dispatch picks: {stray}"


def test_argmax_rows_is_torchs_first_largest(k):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1003, generator=g)  # a tail past the last 8 lanes
    x[1, 500] = x[1, 900] = 50.0  # a tie: the first index wins, as in torch
    x[2, 1002] = 60.0  # in the tail
    x[3, :] = 7.0  # all equal
    assert torch.equal(k.argmax_rows(x), x.argmax(-1))
    assert k.argmax_rows(x)[1].item() == 500
    short = torch.tensor([[0.5, 2.0, 2.0], [-1.0, -3.0, -2.0]])  # fewer values than lanes
    assert k.argmax_rows(short).tolist() == short.argmax(-1).tolist() == [1, 0]
