"""Our `Model` and transformers' on the same prompts: greedy tokens and the logits behind every step.

Shared by the family tests (CPU, TP 1 and 2) and the CUDA tests. Only the engine's public surface is
used: `Engine(...)`, `engine.sampler.sample` (to see the logits) and `OfflineRunner.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from serve.worker.engine import Engine
from serve.worker.model import Model
from serve.worker.offline import OfflineRunner

MAX_LEN = 64
# Different lengths, so that the batch pads both its prefill and its decode steps. Ids fit every vocab.
PROMPTS = [[5, 17, 42, 99, 3, 240, 8], [77], list(range(1, 18)), [200, 31, 64]]
NEW_TOKENS = 16
TOL = 1e-4  # float32; measured differences are ~3e-6 on logits of size ~4


@dataclass
class Run:
    tokens: list[list[int]]  # per prompt, its greedy tokens
    logits: np.ndarray  # [steps, prompts, vocab]: the logits each step chose from


def captured_logits(engine: Engine) -> list[torch.Tensor]:
    """Records the logits every step hands to the sampler."""
    seen: list[torch.Tensor] = []
    sample = engine.sampler.sample
    engine.sampler.sample = lambda logits, rows, masks=None: (seen.append(logits.clone()), sample(logits, rows, masks))[1]
    return seen


def greedy_run(model: Model, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> Run:
    """All prompts as one batch: a padded prefill, then padded decode steps."""
    engine = Engine(model, len(prompts) * MAX_LEN, len(prompts), MAX_LEN)
    seen = captured_logits(engine)
    tokens = OfflineRunner(engine, MAX_LEN).generate(prompts, n)
    return Run(tokens, torch.stack(seen).float().cpu().numpy())


def tp_rank(rank: int, world: int, folder: str) -> Run:
    """One rank of a CPU tensor-parallel run, for `tests.tp_harness.run_ranks`."""
    return greedy_run(Model(folder, rank, world, torch.float32, torch.device("cpu")))


def tp_rank_each(rank: int, world: int, folders: list[str]) -> list[Run]:
    """`tp_rank` for several models in one group: the ranks' start-up (spawn, torch, gloo) is paid once."""
    return [tp_rank(rank, world, folder) for folder in folders]


def hf_run(hf) -> Run:
    """transformers' `generate`, one prompt at a time, and the logits of every step from one forward
    over prompt + generated tokens."""
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            tokens.append(out[0, len(prompt):].tolist())
            logits.append(hf(out[:, :-1]).logits[0, len(prompt) - 1:])
    return Run(tokens, torch.stack(logits, dim=1).numpy())


def assert_matches_hf(ours: Run, hf: Run) -> None:
    # Prefill first: when it is off, every later difference is only its echo.
    assert np.abs(ours.logits[0] - hf.logits[0]).max() < TOL, "prefill logits"
    for i, (got, expected) in enumerate(zip(ours.tokens, hf.tokens)):
        assert got == expected, f"prompt {i}: greedy tokens"
    assert np.abs(ours.logits - hf.logits).max() < TOL, "decode logits"
