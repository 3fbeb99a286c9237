"""GGUF files run as they ship: read by their own names and layouts, their blocks run by our kernels.

Tiny models are written as llama.cpp writes GGUF files (tests/tiny_gguf.py). In float32 they must give
transformers' logits exactly as the safetensors do (names, the interleaved query/key rows of a Llama);
quantized, our kernels must track the same blocks dequantized, and give every request the same logits
whatever else is in its batch and whether its prompt came from the prefix cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.messages import SamplingParams, StepPlan
from serve.worker import native
from serve.worker.engine import Engine
from serve.worker.model import Model
from tests.conftest import TINY_NAME
from tests.parity import assert_matches_hf, captured_logits, greedy_run, hf_run
from tests.server import Server
from tests.tiny_gguf import T, write_gguf
from tests.tiny_model import build_tokenizer, random_model

CPU = torch.device("cpu")
needs_kernels = pytest.mark.skipif(not native.cpu_supported(), reason="this CPU has no AVX2/FMA: no kernels to run the blocks")


def tiny(tmp_path_factory, family: str, **overrides):
    folder = tmp_path_factory.mktemp(f"gguf-{family}")
    vocab = build_tokenizer(folder)
    return folder, random_model(folder, family, seed=3, vocab_size=vocab, **overrides)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny(tmp_path_factory, "llama")


def cosines(a, b) -> np.ndarray:
    """Per step and prompt, the cosine between two runs' logits."""
    return (a.logits * b.logits).sum(-1) / np.linalg.norm(a.logits, axis=-1) / np.linalg.norm(b.logits, axis=-1)


def model_of(folder, path, **kw) -> Model:
    return Model(folder, 0, 1, torch.float32, CPU, gguf=str(path), **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float32_gguf_gives_transformers_logits(tmp_path_factory, family):
    # The names, the vectors and the row order of the queries and keys (interleaved per head in a Llama
    # GGUF, as they come in a Qwen one): any of them wrong and the logits are far off.
    folder, hf = tiny(tmp_path_factory, family)
    path = write_gguf(hf, folder, folder / "model-f32.gguf", T.F32)
    ours = model_of(folder, path)
    assert ours.describe()["quantization"] == "none"
    assert_matches_hf(greedy_run(ours), hf_run(hf))


@needs_kernels
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_blocks_track_their_dequantized_selves(llama, tmp_path, qtype):
    folder, hf = llama
    path = write_gguf(hf, folder, tmp_path / f"model-{qtype.name}.gguf", qtype)
    blocks, floats = model_of(folder, path), model_of(folder, path, quantization="none")
    assert blocks.describe()["quantization"] == "gguf" and qtype.name in blocks.describe()["weights"]
    assert floats.describe()["quantization"] == "none" and floats.describe()["matmul"] == "onednn-f32"
    a, b = greedy_run(blocks), greedy_run(floats)
    # The same weights; only the activations' rounding to 8 bits per block of 32 differs.
    cos = cosines(a, b)
    assert cos[0].min() > 0.999, cos[0]
    assert not np.array_equal(a.logits[0], b.logits[0])  # really the blocks


@needs_kernels
def test_k_quants_and_mixed_formats_run_from_their_blocks(tmp_path_factory, tmp_path):
    # Rows of 256 for the K-quants' super-blocks; the fused q/k/v mixes formats, as Q4_K_M files do.
    folder, hf = tiny(tmp_path_factory, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    mix = {f"blk.{i}.attn_v.weight": T.Q6_K for i in range(2)} | {f"blk.{i}.ffn_down.weight": T.Q5_K for i in range(2)}
    path = write_gguf(hf, folder, tmp_path / "model-k.gguf", T.Q4_K, overrides=mix | {"token_embd.weight": T.Q8_0})
    blocks, floats = model_of(folder, path), model_of(folder, path, quantization="none")
    weights = blocks.describe()["weights"]
    assert all(name in weights for name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0")), weights
    assert blocks.no_kernel == []
    a, b = greedy_run(blocks), greedy_run(floats)
    cos = cosines(a, b)
    # Random quants make a rougher model than trained ones, which the 8-bit activations feel more; a wrong
    # block layout would give a cosine near 0.
    assert cos[0].min() > 0.98, cos[0]


@needs_kernels
def test_a_format_without_a_kernel_is_dequantized_and_named(llama, tmp_path):
    folder, hf = llama
    path = write_gguf(hf, folder, tmp_path / "model-iq4.gguf", T.Q8_0, overrides={"blk.0.ffn_up.weight": T.IQ4_NL})
    model = model_of(folder, path)
    assert model.no_kernel == ["IQ4_NL"]  # the worker logs one warning line naming these
    assert "Q8_0" in model.describe()["weights"] and "float32" in model.describe()["weights"]
    assert len(greedy_run(model).tokens[0]) > 0


def last_logits(engine: Engine, plan: StepPlan, seen: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runs one plan; returns the logits each sampling request of it sampled from."""
    seen.clear()
    engine.step(plan)
    return list(seen[0]) if seen else []


@needs_kernels
def test_a_request_gets_the_same_logits_alone_batched_chunked_or_cached(llama, tmp_path):
    # What a user sees as "temperature 0 gives the same text whether the prompt was cached or not":
    # the logits of a prompt's last token, bit for bit, however the prompt reached the engine.
    folder, hf = llama
    path = write_gguf(hf, folder, tmp_path / "model-q4_1.gguf", T.Q4_1)
    engine = Engine(model_of(folder, path), pool_tokens=1024, max_rows=4, max_len=256)
    seen = captured_logits(engine)
    greedy = [SamplingParams(max_new_tokens=4, temperature=0.0)]
    prompt = [(17 * i) % 200 + 3 for i in range(40)]
    other = [(5 * i) % 150 + 7 for i in range(23)]

    def slots(row: int, start: int, n: int) -> list[int]:
        return [row * 256 + start + i for i in range(n)]

    alone = last_logits(engine, StepPlan(1, [0], [0], [0, 40], prompt, slots(0, 0, 40), [0], greedy), seen)[0]
    # Batched behind another prompt.
    batched = last_logits(engine, StepPlan(2, [2, 1], [0, 0], [0, 23, 63], other + prompt, slots(2, 0, 23) + slots(1, 0, 40),
                                           [2, 1], greedy * 2), seen)[1]
    # In two chunks, of which the first samples nothing.
    last_logits(engine, StepPlan(3, [3], [0], [0, 25], prompt[:25], slots(3, 0, 25), [3], greedy, skip=[0]), seen)
    chunked = last_logits(engine, StepPlan(4, [3], [25], [0, 15], prompt[25:], slots(3, 25, 15)), seen)[0]
    # A prefix-cache hit: row 0's first 39 slots reused, only the last token computed, alone in its step.
    cached = last_logits(engine, StepPlan(5, [1], [39], [0, 1], prompt[39:], [999], [1], greedy, [slots(0, 0, 39)]), seen)[0]
    assert torch.equal(alone, batched)
    assert torch.equal(alone, chunked)
    assert torch.equal(alone, cached)


@needs_kernels
def test_all_layers_in_one_call_match_the_layers_one_op_at_a_time(llama, tmp_path):
    folder, hf = llama
    path = write_gguf(hf, folder, tmp_path / "model-q4_0.gguf", T.Q4_0)
    fused = model_of(folder, path)
    assert fused.fused is not None and "one-call" in fused.describe()["ops"]
    calls = []
    run = fused.fused.run
    fused.fused = type("Counted", (), {"run": lambda self, *args: calls.append(1) or run(*args)})()
    loose = model_of(folder, path)
    loose.fused = None
    a, b = greedy_run(fused), greedy_run(loose)
    assert len(calls) == len(a.tokens[0])  # every step, the prefill included, took the one call
    assert a.tokens == b.tokens and np.array_equal(a.logits, b.logits)


def test_a_gguf_file_is_served_from_its_blocks(llama, tmp_path):
    folder, hf = llama
    path = write_gguf(hf, folder, tmp_path / "tiny-q4_1.gguf", T.Q4_1)
    with Server("--model", str(path), "--served-name", TINY_NAME) as server:
        worker = next(line for line in server.read_log().splitlines() if "serve:worker-0" in line)
        if native.cpu_supported():
            assert "quantization=gguf" in worker and "weights=Q4_1:" in worker and "kv_dtype=int8" in worker
        reply = server.client().chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hello"}],
                                                        max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 8 and reply.choices[0].message.content
