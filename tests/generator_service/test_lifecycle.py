"""Cancels, deadlines and admission control: statuses, and every KV block back once streams end."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.checkpoint import encoder_fingerprint
from generator_service.engine.llm_engine import LLMEngine, RequestOutput
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.generator_service.conftest import Stack, StartGenerator
from tests.generator_service.support import (
    PROMPT,
    EventLoopThread,
    Reference,
    RunningGenerator,
    StreamResult,
    collect,
    generate,
    png_bytes,
    request,
    run_client,
    until,
    wait_until,
)

STEP_DELAY_S = 0.01
LONG = 1000  # tokens: at STEP_DELAY_S per step, a stream that is not aborted runs for more than 10 s


def slow_engine(generator: RunningGenerator, delay_s: float = STEP_DELAY_S) -> None:
    """Each engine step takes at least `delay_s`, so a LONG stream that was not aborted would still be running."""
    assert generator.server.engine is not None
    engine: LLMEngine = generator.server.engine.engine
    step: Callable[[], list[RequestOutput]] = engine.step

    def delayed_step() -> list[RequestOutput]:
        time.sleep(delay_s)
        return step()

    engine.step = delayed_step  # type: ignore[method-assign]


def _assert_released_quickly(generator: RunningGenerator, started: float) -> None:
    # A LONG stream left running would hold its blocks for LONG * STEP_DELAY_S = 10 s; aborted ones free at once.
    generator.wait_idle(timeout=5.0)
    assert time.monotonic() - started < LONG * STEP_DELAY_S
    stats = generator.server.engine.stats() if generator.server.engine is not None else None
    assert stats is not None and stats.requests_running == 0 and stats.requests_waiting == 0


def test_cancel_half_of_32_streams(stack: Stack, start_generator: StartGenerator, reference: Reference) -> None:
    generator = start_generator(encoder_address=stack.encoder.address, num_kv_blocks=4096)
    slow_engine(generator)
    rng = random.Random(0)
    prompts = [(PROMPT, [png_bytes(seed)]) for seed in range(3)] + [("USER: tell me a story ASSISTANT:", [])]
    plan = []  # (prompt, images, cancel_after or None)
    for index in range(32):
        prompt, images = prompts[index % len(prompts)]
        plan.append((prompt, images, rng.randint(0, 8) if index % 2 else None))

    async def one(
        stub: generator_pb2_grpc.GeneratorStub, prompt: str, images: list[bytes], cancel: int | None
    ) -> StreamResult:
        if cancel is None:
            return await collect(stub, request(prompt, images, max_tokens=8))
        message = request(prompt, images, max_tokens=LONG, ignore_eos=True)
        if cancel == 0:  # cancelled before any token: while queued, being encoded or prefilled
            call = stub.Generate(message, timeout=60)
            await asyncio.sleep(rng.random() * 0.05)
            call.cancel()
            return StreamResult(code=grpc.StatusCode.CANCELLED)
        return await collect(stub, message, cancel_after=cancel)

    results = run_client(generator.address, lambda stub: asyncio.gather(*(one(stub, *item) for item in plan)))
    started = time.monotonic()
    for (prompt, images, cancel), result in zip(plan, results, strict=True):
        if cancel is None:
            assert result.code == grpc.StatusCode.OK, result.details
            assert result.token_ids == reference.generate(prompt, images, 8)
        else:
            assert result.code == grpc.StatusCode.CANCELLED
            assert result.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED
    _assert_released_quickly(generator, started)
    # Every stream cancelled after its first message reached the server; one cancelled at once may not have.
    streamed = sum(1 for _, _, cancel in plan if cancel)
    cancelled = generator.metric("mmserve_requests_total", {"status": "CANCELLED"})
    assert streamed <= cancelled <= 16
    assert generator.metric("mmserve_requests_total", {"status": "OK"}) == 16


def test_deadlines_abort_like_cancels(stack: Stack, start_generator: StartGenerator, reference: Reference) -> None:
    generator = start_generator(encoder_address=stack.encoder.address, num_kv_blocks=4096)
    slow_engine(generator)

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> list[StreamResult]:
        short = [
            collect(stub, request(PROMPT, [png_bytes(i)], max_tokens=LONG, ignore_eos=True), timeout=0.2 + 0.05 * i)
            for i in range(8)
        ]
        normal = [collect(stub, request(PROMPT, [png_bytes(i)], max_tokens=6), timeout=60) for i in range(8)]
        return await asyncio.gather(*short, *normal)

    results = run_client(generator.address, run)
    started = time.monotonic()
    for result in results[:8]:
        assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for index, result in enumerate(results[8:]):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == reference.generate(PROMPT, [png_bytes(index)], 6)
    _assert_released_quickly(generator, started)
    wait_until(lambda: generator.metric("mmserve_requests_total", {"status": "DEADLINE_EXCEEDED"}) == 8)


async def _first_message(call: grpc.aio.UnaryStreamCall) -> str:
    """ "STREAMING" once the call's first message arrives, else the status it ended with (before any message)."""
    try:
        message = await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "STREAMING" if isinstance(message, generator_pb2.GenerateResponse) else "ENDED"


def test_admission_control_rejects_before_any_work(stack: Stack, start_generator: StartGenerator) -> None:
    # Capacity: max_num_seqs (2) + max_queue_len (2) = 4 calls in flight.
    generator = start_generator(encoder_address=stack.encoder.address, max_num_seqs=2, max_queue_len=2)
    slow_engine(generator)
    encodes_before = stack.encoder.metric("mmserve_encoder_requests_total", {"code": "OK"})

    def long(prompt: str, images: list[bytes] | None = None) -> generator_pb2.GenerateRequest:
        return request(prompt, images or [], max_tokens=400, ignore_eos=True)

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[list[str], tuple[StreamResult, StreamResult]]:
        # Two running (max_num_seqs) and one waiting in the engine's queue.
        holders = [stub.Generate(long(f"USER: story {i} ASSISTANT:"), timeout=60) for i in range(3)]
        await until(lambda: generator.server.num_in_flight == 3, what="3 calls in flight")
        # A burst at the limit - 1 boundary: exactly one more is admitted, the others are refused at once.
        burst = [stub.Generate(long(PROMPT, [png_bytes(500 + i)]), timeout=60) for i in range(6)]
        tasks = [asyncio.ensure_future(_first_message(call)) for call in burst]
        await until(lambda: sum(task.done() for task in tasks) == 5, what="5 refusals")
        assert generator.server.num_in_flight == 4  # the sixth is admitted, queued behind the running two
        outcomes = [task.result() if task.done() else "ADMITTED" for task in tasks]
        # Full house: any call, image or text, is refused before its first message.
        rejected = await asyncio.gather(
            collect(stub, request(PROMPT, [png_bytes(600)], max_tokens=2), timeout=30),
            collect(stub, request("USER: hi ASSISTANT:", max_tokens=2), timeout=30),
        )
        await until(lambda: generator.metric("mmserve_image_lookups_total", {"source": "encoder"}) == 1)
        for call in holders + burst:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the cancelled read raises CancelledError
        return outcomes, rejected

    outcomes, rejected = run_client(generator.address, run)
    assert sorted(outcomes) == ["ADMITTED"] + ["RESOURCE_EXHAUSTED"] * 5
    for result in rejected:
        assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert result.messages == 0 and "capacity" in result.details
    # Only the one admitted image request reached the encoder: refusals cost no image work.
    assert stack.encoder.metric("mmserve_encoder_requests_total", {"code": "OK"}) == encodes_before + 1
    generator.wait_idle()
    assert generator.metric("mmserve_requests_total", {"status": "RESOURCE_EXHAUSTED"}) == 7
    assert generate(generator.address, request("USER: hi ASSISTANT:", max_tokens=2)).code == grpc.StatusCode.OK


def test_engine_failure_fails_streams_and_turns_health_off(start_generator: StartGenerator) -> None:
    """An exception the engine cannot pin on the step's requests (here `step()` itself fails) ends the engine
    thread: streams end UNAVAILABLE (not hang), new calls are refused, and health says NOT_SERVING so that traffic
    moves to another replica."""
    generator = start_generator()
    assert generator.server.engine is not None
    engine: LLMEngine = generator.server.engine.engine
    step = engine.step
    calls = 0

    def failing_step() -> list[RequestOutput]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected device failure")
        return step()

    engine.step = failing_step  # type: ignore[method-assign]
    streaming = generate(generator.address, request("USER: story ASSISTANT:", max_tokens=50, ignore_eos=True))
    assert streaming.code == grpc.StatusCode.UNAVAILABLE and "engine" in streaming.details
    refused = generate(generator.address, request("USER: hi ASSISTANT:", max_tokens=2))
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "not running" in refused.details

    def health() -> int:
        with grpc.insecure_channel(generator.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    wait_until(lambda: health() == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")


def test_remaining_deadline_is_passed_to_the_encoder(
    tiny_checkpoint: Path, server_loop: EventLoopThread, start_generator: StartGenerator
) -> None:
    """The Encode call carries what is left of the client's deadline (not --encoder-timeout-s)."""
    seen: list[float | None] = []

    class RecordingEncoder(encoder_pb2_grpc.EncoderServicer):
        async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.ModelInfo:
            fingerprint = encoder_fingerprint(tiny_checkpoint, dtype="float32")
            return encoder_pb2.ModelInfo(fingerprint=fingerprint, dtype="float32")

        async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
            seen.append(context.time_remaining())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "recording only")
            raise AssertionError("unreachable")

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        encoder_pb2_grpc.add_EncoderServicer_to_server(RecordingEncoder(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    fake, port = server_loop.run(serve())
    try:
        generator = start_generator(encoder_address=f"127.0.0.1:{port}", encoder_timeout_s=30.0)
        result = generate(generator.address, request(PROMPT, [png_bytes(1)], max_tokens=2), timeout=4.0)
        assert result.code == grpc.StatusCode.UNAVAILABLE
        (remaining,) = seen
        assert remaining is not None and 0 < remaining <= 4.1  # the wire format rounds deadlines up a little
        no_deadline = generate(generator.address, request(PROMPT, [png_bytes(2)], max_tokens=2), timeout=None)
        assert no_deadline.code == grpc.StatusCode.UNAVAILABLE
        assert seen[1] is not None and 4.0 < seen[1] <= 31.0  # no client deadline: --encoder-timeout-s (30 s)
    finally:
        server_loop.run(fake.stop(0))
