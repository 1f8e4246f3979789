"""LocalEmbeddingCache (LRU in bytes), RedisEmbeddingCache (real Redis: records, TTL, poison, faults), breaker."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from typing import Any

import pytest
import torch

from common.config import CacheConfig
from common.embedding_record import EmbeddingRecord, decode_record, encode_record
from common.images.cache import CacheUnavailableError, LocalEmbeddingCache, RedisEmbeddingCache
from common.images.circuit_breaker import BreakerState, CircuitBreaker
from common.images.embedding import ImageEmbedding
from tests.conftest import RedisKeys
from tests.encoder.support import free_port, version_1_record

FINGERPRINT = "f" * 64


def tensor(rows: int, cols: int = 4, value: float = 1.0) -> torch.Tensor:
    return torch.full((rows, cols), value, dtype=torch.float32)


def new_key() -> str:
    return secrets.token_hex(32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redis_cache(url: str, **kwargs: Any) -> RedisEmbeddingCache:
    config = CacheConfig(redis_url=url, redis_timeout_ms=kwargs.pop("timeout_ms", 200.0), ttl_s=kwargs.pop("ttl", 0),
                         breaker_failures=kwargs.pop("failures", 3), breaker_cooldown_s=kwargs.pop("cooldown", 5.0))
    return RedisEmbeddingCache.from_config(config, FINGERPRINT, **kwargs)


# ------------------------------------------------------------------------------------------- local LRU


def test_local_cache_is_an_lru_bounded_in_bytes() -> None:
    cache = LocalEmbeddingCache(capacity_bytes=3 * 64)  # three [4, 4] float32 tensors
    for name in "abc":
        cache.put_sync(name, ImageEmbedding(tensor(4, value=ord(name))))
    assert cache.size_bytes == 192 and len(cache) == 3
    assert cache.get_sync("a") is not None  # "a" is now the most recently used
    cache.put_sync("d", ImageEmbedding(tensor(4)))
    assert cache.get_sync("b") is None  # the least recently used went first
    assert [cache.get_sync(k) is not None for k in "acd"] == [True, True, True]
    cache.put_sync("big", ImageEmbedding(tensor(8)))  # 128 bytes: evicts two entries
    assert cache.size_bytes <= cache.capacity_bytes and len(cache) == 2
    cache.put_sync("huge", ImageEmbedding(tensor(16)))  # larger than the whole cache: not stored, nothing evicted
    assert cache.get_sync("huge") is None and len(cache) == 2


def test_local_cache_replaces_and_zero_capacity_stores_nothing() -> None:
    cache = LocalEmbeddingCache(capacity_bytes=1024)
    cache.put_sync("a", ImageEmbedding(tensor(4, value=1.0)))
    cache.put_sync("a", ImageEmbedding(tensor(2, value=2.0)))
    assert cache.size_bytes == 32 and torch.equal(cache.get_sync("a").tensor, tensor(2, value=2.0))  # type: ignore[union-attr]
    empty = LocalEmbeddingCache(capacity_bytes=0)
    empty.put_sync("a", ImageEmbedding(tensor(1)))
    assert asyncio.run(empty.get("a")) is None


# ------------------------------------------------------------------------------------------- Redis


def test_redis_round_trip_with_ttl(redis_url: str, redis_keys: RedisKeys) -> None:
    key, value = new_key(), ImageEmbedding(torch.randn(5, 3), layout=(1, 4, 6))

    async def scenario() -> ImageEmbedding | None:
        cache = redis_cache(redis_url, ttl=60)
        try:
            assert await cache.get(key) is None
            await cache.put(key, value)
            return await cache.get(key)
        finally:
            await cache.close()

    stored = asyncio.run(scenario())
    assert stored is not None and torch.equal(stored.tensor, value.tensor) and stored.layout == (1, 4, 6)
    name = redis_keys.name(key)
    assert 0 < redis_keys.client.ttl(name) <= 60
    record = decode_record(redis_keys.client.get(name), FINGERPRINT, key)  # type: ignore[arg-type]
    assert (record.dtype, record.shape, record.key, record.layout) == ("float32", (5, 3), key, (1, 4, 6))


def _poison(kind: str, key: str) -> bytes:
    data = torch.ones(6).numpy().tobytes()
    good = EmbeddingRecord(dtype="float32", shape=(2, 3), fingerprint=FINGERPRINT, key=key, data=data)
    if kind == "wrong_length":
        return encode_record(good)[:-4]
    if kind == "wrong_fingerprint":
        return encode_record(EmbeddingRecord(good.dtype, good.shape, "0" * 64, key, good.data))
    if kind == "wrong_shape":
        return encode_record(EmbeddingRecord(good.dtype, (3, 2), FINGERPRINT, key, good.data))
    if kind == "nan":
        nan = torch.full((6,), float("nan")).numpy().tobytes()
        return encode_record(EmbeddingRecord(good.dtype, good.shape, FINGERPRINT, key, nan))
    if kind == "another_key":  # intact, same encoder and shape, but written for another image
        return encode_record(EmbeddingRecord(good.dtype, good.shape, FINGERPRINT, new_key(), good.data))
    if kind == "version_1":  # the old format, without the image key
        return version_1_record(FINGERPRINT, good.dtype, (2, 3), good.data)
    if kind == "pickle":
        return b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    return b"garbage that is not a record"


@pytest.mark.parametrize(
    "kind", ["wrong_length", "wrong_fingerprint", "wrong_shape", "nan", "another_key", "version_1", "pickle", "garbage"]
)
def test_poisoned_record_is_a_miss_and_is_deleted(redis_url: str, redis_keys: RedisKeys, kind: str) -> None:
    key = new_key()
    name = redis_keys.name(key)
    redis_keys.client.set(name, _poison(kind, key))
    poisoned: list[int] = []

    async def scenario() -> ImageEmbedding | None:
        cache = redis_cache(redis_url, expected_dtype="float32", expected_rows=2, expected_hidden_size=3,
                            on_poisoned=lambda: poisoned.append(1))
        try:
            return await cache.get(key)
        finally:
            await cache.close()

    assert asyncio.run(scenario()) is None
    assert poisoned == [1]
    assert redis_keys.client.exists(name) == 0


def test_record_of_another_image_under_this_key_is_a_miss(redis_url: str, redis_keys: RedisKeys) -> None:
    """Image A's valid record copied under image B's Redis key: a miss, deleted; B's own embedding is stored after."""
    key_a, key_b = new_key(), new_key()
    name_a, name_b = redis_keys.name(key_a), redis_keys.name(key_b)
    # Same encoder, same shape: only the key tells them apart.
    value_a, value_b = ImageEmbedding(torch.randn(2, 3)), ImageEmbedding(torch.randn(2, 3))
    poisoned: list[int] = []

    async def scenario() -> tuple[ImageEmbedding | None, ImageEmbedding | None, ImageEmbedding | None]:
        cache = redis_cache(
            redis_url,
            expected_dtype="float32",
            expected_rows=2,
            expected_hidden_size=3,
            on_poisoned=lambda: poisoned.append(1),
        )
        try:
            await cache.put(key_a, value_a)
            redis_keys.client.set(name_b, redis_keys.client.get(name_a))  # type: ignore[arg-type]
            copied = await cache.get(key_b)
            assert redis_keys.client.exists(name_b) == 0  # deleted
            await cache.put(key_b, value_b)  # what the caller does after a miss: encode B and store it
            return copied, await cache.get(key_b), await cache.get(key_a)
        finally:
            await cache.close()

    copied, b_after, a_after = asyncio.run(scenario())
    assert copied is None and poisoned == [1]
    assert b_after is not None and torch.equal(b_after.tensor, value_b.tensor)
    assert a_after is not None and torch.equal(a_after.tensor, value_a.tensor)  # A's own record is untouched
    assert decode_record(redis_keys.client.get(name_b), FINGERPRINT, key_b).key == key_b  # type: ignore[arg-type]


def test_poison_delete_spares_a_value_written_since(redis_url: str, redis_keys: RedisKeys) -> None:
    """Compare-and-delete: a fresh record written after the poisoned read survives the delete."""
    key = new_key()
    name = redis_keys.name(key)
    redis_keys.client.set(name, b"fresh value")

    async def scenario() -> None:
        cache = redis_cache(redis_url)
        try:
            await cache._delete_if_unchanged(name, b"the poisoned value we read")
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert redis_keys.client.get(name) == b"fresh value"


def test_unreachable_redis_fails_fast_counts_errors_and_opens_the_breaker() -> None:
    errors: list[str] = []
    clock = FakeClock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario() -> list[str]:
        cache = redis_cache(url, failures=3, cooldown=5.0, on_error=errors.append, clock=clock)
        outcomes = []
        try:
            for _ in range(5):
                started = time.perf_counter()
                with pytest.raises(CacheUnavailableError):
                    await cache.get(new_key())
                assert time.perf_counter() - started < 1.0  # time-boxed (200 ms), not redis-py's 5 s default
                await cache.put(new_key(), ImageEmbedding(tensor(1)))  # never raises
                outcomes.append(cache.breaker.state.value)
            clock.now += 5.0  # cooldown over: one probe goes to Redis again (and fails)
            with pytest.raises(CacheUnavailableError):
                await cache.get(new_key())
        finally:
            await cache.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    # get, put, get fail -> open after 3; from then on calls are skipped without touching the network.
    assert errors == ["get", "set", "get", "get"]
    assert outcomes == ["closed", "open", "open", "open", "open"]


def test_hanging_redis_is_time_boxed() -> None:
    """A server that accepts connections and never answers (a blackhole): each call gives up after the box."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nobody ever reads or replies
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        errors: list[str] = []

        async def scenario() -> float:
            cache = redis_cache(url, timeout_ms=100, failures=10, on_error=errors.append)
            try:
                started = time.perf_counter()
                with pytest.raises(CacheUnavailableError):
                    await cache.get(new_key())
                await cache.put(new_key(), ImageEmbedding(tensor(2)))
                return time.perf_counter() - started
            finally:
                await cache.close()

        elapsed = asyncio.run(scenario())
    assert errors == ["get", "set"]
    assert 0.15 <= elapsed < 1.0  # two calls of 100 ms each, not redis-py's 5 s socket timeout


def test_circuit_breaker_state_machine() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10.0, clock=clock)
    breaker.record_failure()
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # not consecutive: the success reset the count
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.is_open and not breaker.allow()
    clock.now += 10.0
    assert breaker.allow() and breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
