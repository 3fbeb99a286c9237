"""Every model family we serve, against transformers, at tensor-parallel size 1 and 2, and in 16 bits.

Each case is a tiny random model of the family, saved as a Hugging Face folder that `Model` loads as it
loads a real checkpoint. Checked in float32: the prefill and every decode step's logits (within 1e-4)
and the greedy tokens of HF `generate`, for a batch of prompts of different lengths. The TP 2 run is two
spawned gloo ranks, one group for every case.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from serve.worker.model import Model, ModelArgs, rope_inv_freq
from tests.parity import Run, assert_matches_hf, greedy_run, hf_run, tp_rank_each
from tests.tiny_model import random_model
from tests.tp_harness import run_ranks

LLAMA_6_2 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
# case id -> (family in tests.tiny_model.FAMILIES, config overrides)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", LLAMA_6_2),
    # Llama 3.1's scaling. With head_dim 16 and theta 5e5 the 8 frequencies fall in all three bands:
    # kept (wavelength < 16), smoothed (16..64) and divided by the factor (> 64).
    "llama3-rope": ("llama", dict(LLAMA_6_2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    })),
    "linear-rope": ("llama", dict(LLAMA_6_2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # Biases on every projection; o_proj's and down_proj's are row-parallel.
    "llama-bias": ("llama", dict(LLAMA_6_2, attention_bias=True, mlp_bias=True)),
    "smollm2": ("smollm2", {}),  # 9 query / 3 kv heads: TP 2 splits them 3+6
    "qwen2": ("qwen2", {}),  # qkv bias, odd vocab
    "qwen3": ("qwen3", {}),  # q/k norm, head_dim 32 with hidden 64
    "mistral": ("mistral", {}),
}


class Case(NamedTuple):
    name: str
    folder: Path
    hf: Run  # what transformers makes of the prompts


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Every case's model (its folder, and the HF model saved there), made once: the TP 2 runs take them
    all in one group."""
    out = {}
    for name, (family, overrides) in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, random_model(folder, family, seed=0, pad_token_id=0, **overrides)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, models) -> Case:
    folder, hf = models[request.param]
    return Case(request.param, folder, hf_run(hf))


@pytest.fixture(scope="module")
def tp2(models, tmp_path_factory) -> dict[str, Run]:
    """Every case at TP 2: two spawned gloo ranks, once for all of them."""
    runs = run_ranks(tp_rank_each, [str(folder) for folder, _ in models.values()], workdir=tmp_path_factory.mktemp("tp2"),
                     timeout=120)
    return dict(zip(models, runs))


@pytest.fixture(scope="module")
def tp1(case: Case) -> Run:
    return greedy_run(Model(case.folder, 0, 1, torch.float32, torch.device("cpu")))


def test_tp1_matches_hf(case: Case, tp1: Run) -> None:
    assert_matches_hf(tp1, case.hf)


def test_tp2_matches_hf(case: Case, tp2: dict[str, Run]) -> None:
    assert_matches_hf(tp2[case.name], case.hf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_tracks_float32(case: Case, tp1: Run, dtype: torch.dtype) -> None:
    # The same weights loaded in 16 bits: finite, close to float32 and mostly the same argmax, through a
    # prefill and a few decode steps (which take the real-valued RoPE and a 16-bit attention bias).
    half = greedy_run(Model(case.folder, 0, 1, dtype, torch.device("cpu")), n=4)
    a, b = tp1.logits[0], half.logits[0]
    assert np.isfinite(half.logits).all()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


def test_transformers_4_config_reads_the_same(case: Case, tmp_path: Path) -> None:
    # Checkpoints on the Hub mostly carry transformers 4 configs: rope_theta on top, rope_scaling beside it.
    c = json.loads((case.folder / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}  # the older spelling of rope_type
    (tmp_path / "config.json").write_text(json.dumps(c))
    old, new = ModelArgs.from_folder(tmp_path), ModelArgs.from_folder(case.folder)
    assert replace(old, rope_scaling=None) == replace(new, rope_scaling=None)
    (old_freq, old_scale), (new_freq, new_scale) = rope_inv_freq(old), rope_inv_freq(new)
    assert torch.equal(old_freq, new_freq) and old_scale == new_scale
