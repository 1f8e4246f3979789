"""Embedding caches keyed by image key: an in-process LRU and Redis. Shared by the encoder and the generator.

Both implement `EmbeddingCache`. Keys are the hex image keys of `common.hashing.image_key`; values are
`ImageEmbedding`s (a `[rows, hidden_size]` CPU tensor and its layout). Nothing here knows about the encoder:
owners pass the fingerprint the records must carry and hooks for their own metrics.

Failure policy (the cache is optional, a request never fails because of it):
    get   -> the tensor, None on a miss, or CacheUnavailableError when the backend could not answer in time
             (callers encode anyway; an `embedding_key`-only lookup turns it into UNAVAILABLE);
    put   -> never raises for backend faults; the entry is simply not stored.
A Redis record that fails verification (header, version, length, fingerprint, image key, dtype, shape,
non-finite values) is a miss, and is deleted if it is still the value we read (compare-and-delete, so a fresh
write is not lost). The image key check catches another image's record stored under this key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.config import CacheConfig
from common.embedding_record import EmbeddingRecord, RecordError, decode_record, encode_record
from common.hashing import redis_key
from common.images.circuit_breaker import CircuitBreaker
from common.images.embedding import ImageEmbedding
from common.images.errors import CacheUnavailableError
from common.tensor_codec import TensorDecodeError, tensor_from_bytes, tensor_to_bytes

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Compare-and-delete: drop a poisoned record only if nobody replaced it since we read it.
_DELETE_IF_UNCHANGED = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class EmbeddingCache(Protocol):
    async def get(self, key: str) -> ImageEmbedding | None:
        """The embedding stored under image `key`, None on a miss; raises CacheUnavailableError when unsure."""
        ...

    async def put(self, key: str, embedding: ImageEmbedding) -> None:
        """Store best-effort; never raises for backend faults."""
        ...

    def use_fingerprint(self, fingerprint: str) -> None:
        """Records are written and verified for this encoder fingerprint from now on."""
        ...

    async def close(self) -> None: ...


class LocalEmbeddingCache:
    """In-process LRU bounded in bytes (tensor payload), thread-safe. Capacity 0 stores nothing.

    Returned embeddings are the stored objects: callers must not modify their tensors in place.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes ({capacity_bytes}) must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._size_bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_sync(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            embedding = self._entries.get(key)
            if embedding is not None:
                self._entries.move_to_end(key)
            return embedding

    def put_sync(self, key: str, embedding: ImageEmbedding) -> None:
        size = embedding.nbytes
        if size > self.capacity_bytes:
            return  # would evict everything and still not fit
        stored = ImageEmbedding(embedding.tensor.detach().to("cpu"), embedding.layout)
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._size_bytes -= previous.nbytes
            self._entries[key] = stored
            self._size_bytes += size
            while self._size_bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)  # least recently used first
                self._size_bytes -= evicted.nbytes

    async def get(self, key: str) -> ImageEmbedding | None:
        return self.get_sync(key)

    async def put(self, key: str, embedding: ImageEmbedding) -> None:
        self.put_sync(key, embedding)

    def use_fingerprint(self, fingerprint: str) -> None:
        return None  # keys already contain the fingerprint; entries hold no record header

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size_bytes = 0


class RedisEmbeddingCache:
    """Redis-backed cache of verified embedding records (`common.embedding_record`) under `mmserve:emb:<key>`.

    Every call is time-boxed by `timeout_s`; failures call `on_error(op)` and feed a circuit breaker that skips
    Redis for `breaker_cooldown_s` after `breaker_failures` consecutive failures. `expected_dtype`,
    `expected_rows` (for families with a fixed token count) and `expected_hidden_size`, when given, are checked
    on read too. Use from one asyncio event loop.
    """

    def __init__(
        self,
        client: Redis,
        fingerprint: str,
        *,
        timeout_s: float = 0.05,
        ttl_s: int = 0,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 10.0,
        expected_dtype: str | None = None,
        expected_rows: int | None = None,
        expected_hidden_size: int | None = None,
        on_error: Callable[[str], None] | None = None,
        on_poisoned: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.fingerprint = fingerprint
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._expected_dtype = expected_dtype
        self._expected_rows = expected_rows
        self._expected_hidden_size = expected_hidden_size
        self._on_error = on_error
        self._on_poisoned = on_poisoned
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s, clock)

    @classmethod
    def from_config(cls, config: CacheConfig, fingerprint: str, **kwargs: object) -> RedisEmbeddingCache:
        """A cache for `config.redis_url`. The client never retries: the caller's time box is the only budget."""
        if config.redis_url is None:
            raise ValueError("CacheConfig.redis_url is not set")
        timeout_s = config.redis_timeout_ms / 1000
        client = Redis.from_url(
            config.redis_url,
            socket_timeout=max(1.0, 4 * timeout_s),  # the asyncio time box below is the real limit
            socket_connect_timeout=max(0.5, 2 * timeout_s),
            retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )
        return cls(
            client,
            fingerprint,
            timeout_s=timeout_s,
            ttl_s=config.ttl_s,
            breaker_failures=config.breaker_failures,
            breaker_cooldown_s=config.breaker_cooldown_s,
            **kwargs,  # type: ignore[arg-type]
        )

    async def get(self, key: str) -> ImageEmbedding | None:
        name = redis_key(key)
        raw = await self._call("get", lambda: self._client.get(name))
        if raw is None:
            return None
        blob = raw if isinstance(raw, bytes) else raw.encode()  # str only from a decode_responses client
        try:
            return self._verify(blob, key)
        except (RecordError, TensorDecodeError) as exc:
            logger.warning("poisoned embedding record %s deleted: %s", name, exc)
            if self._on_poisoned is not None:
                self._on_poisoned()
            await self._delete_if_unchanged(name, blob)
            return None

    async def put(self, key: str, embedding: ImageEmbedding) -> None:
        if not torch.isfinite(embedding.tensor).all():
            return  # never store what a reader would reject as poisoned
        dtype, shape, data = tensor_to_bytes(embedding.tensor)
        record = EmbeddingRecord(
            dtype=dtype, shape=tuple(shape), fingerprint=self.fingerprint, key=key, data=data, layout=embedding.layout
        )
        blob = encode_record(record)
        # A failed SET is counted by _call; the embedding is still returned to the caller.
        with contextlib.suppress(CacheUnavailableError):
            await self._call("set", lambda: self._client.set(redis_key(key), blob, ex=self._ttl_s or None))

    def use_fingerprint(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    async def close(self) -> None:
        await self._client.aclose()

    def _verify(self, blob: bytes, key: str) -> ImageEmbedding:
        record = decode_record(blob, self.fingerprint, key)
        if self._expected_dtype is not None and record.dtype != self._expected_dtype:
            raise RecordError(f"record dtype {record.dtype}, expected {self._expected_dtype}")
        rows, hidden_size = record.shape
        if self._expected_hidden_size is not None and hidden_size != self._expected_hidden_size:
            raise RecordError(f"record shape {list(record.shape)}, expected {self._expected_hidden_size} columns")
        if self._expected_rows is not None and rows != self._expected_rows:
            raise RecordError(f"record shape {list(record.shape)}, expected {self._expected_rows} rows")
        tensor = tensor_from_bytes(record.dtype, record.shape, record.data)
        if not torch.isfinite(tensor).all():
            raise RecordError("record holds NaN or infinite values")
        return ImageEmbedding(tensor, record.layout)

    async def _delete_if_unchanged(self, name: str, blob: bytes) -> None:
        # If the delete fails, the next reader finds the record poisoned again and retries it.
        with contextlib.suppress(CacheUnavailableError):
            await self._call("delete", lambda: self._client.eval(_DELETE_IF_UNCHANGED, 1, name, blob))

    async def _call(self, op: str, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run one Redis command within the time box, through the circuit breaker."""
        if not self.breaker.allow():
            raise CacheUnavailableError("Redis skipped: circuit breaker open")
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await command()
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure()
            if self._on_error is not None:
                self._on_error(op)
            logger.debug("redis %s failed: %s: %s", op, type(exc).__name__, exc)
            raise CacheUnavailableError(f"Redis {op} failed: {type(exc).__name__}") from None
        self.breaker.record_success()
        return result
