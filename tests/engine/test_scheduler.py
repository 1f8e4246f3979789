"""Scheduler: token budgets, chunked prefill, preemption, aborts and stops, driven by hand-built samples."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from generator_service.engine.block_manager import BlockManager
from generator_service.engine.request import ImageSpan, Request, RequestStatus
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import (
    RequestRejected,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

BLOCK_SIZE = 4
EOS = 2


LIMITS = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 4096}


def make_scheduler(num_blocks: int = 10, **config: int) -> Scheduler:
    return Scheduler(SchedulerConfig(**{**LIMITS, **config}), BlockManager(num_blocks, BLOCK_SIZE))


def make_request(
    request_id: str, prompt_len: int, max_tokens: int = 4, first_token: int = 10, sampling: SamplingParams | None = None
) -> Request:
    params = sampling if sampling is not None else SamplingParams(max_tokens=max_tokens)
    prompt = list(range(first_token, first_token + prompt_len))
    return Request(request_id, prompt, params, eos_token_ids=frozenset({EOS}))


def position_sampler(scheduler: Scheduler, request_id: str) -> int:
    """A deterministic "model": the next token depends only on the request and its length."""
    request = scheduler.get_request(request_id)
    assert request is not None
    return 1000 * (ord(request_id[0]) - ord("a") + 1) + request.num_tokens


Sampler = Callable[[Scheduler, str], int]


def step(scheduler: Scheduler, sampler: Sampler = position_sampler) -> tuple[SchedulerOutput, list[Request]]:
    out = scheduler.schedule()
    scheduler.block_manager.check_invariants()
    sampled = {c.request_id: sampler(scheduler, c.request_id) for c in out.chunks if c.samples}
    finished = scheduler.update(out, sampled)
    scheduler.block_manager.check_invariants()
    return out, finished


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_chunked_prefill_exact_chunk_sizes() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    a = make_request("a", 10, max_tokens=3)
    sched.add_request(a)
    plans = []
    while sched.has_unfinished_requests():
        out, _ = step(sched)
        plans.append(plan(out))
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
    assert plans == [[("a", 0, 4)], [("a", 4, 4)], [("a", 8, 2)], [("a", 10, 1)], [("a", 11, 1)]]
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_token_ids == [1010, 1011, 1012]
    assert a.num_computed_tokens == 12 and a.finish_reason == "length"
    assert sched.block_manager.num_used_blocks == 0


def test_two_requests_share_the_budget_running_first() -> None:
    sched = make_scheduler(max_num_batched_tokens=6)
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", 5, first_token=50))
    out, _ = step(sched)
    assert plan(out) == [("a", 0, 6)] and [c.samples for c in out.chunks] == [False]
    out, _ = step(sched)
    assert plan(out) == [("a", 6, 4), ("b", 0, 2)] and [c.samples for c in out.chunks] == [True, False]
    out, _ = step(sched)
    assert plan(out) == [("a", 10, 1), ("b", 2, 3)] and [c.samples for c in out.chunks] == [True, True]
    out, _ = step(sched)
    assert plan(out) == [("a", 11, 1), ("b", 5, 1)]
    assert out.chunks[0].block_table == (0, 1, 2) and out.chunks[1].block_table == (3, 4)


def test_decodes_are_scheduled_before_new_prefills() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("a", 4, max_tokens=8))
    out, _ = step(sched)
    assert plan(out) == [("a", 0, 4)]
    sched.add_request(make_request("b", 8, first_token=50))
    out, _ = step(sched)
    assert plan(out) == [("a", 4, 1), ("b", 0, 3)]
    out, _ = step(sched)
    assert plan(out) == [("a", 5, 1), ("b", 3, 3)]
    out, _ = step(sched)
    assert plan(out) == [("a", 6, 1), ("b", 6, 2)] and out.chunks[1].samples


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for rid, max_tokens in (("a", 1), ("b", 3), ("c", 2)):
        sched.add_request(make_request(rid, 3, max_tokens=max_tokens))
    out, finished = step(sched)
    assert [c.request_id for c in out.chunks] == ["a", "b"] and [r.request_id for r in finished] == ["a"]
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    out, _ = step(sched)
    assert plan(out) == [("b", 3, 1), ("c", 0, 3)]
    assert sched.num_running == 2
    while sched.has_unfinished_requests():
        out, _ = step(sched)
        assert len(out.chunks) <= 2
    assert sched.block_manager.num_used_blocks == 0


def test_preempts_the_newest_and_resumes_from_the_prefix_cache() -> None:
    # 10 blocks of 4 tokens; each request grows to 24 tokens (6 blocks): both cannot fit.
    sched = make_scheduler(max_num_batched_tokens=64)
    a = make_request("a", 16, max_tokens=8)
    b = make_request("b", 16, max_tokens=8, first_token=50)
    sched.add_request(a)
    sched.add_request(b)
    bm = sched.block_manager
    out, _ = step(sched)
    assert plan(out) == [("a", 0, 16), ("b", 0, 16)]
    assert out.chunks[0].block_table == (0, 1, 2, 3) and out.chunks[1].block_table == (4, 5, 6, 7)
    for _ in range(4):  # tokens 17..20: one more block each (8 and 9); the cache is now full
        out, _ = step(sched)
    assert bm.block_table("a") == [0, 1, 2, 3, 8] and bm.block_table("b") == [4, 5, 6, 7, 9]
    assert bm.num_free_blocks == 0
    out, _ = step(sched)  # a needs a 6th block: b (the newest) is preempted
    assert out.preempted == ("b",) and plan(out) == [("a", 20, 1)]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert bm.block_table("a") == [0, 1, 2, 3, 8, 9]  # b's tail block 9, freed first, was evicted first
    assert (sched.num_running, sched.num_waiting, sched.num_preemptions_total) == (1, 1, 1)
    out, _ = step(sched)  # b's hit (4 free cached blocks) leaves no room for its 2 new blocks
    assert plan(out) == [("a", 21, 1)] and sched.num_waiting == 1
    out, finished = step(sched)
    assert finished == [a] and a.status is RequestStatus.FINISHED_LENGTH
    out, _ = step(sched)  # b resumes: prompt blocks hit the cache, output tokens are recomputed
    assert plan(out) == [("b", 16, 5)] and out.chunks[0].samples
    assert out.chunks[0].block_table == (4, 5, 6, 7, 9, 8)
    assert sched.prefix_cache_hit_tokens_total == 16 and b.num_cached_tokens == 0
    while sched.has_unfinished_requests():
        step(sched)
    assert a.output_token_ids == list(range(1016, 1024))
    assert b.output_token_ids == list(range(2066 - 50, 2024))  # same tokens as without preemption
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_computed_tokens == b.num_tokens - 1 == 23
    assert bm.num_used_blocks == 0


def test_rejections_say_what_to_change() -> None:
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(
        RequestRejected,
        match=r"prompt \(30 tokens\) \+ max_tokens \(4\) exceeds max_model_len "
        r"\(32\): shorten the prompt or raise --max-model-len",
    ):
        sched.add_request(make_request("a", 30, max_tokens=4))
    sched = make_scheduler(max_model_len=100)
    with pytest.raises(RequestRejected, match=r"needs 11 KV blocks of 4 tokens but the cache has 10.*--num-kv-blocks"):
        sched.add_request(make_request("a", 38, max_tokens=4))
    with pytest.raises(RequestRejected, match="empty prompt"):
        sched.add_request(make_request("a", 0))
    sched.add_request(make_request("a", 36, max_tokens=4))  # exactly the whole cache is fine
    with pytest.raises(RequestRejected, match="already in use"):
        sched.add_request(make_request("a", 3))
    assert sched.num_waiting == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="--max-num-seqs"):
        SchedulerConfig(**{**LIMITS, "max_num_seqs": 0})
    with pytest.raises(ValueError, match="--max-num-batched-tokens"):
        SchedulerConfig(**{**LIMITS, "max_num_batched_tokens": -1})
    with pytest.raises(ValueError, match="--max-model-len"):
        SchedulerConfig(**{**LIMITS, "max_model_len": 0})


def test_abort_in_every_state_frees_blocks() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=4)
    bm = sched.block_manager
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, 10, max_tokens=8, first_token=10 * (ord(rid) - 90)))
    out, _ = step(sched)
    assert plan(out) == [("a", 0, 4)]
    # waiting
    c = sched.abort_request("c")
    assert c is not None and c.status is RequestStatus.FINISHED_ABORTED and c.finish_reason == "abort"
    assert sched.get_request("c") is None and sched.abort_request("c") is None
    # mid-prefill: a holds one block of 4 computed tokens
    assert bm.num_used_blocks == 1
    out, _ = step(sched)
    assert out.finished == ("c",) and plan(out) == [("a", 4, 4)]
    sched.abort_request("a")
    bm.check_invariants()
    assert bm.num_used_blocks == 0
    out, _ = step(sched)
    assert out.finished == ("a",) and plan(out) == [("b", 0, 4)]
    while sched.get_request("b").num_output_tokens < 2:  # type: ignore[union-attr]
        out, _ = step(sched)
    # mid-decode
    assert sched.abort_request("b") is not None
    assert bm.num_used_blocks == 0 and not sched.has_unfinished_requests()
    out, _ = step(sched)
    assert out.finished == ("b",) and out.is_empty
    assert sched.abort_request("unknown") is None


def test_abort_between_schedule_and_update_is_skipped() -> None:
    sched = make_scheduler()
    a = make_request("a", 5)
    b = make_request("b", 5, first_token=50)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort_request("a")
    finished = sched.update(out, {"a": 7, "b": 8})
    sched.block_manager.check_invariants()
    assert finished == [] and a.output_token_ids == [] and b.output_token_ids == [8]
    assert sched.block_manager.block_table("a") == [] and sched.block_manager.num_used_blocks == 2


def test_a_matched_stop_string_finishes_in_update() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 5, max_tokens=10))
    sched.add_request(make_request("b", 5, max_tokens=10))
    out = sched.schedule()
    finished = sched.update(out, {"a": 7, "b": 8}, stop_strings={"a": "END"})
    assert [r.request_id for r in finished] == ["a"]
    assert finished[0].status is RequestStatus.FINISHED_STOPPED and finished[0].stop_reason == "END"
    assert sched.num_running == 1 and sched.block_manager.block_table("a") == []
    assert sched.schedule().finished == ()  # only aborts are reported by the next schedule()


def test_an_abort_is_reported_once_by_the_next_schedule() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 5, max_tokens=10))
    step(sched)
    a = sched.abort_request("a")
    assert a is not None and a.status is RequestStatus.FINISHED_ABORTED
    assert sched.block_manager.num_used_blocks == 0
    assert sched.abort_request("a") is None  # already finished
    assert sched.schedule().finished == ("a",)
    assert sched.schedule().finished == ()


def constant_sampler(token: int) -> Sampler:
    return lambda scheduler, request_id: token


@pytest.mark.parametrize(
    ("sampling", "token", "status", "num_outputs"),
    [
        (SamplingParams(max_tokens=5), EOS, RequestStatus.FINISHED_STOPPED, 1),
        (SamplingParams(max_tokens=5, ignore_eos=True), EOS, RequestStatus.FINISHED_LENGTH, 5),
        (SamplingParams(max_tokens=5, stop_token_ids=(7,)), 7, RequestStatus.FINISHED_STOPPED, 1),
        (SamplingParams(max_tokens=5, stop_token_ids=(7,), ignore_eos=True), 7, RequestStatus.FINISHED_STOPPED, 1),
        (SamplingParams(max_tokens=5), 3, RequestStatus.FINISHED_LENGTH, 5),
    ],
)
def test_stop_conditions(sampling: SamplingParams, token: int, status: RequestStatus, num_outputs: int) -> None:
    sched = make_scheduler()
    request = make_request("a", 6, sampling=sampling)
    sched.add_request(request)
    finished: list[Request] = []
    while not finished:
        _, finished = step(sched, constant_sampler(token))
    assert finished == [request] and request.status is status
    assert request.output_token_ids == [token] * num_outputs
    assert request.stop_reason == (token if status is RequestStatus.FINISHED_STOPPED else None)
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished_requests()


@pytest.mark.parametrize(("seed", "prefix_caching"), [(1234, True), (7, True), (99, False)])
def test_random_simulation_keeps_invariants_and_kv_contents(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=40), bm)
    # A fake KV cache: what the runner wrote at each slot, (token, image key, position) as attention reads it.
    kv: list[list[tuple[int, str | None, int] | None]] = [[None] * BLOCK_SIZE for _ in range(bm.num_blocks)]
    prefixes = [[rng.randrange(3, 50) for _ in range(12)] for _ in range(3)]
    submitted: list[Request] = []
    rejected = 0

    def slot_content(request: Request, pos: int) -> tuple[int, str | None, int]:
        key = next((s.key for s in request.image_spans if s.offset <= pos < s.end), None)
        return request.all_token_ids[pos], key, pos

    def run_chunks(out: SchedulerOutput) -> dict[str, int]:
        sampled: dict[str, int] = {}
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= 8
        assert len(out.chunks) <= 4
        for chunk in out.chunks:
            request = sched.get_request(chunk.request_id)
            assert request is not None and chunk.num_tokens >= 1
            assert len(chunk.block_table) * BLOCK_SIZE >= chunk.start + chunk.num_tokens
            for pos in range(chunk.start):  # the context attention reads must be this request's own
                assert kv[chunk.block_table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == slot_content(request, pos)
            for pos in range(chunk.start, chunk.start + chunk.num_tokens):
                kv[chunk.block_table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] = slot_content(request, pos)
            if chunk.samples:
                sampled[chunk.request_id] = rng.choice([EOS] + list(range(3, 50)) * 3)
        return sampled

    for step_index in range(600):  # arrivals stop at 300; the backlog drains by ~440
        if step_index < 300 and rng.random() < 0.35:
            prompt = list(rng.choice(prefixes)[: rng.randrange(0, 13)]) + [
                rng.randrange(3, 50) for _ in range(rng.randrange(0, 16))
            ]
            spans: tuple[ImageSpan, ...] = ()
            if len(prompt) >= 7 and rng.random() < 0.5:  # an image's key fixes its length (3 or 5 tokens)
                key, length = rng.choice([("cat", 3), ("dog", 5)])
                spans = (ImageSpan(key, offset=rng.randrange(0, 2), length=length),)
            request = Request(
                f"r{step_index}",
                prompt,
                SamplingParams(max_tokens=rng.randrange(1, 20), ignore_eos=rng.random() < 0.2),
                eos_token_ids=frozenset({EOS}),
                image_spans=spans,
            )
            try:
                sched.add_request(request)
                submitted.append(request)
            except RequestRejected:
                rejected += 1
                assert (
                    not prompt
                    or len(prompt) + request.sampling.max_tokens > 40
                    or bm.num_blocks_for(len(prompt) + request.sampling.max_tokens) > bm.num_blocks
                )
        if sched.has_unfinished_requests() and rng.random() < 0.04:
            live = [r for r in submitted if not r.is_finished]
            sched.abort_request(rng.choice(live).request_id)
        out = sched.schedule()
        bm.check_invariants()
        sampled = run_chunks(out)
        if out.chunks and rng.random() < 0.03:  # abort while the runner is busy
            sched.abort_request(rng.choice(out.chunks).request_id)
        sched.update(out, sampled)
        bm.check_invariants()
        for request in submitted:
            if request.status is RequestStatus.RUNNING:
                assert len(bm.block_table(request.request_id)) == bm.num_blocks_for(request.num_computed_tokens)
                assert request.num_computed_tokens < request.num_tokens
        if step_index >= 300 and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests() and bm.num_used_blocks == 0 and bm.num_free_blocks == 12
    assert all(r.is_finished for r in submitted) and len(submitted) > 50 and rejected > 0
    assert sched.num_preemptions_total > 0
    assert (sched.prefix_cache_hit_tokens_total > 0) == prefix_caching
    for request in submitted:
        outputs, sampling = request.output_token_ids, request.sampling
        assert len(outputs) <= sampling.max_tokens
        if request.status is RequestStatus.FINISHED_LENGTH:
            assert len(outputs) == sampling.max_tokens
        elif request.status is RequestStatus.FINISHED_STOPPED:
            assert outputs[-1] == EOS and not sampling.ignore_eos


# ------------------------------------------------------------------------------------------- attention blocks


def block_request(
    request_id: str, prompt_len: int, blocks: tuple[tuple[int, int], ...], max_tokens: int = 4, first_token: int = 10
) -> Request:
    request = make_request(request_id, prompt_len, max_tokens=max_tokens, first_token=first_token)
    request.attention_blocks = blocks
    return request


def test_a_chunk_never_ends_inside_an_attention_block() -> None:
    """An image whose tokens attend both ways (Gemma 3) is prefilled in one chunk: the chunk that would end inside
    it stops at its start, and the next one takes it whole."""
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=7)
    sched.add_request(block_request("a", 16, ((3, 9),), max_tokens=2))  # image tokens 3..8
    chunks = [plan(step(sched)[0]) for _ in range(4)]
    assert chunks[:3] == [[("a", 0, 3)], [("a", 3, 7)], [("a", 10, 6)]]  # 0-2 | the image 3-8 and 9 | 10-15
    assert chunks[3] == [("a", 16, 1)]  # decode


def test_a_block_too_long_for_the_budget_is_rejected_and_one_that_does_not_fit_now_waits() -> None:
    sched = make_scheduler(num_blocks=30, max_num_batched_tokens=8)
    with pytest.raises(RequestRejected, match=r"image of 9 tokens .* raise it to at least 9"):
        sched.add_request(block_request("long", 12, ((2, 11),)))
    sched.add_request(make_request("b", 5, max_tokens=8))
    sched.add_request(block_request("c", 10, ((1, 9),), max_tokens=2))  # 8 image tokens: the whole budget
    first = plan(step(sched)[0])
    assert first == [("b", 0, 5), ("c", 0, 1)]  # c stops before its image: 3 tokens left would split it
    second = plan(step(sched)[0])
    assert second == [("b", 5, 1)]  # b decodes; c's 8-token image does not fit the 7 tokens left: it waits
    # ... until nothing else runs: b finishes after 8 tokens, then c's image gets a whole step.
    for _ in range(8):
        out, _ = step(sched)
        if ("c", 1, 8) in plan(out):
            break
    else:
        raise AssertionError("the image's chunk was never scheduled")


def test_a_prefix_hit_inside_a_block_resumes_with_the_rest_of_the_block() -> None:
    """Blocks cached up to the middle of an image: the next request computes the image's rest in one chunk."""
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=16)
    image = ImageSpan(key="k" * 64, offset=2, length=8)
    first = block_request("a", 14, ((2, 10),), max_tokens=1)
    first.image_spans = (image,)
    sched.add_request(first)
    while sched.has_unfinished_requests():
        step(sched)
    again = block_request("b", 14, ((2, 10),), max_tokens=1)
    again.image_spans = (image,)
    sched.add_request(again)
    out, _ = step(sched)
    assert plan(out) == [("b", 12, 2)]  # hit: 3 full blocks of 4 (tokens 0-11), past the image's end
    third = block_request("c", 14, ((2, 10),), max_tokens=1, first_token=10)
    third.prompt_token_ids[11] = 999  # differs in the 3rd block: the hit stops at token 8, inside the image
    third = Request("c", third.prompt_token_ids, third.sampling, image_spans=(image,), attention_blocks=((2, 10),))
    sched.add_request(third)
    out, _ = step(sched)
    assert plan(out) == [("c", 8, 6)]  # resumes inside the image [2, 10) and takes its rest (8, 9) and beyond
