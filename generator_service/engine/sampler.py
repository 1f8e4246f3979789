"""Batched next-token sampling over the logits of one engine step.

Pipeline per row (same order as Hugging Face `generate`, so seeded HF runs and ours agree on which tokens are
allowed):

    logits -> penalties -> greedy? argmax
                        -> / temperature -> top-k -> top-p -> min-p -> exponential race (sample)

Every stage is a tensor op over all rows that need it; Python only loops over rows to read their parameters and,
for seeded rows, to draw their noise from their own generator. Rows whose parameters disable a stage are left
bit-for-bit untouched by it, so a row's result never depends on what else is in the batch.

Logprobs are "processed" logprobs (vLLM's `processed_logprobs` mode): log_softmax of the distribution the token was
actually drawn from, after penalties, temperature and the top-k/top-p/min-p filters (filtered tokens get -inf).
For greedy rows that is log_softmax of the penalised logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from generator_service.engine.sampling_params import SamplingParams

# Temperatures below this are clamped before dividing, so logits / temperature cannot overflow to inf (inf - inf
# inside softmax would give NaN). Only temperature == 0 means greedy, as SamplingParams.greedy says.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One request that samples a token this step; row i of the logits belongs to rows[i].

    `generator` is the request's own RNG (see `Sampler.make_generator`), created once per request on the logits'
    device and passed again every step: its state carries the request's random stream from step to step.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the chosen token and the `params.logprobs` most likely tokens, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob); -inf entries when fewer tokens survived the filters


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row; None where params.logprobs == 0


class Sampler:
    """Stateless: all per-request state (generators, token histories) lives in the rows."""

    @staticmethod
    def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
        """The per-request generator for `SamplingRow.generator`; None for unseeded requests."""
        if seed is None:
            return None
        return torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Pick one token per row of `logits` [num_seqs, vocab]. Does not modify `logits`."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [num_seqs={len(rows)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()  # no copy when already float32; every op below is out-of-place
        if all(r.params.greedy and r.params.logprobs == 0 and not _has_penalties(r.params) for r in rows):
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(rows))  # fast path: plain argmax

        logits = apply_penalties(logits, rows)  # [num_seqs, vocab]
        token_ids = logits.argmax(dim=-1)  # [num_seqs]; right for greedy rows, random rows are replaced below
        final_logits = logits  # the distribution each row's token came from, for logprobs
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)  # [num_random]
            processed = apply_filters(logits[index], [rows[i].params for i in random_rows])  # [num_random, vocab]
            sampled = _exponential_race(processed.softmax(dim=-1), [rows[i].generator for i in random_rows])
            token_ids = token_ids.index_copy(0, index, sampled)
            final_logits = logits.index_copy(0, index, processed)
        return SampleResult(token_ids.tolist(), _logprobs(final_logits, token_ids, rows))


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token id, by scatter_add over a padded id tensor."""
    width = max(len(ids) for ids in token_lists)
    # Pad with id `vocab`: an extra column that is dropped at the end. Ids >= vocab (never produced by the lm_head)
    # are clamped into it too, as HF's RepetitionPenaltyLogitsProcessor does.
    padded = [list(ids) + [vocab] * (width - len(ids)) for ids in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device).clamp_(max=vocab)  # [n, width]
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)  # [n, vocab + 1]
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt + output tokens), presence and frequency (output tokens only) penalties; a new tensor."""
    vocab, device = logits.shape[1], logits.device
    repeat = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if repeat:
        index = torch.tensor(repeat, device=device)
        seen = _token_counts([[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in repeat], vocab, device)
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in repeat], device=device)[:, None]
        sub = logits[index]  # [n, vocab]
        # vLLM and HF agree: divide positive logits, multiply negative ones, so the token always becomes less likely.
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits = logits.index_copy(0, index, torch.where(seen > 0, penalised, sub))
    additive = [i for i, r in enumerate(rows) if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    if additive:
        index = torch.tensor(additive, device=device)
        counts = _token_counts([rows[i].output_token_ids for i in additive], vocab, device)  # [n, vocab]
        presence = torch.tensor([rows[i].params.presence_penalty for i in additive], device=device)[:, None]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in additive], device=device)[:, None]
        sub = logits[index] - presence * (counts > 0) - frequency * counts
        logits = logits.index_copy(0, index, sub)
    return logits


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for non-greedy rows [n, vocab]; removed tokens become -inf."""
    device = logits.device
    temperature = torch.tensor([max(p.temperature, _MIN_TEMPERATURE) for p in params], device=device)
    logits = logits / temperature[:, None]  # [n, vocab]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    if any(p.min_p > 0.0 for p in params):
        # min-p keeps tokens with prob >= min_p * max prob. The ratio to the max is unchanged by renormalising, so
        # computing it after top-k/top-p (as HF does) equals computing it on the temperature-scaled distribution.
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = logits.softmax(dim=-1)  # [n, vocab]
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -torch.inf)
    return logits


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    vocab, device = logits.shape[1], logits.device
    # One ascending sort serves both filters: column vocab - k holds the k-th largest logit.
    #   sorted:  [ smallest ............................ k-th largest ... largest ]
    #   column:    0                                    vocab - k          vocab - 1
    # top_k == 0 (off) maps to k = vocab, i.e. column 0, whose threshold removes nothing.
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1)  # [n, vocab] each
    kth_largest = sorted_logits.gather(1, (vocab - k)[:, None])  # [n, 1]
    # Threshold, not position: tokens tied with the k-th largest are kept (same as HF's TopKLogitsWarper and vLLM).
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, -torch.inf)
    # top-p: drop the low tail whose cumulative mass is <= 1 - top_p (HF's rule); the largest token always stays.
    # 1 - top_p is computed in Python double, as HF does, so both round the threshold the same way.
    tail_mass = torch.tensor([1.0 - p.top_p for p in params], device=device)[:, None]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    remove = (cumulative <= tail_mass) & (tail_mass > 0)  # rows with top_p == 1 are untouched, not just nearly
    remove[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(remove, -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # back to vocab order


def _exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exp(1) is an exact sample from probs (Gumbel-max in disguise), with no sync."""
    q = torch.empty_like(probs)  # [n, vocab]
    if any(g is None for g in generators):
        q.exponential_()  # one batched draw from the device's default generator for all unseeded rows
    for row, generator in enumerate(generators):
        if generator is not None:
            # A seeded row draws exactly `vocab` values from its own generator each step, whatever else is in the
            # batch and wherever the row sits, so its token sequence depends on its seed alone.
            q[row].exponential_(generator=generator)
    # exponential_ may return exactly 0; 0 / 0 would be NaN, which argmax treats as the maximum.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)  # [n]


def _logprobs(
    final_logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs > 0]
    result: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return result
    index = torch.tensor(wanted, device=final_logits.device)
    logprobs = final_logits[index].log_softmax(dim=-1)  # [n, vocab]
    chosen_ids = token_ids[index]  # [n]
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1)  # [n]
    k = min(max(rows[i].params.logprobs for i in wanted), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)  # [n, k] each, most likely first
    # One device-to-host copy per tensor, then plain Python.
    chosen_id_list, chosen_list = chosen_ids.tolist(), chosen.tolist()
    values_list, ids_list = top_values.tolist(), top_ids.tolist()
    for n, i in enumerate(wanted):
        top = tuple(zip(ids_list[n], values_list[n], strict=True))[: rows[i].params.logprobs]
        result[i] = TokenLogprobs(chosen_id_list[n], chosen_list[n], top)
    return result
