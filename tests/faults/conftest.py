"""Fault-suite fixtures and checks shared by its test files: a server event loop, a generator factory, and what
every fault case must leave behind (no call in flight, every KV block back, health SERVING)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator_service.server import SERVICE_NAME as GENERATOR_SERVICE
from protos import generator_pb2
from tests.generator_service.support import (
    EventLoopThread,
    RunningGenerator,
    StreamResult,
    generate,
    generator_config,
)


@pytest.fixture(scope="session")
def server_loop() -> Iterator[EventLoopThread]:
    """One asyncio loop on a daemon thread for every in-process server of the fault suite."""
    loop = EventLoopThread()
    yield loop
    loop.close()


StartGenerator = Callable[..., RunningGenerator]


def start_generator_on(
    loop: EventLoopThread, model: Path, *, local_cache_bytes: int | None = None, **kwargs: Any
) -> RunningGenerator:
    """An in-process generator (kwargs as `tests.generator_service.support.generator_config`). `local_cache_bytes=0`
    turns its in-process embedding LRU off, so every image goes through Redis and the encoder again."""
    config = generator_config(model, **kwargs)
    if local_cache_bytes is not None:
        config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, local_cache_bytes=local_cache_bytes)
        )
    return RunningGenerator(loop, config)


@pytest.fixture
def start_generator(tiny_checkpoint: Path, server_loop: EventLoopThread) -> Iterator[StartGenerator]:
    """`start_generator(**kwargs)` -> a started in-process generator on the tiny checkpoint, stopped after the test."""
    started: list[RunningGenerator] = []

    def start(**kwargs: Any) -> RunningGenerator:
        generator = start_generator_on(server_loop, tiny_checkpoint, **kwargs)
        started.append(generator)
        return generator

    yield start
    for generator in started:
        generator.stop()


def health_status(address: str, service: str = GENERATOR_SERVICE) -> str:
    """The gRPC health status name of `service` at `address` (or the error code's name when Check fails)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def assert_recovered(generator: RunningGenerator) -> None:
    """After a fault: no call left in flight, every KV block back (`mmserve_kv_blocks_used` 0), health SERVING."""
    generator.wait_idle(timeout=10)
    assert generator.kv_blocks_used() == 0
    assert health_status(generator.address) == "SERVING"


def timed_generate(
    address: str, message: generator_pb2.GenerateRequest, *, timeout: float = 30.0
) -> tuple[StreamResult, float]:
    """One Generate call and how many seconds it took to end (with any status)."""
    started = time.monotonic()
    result = generate(address, message, timeout=timeout)
    return result, time.monotonic() - started
