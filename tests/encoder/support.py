"""Helpers for the encoder tests: an in-process server on its own event loop, a private redis-server, images."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import struct
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from common.config import CacheConfig, EncoderConfig, ModelConfig, ServerConfig
from common.images.embedding import ImageEmbedding
from common.images.vision_encoder import VisionEncoder
from common.models.base import PreparedImage
from encoder_service.server import EncoderServer
from protos import encoder_pb2, encoder_pb2_grpc
from tests.grpc_support import RedisProcess as RedisProcess  # re-exported for the encoder tests
from tests.grpc_support import free_port as free_port

_T = TypeVar("_T")
MiB = 1024 * 1024


def png_bytes(seed: int | None = None, size: tuple[int, int] = (40, 30)) -> bytes:
    """A noise PNG; seed None = a fresh random image (unique across test runs, so Redis keys never collide)."""
    rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def version_1_record(fingerprint: str, dtype: str, shape: tuple[int, int], data: bytes) -> bytes:
    """An intact record in the old format 1 (no image key in the header), as an older release wrote it."""
    header = {"dtype": dtype, "shape": list(shape), "fingerprint": fingerprint}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<6sBI", b"MMEMB\0", 1, len(encoded)) + encoded + data


def encoder_config(
    model: Path,
    *,
    redis_url: str | None = None,
    metrics_port: int | None = None,
    max_message_bytes: int = 64 * MiB,
    cache: CacheConfig | None = None,
    **kwargs: Any,
) -> EncoderConfig:
    return EncoderConfig(
        model=ModelConfig(model=str(model), dtype=kwargs.pop("dtype", "float32")),
        server=ServerConfig(
            port=0, metrics_port=metrics_port, max_message_bytes=max_message_bytes, shutdown_grace_s=5.0
        ),
        cache=cache or CacheConfig(redis_url=redis_url, redis_timeout_ms=200.0),
        **kwargs,
    )


class SlowVisionEncoder(VisionEncoder):
    """The real encoder, with an optional delay per forward pass, counting forward passes and preprocessed images."""

    delay_s = 0.0

    def __init__(self, model_config: ModelConfig) -> None:
        self.forward_passes = 0
        self.preprocessed_images = 0
        super().__init__(model_config)

    def prepare(self, image: Image.Image, condition: str | None = None) -> PreparedImage:
        self.preprocessed_images += 1
        return super().prepare(image, condition)

    def encode_prepared(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        self.forward_passes += 1
        time.sleep(self.delay_s)
        return super().encode_prepared(images)


class RunningServer:
    """An EncoderServer on a private event loop thread, and a blocking gRPC channel to it."""

    def __init__(self, config: EncoderConfig, *, listen_only: bool = False, **kwargs: Any) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-encoder-loop", daemon=True)
        self._thread.start()
        self.server = EncoderServer(config, **kwargs)
        self.run(self.server.listen() if listen_only else self.server.start())
        limit = config.server.max_message_bytes
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 120.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def encode(self, *images: bytes | str, return_embeddings: bool = True) -> encoder_pb2.EncodeResponse:
        items = [
            encoder_pb2.ImageInput(embedding_key=i) if isinstance(i, str) else encoder_pb2.ImageInput(data=i)
            for i in images
        ]
        request = encoder_pb2.EncodeRequest(images=items, return_embeddings=return_embeddings)
        response: encoder_pb2.EncodeResponse = self.stub.Encode(request, timeout=60)
        return response

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.value(name, labels)

    def close(self) -> None:
        self.channel.close()
        if self.loop.is_running():
            self.run(self.server.stop(0))
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
