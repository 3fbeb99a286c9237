"""Where a worker runs and in what dtype (`serve.device.place`), and the tiny Llama on a CUDA GPU.

The CUDA tests skip on machines without one. They run TP 1, so no NCCL is needed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch

from serve import device, isa
from serve.device import DTYPES, Placement, place
from serve.worker.engine import Engine
from serve.worker.model import Model
from serve.worker.offline import OfflineRunner
from tests.parity import MAX_LEN, PROMPTS, Run, assert_matches_hf, greedy_run, hf_run
from tests.tiny_model import random_llama

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_auto_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda cpu_isa="auto": native)
    assert place(0, "auto") == Placement(CPU, "gloo", torch.bfloat16 if native else torch.float32)
    # int8 keeps its activations in float32, whatever the CPU.
    assert place(0, "auto", "int8") == Placement(CPU, "gloo", torch.float32)


@pytest.fixture
def cpu_flags(monkeypatch) -> Callable[[str | None], None]:
    """Pretend this machine's /proc/cpuinfo lists these flags (None: there is none, as off Linux), with no
    cap from the environment (the suite may run under SERVE_CPU_ISA)."""
    monkeypatch.delenv(isa.ENV, raising=False)

    def pretend(flags: str | None) -> None:
        def cpuinfo(path: str, *args: Any) -> io.StringIO:
            if flags is None:
                raise OSError(path)
            return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")

        monkeypatch.setattr(isa, "open", cpuinfo, raising=False)
        isa.available.cache_clear()

    yield pretend
    isa.available.cache_clear()


ZEN3 = "fpu avx2 fma f16c"
ZEN4 = ZEN3 + " avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16"
ZEN5 = ZEN4 + " avx_vnni"
SPR = ZEN5 + " amx_tile amx_int8 amx_bf16"


@pytest.mark.parametrize("flags, levels", [
    (ZEN3, ("avx2",)),
    (ZEN4, ("avx2", "avx512", "avx512_bf16")),  # no avx_vnni: Zen 4 has only the EVEX form of VNNI
    (ZEN5, ("avx2", "avx_vnni", "avx512", "avx512_bf16")),
    (SPR, isa.LEVELS),
    ("fpu sse4_2 avx", ()),
    (None, ()),
], ids=["zen3", "zen4", "zen5", "sapphire-rapids", "below-avx2", "no-proc"])
def test_levels_come_from_the_cpu_flags(cpu_flags, flags: str | None, levels: tuple[str, ...]) -> None:
    cpu_flags(flags)
    assert isa.available() == levels
    assert device.cpu_has_native_bf16() == ("avx512_bf16" in levels)


def test_a_cap_runs_a_lower_level(cpu_flags, monkeypatch) -> None:
    cpu_flags(ZEN5)
    assert isa.chosen() == "avx512_bf16"
    assert isa.chosen("avx2") == "avx2" and not device.cpu_has_native_bf16("avx2")
    assert isa.chosen("amx") == "avx512_bf16"  # a cap above what the CPU has is no cap
    monkeypatch.setenv(isa.ENV, "avx512")
    assert isa.chosen() == "avx512" and not device.cpu_has_native_bf16()
    assert isa.chosen("avx_vnni") == "avx_vnni"  # the config's setting wins over the environment
    cpu_flags(ZEN4)
    assert isa.chosen("avx_vnni") == "avx2"
    monkeypatch.setenv(isa.ENV, "sse")
    with pytest.raises(ValueError, match="cpu_isa must be auto or one of"):
        isa.chosen()


@pytest.mark.parametrize("name", ["auto", *DTYPES])
def test_place_on_this_machine(name: str) -> None:
    p = place(0, name)
    if torch.cuda.is_available():
        assert (p.device.type, p.backend) == ("cuda", "nccl")
        native = torch.cuda.is_bf16_supported()
    else:
        assert (p.device, p.backend) == (CPU, "gloo")
        native = device.cpu_has_native_bf16()
    # A named dtype is taken as it is, whatever the hardware.
    expected = (torch.bfloat16 if native else torch.float32) if name == "auto" else DTYPES[name]
    assert p.dtype == expected


class CudaLlama(NamedTuple):
    folder: Path
    hf: Run


@pytest.fixture(scope="module")
def cuda_llama(tmp_path_factory) -> CudaLlama:
    folder = tmp_path_factory.mktemp("cuda-llama")
    return CudaLlama(folder, hf_run(random_llama(folder, 0, pad_token_id=0)))


@pytest.fixture
def no_tf32(monkeypatch) -> None:
    # TF32 matmuls keep 10 mantissa bits, far outside the 1e-4 the parity check allows.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@needs_cuda
def test_tiny_llama_matches_hf_on_cuda(cuda_llama: CudaLlama, no_tf32: None) -> None:
    assert_matches_hf(greedy_run(Model(cuda_llama.folder, 0, 1, torch.float32, torch.device("cuda"))), cuda_llama.hf)


@needs_cuda
def test_a_gguf_runs_dequantized_on_cuda(tmp_path, no_tf32: None) -> None:
    # No GPU kernels for GGUF blocks: quantization auto dequantizes them onto the GPU; F32 tensors must
    # give transformers' logits as the safetensors do.
    from tests.tiny_gguf import T, write_gguf
    from tests.tiny_model import build_tokenizer, random_model

    vocab = build_tokenizer(tmp_path)
    hf = random_model(tmp_path, "llama", seed=3, vocab_size=vocab)
    for qtype in (T.F32, T.Q4_1):
        path = write_gguf(hf, tmp_path, tmp_path / f"m-{qtype.name}.gguf", qtype)
        model = Model(tmp_path, 0, 1, torch.float32, torch.device("cuda"), gguf=str(path))
        assert model.describe()["quantization"] == "none" and model.lm_head.weight.device.type == "cuda"
        run = greedy_run(model)
        if qtype == T.F32:
            assert_matches_hf(run, hf_run(hf))
        assert np.isfinite(run.logits).all()


@needs_cuda
def test_auto_dtype_on_cuda_tracks_float32(cuda_llama: CudaLlama) -> None:
    p = place(0, "auto")
    ours = greedy_run(Model(cuda_llama.folder, 0, 1, p.dtype, p.device), n=4)
    a, b = cuda_llama.hf.logits[0], ours.logits[0]
    assert np.isfinite(ours.logits).all()
    assert ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


@needs_cuda
@pytest.mark.parametrize("scope", ["forward", "step"])
def test_decode_does_not_sync_with_the_host(cuda_llama: CudaLlama, no_tf32: None, scope: str) -> None:
    """In sync debug mode "error" any synchronizing CUDA call raises. It is on from the second decode
    step (the first runs each kernel once, with whatever lazy setup that brings) around the model's
    forward alone, or around the whole engine step up to the sampled ids' `.tolist()`, the one sync
    a step makes by design."""
    model = Model(cuda_llama.folder, 0, 1, torch.float32, torch.device("cuda"))
    engine = Engine(model, len(PROMPTS) * MAX_LEN, len(PROMPTS), MAX_LEN)
    calls: list[None] = []

    def checked(inner: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            calls.append(None)
            if len(calls) >= 3:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return inner(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    if scope == "forward":
        model.forward = checked(model.forward)
    else:
        engine.step = checked(engine.step)
        sample = engine.sampler.sample

        def sample_then_allow_sync(logits: torch.Tensor, rows: list[int], masks=None) -> torch.Tensor:
            try:
                return sample(logits, rows, masks)
            finally:
                torch.cuda.set_sync_debug_mode("default")  # what follows is the ids' .tolist()

        engine.sampler.sample = sample_then_allow_sync
    tokens = OfflineRunner(engine, MAX_LEN).generate(PROMPTS, 6)
    assert len(calls) == 6
    assert tokens == [t[:6] for t in cuda_llama.hf.tokens]
