"""Engine faults: a step that raises fails only the requests it was computing; a fatal error stops the engine and
every stream ends with a defined status while health turns NOT_SERVING.

Faults are injected through `LLMEngine.step_hook` (see tests/faults/engine_support.py), never by replacing engine
methods, so the engine's own failure handling (abort through the scheduler, blocks freed) is what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from common.config import EngineConfig, ModelConfig
from generator_service.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from generator_service.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from generator_service.engine.sampling_params import SamplingParams
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER
from tests.faults.engine_support import (  # noqa: F401  (fixtures)
    FatalEngineError,
    Generators,
    StepTrap,
    assert_serves_exactly,
    assert_settled,
    decoding,
    decoding_any,
    engine_of,
    fault_free,
    fault_loop_fixture,
    generators_fixture,
    greedy,
    prefilling,
    wait_health,
)
from tests.generator_service.support import StreamResult, collect, run_client

pytestmark = pytest.mark.faults
PROMPTS = [f"USER: tell story number {i} about a cat ASSISTANT:" for i in range(4)]
INTERNAL_DETAILS = "the engine failed on this request"


# ---------------------------------------------------------------------------------------------------------------
# The engine alone (no threads, no network)


@pytest.fixture
def llm_engine(tiny_checkpoint: Path) -> LLMEngine:
    # 8-token budget: a 20-token prompt is prefilled in three chunks, next to the others' decodes.
    config = EngineConfig(
        model=ModelConfig(str(tiny_checkpoint), enforce_eager=ENFORCE_EAGER),
        block_size=4,
        num_kv_blocks=64,
        max_model_len=64,
        max_num_seqs=2,
        max_num_batched_tokens=8,
    )
    return LLMEngine.from_config(config)


def _engine_request(index: int, max_tokens: int = 6) -> EngineRequest:
    prompt = [1] + [40 + 7 * index + k for k in range(19)]  # 20 tokens, different per request
    return EngineRequest(f"r{index}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_failed_step_fails_its_requests_and_the_rest_stay_exact(llm_engine: LLMEngine) -> None:
    """A step that raises halfway through a chunked prefill: the requests of that step end with "error", the
    others' tokens are exactly the fault-free ones, no block leaks (invariants after every step), and the failed
    prompt run again gives the fault-free tokens (its half-written KV never entered the prefix cache)."""
    expected = {
        rid: tokens(outputs) for rid, outputs in drive(llm_engine, {0: [_engine_request(i) for i in range(3)]}).items()
    }
    hook = StepTrap(prefilling("r1"), fail=True).install(llm_engine)
    outputs = drive(llm_engine, {0: [_engine_request(i) for i in range(3)]})

    failed = set(hook.fired_step)
    assert "r1" in failed and "r2" not in failed  # r2 waits (max_num_seqs 2) while r0 and r1 run
    for rid, stream in outputs.items():
        if rid in failed:
            assert stream[-1].finish_reason == "error"
            assert tokens(stream) == expected[rid][: len(tokens(stream))]
        else:
            assert stream[-1].finish_reason == "length" and tokens(stream) == expected[rid]
    assert llm_engine.num_consecutive_failed_steps == 0  # the steps after the failure succeeded
    assert not llm_engine.has_unfinished_requests() and llm_engine.scheduler.num_running == 0

    llm_engine.step_hook = None
    again = drive(llm_engine, {0: [_engine_request(1)]})
    assert tokens(again["r1"]) == expected["r1"]


def test_a_failed_request_id_is_free_at_once(llm_engine: LLMEngine) -> None:
    """A failed step that was the engine's last leaves the scheduler's abort notice for the next step; a new request
    reusing the id right away must not be taken for the aborted one (it runs to its fault-free tokens)."""
    expected = tokens(drive(llm_engine, {0: [_engine_request(0)]})["r0"])
    StepTrap(decoding("r0", 1), fail=True).install(llm_engine)
    failed = drive(llm_engine, {0: [_engine_request(0)]})["r0"]
    assert failed[-1].finish_reason == "error" and tokens(failed) == expected[:1]
    llm_engine.step_hook = None
    assert tokens(drive(llm_engine, {0: [_engine_request(0)]})["r0"]) == expected
    # The id reused and aborted before the next step: the notice lists it twice, the request ends once.
    StepTrap(decoding("r0", 1), fail=True).install(llm_engine)
    drive(llm_engine, {0: [_engine_request(0)]})
    llm_engine.step_hook = None
    llm_engine.add_request(_engine_request(0))
    llm_engine.abort_request("r0")
    (ended,) = llm_engine.step()
    assert ended.finish_reason == "abort" and not llm_engine.has_unfinished_requests()
    assert llm_engine.block_manager.num_used_blocks == 0


async def _outcome(engine: AsyncEngine, request: EngineRequest) -> list[RequestOutput] | BaseException:
    try:
        return [output async for output in engine.generate(request)]
    except (RequestFailedError, EngineDeadError) as exc:
        return exc


@contextlib.contextmanager
def _async_engine(engine: LLMEngine, max_consecutive_failed_steps: int = 3) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(engine, max_consecutive_failed_steps=max_consecutive_failed_steps)
    async_engine.start()
    try:
        yield async_engine
    finally:
        async_engine.shutdown()


def test_consecutive_failed_steps_stop_the_engine(llm_engine: LLMEngine) -> None:
    """Every step fails (a broken device): the first two failed requests get RequestFailedError, the third failed
    step in a row stops the engine thread, and every request still in flight or arriving gets EngineDeadError."""
    llm_engine.step_hook = _always_fail
    with _async_engine(llm_engine, max_consecutive_failed_steps=3) as async_engine:

        async def main() -> list[list[RequestOutput] | BaseException]:
            requests = [_engine_request(i, max_tokens=4) for i in range(4)]
            return await asyncio.wait_for(asyncio.gather(*(_outcome(async_engine, r) for r in requests)), 30)

        outcomes = asyncio.run(main())
        assert sum(isinstance(outcome, RequestFailedError) for outcome in outcomes) == 3
        assert all(isinstance(outcome, RequestFailedError | EngineDeadError) for outcome in outcomes)
        assert not async_engine.is_alive
        assert llm_engine.num_consecutive_failed_steps == 3


def _always_fail(scheduled: object) -> None:
    raise RuntimeError("the device is gone")


def test_a_failure_between_successes_does_not_stop_the_engine(llm_engine: LLMEngine) -> None:
    """Failures that are not consecutive never reach the limit (2 here): three failed steps, each followed by a
    good one, leave the engine alive and every block free."""
    with _async_engine(llm_engine, max_consecutive_failed_steps=2) as async_engine:

        async def main() -> None:
            for index in range(3):
                hook = StepTrap(decoding(f"r{index}", 2), fail=True).install(llm_engine)
                failed = await asyncio.wait_for(_outcome(async_engine, _engine_request(index)), 30)
                assert isinstance(failed, RequestFailedError) and failed.request_id == f"r{index}"
                assert hook.fired_step == (f"r{index}",)
                llm_engine.step_hook = None
                good = await asyncio.wait_for(_outcome(async_engine, _engine_request(index + 10, 2)), 30)
                assert isinstance(good, list) and good[-1].finish_reason == "length"

        asyncio.run(main())
        assert async_engine.is_alive
        assert async_engine.stats().kv_blocks_used == 0 and llm_engine.block_manager.num_used_blocks == 0


def test_a_failing_abort_after_a_failed_step_is_fatal(llm_engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the engine cannot even abort the failed step's requests, its state is unknown: the thread stops and
    every stream ends with EngineDeadError (never a hang). The scheduler's abort is patched to raise: a real
    scheduler cannot be made to fail on demand."""

    def broken_abort(request_id: str) -> None:
        raise RuntimeError("bookkeeping is broken")

    with _async_engine(llm_engine) as async_engine:
        StepTrap(decoding("r0", 1), fail=True).install(llm_engine)
        monkeypatch.setattr(llm_engine.scheduler, "abort_request", broken_abort)

        async def main() -> list[list[RequestOutput] | BaseException]:
            requests = [_engine_request(i, max_tokens=20) for i in range(3)]
            return await asyncio.wait_for(asyncio.gather(*(_outcome(async_engine, r) for r in requests)), 30)

        outcomes = asyncio.run(main())
        assert all(isinstance(outcome, EngineDeadError) for outcome in outcomes), outcomes
        assert not async_engine.is_alive


# ---------------------------------------------------------------------------------------------------------------
# Through the gRPC generator server


@pytest.mark.parametrize("max_num_seqs", [1, 2], ids=["alone-in-its-step", "batched-with-another"])
def test_failed_step_over_grpc_fails_only_its_streams(generators: Generators, max_num_seqs: int) -> None:
    """Four concurrent streams; the step computing `s1`'s third token raises. Alone in its step (max_num_seqs 1),
    only `s1` fails; batched, exactly the requests of that step fail. Failed streams end INTERNAL with a message
    free of internals, the others finish OK with the fault-free tokens, and the server keeps serving."""
    generator = generators.start(max_num_seqs=max_num_seqs)
    messages = [greedy(prompt, 10, request_id=f"s{i}") for i, prompt in enumerate(PROMPTS)]
    expected = fault_free(generator, messages)
    hook = StepTrap(decoding("s1", 2), fail=True).install(engine_of(generator))

    async def run(stub: object) -> list[StreamResult]:
        return list(await asyncio.gather(*(collect(stub, message, timeout=30) for message in messages)))  # type: ignore[arg-type]

    results = run_client(generator.address, run)
    failed = set(hook.fired_step)
    assert "s1" in failed and len(failed) <= max_num_seqs
    if max_num_seqs == 1:
        assert failed == {"s1"}
    for index, result in enumerate(results):
        if f"s{index}" in failed:
            assert result.code == grpc.StatusCode.INTERNAL
            assert INTERNAL_DETAILS in result.details and f"s{index}" in result.details
            assert "Traceback" not in result.details and "injected" not in result.details
            assert result.token_ids == expected[index][: len(result.token_ids)]
        else:
            assert result.code == grpc.StatusCode.OK, result.details
            assert result.token_ids == expected[index]
    assert len(results[1].token_ids) == 2  # it streamed two tokens before its third step failed
    assert generator.metric("mmserve_requests_total", {"status": "INTERNAL"}) == len(failed)
    assert_settled(generator)
    assert_serves_exactly(generator, messages[1], expected[1])
    assert engine_of(generator).num_consecutive_failed_steps == 0  # a good step resets the count


def test_fatal_engine_error_ends_every_stream_and_turns_health_off(generators: Generators) -> None:
    """A fatal error (not an Exception) in a step kills the engine thread: every stream, running or queued, ends
    UNAVAILABLE within a bound, health turns NOT_SERVING (the server's watchdog), and new calls are refused."""
    generator = generators.start(max_num_seqs=2)
    # Any request's third token: the calls arrive in no fixed order, and with 2 slots a request the test named could
    # start only after two others had already finished.
    hook = StepTrap(decoding_any(2), error=FatalEngineError("device lost")).install(engine_of(generator))
    messages = [greedy(prompt, 200, request_id=f"s{i}") for i, prompt in enumerate(PROMPTS)]

    async def run(stub: object) -> list[StreamResult]:
        return list(await asyncio.gather(*(collect(stub, message, timeout=30) for message in messages)))  # type: ignore[arg-type]

    started = time.monotonic()
    results = run_client(generator.address, run)
    assert time.monotonic() - started < 10
    assert hook.fired.is_set()
    for result in results:
        assert result.code == grpc.StatusCode.UNAVAILABLE, (result.code, result.details)
        assert "engine" in result.details and "Traceback" not in result.details
    assert wait_health(generator.address, health_pb2.HealthCheckResponse.NOT_SERVING) < 5
    assert generator.server.engine is not None and not generator.server.engine.is_alive
    refused = run_client(generator.address, lambda stub: collect(stub, greedy(PROMPTS[0], 2), timeout=10))
    assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.messages == 0
    assert generator.server.num_in_flight == 0
