"""Build, start and stop one generator server: gRPC (Generator + health + reflection) and Prometheus metrics.

Start-up order, so that load balancers and probes always get an honest answer:

    listen()  bind the gRPC port and the metrics port; health NOT_SERVING; Generate answers UNAVAILABLE
    load()    load the language model (and, without --encoder-address, the vision encoder) in a worker
              thread and warm it up there (one tiny generation: torch.compile happens here when it is on),
              start the engine thread, build the image path (local LRU -> Redis -> the encoder service or the
              in-process encoder, warmed up too), check the encoder's fingerprint -> health SERVING
    stop()    health NOT_SERVING and new calls UNAVAILABLE; in-flight streams get `grace` seconds to finish;
              whatever is still running then ends with UNAVAILABLE; engine, caches and metrics endpoint closed

`serve(config)` does all three around SIGTERM/SIGINT and returns the process exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.checkpoint import encoder_fingerprint, resolve_checkpoint
from common.config import GeneratorConfig
from common.images.cache import LocalEmbeddingCache, RedisEmbeddingCache
from common.images.local_encoder import LocalEncoder
from common.images.provider import CacheLayer, EmbeddingProvider, ImageEncoder
from common.images.vision_encoder import VisionEncoder
from common.security import channel_credentials
from common.serving import (
    MetricsHttpServer,
    bind_and_start,
    describe_security,
    grpc_server,
    run_until_signal,
    set_health,
    start_metrics_http,
)
from generator_service.encoder_client import RemoteEncoder
from generator_service.engine.async_engine import AsyncEngine
from generator_service.engine.llm_engine import EngineStats, LLMEngine
from generator_service.inputs import InputProcessor
from generator_service.metrics import GeneratorMetrics
from generator_service.servicer import GeneratorBackend, GeneratorServicer
from protos import encoder_pb2, generator_pb2, generator_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME: str = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name  # mmserve.generator.v1.Generator
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_NO_STATS = EngineStats(0, 0, 0, 0, 0, 0)
_WATCHDOG_PERIOD_S = 1.0
_FINAL_STATUS_GRACE_S = 1.0  # after the drain grace: time to deliver the UNAVAILABLE of cut-off streams
try:
    VERSION = importlib.metadata.version("mmserve")
except importlib.metadata.PackageNotFoundError:  # running from a checkout
    VERSION = "0.1.0"


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Large messages, and keepalive settings under which long, quiet token streams survive proxies and NATs."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second replica on a taken port must fail, not share it
        ("grpc.keepalive_time_ms", 20_000),  # ping each client every 20 s, so dead peers are noticed
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # a stream waiting for its next token is still alive
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # accept client pings every 5 s
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging
    ]


@dataclass(frozen=True)
class _Loaded:
    engine: LLMEngine
    vision: VisionEncoder | None  # when images are encoded in this process (no --encoder-address)


class GeneratorServer:
    """One generator replica."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.metrics = GeneratorMetrics(self._engine_stats)
        engine_config = config.engine
        self._servicer = GeneratorServicer(
            metrics=self.metrics, max_in_flight=engine_config.max_num_seqs + config.max_queue_len
        )
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.engine: AsyncEngine | None = None
        self.images: EmbeddingProvider | None = None
        self._encoder: LocalEncoder | RemoteEncoder | None = None
        self.port = 0
        self._stopped = False

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_http is None else self._metrics_http.port

    @property
    def num_in_flight(self) -> int:
        return self._servicer.num_in_flight

    def _engine_stats(self) -> EngineStats:
        return _NO_STATS if self.engine is None else self.engine.stats()

    async def start(self) -> None:
        await self.listen()
        await self.load()

    async def listen(self) -> None:
        server_config = self.config.server
        self._server = grpc_server(server_config, server_options(server_config.max_message_bytes))
        generator_pb2_grpc.add_GeneratorServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = await bind_and_start(self._server, server_config)
        self._metrics_http = start_metrics_http(self.metrics.registry, server_config.host, server_config.metrics_port)
        logger.info(
            "generator listening on %s:%d (%s; metrics port %s); loading model",
            server_config.host, self.port, describe_security(server_config), self.metrics_port,
        )  # fmt: skip

    async def load(self) -> None:
        """Load, warm up, check the encoder, then report SERVING."""
        loaded = await asyncio.to_thread(self._load_models)
        engine = AsyncEngine(loaded.engine)
        engine.start()
        self.engine = engine
        family = loaded.engine.family
        inputs = InputProcessor(loaded.engine.processor, family)
        encoder = self._image_encoder(loaded.vision)
        self._encoder = encoder
        self.images = self._image_provider(encoder, family.hidden_size, inputs.tokens_per_image)
        if isinstance(encoder, LocalEncoder):
            await encoder.warm_up()  # the vision tower's first forward, before SERVING, as the encoder service does
        if isinstance(encoder, RemoteEncoder):
            await encoder.verify()
        model = self.config.engine.model

        def model_info() -> encoder_pb2.ModelInfo:
            return encoder_pb2.ModelInfo(
                model_id=model.model,
                fingerprint=encoder.fingerprint,
                dtype=model.dtype,
                device=model.device,
                image_placeholder=inputs.image_token,
                hidden_size=family.hidden_size,
                max_context=loaded.engine.max_model_len,
                image_token_id=inputs.image_token_id,
                image_size=family.image_size,
                version=VERSION,
                family=family.name,
                tokens_per_image=inputs.tokens_per_image or 0,
                image_embeddings_depend_on_instruction=family.embedding_condition("") is not None,
                images_before_text=family.images_before_text,
            )

        self._servicer.attach(
            GeneratorBackend(
                engine=engine,
                inputs=inputs,
                images=self.images,
                max_model_len=loaded.engine.max_model_len,
                model_info=model_info,
            )
        )
        self._watchdog = asyncio.create_task(self._watch_engine(engine))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "generator ready: model %s, encoder %s, redis %s",
            model.model, self.config.encoder_address or "in-process", "on" if self.config.cache.redis_url else "off",
        )  # fmt: skip

    def _load_models(self) -> _Loaded:
        engine = LLMEngine.from_config(self.config.engine)
        engine.warm_up()  # on this thread, before the engine thread starts (compiles the language model when on)
        # Single-process deployment (no --encoder-address): images are encoded here.
        vision = VisionEncoder(self.config.engine.model) if self.config.encoder_address is None else None
        return _Loaded(engine=engine, vision=vision)

    def _image_encoder(self, vision: VisionEncoder | None) -> LocalEncoder | RemoteEncoder:
        """The in-process encoder when `vision` is loaded, else the encoder service at --encoder-address."""
        if vision is not None:
            local = LocalEncoder(vision)
            local.start()
            return local
        address, model = self.config.encoder_address, self.config.engine.model
        if address is None:
            raise ValueError("no encoder: set --encoder-address or load the vision encoder in-process")
        path = str(resolve_checkpoint(model.model, model.revision))
        return RemoteEncoder(
            address,
            fingerprint=encoder_fingerprint(path, dtype=model.dtype),
            model_path=path,
            dtype=model.dtype,
            max_message_bytes=self.config.server.max_message_bytes,
            timeout_s=self.config.encoder_timeout_s,
            on_error=lambda status: self.metrics.encoder_errors.labels(status=status).inc(),
            credentials=channel_credentials(self.config.encoder_tls),
            api_key=self.config.encoder_api_key,
        )

    def _image_provider(
        self, encoder: ImageEncoder, hidden_size: int, tokens_per_image: int | None
    ) -> EmbeddingProvider:
        """local LRU -> Redis (--redis-url) -> `encoder`. A remote encoder fills Redis itself; an in-process one
        is this replica's own encoder, so what it encodes is shared through Redis from here."""
        cache_config, metrics = self.config.cache, self.metrics
        layers = [CacheLayer("local", LocalEmbeddingCache(cache_config.local_cache_bytes))]
        if cache_config.redis_url is not None:
            redis = RedisEmbeddingCache.from_config(
                cache_config,
                encoder.fingerprint,
                expected_rows=tokens_per_image,
                expected_hidden_size=hidden_size,
                on_error=lambda op: metrics.redis_errors.labels(op=op).inc(),
            )
            layers.append(CacheLayer("redis", redis, fill=isinstance(encoder, LocalEncoder), shared=True))
        return EmbeddingProvider(
            encoder,
            layers,
            hidden_size=hidden_size,
            tokens_per_image=tokens_per_image,
            on_lookup=lambda source: metrics.image_lookups.labels(source=source).inc(),
        )

    async def _watch_engine(self, engine: AsyncEngine) -> None:
        """A dead engine thread makes this replica NOT_SERVING, so traffic moves elsewhere."""
        while engine.is_alive:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
        if not self._stopped:
            logger.error("the engine thread stopped: reporting NOT_SERVING")
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; `grace` defaults to --shutdown-grace-s. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.server.shutdown_grace_s if grace is None else grace
        self._servicer.draining = True
        await self._health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        in_flight = self._servicer.num_in_flight
        if in_flight:
            logger.info("draining: %d stream(s) in flight, up to %.1f s", in_flight, grace)
            try:
                await asyncio.wait_for(self._servicer.wait_idle(), grace)
            except TimeoutError:
                logger.warning("grace period over: ending %d stream(s) with UNAVAILABLE", self._servicer.num_in_flight)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)  # streams still running get EngineDeadError
        if self._server is not None:
            await self._server.stop(_FINAL_STATUS_GRACE_S)
            self._server = None
        if self.images is not None:
            await self.images.close()
        if self._encoder is not None:
            await self._encoder.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        logger.info("generator stopped")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await set_health(self._health, SERVICE_NAME, status)


async def serve(config: GeneratorConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully; returns the exit code (0)."""
    return await run_until_signal(
        GeneratorServer(config), shutdown_grace_s=config.server.shutdown_grace_s, logger=logger
    )
