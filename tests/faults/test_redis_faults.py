"""Redis misbehaving under both services: blackholed, slowed, dropping every connection, restarted empty, refusing
writes (OOM), and holding a poisoned record. The cache is optional, so every request must still get the answer it
gets without the fault, within a bound, and the services must use Redis again once it is healthy.

    encoder (in-process) ──┐
                           ├──▶ TcpProxy (pass-through / blackhole / slow / close-all) ──▶ redis-server
    generator (in-process) ┘    local embedding LRU off: every image goes through Redis

Already covered elsewhere, not repeated here: Redis unreachable (tests/encoder/test_redis_service.py), Redis killed
mid-run (same file, and tests/generator_service/test_dependencies.py), and poisoned records read by the encoder
(test_poisoned_records_are_misses_and_are_deleted, for garbage, another fingerprint, another key and more).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch

from common.embedding_record import EmbeddingRecord, decode_record, encode_record
from common.hashing import image_key, redis_key
from common.images.cache import RedisEmbeddingCache
from common.images.errors import CacheUnavailableError
from common.tensor_codec import tensor_from_proto
from encoder_service.server import SERVICE_NAME as ENCODER_SERVICE
from protos import encoder_pb2, encoder_pb2_grpc
from tests.faults.conftest import assert_recovered, health_status, start_generator_on, timed_generate
from tests.faults.tcp_proxy import ProxyMode, TcpProxy
from tests.generator_service.support import (
    PROMPT,
    EventLoopThread,
    RunningEncoder,
    RunningGenerator,
    encoder_config,
    png_bytes,
    request,
)
from tests.grpc_support import RedisProcess

pytestmark = pytest.mark.faults

ENCODER_TIMEOUT_S = 5.0
# Redis calls are time-boxed at 200 ms (--redis-timeout-ms): an Encode makes two (GET, SET), a Generate three (its
# own GET, then the encoder's). The bounds leave room for a loaded machine, yet are below what the same calls take
# when only the client's 1 s socket timeout stops them (the time box lost).
ENCODE_BOUND_S = 1.5
GENERATE_BOUND_S = 2.5
RECOVERY_S = 10.0  # the breaker's 0.5 s cool-down and a reconnect, with room for a loaded machine
MAX_TOKENS = 4
FAULTS = ["blackhole", "slow", "close_all", "restart_empty", "oom"]


class RestartableRedis(RedisProcess):
    """A private redis-server that can be killed and started again, empty, on the same port."""

    def restart_empty(self) -> None:
        self.kill()
        executable = shutil.which("redis-server")
        assert executable is not None
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not restart"
                time.sleep(0.02)


@dataclass
class RedisStack:
    redis: RestartableRedis
    proxy: TcpProxy
    loop: EventLoopThread
    encoder: RunningEncoder
    generator: RunningGenerator
    encoder_stub: encoder_pb2_grpc.EncoderStub

    def encode(self, data: bytes) -> tuple[encoder_pb2.EncodedImage, float]:
        started = time.monotonic()
        request = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=data)], return_embeddings=True)
        response = self.encoder_stub.Encode(request, timeout=30)
        return response.images[0], time.monotonic() - started

    def redis_caches(self) -> list[RedisEmbeddingCache]:
        assert self.encoder.server.provider is not None and self.generator.server.images is not None
        caches = [self.encoder.server.provider.caches[0].cache, self.generator.server.images.caches[1].cache]
        assert all(isinstance(cache, RedisEmbeddingCache) for cache in caches)
        return caches  # type: ignore[return-value]

    def settle(self) -> None:
        """Pass-through, and both services' Redis clients answering again (breakers closed, connections fresh):
        each test starts from a healthy cache whatever the previous test did to it."""
        self.proxy.set_mode(ProxyMode.PASS_THROUGH)
        deadline = time.monotonic() + RECOVERY_S
        for cache in self.redis_caches():
            while True:
                try:
                    self.loop.run(cache.get("0" * 64))  # a key nobody stores: None once Redis answers
                    break
                except CacheUnavailableError:
                    assert time.monotonic() < deadline, "Redis did not answer the services again"
                    time.sleep(0.05)


@pytest.fixture(scope="module")
def shared_stack(tiny_checkpoint: Path, server_loop: EventLoopThread) -> Iterator[RedisStack]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    with contextlib.ExitStack() as cleanup:
        redis_server = RestartableRedis()
        cleanup.callback(redis_server.kill)
        proxy = cleanup.enter_context(TcpProxy(redis_server.port))
        url = f"redis://127.0.0.1:{proxy.port}/0"
        # One image per forward pass: embeddings are bit-identical run to run, so greedy tokens are too.
        encoder = RunningEncoder(server_loop, encoder_config(tiny_checkpoint, redis_url=url, max_batch_size=1))
        cleanup.callback(encoder.stop)
        generator = start_generator_on(
            server_loop,
            tiny_checkpoint,
            local_cache_bytes=0,
            encoder_address=encoder.address,
            redis_url=url,
            encoder_timeout_s=ENCODER_TIMEOUT_S,
        )
        cleanup.callback(generator.stop)
        channel = cleanup.enter_context(grpc.insecure_channel(encoder.address))
        yield RedisStack(redis_server, proxy, server_loop, encoder, generator, encoder_pb2_grpc.EncoderStub(channel))


@pytest.fixture
def stack(shared_stack: RedisStack) -> Iterator[RedisStack]:
    shared_stack.settle()
    yield shared_stack
    shared_stack.proxy.set_mode(ProxyMode.PASS_THROUGH)


def fresh_image() -> bytes:
    return png_bytes(secrets.randbits(32))  # never seen by this Redis before


@contextlib.contextmanager
def redis_fault(stack: RedisStack, kind: str, name: str) -> Iterator[None]:
    """Inject `kind` around the record `name`; undo it on exit (the record itself is not restored)."""
    fillers: list[str] = []
    if kind == "blackhole":
        stack.proxy.set_mode(ProxyMode.BLACKHOLE)
    elif kind == "slow":
        stack.proxy.set_mode(ProxyMode.SLOW)
    elif kind == "close_all":
        stack.proxy.close_all()
    elif kind == "restart_empty":
        stack.redis.restart_empty()
    elif kind == "oom":
        stack.redis.client.delete(name)  # so that the service must write it again, and cannot
        fillers = fill_until_oom(stack.redis.client)
    else:
        raise ValueError(kind)
    try:
        yield
    finally:
        stack.proxy.set_mode(ProxyMode.PASS_THROUGH)
        if kind == "oom":
            stack.redis.client.config_set("maxmemory", 0)
            if fillers:  # none when an empty Redis already uses more than 1 MiB
                stack.redis.client.delete(*fillers)


def fill_until_oom(client: redis.Redis) -> list[str]:
    """`maxmemory 1mb` with `noeviction` (as `redis-server --maxmemory 1mb --maxmemory-policy noeviction`), then
    filler values until Redis refuses writes with OOM; reads still work. Returns the filler keys."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")
    fillers: list[str] = []
    for index in range(64):
        try:
            client.set(f"mmserve-test:filler:{index}", b"\0" * 65536)
        except redis.exceptions.OutOfMemoryError:  # redis-py's name for the "-OOM ..." reply
            return fillers
        fillers.append(f"mmserve-test:filler:{index}")
    raise AssertionError("Redis never refused a write with maxmemory 1mb")


def encoder_cache_errors(stack: RedisStack) -> dict[str, float]:
    return {op: stack.encoder.metric("mmserve_encoder_cache_errors_total", {"op": op}) for op in ("get", "set")}


@pytest.mark.parametrize("kind", FAULTS)
def test_encoder_answers_right_through_redis_fault(stack: RedisStack, kind: str) -> None:
    """Encode under the fault: the fault-free embedding, not from the cache, in bounded time; then a hit again."""
    data = fresh_image()
    baseline, _ = stack.encode(data)
    name = redis_key(baseline.embedding_key)
    assert not baseline.cache_hit and stack.redis.client.exists(name)  # Redis holds it before the fault
    errors_before = encoder_cache_errors(stack)
    poisoned_before = stack.encoder.metric("mmserve_encoder_cache_poisoned_total")

    with redis_fault(stack, kind, name):
        result, elapsed = stack.encode(data)
        if kind == "oom":
            assert not stack.redis.client.exists(name)  # the SET was refused
    assert elapsed < ENCODE_BOUND_S, f"{kind}: Encode took {elapsed:.2f} s"
    assert result.embedding_key == baseline.embedding_key
    assert torch.equal(tensor_from_proto(result.embedding), tensor_from_proto(baseline.embedding))
    if kind != "close_all":  # after a dropped connection the intact record may be read (redis-py reconnects) or not
        assert not result.cache_hit  # unreachable, gone, or never written
    errors = {op: count - errors_before[op] for op, count in encoder_cache_errors(stack).items()}
    if kind in ("blackhole", "slow"):
        assert errors["get"] >= 1  # Redis was asked and did not answer in time
    if kind == "oom":
        assert errors["set"] >= 1
    # A slow server's late replies never answer a later command (no off-by-one replies: redis-py CVE-2023-28858).
    assert stack.encoder.metric("mmserve_encoder_cache_poisoned_total") == poisoned_before

    # Healthy again: the cache is used again without a restart (stored again if lost, then a hit).
    deadline = time.monotonic() + RECOVERY_S
    while not (again := stack.encode(data)[0]).cache_hit:
        assert time.monotonic() < deadline, f"{kind}: the encoder never used Redis again"
        time.sleep(0.05)
    assert torch.equal(tensor_from_proto(again.embedding), tensor_from_proto(baseline.embedding))
    assert health_status(stack.encoder.address, ENCODER_SERVICE) == "SERVING"


@pytest.mark.parametrize("kind", FAULTS)
def test_generator_answers_right_through_redis_fault(stack: RedisStack, kind: str) -> None:
    """Generate under the fault (both services' Redis affected): the fault-free tokens, in bounded time; then the
    generator reads Redis again."""
    generator = stack.generator
    data = fresh_image()
    message = request(PROMPT, [data], max_tokens=MAX_TOKENS)
    baseline, _ = timed_generate(generator.address, message)
    assert baseline.code == grpc.StatusCode.OK, baseline.details
    name = redis_key(image_key(stack.encoder.server.provider.encoder.fingerprint, data))  # type: ignore[union-attr]
    assert stack.redis.client.exists(name)  # the encoder stored it: the generator could read it from Redis
    errors_before = generator.metric("mmserve_generator_cache_errors_total", {"op": "get"})

    with redis_fault(stack, kind, name):
        result, elapsed = timed_generate(generator.address, message)
        if kind == "oom":
            assert not stack.redis.client.exists(name)  # the encoder's SET was refused
    assert result.code == grpc.StatusCode.OK, f"{kind}: {result.code.name} {result.details}"
    assert result.token_ids == baseline.token_ids
    assert elapsed < GENERATE_BOUND_S, f"{kind}: Generate took {elapsed:.2f} s"
    if kind in ("blackhole", "slow"):
        assert generator.metric("mmserve_generator_cache_errors_total", {"op": "get"}) > errors_before
    assert_recovered(generator)

    # Healthy again: a Generate is served from Redis (the encoder stores the record again where it was lost).
    deadline = time.monotonic() + RECOVERY_S
    while True:
        from_redis = generator.metric("mmserve_image_lookups_total", {"source": "redis"})
        again, _ = timed_generate(generator.address, message)
        assert again.code == grpc.StatusCode.OK and again.token_ids == baseline.token_ids
        if generator.metric("mmserve_image_lookups_total", {"source": "redis"}) > from_redis:
            break
        assert time.monotonic() < deadline, f"{kind}: the generator never read Redis again"
        time.sleep(0.05)
    assert_recovered(generator)


def _poison(kind: str, fingerprint: str, key: str) -> bytes:
    data = torch.ones(16 * 64).numpy().tobytes()  # the tiny checkpoint's [16, 64] float32 embedding
    if kind == "wrong_fingerprint":  # a record another encoder (another model) wrote
        return encode_record(EmbeddingRecord("float32", (16, 64), "e" * 64, key, data))
    if kind == "another_key":  # intact, right encoder and shape, but another image's record
        return encode_record(EmbeddingRecord("float32", (16, 64), fingerprint, "d" * 64, data))
    return b"\x00garbage\xff" * 10


@pytest.mark.parametrize("kind", ["garbage", "wrong_fingerprint", "another_key"])
def test_generator_never_uses_a_poisoned_record(stack: RedisStack, kind: str) -> None:
    """A bad record under the key the generator reads: the image is encoded afresh, the tokens are the fault-free
    ones, and a valid record replaces the poison."""
    generator, encoder = stack.generator, stack.encoder
    data = fresh_image()
    message = request(PROMPT, [data], max_tokens=MAX_TOKENS)
    baseline, _ = timed_generate(generator.address, message)
    assert baseline.code == grpc.StatusCode.OK, baseline.details
    fingerprint = encoder.server.provider.encoder.fingerprint  # type: ignore[union-attr]
    key = image_key(fingerprint, data)
    stack.redis.client.set(redis_key(key), _poison(kind, fingerprint, key))
    encoded_before = encoder.metric("mmserve_encoder_images_encoded_total")

    result, elapsed = timed_generate(generator.address, message)
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.token_ids == baseline.token_ids
    assert elapsed < GENERATE_BOUND_S
    assert encoder.metric("mmserve_encoder_images_encoded_total") == encoded_before + 1  # encoded afresh
    stored = stack.redis.client.get(redis_key(key))
    assert isinstance(stored, bytes)
    assert decode_record(stored, fingerprint, key).shape == (16, 64)  # the poison is gone, a valid record is back
    assert_recovered(generator)


def test_dropped_connections_cost_no_cache_miss(stack: RedisStack) -> None:
    """Every connection to Redis dropped while idle (a Redis failover, an idle-timeout in a proxy): the next calls
    reconnect and still find the records, with no Redis error counted."""
    data = fresh_image()
    message = request(PROMPT, [data], max_tokens=MAX_TOKENS)
    baseline, _ = timed_generate(stack.generator.address, message)
    assert baseline.code == grpc.StatusCode.OK, baseline.details
    errors_before = (
        encoder_cache_errors(stack)["get"],
        stack.generator.metric("mmserve_generator_cache_errors_total", {"op": "get"}),
    )
    stack.proxy.close_all()
    deadline = time.monotonic() + RECOVERY_S
    while stack.proxy.num_connections:  # both sides closed: the services' sockets are at EOF now
        assert time.monotonic() < deadline
        time.sleep(0.01)

    result, _ = stack.encode(data)
    again, _ = timed_generate(stack.generator.address, message)
    assert result.cache_hit
    assert again.token_ids == baseline.token_ids
    errors_after = (
        encoder_cache_errors(stack)["get"],
        stack.generator.metric("mmserve_generator_cache_errors_total", {"op": "get"}),
    )
    assert errors_after == errors_before
