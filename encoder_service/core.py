"""The encoder's request path without any transport: image bytes -> cached or freshly encoded embedding.

    bytes ──image_key──▶ single flight per key ──▶ cache.get ──hit──▶ done (the image is never decoded)
                                                      │miss / cache down
                                                      ▼
                         decode + preprocess (thread pool) ──▶ DynamicBatcher ──▶ cache.put ──▶ done

Concurrent requests for the same uncached image join one flight, so it is decoded and encoded once. The
cache is optional: when it cannot answer, the image is encoded anyway. The gRPC servicer is a thin shell
over `EncoderCore`; tests and benchmarks can drive it directly.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.config import CacheConfig
from common.hashing import image_key
from common.models.base import PreparedImage
from encoder_service.batcher import DynamicBatcher, SingleFlight
from encoder_service.embedding_cache import (
    CacheUnavailableError,
    EmbeddingCache,
    LocalEmbeddingCache,
    RedisEmbeddingCache,
)
from encoder_service.image_io import ImageLimits, decode_image
from encoder_service.metrics import EncoderMetrics
from encoder_service.vision_encoder import VisionEncoder

_HASH_INLINE_BYTES = 1 << 20  # larger payloads are hashed off the event loop (hashlib releases the GIL)


class EmbeddingNotFoundError(LookupError):
    """An `embedding_key` that is not in the cache (expired, evicted, or never stored)."""


@dataclass(frozen=True)
class ImageEmbedding:
    key: str  # hex image key; the Redis key is "mmserve:emb:" + key
    embedding: torch.Tensor  # [num_tokens, hidden_size], CPU, the encoder's dtype
    cache_hit: bool


def make_cache(
    config: CacheConfig, encoder: VisionEncoder, metrics: EncoderMetrics
) -> LocalEmbeddingCache | RedisEmbeddingCache:
    """Redis when `config.redis_url` is set, else the in-process LRU; errors and poison feed `metrics`."""
    if config.redis_url is None:
        return LocalEmbeddingCache(config.local_cache_bytes)
    cache = RedisEmbeddingCache.from_config(
        config,
        encoder.fingerprint,
        expected_dtype=encoder.dtype,
        expected_rows=encoder.tokens_per_image,
        expected_hidden_size=encoder.hidden_size,
        on_error=metrics.record_cache_error,
        on_poisoned=metrics.cache_poisoned.inc,
    )
    metrics.watch_breaker(lambda: cache.breaker.is_open)
    return cache


class EncoderCore:
    """Cache lookups, single flight, image decoding and dynamic batching around one `VisionEncoder`.

    Use from one asyncio event loop: `start()` inside it, `await close()` when done.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        cache: EmbeddingCache,
        *,
        limits: ImageLimits,
        max_batch_size: int = 16,
        max_batch_wait_s: float = 0.005,
        metrics: EncoderMetrics | None = None,
        decode_workers: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        self.limits = limits
        self.metrics = metrics or EncoderMetrics()
        self.batcher = DynamicBatcher(
            encoder.encode_prepared,
            max_batch_size=max_batch_size,
            max_wait_s=max_batch_wait_s,
            on_batch=self.metrics.record_batch,
        )
        self._flights: SingleFlight[ImageEmbedding] = SingleFlight()
        workers = decode_workers or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmserve-decode")

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        """Stop the batcher (the running batch finishes), then release the cache and the decode threads."""
        await self.batcher.close()
        await self.cache.close()
        self._decode_pool.shutdown(wait=True)

    async def image_key(self, data: bytes) -> str:
        if len(data) <= _HASH_INLINE_BYTES:
            return image_key(self.fingerprint, data)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, image_key, self.fingerprint, data)

    async def encode_image(self, data: bytes) -> ImageEmbedding:
        """The embedding of one image file, from the cache when possible.

        Raises ImageDecodeError / UnsupportedImageError for bad images (client-safe messages) and
        BatcherClosedError when shutting down.
        """
        key = await self.image_key(data)
        result, leader = await self._flights.run(key, lambda: self._lookup_or_encode(key, data))
        if not leader:
            self.metrics.cache_coalesced.inc()
        return result

    async def lookup(self, key: str) -> ImageEmbedding:
        """A stored embedding by key. Raises EmbeddingNotFoundError, or CacheUnavailableError if Redis is down."""
        embedding = await self.cache.get(key)
        if embedding is None:
            self.metrics.cache_misses.inc()
            raise EmbeddingNotFoundError(f"no embedding is cached under key {key}: send the image bytes instead")
        self.metrics.cache_hits.inc()
        return ImageEmbedding(key, embedding, cache_hit=True)

    async def _lookup_or_encode(self, key: str, data: bytes) -> ImageEmbedding:
        try:
            cached = await self.cache.get(key)
        except CacheUnavailableError:
            cached = None  # fail open: encode
        if cached is not None:
            self.metrics.cache_hits.inc()
            return ImageEmbedding(key, cached, cache_hit=True)
        self.metrics.cache_misses.inc()
        embedding = await self.batcher.submit_prepared(lambda: self._prepare(data), self._decode_pool)
        await self.cache.put(key, embedding)
        return ImageEmbedding(key, embedding, cache_hit=False)

    def _prepare(self, data: bytes) -> PreparedImage:
        return self.encoder.prepare(decode_image(data, self.limits))
