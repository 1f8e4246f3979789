"""Clients that leave: a cancel in every phase of a request (queued, encoding, prefill, decode, on the last token,
cancelled twice), a client whose channel closes or whose process dies mid-stream, and SIGTERM while streams run.

Each phase is reached deterministically: a step hook (tests/faults/engine_support.py) holds the engine thread at the
step where the request is in that phase, the client cancels, the server's handler sees the cancel (its CANCELLED
count goes up while the engine is still held), and only then does the engine go on. After every case: the other
streams got their fault-free tokens, the cancelled request was never computed again, nothing is left in the engine,
every KV block is free, health is SERVING, and a following request gets the fault-free tokens.

What existed before (tests/generator_service): cancels at random points of 32 streams and deadlines
(test_lifecycle.py), a cancel while an image is at the encoder, timed by a big image (test_errors.py), an aborted
engine stream freeing its blocks (tests/engine/test_async_engine.py), offline aborts in chosen phases
(tests/families/support.py), and SIGTERM with one short and one long stream (test_shutdown.py). These tests add the
phases held exactly, over gRPC, and the cases those do not reach.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from common.checkpoint import encoder_fingerprint
from generator_service.engine.llm_engine import LLMEngine
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.faults.engine_support import (  # noqa: F401  (fixtures)
    Generators,
    StepPredicate,
    StepTrap,
    assert_serves_exactly,
    assert_settled,
    decoding,
    engine_of,
    fault_free,
    fault_loop_fixture,
    generators_fixture,
    greedy,
    health,
    prefilling,
    request_of,
)
from tests.generator_service.support import (
    PROMPT,
    EventLoopThread,
    RunningGenerator,
    StreamResult,
    collect,
    png_bytes,
    request,
    run_client,
    until,
    wait_until,
)
from tests.grpc_support import generator_process as start_generator_process

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
TARGET = "target"
MAX_TOKENS = 12
LONG_PROMPT = "USER: " + " ".join(f"word{i}" for i in range(24)) + " ASSISTANT:"  # several 8-token prefill chunks
SURVIVORS = [greedy(f"USER: survivor {i} tells a story ASSISTANT:", 40, request_id=f"survivor{i}") for i in range(2)]
FOLLOWING = greedy("USER: and after that? ASSISTANT:", 6, request_id="following")


def _queued(engine: LLMEngine, scheduled: Sequence[str]) -> bool:
    """The target is in the engine's waiting queue: known to the scheduler, not computed in this step."""
    return request_of(engine, TARGET) is not None and TARGET not in scheduled


# phase -> (target prompt, survivors running first, the step to hold, cancels sent)
PHASES: dict[str, tuple[str, int, StepPredicate, int]] = {
    "queued": ("USER: queued ASSISTANT:", 2, _queued, 1),
    "prefill": (LONG_PROMPT, 1, prefilling(TARGET), 1),
    "decode": ("USER: decode ASSISTANT:", 1, decoding(TARGET, 3), 1),
    "last-token": ("USER: last ASSISTANT:", 1, decoding(TARGET, MAX_TOKENS - 1), 1),
    "decode-cancelled-twice": ("USER: twice ASSISTANT:", 1, decoding(TARGET, 2), 2),
}


async def _read_all(call: grpc.aio.UnaryStreamCall) -> StreamResult:
    """Read a call to its end; a cancel made by this test ends it as CANCELLED."""
    result = StreamResult()
    try:
        async for response in call:
            result.add(response)
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code(), exc.details() or ""
    except asyncio.CancelledError:  # grpc.aio raises this in the reader when the call was cancelled locally
        result.code = grpc.StatusCode.CANCELLED
    return result


def _cancelled_count(generator: RunningGenerator) -> float:
    return generator.metric("mmserve_requests_total", {"status": "CANCELLED"})


@pytest.mark.parametrize("phase", list(PHASES))
def test_cancel_in_phase(generators: Generators, phase: str) -> None:
    """The client cancels while its request is held in `phase`, next to running survivors (see the module doc)."""
    prompt, num_survivors, hold_at, num_cancels = PHASES[phase]
    # Two running at most (a third request waits); an 8-token budget prefills LONG_PROMPT in chunks.
    generator = generators.start(max_num_seqs=2, max_num_batched_tokens=8)
    target = greedy(prompt, MAX_TOKENS, request_id=TARGET)
    survivors = SURVIVORS[:num_survivors]
    *expected, expected_target, expected_following = fault_free(generator, [*survivors, target, FOLLOWING])
    hook = StepTrap(hold_at).install(engine_of(generator))

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[list[StreamResult], StreamResult, list[bool]]:
        running = [asyncio.ensure_future(collect(stub, message, timeout=60)) for message in survivors]
        await until(lambda: generator.metric("mmserve_requests_running") == num_survivors, what="survivors running")
        call = stub.Generate(target, timeout=60)
        reader = asyncio.ensure_future(_read_all(call))
        try:
            await asyncio.to_thread(hook.wait_fired)  # the engine is held with the target in `phase`
            cancels = [call.cancel() for _ in range(num_cancels)]
            await until(lambda: _cancelled_count(generator) == 1, what="the server to see the cancel")
        finally:
            hook.release()
        return list(await asyncio.gather(*running)), await reader, cancels

    survived, cancelled, cancels = run_client(generator.address, run)
    assert cancels == [True] + [False] * (num_cancels - 1)  # a second cancel of an ended call is a no-op
    assert cancelled.code == grpc.StatusCode.CANCELLED
    assert cancelled.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED
    assert cancelled.token_ids == expected_target[: len(cancelled.token_ids)]
    if phase in ("queued", "prefill"):
        assert cancelled.token_ids == []
    for result, tokens in zip(survived, expected, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == tokens
    # The abort lands at the next step boundary: the target is never computed after the held step.
    assert not hook.scheduled_after_firing(TARGET)
    if phase == "queued":
        assert not hook.scheduled_ever(TARGET)
    assert_settled(generator)
    assert _cancelled_count(generator) == 1
    assert_serves_exactly(generator, FOLLOWING, expected_following)


# ---------------------------------------------------------------------------------------------------------------
# Cancel while the image is at the encoder


class _HeldEncoder(encoder_pb2_grpc.EncoderServicer):
    """An encoder service whose Encode is held until `released` (at most 30 s), then fails UNAVAILABLE."""

    def __init__(self, model: Path) -> None:
        self.fingerprint = encoder_fingerprint(model, dtype="float32")
        self.entered = threading.Event()
        self.released = threading.Event()
        self.answered = threading.Event()

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.ModelInfo:
        return encoder_pb2.ModelInfo(fingerprint=self.fingerprint, dtype="float32")

    async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        self.entered.set()
        try:
            await asyncio.to_thread(self.released.wait, 30)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "held encoder released")
        finally:
            self.answered.set()
        raise AssertionError("unreachable")


@pytest.fixture
def held_encoder(fault_loop: EventLoopThread, tiny_checkpoint: Path) -> Iterator[tuple[_HeldEncoder, str]]:
    servicer = _HeldEncoder(tiny_checkpoint)

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = fault_loop.run(serve())
    yield servicer, f"127.0.0.1:{port}"
    fault_loop.run(server.stop(0))


def test_cancel_while_encoding(generators: Generators, held_encoder: tuple[_HeldEncoder, str]) -> None:
    """Cancelled while its image is at the encoder: the call ends at once (the server releases it while the encode
    is still held), the encode's late outcome lands nowhere, and the request never reaches the engine.

    The encode itself is not cancelled: it is a shared flight that other requests for the same image may have
    joined (common/images/provider.py), so it runs to its end."""
    encoder, address = held_encoder
    generator = generators.start(encoder_address=address)
    (expected_following,) = fault_free(generator, [FOLLOWING])
    hook = StepTrap(lambda engine, scheduled: False).install(engine_of(generator))  # records the steps only

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> StreamResult:
        call = stub.Generate(request(PROMPT, [png_bytes(7)], max_tokens=MAX_TOKENS, request_id=TARGET), timeout=60)
        reader = asyncio.ensure_future(_read_all(call))
        assert await asyncio.to_thread(encoder.entered.wait, 10), "the image never reached the encoder"
        call.cancel()
        return await reader

    try:
        cancelled = run_client(generator.address, run)
        assert cancelled.code == grpc.StatusCode.CANCELLED and cancelled.messages == 0
        wait_until(
            lambda: _cancelled_count(generator) == 1 and generator.server.num_in_flight == 0,
            what="the server to end the cancelled call",
        )
        assert not encoder.answered.is_set()  # ended while the encode was still running
    finally:
        encoder.released.set()
    assert encoder.answered.wait(10)
    assert not hook.scheduled_ever(TARGET)
    assert_settled(generator)
    assert_serves_exactly(generator, FOLLOWING, expected_following)


# ---------------------------------------------------------------------------------------------------------------
# Clients that vanish without a cancel

_CLIENT = """
import sys, grpc
from protos import generator_pb2, generator_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
message = generator_pb2.GenerateRequest.FromString(sys.stdin.buffer.read())
for response in generator_pb2_grpc.GeneratorStub(channel).Generate(message, timeout=60):
    print(len(response.token_ids), flush=True)  # the test kills us once the first token is out
"""


def _vanish_by_killing(address: str, message: generator_pb2.GenerateRequest, hook: StepTrap) -> None:
    """A client process mid-stream is SIGKILLed: its TCP connection closes with no cancel sent."""
    process = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, address], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(message.SerializeToString())
        process.stdin.close()
        assert process.stdout.readline().strip() == b"1", "the client got no first token"
        hook.wait_fired()
        process.kill()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def _vanish_by_closing(address: str, message: generator_pb2.GenerateRequest, hook: StepTrap) -> None:
    """The client closes its channel mid-stream (what an application shutting down does)."""

    async def main() -> None:
        channel = grpc.aio.insecure_channel(address)
        call = generator_pb2_grpc.GeneratorStub(channel).Generate(message, timeout=60)
        await call.read()
        await asyncio.to_thread(hook.wait_fired)
        await channel.close()

    asyncio.run(main())


@pytest.mark.parametrize("vanish", [_vanish_by_closing, _vanish_by_killing], ids=["channel-closed", "process-killed"])
def test_client_that_vanishes_mid_stream(generators: Generators, vanish: Any) -> None:
    """The server notices the vanished client while the engine is held (so the stream cannot have ended by
    itself), aborts the request, and everything is back to idle."""
    generator = generators.start()
    message = greedy("USER: vanish ASSISTANT:", 200, request_id=TARGET)
    (expected_following,) = fault_free(generator, [FOLLOWING])
    hook = StepTrap(decoding(TARGET, 3)).install(engine_of(generator))
    try:
        vanish(generator.address, message, hook)
        wait_until(lambda: _cancelled_count(generator) == 1, timeout=10, what="the server to see the client go")
    finally:
        hook.release()
    assert_settled(generator)
    assert not hook.scheduled_after_firing(TARGET)
    assert_serves_exactly(generator, FOLLOWING, expected_following)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM while streams run (a real `python -m generator_service` process)

GRACE_S = 20.0  # far more than the drained streams need: the test measures how much of it they use
DRAINED_TOKENS = 100  # per stream: long enough to be running when SIGTERM lands, short enough to end in the grace


@pytest.fixture
def generator_process(tiny_checkpoint: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    args = ["--block-size", "4", "--num-kv-blocks", "1024", "--max-num-seqs", "4", "--shutdown-grace-s", str(GRACE_S)]
    with start_generator_process(tiny_checkpoint, args) as started:
        yield started


def test_sigterm_drains_running_streams_exactly(generator_process: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    """SIGTERM with three streams running: all three finish OK with exactly the fault-free tokens, a call made
    during the drain is refused UNAVAILABLE by the draining server, and the process exits 0 well within the grace
    period. (test_shutdown.py covers a stream cut off at the end of the grace period.)"""
    process, address, log_path = generator_process
    messages = [greedy(f"USER: drained story {i} ASSISTANT:", DRAINED_TOKENS) for i in range(3)]
    deadline = time.monotonic() + 90
    while True:
        try:
            if health(address) == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the generator did not report SERVING"
        time.sleep(0.1)

    sigterm_at = 0.0

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[list[list[int]], list[StreamResult], StreamResult]:
        nonlocal sigterm_at
        expected = [result.token_ids for result in await asyncio.gather(*(collect(stub, m) for m in messages))]
        calls = [stub.Generate(message, timeout=60) for message in messages]
        streams = [StreamResult() for _ in calls]
        for call, stream in zip(calls, streams, strict=True):
            stream.add(await call.read())  # every stream is running: now SIGTERM
        process.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        refused = await collect(stub, greedy("USER: late ASSISTANT:", 2), timeout=10)
        await asyncio.gather(*(_read_rest(call, stream) for call, stream in zip(calls, streams, strict=True)))
        return expected, streams, refused

    expected, drained, refused = run_client(address, run)
    assert process.wait(timeout=GRACE_S + 10) == 0, log_path.read_text()[-3000:]
    took = time.monotonic() - sigterm_at
    match = re.search(r"draining: (\d+) stream\(s\) in flight", log_path.read_text())
    assert match is not None and int(match.group(1)) == 3, "SIGTERM did not land while the three streams ran"
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details, refused.details
    for result, tokens in zip(drained, expected, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.finish_reason == generator_pb2.FINISH_REASON_LENGTH
        assert result.token_ids == tokens and len(tokens) == DRAINED_TOKENS
    assert took < GRACE_S / 2, f"exit {took:.1f} s after SIGTERM: the drain waited for the grace, not the streams"


async def _read_rest(call: grpc.aio.UnaryStreamCall, result: StreamResult) -> None:
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # read() as for the first message
            result.add(response)
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code(), exc.details() or ""
