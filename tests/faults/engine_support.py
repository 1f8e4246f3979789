"""What the engine and client fault tests share: step hooks that fail or hold one engine step, a generator
server on a private loop, and the checks every fault case ends with (nothing leaked, still SERVING).

Faults go in through `LLMEngine.step_hook`, the engine's own seam: it is called on the engine thread at the start
of each step with the ids of the requests that step computes, so a hook can pick the step by its contents (which
request, how far along) and either raise (a failed step) or block (the engine held still while the test acts).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator_service.engine.llm_engine import LLMEngine
from generator_service.engine.request import Request
from protos import generator_pb2, generator_pb2_grpc
from tests.generator_service.support import (
    EventLoopThread,
    RunningGenerator,
    StreamResult,
    collect,
    generate,
    generator_config,
    request,
    run_client,
    wait_until,
)

HOLD_TIMEOUT_S = 30.0  # a held step never waits longer than this, so a broken test cannot hang the engine
SETTLE_TIMEOUT_S = 10.0
StepPredicate = Callable[[LLMEngine, Sequence[str]], bool]


class InjectedStepError(RuntimeError):
    """What a failing step hook raises (an ordinary error: the step's requests fail, the engine goes on)."""


class FatalEngineError(BaseException):
    """What a fatal step hook raises: not an Exception, so nothing below the engine thread's top may swallow it."""


def request_of(engine: LLMEngine, request_id: str) -> Request | None:
    """The scheduler's view of an unfinished request (call it on the engine thread, i.e. inside a hook)."""
    return engine.scheduler.get_request(request_id)


def decoding(request_id: str, num_output_tokens: int) -> StepPredicate:
    """The step that computes `request_id`'s token number `num_output_tokens + 1` (it has that many so far)."""

    def predicate(engine: LLMEngine, scheduled: Sequence[str]) -> bool:
        request = request_of(engine, request_id)
        return request_id in scheduled and request is not None and request.num_output_tokens == num_output_tokens

    return predicate


def decoding_any(num_output_tokens: int) -> StepPredicate:
    """The first step that computes token number `num_output_tokens + 1` of any request: it comes before any
    longer request can finish, whatever order the requests arrived in."""

    def predicate(engine: LLMEngine, scheduled: Sequence[str]) -> bool:
        requests = (request_of(engine, request_id) for request_id in scheduled)
        return any(request is not None and request.num_output_tokens == num_output_tokens for request in requests)

    return predicate


def prefilling(request_id: str) -> StepPredicate:
    """A step that computes a prompt chunk of `request_id` after its first (chunked prefill under way)."""

    def predicate(engine: LLMEngine, scheduled: Sequence[str]) -> bool:
        request = request_of(engine, request_id)
        return (
            request_id in scheduled
            and request is not None
            and 0 < request.num_computed_tokens < request.num_prompt_tokens
        )

    return predicate


class StepTrap:
    """A step hook (a trap) acting once, at the first step `when` picks; it records the ids of every step it saw.

    `fail=True`: that step raises `error` (an `InjectedStepError` unless given). Otherwise the engine thread is
    held there until `release()`, so the test can act (cancel a client, kill it) while the request is in exactly
    that phase. `fired` is set when the step was picked.
    """

    def __init__(self, when: StepPredicate, *, fail: bool = False, error: BaseException | None = None) -> None:
        self.when = when
        self.fail = fail or error is not None
        self.error = error
        self.fired = threading.Event()
        self.steps: list[tuple[str, ...]] = []  # the ids of each step seen, in order
        self.fired_step: tuple[str, ...] = ()
        self._fired_index = 0
        self._released = threading.Event()
        self._engine: LLMEngine | None = None

    def install(self, engine: LLMEngine) -> StepTrap:
        self._engine = engine
        engine.step_hook = self
        return self

    def __call__(self, scheduled: Sequence[str]) -> None:
        assert self._engine is not None
        ids = tuple(scheduled)
        self.steps.append(ids)
        if self.fired.is_set() or not self.when(self._engine, ids):
            return
        self.fired_step = ids
        self._fired_index = len(self.steps) - 1
        self.fired.set()
        if self.fail:
            raise self.error if self.error is not None else InjectedStepError("injected step failure")
        self._released.wait(HOLD_TIMEOUT_S)

    def wait_fired(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        if not self.fired.wait(timeout):
            raise AssertionError(f"no engine step matched within {timeout:g} s (steps seen: {self.steps[-5:]})")

    def release(self) -> None:
        self._released.set()

    def scheduled_ever(self, request_id: str) -> bool:
        return any(request_id in step for step in self.steps)

    def scheduled_after_firing(self, request_id: str) -> bool:
        """Whether a step after the picked one computed `request_id` (an abort lands at the next step boundary)."""
        return self.fired.is_set() and any(request_id in step for step in self.steps[self._fired_index + 1 :])


# ---------------------------------------------------------------------------------------------------------------
# Generator servers


class Generators:
    """Starts in-process generators (with `tests.generator_service.support.generator_config` kwargs) on one
    private loop, and stops them after the test."""

    def __init__(self, loop: EventLoopThread, model: Path) -> None:
        self.loop = loop
        self.model = model
        self.started: list[RunningGenerator] = []

    def start(self, **kwargs: object) -> RunningGenerator:
        generator = RunningGenerator(self.loop, generator_config(self.model, **kwargs))  # type: ignore[arg-type]
        self.started.append(generator)
        return generator

    def stop_all(self) -> None:
        for generator in self.started:
            generator.stop()


# Fixtures: a test module imports these functions (`fault_loop_fixture`, `generators_fixture`, marked noqa F401);
# pytest registers them under their `name`.
@pytest.fixture(scope="module", name="fault_loop")
def fault_loop_fixture() -> Iterator[EventLoopThread]:
    loop = EventLoopThread()
    yield loop
    loop.close()


@pytest.fixture(name="generators")
def generators_fixture(fault_loop: EventLoopThread, tiny_checkpoint: Path) -> Iterator[Generators]:
    started = Generators(fault_loop, tiny_checkpoint)
    yield started
    started.stop_all()


def engine_of(generator: RunningGenerator) -> LLMEngine:
    assert generator.server.engine is not None, "the generator has no engine (not loaded?)"
    return generator.server.engine.engine


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def wait_health(address: str, status: int, timeout: float = 5.0) -> float:
    """Seconds until health reports `status` (fails the test after `timeout`)."""
    started = time.monotonic()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    wait_until(lambda: health(address) == status, timeout, f"health {name}")
    return time.monotonic() - started


def assert_settled(generator: RunningGenerator, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Nothing left behind: no call in flight, no request in the engine, every KV block free (the engine's
    stats snapshot, which the metrics serve, agrees with the block manager), and health SERVING."""
    wait_until(
        lambda: (
            generator.server.num_in_flight == 0
            and generator.kv_blocks_used() == 0
            and generator.metric("mmserve_requests_running") == 0
            and generator.metric("mmserve_requests_waiting") == 0
        ),
        timeout,
        "the generator to hold no call, no request and no KV block",
    )
    engine = engine_of(generator)
    wait_until(lambda: not engine.has_unfinished_requests(), timeout, "the engine to track no request")
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0
    assert health(generator.address) == health_pb2.HealthCheckResponse.SERVING


def assert_serves_exactly(
    generator: RunningGenerator, message: generator_pb2.GenerateRequest, tokens: list[int]
) -> None:
    """A request after the fault gets the fault-free tokens."""
    after = generate(generator.address, message, timeout=30)
    assert after.code == grpc.StatusCode.OK, after.details
    assert after.token_ids == tokens


def greedy(prompt: str, max_tokens: int, request_id: str = "") -> generator_pb2.GenerateRequest:
    """A greedy request of exactly `max_tokens` tokens (EOS ignored, so lengths do not depend on the weights)."""
    return request(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=request_id)


def fault_free(generator: RunningGenerator, messages: Sequence[generator_pb2.GenerateRequest]) -> list[list[int]]:
    """Each request's tokens on this generator with no fault installed (the expected answer), run concurrently."""

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> list[StreamResult]:
        return list(await asyncio.gather(*(collect(stub, message, timeout=60) for message in messages)))

    results = run_client(generator.address, run)
    for result in results:
        assert result.code == grpc.StatusCode.OK, result.details
    return [result.token_ids for result in results]
