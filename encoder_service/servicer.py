"""`mmserve.encoder.v1.Encoder` over grpc.aio: validate, convert, call `EncoderCore`, map errors to status codes.

    bad image bytes / malformed key / no images      INVALID_ARGUMENT   (client-safe message, image index)
    too many images, image or response too large     RESOURCE_EXHAUSTED
    overloaded (--max-pending-images in flight)      RESOURCE_EXHAUSTED (refused before any decode or cache call)
    model still loading, draining, cache down*       UNAVAILABLE        (*only for embedding_key inputs)
    embedding_key not in the cache                   FAILED_PRECONDITION
    anything else                                    INTERNAL           (details in the server log only)

Admission is counted in images, before the first await: a call is admitted while the images of the calls in
flight plus its own stay within `max_pending_images` (or when no call is in flight, so a valid request larger
than the limit is never refused forever), and released when it ends for any reason (OK, error, cancel,
deadline). Cache hits count too while their call is in flight. A cancelled call stops counting at
once, even though an encode it started keeps running for the cache and for other callers of the same image.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import time

import grpc

from common.config import EncoderConfig
from common.tensor_codec import tensor_to_proto
from encoder_service.batcher import BatcherClosedError
from encoder_service.core import EmbeddingNotFoundError, EncoderCore, ImageEmbedding
from encoder_service.embedding_cache import CacheUnavailableError
from encoder_service.image_io import ImageDecodeError
from encoder_service.metrics import EncoderMetrics
from encoder_service.vision_encoder import UnsupportedImageError
from protos import encoder_pb2, encoder_pb2_grpc

logger = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_PER_IMAGE_OVERHEAD = 256  # bytes of protobuf framing per EncodedImage, generous
try:
    VERSION = importlib.metadata.version("mmserve")
except importlib.metadata.PackageNotFoundError:  # running from a checkout
    VERSION = "0.1.0"


class RpcError(Exception):
    """A request that ends with a non-OK status; `message` is sent to the client verbatim."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_for(index: int, error: BaseException) -> RpcError:
    where = f"images[{index}]"
    if isinstance(error, (ImageDecodeError, UnsupportedImageError)):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {error}")
    if isinstance(error, EmbeddingNotFoundError):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"{where}: {error}")
    if isinstance(error, CacheUnavailableError):
        return RpcError(grpc.StatusCode.UNAVAILABLE, f"{where}: the embedding cache is unavailable; retry later")
    if isinstance(error, BatcherClosedError):
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the encoder is shutting down; retry on another replica")
    logger.error("%s: unexpected %s", where, type(error).__name__, exc_info=error)
    return RpcError(grpc.StatusCode.INTERNAL, f"{where}: internal error while encoding")


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Serves once `attach(core)` has been called (after the model is loaded and warmed up)."""

    def __init__(self, config: EncoderConfig, metrics: EncoderMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._core: EncoderCore | None = None
        self._pending_images = 0
        self.draining = False

    @property
    def pending_images(self) -> int:
        """Images of the Encode calls admitted and not yet finished."""
        return self._pending_images

    def attach(self, core: EncoderCore) -> None:
        self._core = core

    async def Encode(
        self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeResponse:
        started = time.perf_counter()
        admitted = 0
        error: RpcError | None = None
        try:
            # No await before _admit: two concurrent calls can never both take the last slot.
            core = self._ready_core()
            self._validate(request)
            admitted = self._admit(len(request.images))
            response = await self._encode(core, request)
        except RpcError as exc:
            error = exc
        finally:
            # Also on cancel; and before the status is sent, so a client that retries at once finds the slots free.
            self._pending_images -= admitted
            self._metrics.request_seconds.observe(time.perf_counter() - started)
        if error is not None:
            self._metrics.requests.labels(code=error.code.name).inc()
            await context.abort(error.code, error.message)
        self._metrics.requests.labels(code="OK").inc()
        return response

    async def GetModelInfo(
        self, request: encoder_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.ModelInfo:
        try:
            encoder = self._ready_core().encoder
        except RpcError as error:
            await context.abort(error.code, error.message)
        return encoder_pb2.ModelInfo(
            model_id=self._config.model.model,
            fingerprint=encoder.fingerprint,
            dtype=encoder.dtype,
            device=str(encoder.device),
            image_placeholder=encoder.image_placeholder,
            hidden_size=encoder.hidden_size,
            max_context=0,
            image_token_id=encoder.image_token_id,
            image_size=encoder.image_size,
            version=VERSION,
        )

    def _ready_core(self) -> EncoderCore:
        if self.draining:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the encoder is shutting down; retry on another replica")
        if self._core is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the encoder is still loading its model; retry shortly")
        return self._core

    def _admit(self, count: int) -> int:
        """Take `count` slots of --max-pending-images or raise RESOURCE_EXHAUSTED; returns what was taken."""
        in_flight, limit = self._pending_images, self._config.max_pending_images
        if in_flight and in_flight + count > limit:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"encoder overloaded: {in_flight} images in flight, limit {limit} (--max-pending-images); "
                "retry later",
            )
        self._pending_images += count
        return count

    async def _encode(self, core: EncoderCore, request: encoder_pb2.EncodeRequest) -> encoder_pb2.EncodeResponse:
        jobs = [
            core.encode_image(item.data) if item.WhichOneof("source") == "data" else core.lookup(item.embedding_key)
            for item in request.images
        ]
        # All images at once, so the images of one request share forward passes.
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                raise _status_for(index, result)
        embeddings = [result for result in results if isinstance(result, ImageEmbedding)]
        if request.return_embeddings:
            self._check_response_size(embeddings)
        return encoder_pb2.EncodeResponse(images=[self._to_proto(e, request.return_embeddings) for e in embeddings])

    def _validate(self, request: encoder_pb2.EncodeRequest) -> None:
        count, limit = len(request.images), self._config.max_images_per_request
        if count == 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no images")
        if count > limit:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{count} images in one request; the limit is {limit}"
            )
        for index, item in enumerate(request.images):
            source = item.WhichOneof("source")
            if source is None:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}] has neither data nor embedding_key")
            if source == "data" and len(item.data) > self._config.max_image_bytes:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"images[{index}] is {len(item.data)} bytes; the limit is {self._config.max_image_bytes} bytes",
                )
            if source == "embedding_key" and not _KEY_RE.match(item.embedding_key):
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"images[{index}].embedding_key must be 64 lowercase hex characters (a key returned by Encode)",
                )

    def _check_response_size(self, embeddings: list[ImageEmbedding]) -> None:
        size = sum(e.embedding.numel() * e.embedding.element_size() + _PER_IMAGE_OVERHEAD for e in embeddings)
        limit = self._config.server.max_message_bytes
        if size > limit:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the response would be {size} bytes, over the {limit}-byte message limit: send fewer images per "
                "call, or set return_embeddings=false and read the embeddings by key",
            )

    @staticmethod
    def _to_proto(result: ImageEmbedding, return_embeddings: bool) -> encoder_pb2.EncodedImage:
        num_tokens, hidden_size = result.embedding.shape
        message = encoder_pb2.EncodedImage(
            embedding_key=result.key, cache_hit=result.cache_hit, num_tokens=num_tokens, hidden_size=hidden_size
        )
        if return_embeddings:
            message.embedding.CopyFrom(tensor_to_proto(result.embedding))
        return message
