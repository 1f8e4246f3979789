"""Generator-service fixtures: one shared stack (encoder + generator + private Redis) on a background loop."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.generator_service.support import (
    EventLoopThread,
    Reference,
    RunningEncoder,
    RunningGenerator,
    encoder_config,
    generator_config,
)
from tests.grpc_support import RedisProcess


@dataclass
class Stack:
    encoder: RunningEncoder
    generator: RunningGenerator
    redis: RedisProcess


@pytest.fixture(scope="session")
def server_loop() -> Iterator[EventLoopThread]:
    loop = EventLoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path) -> Reference:
    return Reference(tiny_checkpoint)


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A private redis-server this test may kill."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    process = RedisProcess()
    yield process
    process.kill()


@pytest.fixture(scope="session")
def stack(tiny_checkpoint: Path, server_loop: EventLoopThread) -> Iterator[Stack]:
    """Encoder + generator over loopback gRPC sharing a private Redis. Tests must leave it healthy."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    redis = RedisProcess()
    # One image per vision forward pass: a batch of one is bit-identical to Hugging Face's (bigger batches
    # agree within 1e-5, which is the encoder's own test; greedy tokens must match exactly here).
    encoder = RunningEncoder(server_loop, encoder_config(tiny_checkpoint, redis_url=redis.url, max_batch_size=1))
    generator = RunningGenerator(
        server_loop,
        generator_config(tiny_checkpoint, encoder_address=encoder.address, redis_url=redis.url, metrics_port=0),
    )
    yield Stack(encoder, generator, redis)
    generator.stop()
    encoder.stop()
    redis.kill()


StartGenerator = Callable[..., RunningGenerator]


@pytest.fixture
def start_generator(tiny_checkpoint: Path, server_loop: EventLoopThread) -> Iterator[StartGenerator]:
    """`start_generator(encoder_address=..., **engine_kwargs)` -> a generator stopped after the test."""
    started: list[RunningGenerator] = []

    def start(model: Path | None = None, **kwargs: object) -> RunningGenerator:
        generator = RunningGenerator(server_loop, generator_config(model or tiny_checkpoint, **kwargs))  # type: ignore[arg-type]
        started.append(generator)
        return generator

    yield start
    for generator in started:
        generator.stop()


StartEncoder = Callable[..., RunningEncoder]


@pytest.fixture
def start_encoder(tiny_checkpoint: Path, server_loop: EventLoopThread) -> Iterator[StartEncoder]:
    started: list[RunningEncoder] = []

    def start(model: Path | None = None, **kwargs: object) -> RunningEncoder:
        encoder = RunningEncoder(server_loop, encoder_config(model or tiny_checkpoint, **kwargs))  # type: ignore[arg-type]
        started.append(encoder)
        return encoder

    yield start
    for encoder in started:
        encoder.stop()
