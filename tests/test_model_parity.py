"""Our model code against transformers, on tiny random Llamas: logits, greedy tokens, and seeded sampling.

Fast (no server, no tokenizer): the models are built in memory, saved with save_pretrained and loaded by
`Model` exactly as a real checkpoint is.
"""

from __future__ import annotations

import pytest
import torch

from serve.messages import SamplingParams
from serve.worker import native
from serve.worker.engine import Engine
from serve.worker.model import Model
from serve.worker.offline import OfflineRunner
from tests.parity import captured_logits
from tests.tiny_model import random_llama

VOCAB = 256
MAX_LEN = 128
# Different lengths, so that a batch pads both its prefill and its decode steps.
PROMPTS = [[5, 17, 42, 99, 3, 250, 8], [77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [200, 31, 64]]
NEW_TOKENS = 24


def build_hf(folder, tie: bool, seed: int = 0):
    return random_llama(folder, seed, vocab_size=VOCAB, max_position_embeddings=MAX_LEN, tie_word_embeddings=tie, pad_token_id=0)


# float32 on CPU runs on our kernels (serve/worker/csrc/) by default; "torch-ops" is the plain-torch
# form of the same forward (other dtypes, CUDA, engine.cpu_kernels: false), checked against HF too.
@pytest.fixture(scope="module", params=[(True, True), (False, True), (True, False)], ids=["tied", "untied", "tied-torch-ops"])
def models(request, tmp_path_factory):
    tie, kernels = request.param
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf = build_hf(folder, tie=tie)
    ours = Model(folder, 0, 1, torch.float32, torch.device("cpu"), cpu_kernels=kernels)
    assert ours.ops.native == (kernels and native.cpu_supported())
    return hf, ours


def runner(model: Model, rows: int = len(PROMPTS), kv_dtype: torch.dtype | None = None) -> OfflineRunner:
    return OfflineRunner(Engine(model, rows * MAX_LEN, rows, MAX_LEN, kv_dtype=kv_dtype), MAX_LEN)


def test_prefill_logits_match_hf(models):
    hf, ours = models
    r = runner(ours)
    seen = captured_logits(r.engine)
    r.generate(PROMPTS, 1)
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
    assert (seen[0] - expected).abs().max().item() < 1e-4


def test_batched_greedy_matches_hf_generate(models):
    hf, ours = models
    r = runner(ours)
    seen = captured_logits(r.engine)
    got = r.generate(PROMPTS, NEW_TOKENS)  # one batch: padded prefill, then padded decode steps
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, got)):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
            full = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
        assert tokens == expected, f"prompt {i}"
        # Every decode step's logits, not only the argmax.
        assert (torch.stack([s[i] for s in seen]) - full).abs().max().item() < 1e-4, f"prompt {i}"


def test_real_valued_rope_matches_complex(models):
    # Non-float32 dtypes take the real-valued RoPE; check it against the complex one here, in float32.
    _, ours = models
    expected = runner(ours).generate(PROMPTS, 8)
    try:
        ours.init_rope(complex_rope=False)
        assert runner(ours).generate(PROMPTS, 8) == expected
    finally:
        ours.init_rope(complex_rope=True)


def test_seeded_sampling_is_the_same_alone_and_batched(models):
    _, ours = models
    params = [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, top_k=20, seed=1234 + i) for i in range(len(PROMPTS))]
    batched = run_sampled(ours, PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        assert run_sampled(ours, [prompt], [params[i]]) == [batched[i]], f"prompt {i}"
    # And sampling really samples: another seed gives another text.
    other = [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, top_k=20, seed=99)]
    assert run_sampled(ours, [PROMPTS[0]], other) != [batched[0]]


def run_sampled(model: Model, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """OfflineRunner.generate, but with per-request sampling parameters."""
    from serve.messages import StepPlan

    r = runner(model, len(prompts))
    rows = list(range(len(prompts)))
    offsets = [0]
    for p in prompts:
        offsets.append(offsets[-1] + len(p))
    slots = [row * MAX_LEN + i for row, p in zip(rows, prompts) for i in range(len(p))]
    plan = StepPlan(1, rows, [0] * len(prompts), offsets, [t for p in prompts for t in p], slots, rows, params)
    out = [[t] for t in r.engine.step(plan)[0]]
    for _ in range(NEW_TOKENS - 1):
        out = [o + [t] for o, t in zip(out, r.engine.step(r.decode_plan(prompts, out))[0])]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_tracks_float32(models, tmp_path, dtype):
    # Same weights loaded in 16 bits: the logits stay close to float32's and mostly agree on the argmax.
    hf, ours = models
    hf.save_pretrained(tmp_path, safe_serialization=True)
    half = Model(tmp_path, 0, 1, dtype, torch.device("cpu"))
    full_logits, half_logits = captured_logits((r32 := runner(ours)).engine), captured_logits((r16 := runner(half)).engine)
    r32.generate(PROMPTS, 1)
    r16.generate(PROMPTS, 1)
    a, b = full_logits[0], half_logits[0]
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


def test_int8_quantization_tracks_float32(models, tmp_path):
    # quantization: int8 (weights in int8 blocks of 32, activations per block) stays close to float32; exact
    # parity is float32's job. (This random model's logits are too flat to ask for long greedy agreement.)
    hf, ours = models
    hf.save_pretrained(tmp_path, safe_serialization=True)
    q = Model(tmp_path, 0, 1, torch.float32, torch.device("cpu"), quantization="int8")
    assert (q.kernels is not None) == native.cpu_supported()
    full_logits, q_logits = captured_logits((r32 := runner(ours)).engine), captured_logits((r8 := runner(q)).engine)
    # Prompts and decode steps alike go through our quantized matmul.
    assert q.describe()["quantization"] == "int8" and "Q8_0" in q.describe()["weights"]
    tokens = r32.generate(PROMPTS, 4)
    r8.generate(PROMPTS, 1)
    for step in range(1, 4):  # fed float32's tokens, so that both see the same text
        r8.engine.step(r8.decode_plan(PROMPTS, [t[:step] for t in tokens]))
    for a, b in zip(full_logits, q_logits):
        assert torch.isfinite(b).all() and not torch.equal(a, b)  # really quantized
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() > 0.99
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


@pytest.mark.parametrize("kv_dtype, tolerance", [(torch.float16, 1e-2), (torch.int8, 3e-2)], ids=["float16", "int8"])
def test_a_smaller_kv_cache_tracks_float32(models, kv_dtype, tolerance):
    # engine.kv_cache_dtype: float16 stores K/V rounded to 11 bits, int8 to 8 with a scale per token and
    # head; every step's logits stay close to a float32 cache's, on the kernels' path and on torch's, fed
    # the same tokens.
    _, ours = models
    r32, r16 = runner(ours), runner(ours, kv_dtype=kv_dtype)
    assert r16.engine.kv_cache[0].dtype == kv_dtype
    full_logits, half_logits = captured_logits(r32.engine), captured_logits(r16.engine)
    tokens = r32.generate(PROMPTS, 6)
    r16.generate(PROMPTS, 1)
    for step in range(1, 6):
        r16.engine.step(r16.decode_plan(PROMPTS, [t[:step] for t in tokens]))
    for a, b in zip(full_logits, half_logits):
        assert not torch.equal(a, b)
        assert (a - b).abs().max().item() < tolerance
        assert torch.equal(a.argmax(-1), b.argmax(-1))
