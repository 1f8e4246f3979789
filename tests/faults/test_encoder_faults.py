"""The encoder as a real process, dying under load: SIGKILLed with Generate calls waiting on it and restarted on
the same address (the generator recovers without a restart), and one of two replicas SIGKILLed (calls fail over).

Calls are made to wait on an encoder deterministically by stopping it first (SIGSTOP: its sockets stay open,
the calls are sent and never answered), then SIGKILL ends it with those calls in flight.

    generator (in-process, embedding LRU off) ──Encode──▶ encoder process A [, encoder process B]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from encoder_service.server import SERVICE_NAME as ENCODER_SERVICE
from protos import generator_pb2, generator_pb2_grpc
from tests.faults.conftest import StartGenerator, assert_recovered, health_status
from tests.generator_service.support import (
    PROMPT,
    RunningGenerator,
    StreamResult,
    generate,
    png_bytes,
    request,
    run_client,
    until,
    wait_until,
)
from tests.grpc_support import free_port

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
ENCODER_TIMEOUT_S = 5.0
CALL_BOUND_S = ENCODER_TIMEOUT_S + 2  # every call ends, with a defined status, within this
START_TIMEOUT_S = 120.0  # imports and model load of a fresh process on a loaded 2-core machine
MAX_TOKENS = 4
LONG_TOKENS = 48  # streams that are past the encoder and still decoding when it dies


class EncoderProcess:
    """`python -m encoder_service` on a port of its own, which survives kills: `start()` again reuses it."""

    def __init__(self, checkpoint: Path, log_path: Path) -> None:
        self.checkpoint = checkpoint
        self.log_path = log_path
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Launch (returns at once; `wait_serving()` waits for the model to load)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "MMSERVE_MAX_BATCH_WAIT_MS": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                # One image per forward pass: embeddings are bit-identical run to run, so greedy tokens are too.
                [sys.executable, "-m", "encoder_service", "--model", str(self.checkpoint), "--port", str(self.port),
                 "--max-batch-size", "1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while health_status(self.address, ENCODER_SERVICE) != "SERVING":
            if not self.alive or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"encoder process on {self.address} did not start:\n{log}")
            time.sleep(0.1)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (calls sent to it wait)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.kill()  # SIGKILL, also for a stopped process
            self.process.wait(timeout=10)
        self.paused = False


@pytest.fixture(scope="module")
def encoder_pool(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EncoderProcess]]:
    """Two encoder processes, started together (start-up dominates this file's time)."""
    logs = tmp_path_factory.mktemp("encoder-logs")
    pool = [EncoderProcess(tiny_checkpoint, logs / f"encoder-{index}.log") for index in range(2)]
    with contextlib.ExitStack() as cleanup:
        for encoder in pool:
            cleanup.callback(encoder.kill)
            encoder.start()
        for encoder in pool:
            encoder.wait_serving()
        yield pool


@pytest.fixture
def encoders(encoder_pool: list[EncoderProcess]) -> Iterator[list[EncoderProcess]]:
    """The pool with every process serving (a previous test may have left one killed)."""
    dead = [encoder for encoder in encoder_pool if not encoder.alive]
    for encoder in dead:
        encoder.start()
    for encoder in dead:
        encoder.wait_serving()
    yield encoder_pool
    for encoder in encoder_pool:
        if encoder.paused:  # a test that failed before its kill: never hand a stopped encoder to the next one
            encoder.kill()


@dataclass
class Call:
    """One Generate stream, watched while it runs."""

    message: generator_pb2.GenerateRequest
    result: StreamResult = field(default_factory=StreamResult)
    seconds: float | None = None  # set when the call ended

    async def run(self, stub: generator_pb2_grpc.GeneratorStub) -> None:
        started = time.monotonic()
        try:
            async for response in stub.Generate(self.message, timeout=30):
                self.result.add(response)
        except grpc.aio.AioRpcError as exc:
            self.result.code, self.result.details = exc.code(), exc.details() or ""
        self.seconds = time.monotonic() - started


def image_messages(seeds: Sequence[int], max_tokens: int = MAX_TOKENS) -> list[generator_pb2.GenerateRequest]:
    return [request(PROMPT, [png_bytes(seed)], max_tokens=max_tokens) for seed in seeds]


def fault_free_tokens(
    generator: RunningGenerator, messages: Sequence[generator_pb2.GenerateRequest]
) -> list[list[int]]:
    """The tokens of each request with every encoder healthy (each image through the encoder: the LRU is off)."""
    tokens = []
    for message in messages:
        result = generate(generator.address, message)
        assert result.code == grpc.StatusCode.OK, result.details
        tokens.append(result.token_ids)
    return tokens


def waiting_on_encoder(generator: RunningGenerator) -> int:
    """Images whose lookup is in flight in the generator (asked of the encoder, not answered yet)."""
    assert generator.server.images is not None
    return len(generator.server.images._in_flight)


def encoder_lookups(generator: RunningGenerator) -> float:
    return generator.metric("mmserve_image_lookups_total", {"source": "encoder"})


def test_encoder_sigkilled_under_load_then_restarted(
    encoders: list[EncoderProcess], start_generator: StartGenerator
) -> None:
    encoder = encoders[0]
    generator = start_generator(
        encoder_address=encoder.address, local_cache_bytes=0, encoder_timeout_s=ENCODER_TIMEOUT_S
    )
    decoding = image_messages([101, 102, 103], max_tokens=LONG_TOKENS)
    waiting = image_messages([201, 202, 203])
    expected_decoding = fault_free_tokens(generator, decoding)
    expected_waiting = fault_free_tokens(generator, waiting)

    async def under_load(stub: generator_pb2_grpc.GeneratorStub) -> tuple[list[Call], list[Call], Call]:
        past_encoder = [Call(message) for message in decoding]
        tasks = [asyncio.create_task(call.run(stub)) for call in past_encoder]
        await until(lambda: all(call.result.token_ids for call in past_encoder), 30, "the first streams to decode")
        encoder.pause()
        at_encoder = [Call(message) for message in waiting]
        tasks += [asyncio.create_task(call.run(stub)) for call in at_encoder]
        await until(lambda: waiting_on_encoder(generator) == len(at_encoder), 10, "the calls to reach the encoder")
        encoder.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), CALL_BOUND_S + 1)
        during_outage = Call(image_messages([301])[0])
        await during_outage.run(stub)
        return past_encoder, at_encoder, during_outage

    past_encoder, at_encoder, during_outage = run_client(generator.address, under_load)

    for call, expected in zip(past_encoder, expected_decoding, strict=True):
        assert call.result.code == grpc.StatusCode.OK, call.result.details  # already had its embedding
        assert call.result.token_ids == expected
    for call in at_encoder:
        assert call.result.code == grpc.StatusCode.UNAVAILABLE, call.result.details
        assert "encoder service" in call.result.details and not call.result.token_ids
    for call in [*past_encoder, *at_encoder]:
        assert call.seconds is not None and call.seconds < CALL_BOUND_S
    # While it is down, image calls fail fast (no wait for the encoder timeout).
    assert during_outage.result.code == grpc.StatusCode.UNAVAILABLE
    assert during_outage.seconds is not None and during_outage.seconds < 2.0
    assert_recovered(generator)

    # Restarted on the same address: the same generator finds it again and answers right.
    encoder.start()
    encoder.wait_serving()
    wait_until(
        lambda: generate(generator.address, waiting[0]).code == grpc.StatusCode.OK,
        timeout=15,
        what="image calls to work again once the encoder is back",
    )
    assert fault_free_tokens(generator, waiting) == expected_waiting
    assert_recovered(generator)


def test_replica_sigkilled_calls_fail_over(encoders: list[EncoderProcess], start_generator: StartGenerator) -> None:
    survivor, victim = encoders
    generator = start_generator(
        encoder_address=f"{survivor.address},{victim.address}",
        local_cache_bytes=0,
        encoder_timeout_s=ENCODER_TIMEOUT_S,
    )
    messages = image_messages(range(401, 407))
    expected = fault_free_tokens(generator, messages)  # round robin: both replicas answered some of these
    errors_before = generator.metric("mmserve_encoder_call_errors_total", {"status": "UNAVAILABLE"})

    async def under_load(stub: generator_pb2_grpc.GeneratorStub) -> list[Call]:
        victim.pause()
        calls = [Call(message) for message in messages]
        lookups = encoder_lookups(generator)
        tasks = [asyncio.create_task(call.run(stub)) for call in calls]

        def all_sent_and_survivor_answering() -> bool:
            answered = encoder_lookups(generator) - lookups
            return answered >= 1 and answered + waiting_on_encoder(generator) == len(calls)

        # Round robin sent every other call to the paused replica: those wait until it is killed.
        await until(all_sent_and_survivor_answering, 10, "the calls to reach both replicas")
        victim.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), CALL_BOUND_S + 1)
        return calls

    calls = run_client(generator.address, under_load)
    for call, tokens in zip(calls, expected, strict=True):
        assert call.result.code == grpc.StatusCode.OK, call.result.details
        assert call.result.token_ids == tokens
        assert call.seconds is not None and call.seconds < CALL_BOUND_S
    # The victim really held calls when it died: their failures were counted, then they went to the survivor.
    assert generator.metric("mmserve_encoder_call_errors_total", {"status": "UNAVAILABLE"}) > errors_before
    # Later calls go to the survivor alone.
    assert fault_free_tokens(generator, messages) == expected
    assert_recovered(generator)
