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

Redis is named by a URL: redis://[[user]:password@]host:port/db, rediss://... (TLS; CA and client certificates as
query arguments, e.g. ?ssl_ca_certs=/etc/mmserve/ca.pem) or unix://path. With `CacheConfig.redis_cluster` the URL
names one node of a Redis Cluster. Every command touches one key, so each runs on the node owning that key's slot;
a dead node makes its own keys misses, the others keep hitting. Log URLs only through `redacted_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import torch
from redis._parsers import AsyncCommandsParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from common.config import CacheConfig
from common.embedding_record import EmbeddingRecord, RecordError, decode_record, encode_record
from common.hashing import redis_key
from common.images.circuit_breaker import CircuitBreaker
from common.images.embedding import ImageEmbedding
from common.images.errors import CacheUnavailableError
from common.tensor_codec import TensorDecodeError, tensor_from_bytes, tensor_to_bytes

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Compare-and-delete: drop a poisoned record only if nobody replaced it since we read it. It touches KEYS[1] only,
# so on a Redis Cluster it runs on the node that owns that key's slot.
_DELETE_IF_UNCHANGED = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REDACTED = "***"
_SECRET_QUERY_ARGS = frozenset({"password", "ssl_password"})  # redis-py takes both from a URL's query string too


def redacted_url(url: str) -> str:
    """`url` fit for a log line: the password (in the userinfo or a ?password= argument) replaced by ***;
    scheme, user, host, port, db and the other query arguments kept."""
    parts = urlsplit(url)
    if "@" in parts.path + parts.query + parts.fragment:
        # An unencoded '/', '?' or '#' in the password moved part of it past the netloc: show nothing of it.
        return f"{parts.scheme}://{_REDACTED}"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, address = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{_REDACTED}@{address}"
    query = "&".join(_redacted_query_arg(arg) for arg in parts.query.split("&"))
    # Built by hand: urlunsplit drops the empty netloc of unix:///path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if parts.query else "")


def _redacted_query_arg(arg: str) -> str:
    name, separator, _ = arg.partition("=")
    return f"{name}={_REDACTED}" if separator and name.lower() in _SECRET_QUERY_ARGS else arg


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
        client: Redis | RedisCluster,
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
        self._cluster_startup = _ClusterStartup(client) if isinstance(client, RedisCluster) else None
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
        """A cache for `config.redis_url` (a Redis Cluster node when `config.redis_cluster`). The caller's time box
        is the only budget: a single-node client retries once, at once, which replaces a pooled connection the
        server closed (a Redis restart or an idle timeout would otherwise fail one call per pooled connection and
        open the breaker although Redis is back); a cluster client does not retry (it re-reads the topology)."""
        if config.redis_url is None:
            raise ValueError("CacheConfig.redis_url is not set")
        timeout_s = config.redis_timeout_ms / 1000
        options: dict[str, Any] = {
            "socket_timeout": max(1.0, 4 * timeout_s),  # the asyncio time box in _call is the real limit
            "socket_connect_timeout": max(0.5, 2 * timeout_s),
            "max_connections": 256,  # per node on a cluster
        }
        kind = "Redis Cluster node" if config.redis_cluster else "Redis"
        logger.info("embedding cache: %s at %s", kind, redacted_url(config.redis_url))
        client = (
            _cluster_client(config.redis_url, {**options, "retry": Retry(NoBackoff(), 0)})
            if config.redis_cluster
            else Redis.from_url(config.redis_url, **options, retry=Retry(NoBackoff(), 1))
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
        if self._cluster_startup is not None:
            await self._cluster_startup.close()

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
                if self._cluster_startup is not None:
                    await self._cluster_startup.wait()
                result = await command()
        # RedisClusterException (no reachable node, a slot without an owner) is not a RedisError.
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            self.breaker.record_failure()
            if self._on_error is not None:
                self._on_error(op)
            logger.debug("redis %s failed: %s: %s", op, type(exc).__name__, exc)
            raise CacheUnavailableError(f"Redis {op} failed: {type(exc).__name__}") from None
        self.breaker.record_success()
        return result


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """A RedisCluster client that never retries. `retry` is the cluster-level policy (redis-py re-runs a command
    after a connection error, timeout or CLUSTERDOWN with a reloaded topology): 0 retries = one attempt. Node
    connections get no retry of their own (redis-py's default for them), and `cluster_error_retry_attempts` is
    ignored once `retry` is given."""
    client = RedisCluster.from_url(
        url,
        # Start even when some slots have no owner (a shard lost, a resharding half done): only those keys fail.
        require_full_coverage=False,
        **options,
    )
    client.commands_parser = _CommandTableOnce()
    return client


class _CommandTableOnce(AsyncCommandsParser):
    """Fetches the COMMAND table once. redis-py reloads the topology after every connection error to a node, and
    with it COMMAND: ~240 entries parsed synchronously, ~80 ms on a busy core, during which the event loop stalls
    past every caller's time box. With a node dead, each miss on its keys would stall the next call of every other
    key. The table does not change with the topology; the node used for COMMAND GETKEYS still follows it."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


class _ClusterStartup:
    """Loads the cluster topology (CLUSTER SLOTS, COMMAND) in a task that callers' time boxes do not cancel.

    Cold, the load takes several round trips and ~100 ms (COMMAND's parse): over a link slower than the time box,
    cancelled with each caller, it would start over on every call and never finish. A caller waits for it within
    its own box (a miss when the box runs out) and the load goes on for the next one. A load that failed (no node
    reachable) is started again by the next caller.
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._task: asyncio.Task[RedisCluster] | None = None

    async def wait(self) -> None:
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._task = asyncio.create_task(self._client.initialize())
            task.add_done_callback(_retrieve_exception)
        await asyncio.shield(task)

    async def close(self) -> None:
        """Stops a pending load and closes every node connection (after the client's own aclose())."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, RedisClusterException, OSError):
                await self._task
        # RedisCluster.aclose() closes nothing while a topology reload is pending, which is the case after any node
        # error: close the node connections here (closing a closed one is a no-op).
        await self._client.nodes_manager.aclose()
        await self._client.nodes_manager.aclose("startup_nodes")


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    # A load whose waiters all timed out: its failure is counted by their time boxes; asyncio must not log
    # "exception was never retrieved" for it.
    if not task.cancelled():
        task.exception()
