"""Sampler: greedy equals argmax, filters match HF's warpers, penalties match vLLM/HF, seeds are batch-independent."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from generator_service.engine.sampler import Sampler, SamplingRow, apply_filters, apply_penalties
from generator_service.engine.sampling_params import SamplingParams

VOCAB = 64


def random_logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None) -> SamplingRow:
    return SamplingRow(params, prompt or [], output or [], Sampler.make_generator(params.seed, "cpu"))


def sample_many(logits_row: torch.Tensor, params: SamplingParams, num_samples: int) -> Counter[int]:
    """Sample one distribution num_samples times in one batch, each row with its own fixed seed (not flaky)."""
    rows = [row(SamplingParams(**{**params.__dict__, "seed": s})) for s in range(num_samples)]
    return Counter(Sampler()(logits_row.expand(num_samples, -1), rows).token_ids)


def test_greedy_equals_argmax_including_ties() -> None:
    logits = random_logits(5)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1.0  # tie: torch.argmax takes the lowest index
    result = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.token_ids[2] == 7
    assert result.logprobs == [None] * 5


def test_greedy_rows_mixed_with_random_rows_still_argmax() -> None:
    logits = random_logits(4, seed=1)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams(temperature=0.0, logprobs=2)]
    params.append(SamplingParams(top_k=5))
    result = Sampler()(logits, [row(p) for p in params])
    assert result.token_ids[0] == int(logits[0].argmax())
    assert result.token_ids[2] == int(logits[2].argmax())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(top_p=1e-9),
        SamplingParams(temperature=2.0, top_k=1, seed=9),
    ],
)
def test_top_k_1_and_tiny_top_p_equal_argmax(params: SamplingParams) -> None:
    logits = random_logits(8, seed=2)
    result = Sampler()(logits, [row(params) for _ in range(8)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_filters_match_hf_warpers_row_by_row() -> None:
    logits = random_logits(6, seed=3)
    params = [
        SamplingParams(temperature=0.7, top_k=10),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0),
        SamplingParams(top_k=VOCAB + 5, top_p=0.5),
    ]
    ours = apply_filters(logits, params)
    for i, p in enumerate(params):
        expected = logits[i : i + 1]
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(p.temperature)]
        warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
        warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
        warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0.0 else []
        for warper in warpers:
            expected = warper(torch.zeros(1, 1, dtype=torch.long), expected)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(expected[0])), f"row {i} keeps different tokens"
        kept = ~torch.isinf(expected[0])
        torch.testing.assert_close(ours[i][kept], expected[0][kept])
    assert (~torch.isinf(ours[4])).all()  # no filter requested: nothing removed


def test_min_p_never_samples_tokens_below_threshold() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # min_p 0.2 -> threshold 0.1: token 3 is out
    counts = sample_many(probs.log(), SamplingParams(min_p=0.2), 2000)
    assert counts[3] == 0
    assert set(counts) == {0, 1, 2}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # top_p 0.7 -> {0, 1}
    counts = sample_many(probs.log(), SamplingParams(top_p=0.7), 1000)
    assert set(counts) == {0, 1}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_seeded_frequencies_follow_tempered_distribution(temperature: float) -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    num_samples = 4000
    counts = sample_many(probs.log(), SamplingParams(temperature=temperature), num_samples)
    expected = (probs.log() / temperature).softmax(dim=-1)
    for token in range(3):
        # Fixed seeds make this deterministic; the bound is ~4.5 standard deviations at n=4000.
        assert abs(counts[token] / num_samples - float(expected[token])) < 0.035


def test_repetition_penalty_matches_hf_processor() -> None:
    logits = random_logits(3, seed=4)
    histories = [([1, 2, 3, 3], [5, 60]), ([10], []), ([], [0, 63, 7])]
    rows = [row(SamplingParams(repetition_penalty=1.3), p, o) for p, o in histories]
    ours = apply_penalties(logits, rows)
    for i, (prompt, output) in enumerate(histories):
        ids = torch.tensor([prompt + output])
        expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], expected[0], rtol=0, atol=0)
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = random_logits(2, seed=5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    rows = [row(params, prompt=[1, 1, 2], output=[2, 2, 2, 9]), row(SamplingParams())]
    ours = apply_penalties(logits, rows)
    expected = logits.clone()
    expected[0, 2] -= 0.5 + 0.25 * 3
    expected[0, 9] -= 0.5 + 0.25 * 1  # token 1 is only in the prompt: untouched
    torch.testing.assert_close(ours, expected)


def test_greedy_uses_penalised_logits() -> None:
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0]])
    result = Sampler()(logits, [row(SamplingParams(temperature=0.0, repetition_penalty=2.0), output=[0])])
    assert result.token_ids == [1]  # 4.0 / 2 < 3.9


def test_seed_gives_same_tokens_whatever_the_batch() -> None:
    """A seeded request alone, and inside batches of other rows at different positions, over several steps."""
    target = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    others = [
        SamplingParams(),
        SamplingParams(seed=7, top_k=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(min_p=0.1, presence_penalty=0.3, logprobs=3),
    ]
    compositions = [[], others[:1], others[::-1], others[1:3] + others[:1], others]
    sequences = []
    for composition_index, composition in enumerate(compositions):
        position = composition_index % (len(composition) + 1)
        target_row = row(target)
        batch = [row(p) for p in composition]
        batch.insert(position, target_row)
        tokens = []
        for step in range(6):
            logits = random_logits(len(batch), seed=100 + step * 10 + composition_index)
            logits[position] = random_logits(1, seed=step)[0]  # the target sees the same logits every run
            sampled = Sampler()(logits, batch).token_ids
            tokens.append(sampled[position])
            target_row.output_token_ids = tokens
        sequences.append(tokens)
    assert all(s == sequences[0] for s in sequences), sequences
    assert len(set(sequences[0])) > 1  # really sampling, not collapsing to argmax


def test_logprobs_are_log_softmax_of_processed_distribution() -> None:
    logits = random_logits(3, seed=6)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(seed=1, temperature=0.8, top_k=4, logprobs=5)]
    params.append(SamplingParams(seed=2))
    result = Sampler()(logits, [row(p) for p in params])
    greedy, sampled, none = result.logprobs
    assert none is None
    assert greedy is not None and sampled is not None
    expected_greedy = logits[0].log_softmax(dim=-1)
    assert greedy.token_id == result.token_ids[0]
    assert math.isclose(greedy.logprob, float(expected_greedy.max()), rel_tol=1e-6)
    assert [t for t, _ in greedy.top] == expected_greedy.topk(3).indices.tolist()
    processed = apply_filters(logits[1:2], [params[1]])[0].log_softmax(dim=-1)
    assert len(sampled.top) == 5
    assert [t for t, _ in sampled.top[:4]] == processed.topk(4).indices.tolist()
    assert sampled.top[4][1] == -math.inf  # only 4 tokens survive top_k=4
    assert math.isclose(sampled.logprob, float(processed[result.token_ids[1]]), rel_tol=1e-6)
    assert sampled.token_id in [t for t, _ in sampled.top[:4]]


def test_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="num_seqs=2"):
        Sampler()(random_logits(3), [row(SamplingParams()), row(SamplingParams())])
