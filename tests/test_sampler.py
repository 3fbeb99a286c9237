"""The per-request sampler on its own, on CPU with synthetic logits: each sampling option changes the
tokens the way a user would notice, logprobs are the raw model's, and a seeded request gives the same
tokens alone, in a mixed batch, or restarted after a preemption."""

from __future__ import annotations

import pytest
import torch

from serve.messages import SamplingParams
from serve.worker import native
from serve.worker.sampler import Sampler

V = 16
EOS = 15
CPU = torch.device("cpu")
KERNELS = native.load() if native.cpu_supported() else None
FORM = {"kernels": None}


@pytest.fixture(autouse=True, params=["torch", pytest.param("kernels", marks=pytest.mark.skipif(KERNELS is None, reason="no CPU kernels here"))])
def form(request):
    """Every test twice: steps 6-8 through torch (CUDA's way) and through our kernel (csrc/sample.cpp)."""
    FORM["kernels"] = KERNELS if request.param == "kernels" else None
    yield request.param


def sampler() -> Sampler:
    return Sampler(CPU, V, [EOS], FORM["kernels"])


def peaked(*favourites: tuple[int, float]) -> torch.Tensor:
    """One row of logits: 0 everywhere but at the given (token, logit) pairs."""
    row = torch.zeros(V)
    for token, logit in favourites:
        row[token] = logit
    return row


def run(s: Sampler, row: int, logits: torch.Tensor, steps: int) -> list[int]:
    """`steps` tokens of one request fed the same logits at every step."""
    return [s.sample(logits[None], [row])[0].item() for _ in range(steps)]


def test_greedy_without_options_is_the_raw_argmax_and_skips_the_adjustments():
    s = sampler()
    s.start(0, SamplingParams(temperature=0))
    s.start(1, SamplingParams(temperature=0, logprobs=2))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    ids, logprobs = s.sample(logits, [0, 1])
    assert ids.dtype == torch.int64 and ids.tolist() == logits.argmax(-1).tolist()
    assert logprobs[0] is None and logprobs[1] is not None
    # The fast path: no bias, penalty or min_tokens in the batch, so the logits are not even copied.
    assert s._adjust(logits, [s.rows[0], s.rows[1]])[0] is logits


def test_negative_logit_bias_bans_the_token_greedy_and_sampling_would_pick():
    s = sampler()
    logits = peaked((3, 5.0), (4, 4.0))
    s.start(0, SamplingParams(temperature=0))
    assert run(s, 0, logits, 1) == [3]
    s.start(0, SamplingParams(temperature=0, logit_bias={3: -100.0}))
    assert run(s, 0, logits, 3) == [4, 4, 4]
    for seed in range(20):
        s.start(seed, SamplingParams(temperature=1.0, seed=seed, logit_bias={3: -100.0}))
    ids, _ = s.sample(logits.expand(20, V), list(range(20)))
    assert 3 not in ids.tolist()


def test_positive_logit_bias_forces_a_token():
    s = sampler()
    logits = peaked((3, 5.0))
    for seed in range(10):
        s.start(seed, SamplingParams(temperature=1.5 if seed else 0, seed=seed, logit_bias={9: 100.0}))
    ids, _ = s.sample(logits.expand(10, V), list(range(10)))
    assert ids.tolist() == [9] * 10


def test_min_tokens_holds_eos_and_stop_token_ids_back_for_exactly_min_tokens_tokens():
    s = sampler()
    # EOS is by far the likeliest, then a stop token id, then an ordinary token.
    logits = peaked((EOS, 9.0), (7, 8.0), (2, 1.0))
    s.start(0, SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7]))
    assert run(s, 0, logits, 5) == [2, 2, 2, EOS, EOS]
    # ignore_eos does not lift the mask; sampling rows are masked too.
    s.start(1, SamplingParams(temperature=1.0, seed=1, min_tokens=2, ignore_eos=True))
    tokens = run(s, 1, peaked((EOS, 30.0)), 3)
    assert EOS not in tokens[:2] and tokens[2] == EOS
    # Restarted after a preemption with two tokens already produced: one more to hold EOS back.
    s.start(2, SamplingParams(temperature=0, min_tokens=3), produced=2)
    assert run(s, 2, logits, 2) == [7, EOS]


def test_penalties_follow_vllm_formulas():
    s = sampler()
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0] + [0.0] * (V - 6)])
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.25, presence_penalty=0.5)
    # Prompt [0, 1], then 3, 3, 2 generated before a preemption.
    s.start(0, params, produced=3, history=[0, 1, 3, 3, 2])
    adjusted = s._adjust(logits, [s.rows[0]])[0][0]
    expected = logits[0].clone()
    expected[0] = 2.0 / 1.5  # in the prompt: repetition only, a positive logit divided
    expected[1] = -1.0 * 1.5  # a negative one multiplied
    expected[2] = 0.5 / 1.5 - 0.25 * 1 - 0.5  # generated once
    expected[3] = 3.0 / 1.5 - 0.25 * 2 - 0.5  # generated twice
    torch.testing.assert_close(adjusted, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits[0, :6], torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0]))  # the input is untouched


def test_penalties_move_greedy_away_from_repeated_tokens():
    logits = peaked((3, 3.0), (5, 2.5))
    s = sampler()
    s.start(0, SamplingParams(temperature=0))
    assert run(s, 0, logits, 3) == [3, 3, 3]
    s.start(0, SamplingParams(temperature=0, presence_penalty=1.0))  # 3 drops to 2.0 once generated at all
    assert run(s, 0, logits, 3) == [3, 5, 3]
    s.start(0, SamplingParams(temperature=0, frequency_penalty=0.4))  # 3 drops by 0.4 per occurrence
    assert run(s, 0, logits, 4) == [3, 3, 5, 3]
    # Repetition covers the prompt as well: 3 is in it, so 3.0 / 2 loses to 2.5 from the first token on.
    s.start(0, SamplingParams(temperature=0, repetition_penalty=2.0), history=[1, 3])
    assert run(s, 0, logits, 2) == [5, 3]
    # A later request on the same row starts from its own counts, penalized or not.
    s.start(0, SamplingParams(temperature=0, frequency_penalty=0.4))
    assert run(s, 0, logits, 1) == [3]
    s.start(0, SamplingParams(temperature=0))
    assert run(s, 0, logits, 2) == [3, 3]


def test_penalty_state_survives_the_pool_growing_and_reused_rows_give_theirs_back():
    logits = peaked((3, 3.0), (5, 2.5))
    params = SamplingParams(temperature=0, presence_penalty=1.0)
    s = sampler()
    for i in range(20):  # one row, many penalized requests in turn: the pool keeps its first size
        s.start(0, params, history=[1])
    for row in range(1, 8):
        s.start(row, params, history=[1])
    assert run(s, 0, logits, 1) == [3]
    assert s.counts.shape[0] == 8
    s.finish(3)
    s.start(8, params, history=[1])  # takes the slot row 3 gave back
    assert s.counts.shape[0] == 8
    s.start(9, params, history=[1])  # a ninth: the pool grows, and row 0 still remembers its 3
    assert s.counts.shape[0] == 16
    assert run(s, 0, logits, 1) == [5]


def test_restart_with_history_rebuilds_the_counts():
    logits = peaked((3, 3.0), (5, 2.5))
    params = SamplingParams(temperature=0, frequency_penalty=0.4)
    s = sampler()
    s.start(0, params, history=[1, 2])
    full = run(s, 0, logits, 6)
    assert full == [3, 3, 5, 3, 5, 3]
    s.start(1, params, history=[1, 2])
    head = run(s, 1, logits, 3)
    s.finish(1)
    s.start(4, params, produced=3, history=[1, 2] + head)
    assert head + run(s, 4, logits, 3) == full
    s.start(5, params, produced=3, history=[1, 2, 9, 9, 9])  # other tokens generated: 3 unpenalized
    assert run(s, 5, logits, 1) == [3]


def test_min_p_drops_tokens_below_the_threshold_after_temperature():
    # Tempered by 2, token i has (relative to token 0) probability 1, e^-0.5, e^-1, then e^-2 for 3..15.
    logits = torch.tensor([0.0, -1.0, -2.0] + [-4.0] * (V - 3))
    n = 300

    def tokens(min_p: float) -> set[int]:
        s = sampler()
        for seed in range(n):
            s.start(seed, SamplingParams(temperature=2.0, seed=seed, min_p=min_p))
        return set(s.sample(logits.expand(n, V), list(range(n)))[0].tolist())

    assert tokens(0.0) > {0, 1, 2}  # without min_p the unlikely tail shows up
    # 0.25 keeps e^-1 = 0.37 (which applied before temperature, at e^-2 = 0.14, it would drop) but not e^-2.
    assert tokens(0.25) == {0, 1, 2}


def test_logprobs_are_the_raw_models_with_sorted_alternatives():
    s = sampler()
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    s.start(0, SamplingParams(temperature=0.7, seed=3, logprobs=4, logit_bias={6: 100.0}))
    s.start(1, SamplingParams(temperature=0))
    s.start(2, SamplingParams(temperature=0, logprobs=0, presence_penalty=1.0))
    ids, out = s.sample(logits, [0, 1, 2])
    raw = torch.log_softmax(logits, -1)
    assert ids[0].item() == 6 and out[1] is None
    # The forced token's logprob is the raw model's, not ~0 as after the bias.
    assert out[0].token_logprobs == [raw[0, 6].item()]
    top = raw[0].sort(descending=True)
    assert out[0].top_ids == [top.indices[:4].tolist()]
    assert out[0].top_logprobs == [top.values[:4].tolist()]
    assert out[0].top_logprobs[0] == sorted(out[0].top_logprobs[0], reverse=True)
    assert out[2].token_logprobs == [raw[2, ids[2]].item()]
    assert out[2].top_ids == [[]] and out[2].top_logprobs == [[]]


def test_score_is_the_log_softmax_of_each_target():
    s = sampler()
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(2)).half()
    targets = [3, 0, 15, 7, 7]
    out = s.score(logits, targets, 2)
    raw = torch.log_softmax(logits.float(), -1)
    assert out.token_logprobs == [raw[i, t].item() for i, t in enumerate(targets)]
    assert out.top_ids == raw.topk(2).indices.tolist()
    assert out.top_logprobs == raw.topk(2).values.tolist()
    assert s.score(logits, targets, 0).top_ids == [[]] * 5


def test_a_seeded_request_gives_the_same_tokens_alone_batched_and_restarted():
    steps = 12
    step_logits = torch.randn(steps, V, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=1.0, seed=1234, presence_penalty=0.8, frequency_penalty=0.8, repetition_penalty=1.3,
                            logit_bias={0: 1.0}, min_tokens=2, top_p=0.95, logprobs=1)
    prompt = [2, 4, 6]

    s = sampler()
    s.start(0, params, history=prompt)
    alone = [s.sample(step_logits[i][None], [0])[0].item() for i in range(steps)]
    assert len(set(alone)) > 3  # penalties and noise at work: not one token over and over

    # Row 5 among penalized and biased neighbours (eight penalized requests fill the penalty pool); four
    # more penalized requests join at step 3, which grows the pool under the running ones.
    s = sampler()
    others = [SamplingParams(temperature=0.8, seed=i, frequency_penalty=0.5, logit_bias={i: 3.0}) for i in range(7)]
    rows = [0, 1, 2, 5, 6, 7, 8, 9]
    for row, other in zip([0, 1, 2, 6, 7, 8, 9], others):
        s.start(row, other, history=[row])
    s.start(5, params, history=prompt)
    batched = []
    for i in range(steps):
        if i == 3:
            for row in range(11, 15):
                s.start(row, SamplingParams(repetition_penalty=1.2, seed=row), history=[1, 2, 3])
            rows += list(range(11, 15))
            assert s.counts.shape[0] == 16
        noise = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(100 + i))
        batch = noise.index_copy(0, torch.tensor([3]), step_logits[i][None])  # row 5 sits at index 3
        batched.append(s.sample(batch, rows)[0][3].item())
    assert batched == alone

    # Preempted after 5 tokens, restarted on another row with its history.
    s = sampler()
    s.start(0, params, history=prompt)
    head = [s.sample(step_logits[i][None], [0])[0].item() for i in range(5)]
    s.start(3, params, produced=5, history=prompt + head)
    tail = [s.sample(step_logits[i][None], [3])[0].item() for i in range(5, steps)]
    assert head + tail == alone


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0] + [0.0] * (V - 4))
    n = 400

    def tokens(**options) -> set[int]:
        s = sampler()
        for seed in range(n):
            s.start(seed, SamplingParams(temperature=1.0, seed=seed, **options))
        return set(s.sample(logits.expand(n, V), list(range(n)))[0].tolist())

    assert len(tokens()) > 4
    assert tokens(top_k=2) == {0, 1}
    # Probabilities ~0.37, 0.22, 0.14, ...: top_p 0.5 keeps token 1 (0.37 before it) but not token 2 (0.59).
    assert tokens(top_p=0.5) == {0, 1}
    assert tokens(top_p=0.01) == {0}  # the most likely token always survives
    assert tokens(top_k=3, top_p=0.9) == {0, 1, 2}


def test_sampling_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5] + [-1.0] * (V - 3))
    expected = torch.softmax(logits, dim=0)
    n = 4000
    s = sampler()
    for seed in range(n):
        s.start(seed, SamplingParams(temperature=1.0, seed=seed))
    counts = torch.bincount(s.sample(logits.expand(n, V), list(range(n)))[0], minlength=V).float() / n
    assert (counts - expected).abs().max().item() < 0.03, (counts, expected)


def bitmask(allowed: list[int], width: int = V) -> bytes:
    """llguidance's layout: bit j of the mask (little-endian, in 32-bit words) allows token j."""
    words = [0] * ((width + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


def test_a_grammar_mask_limits_the_rows_it_names_and_no_other():
    s = sampler()
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    for row in range(3):
        s.start(row, SamplingParams(temperature=1.0 if row == 1 else 0, seed=row, logprobs=1))
    allowed = [1, 6, 9]
    # Row 0 is greedy and row 1 samples, both constrained; row 2 is free and keeps its argmax.
    for _ in range(20):
        ids, logprobs = s.sample(logits, [0, 1, 2], ([0, 1], [bitmask(allowed)] * 2))
        assert ids[0].item() == max(allowed, key=lambda t: logits[0, t].item())
        assert ids[1].item() in allowed
        assert ids[2].item() == logits[2].argmax().item()
    # Logprobs stay the raw model's, not the masked distribution's.
    assert logprobs[0] is not None
    assert abs(logprobs[0].token_logprobs[0] - torch.log_softmax(logits[0], -1)[ids[0]].item()) < 1e-5


def test_the_grammar_wins_over_min_tokens_and_bias_when_they_leave_nothing():
    """A finished grammar allows only EOS; min_tokens bans it: the row still gets EOS, never a banned token."""
    s = sampler()
    s.start(0, SamplingParams(temperature=1.0, seed=0, min_tokens=10, logit_bias={EOS: -100.0}))
    ids, _ = s.sample(peaked((3, 9.0))[None], [0], ([0], [bitmask([EOS])]))
    assert ids.tolist() == [EOS]


def test_the_mask_covers_a_vocabulary_that_is_no_multiple_of_eight():
    s = Sampler(CPU, 13, [12], FORM["kernels"])
    s.start(0, SamplingParams(temperature=0))
    logits = torch.arange(13, dtype=torch.float32)[None]  # the last token is the argmax
    assert s.sample(logits, [0], ([0], [bitmask([2, 11], 13)]))[0].tolist() == [11]
    assert s.sample(logits, [0], ([0], [bitmask([2], 13)]))[0].tolist() == [2]
