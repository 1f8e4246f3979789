"""Build, start and stop one encoder server: gRPC (Encoder + health + reflection) and Prometheus metrics.

Start-up order, so that load balancers and probes always get an honest answer:

    listen()  bind the gRPC port and the metrics port; health NOT_SERVING; Encode answers UNAVAILABLE
    load()    load the vision half in a worker thread (the event loop keeps answering health checks),
              build the cache, run one warm-up batch through the batcher -> health SERVING
    stop()    health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get `grace` seconds, then the
              batcher, cache and metrics endpoint are closed

`serve(config)` does all three around SIGTERM/SIGINT and returns the process exit code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import CacheConfig, ConfigError, EncoderConfig
from common.images.cache import EmbeddingCache, LocalEmbeddingCache, RedisEmbeddingCache
from common.images.intake import ImageLimits
from common.images.local_encoder import LocalEncoder
from common.images.provider import CacheLayer, EmbeddingProvider
from common.images.vision_encoder import VisionEncoder
from common.serving import (
    MetricsHttpServer,
    bind_and_start,
    describe_security,
    grpc_server,
    run_until_signal,
    set_health,
    start_metrics_http,
)
from encoder_service.metrics import EncoderMetrics
from encoder_service.servicer import EncoderBackend, EncoderServicer
from protos import encoder_pb2, encoder_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME: str = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name  # mmserve.encoder.v1.Encoder
EncoderFactory = Callable[[], VisionEncoder]


def image_limits(config: EncoderConfig) -> ImageLimits:
    try:
        return ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    except ValueError as exc:
        raise ConfigError(f"--max-image-bytes / --max-image-pixels: {exc}") from None


def make_cache(config: CacheConfig, encoder: VisionEncoder, metrics: EncoderMetrics) -> CacheLayer:
    """Redis when `config.redis_url` is set, else the in-process LRU; errors and poison feed `metrics`."""
    if config.redis_url is None:
        return CacheLayer("local", LocalEmbeddingCache(config.local_cache_bytes))
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
    return CacheLayer("redis", cache, shared=True)


class EncoderServer:
    """One encoder replica. `encoder_factory` (default: load `config.model`) runs in a worker thread;
    `cache` (default: from `config.cache`) lets tests inject one."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        encoder_factory: EncoderFactory | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.config = config
        self.limits = image_limits(config)
        self.metrics = EncoderMetrics()
        self._encoder_factory = encoder_factory or (lambda: VisionEncoder(config.model))
        self._cache = cache
        self._servicer = EncoderServicer(config, self.metrics)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self.local_encoder: LocalEncoder | None = None
        self.provider: EmbeddingProvider | None = None
        self.port = 0

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_http is None else self._metrics_http.port

    async def start(self) -> None:
        await self.listen()
        await self.load()

    async def listen(self) -> None:
        server_config = self.config.server
        limit = server_config.max_message_bytes
        self._server = grpc_server(
            server_config,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second replica on a taken port must fail, not share it
                # Generators re-resolve `dns:///` only when a connection drops: ending each connection after
                # 5 minutes (in-flight calls get 30 s more) lets encoders added by scaling receive traffic.
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", 30_000),
            ],
        )
        encoder_pb2_grpc.add_EncoderServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = await bind_and_start(self._server, server_config)
        self._metrics_http = start_metrics_http(self.metrics.registry, server_config.host, server_config.metrics_port)
        logger.info(
            "encoder listening on %s:%d (%s; metrics port %s); loading model",
            server_config.host,
            self.port,
            describe_security(server_config),
            self.metrics_port,
        )

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        encoder = await loop.run_in_executor(None, self._encoder_factory)
        cache = CacheLayer("cache", self._cache) if self._cache is not None else None
        cache = cache or make_cache(self.config.cache, encoder, self.metrics)
        local_encoder = LocalEncoder(
            encoder,
            limits=self.limits,
            max_batch_size=self.config.max_batch_size,
            max_batch_wait_s=self.config.max_batch_wait_ms / 1000,
            on_batch=self.metrics.record_batch,
        )
        local_encoder.start()
        self.local_encoder = local_encoder
        await local_encoder.warm_up()  # through the batcher thread (kernels, allocator, thread pools), not the cache
        self.provider = EmbeddingProvider(
            local_encoder,
            [cache],
            hidden_size=encoder.hidden_size,
            tokens_per_image=encoder.tokens_per_image,
            on_lookup=self.metrics.record_lookup,
            on_coalesced=self.metrics.cache_coalesced.inc,
            on_cache_miss=self.metrics.cache_misses.inc,
        )
        self._servicer.attach(EncoderBackend(self.provider, encoder))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("encoder ready: %s; cache %s", encoder.describe(), type(cache.cache).__name__)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; `grace` defaults to --shutdown-grace-s. Idempotent."""
        grace = self.config.server.shutdown_grace_s if grace is None else grace
        self._servicer.draining = True
        await self._health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.local_encoder is not None:
            await self.local_encoder.close()  # the batch in progress finishes
            self.local_encoder = None
        if self.provider is not None:
            await self.provider.close()
            self.provider = None
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await set_health(self._health, SERVICE_NAME, status)


async def serve(config: EncoderConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully; returns the exit code (0)."""
    return await run_until_signal(EncoderServer(config), shutdown_grace_s=config.server.shutdown_grace_s, logger=logger)
