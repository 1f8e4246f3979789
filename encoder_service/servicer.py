"""`mmserve.encoder.v1.Encoder` over grpc.aio: validate, convert, call the `EmbeddingProvider`, map errors to codes.

    no images, malformed key, bad image bytes          INVALID_ARGUMENT   (client-safe message, image index)
    too many images, image or response too large       RESOURCE_EXHAUSTED
    overloaded (--max-pending-images in flight)        RESOURCE_EXHAUSTED (refused before any decode or cache call)
    model still loading, draining, cache down*         UNAVAILABLE        (*only for embedding_key inputs)
    embedding_key not in the cache                     FAILED_PRECONDITION
    anything else                                      INTERNAL           (details in the server log only)

Domain errors become codes through `common.serving.rpc_error`, the table both services share.

Admission is counted in images, before the first await: a call is admitted while the images of the calls in
flight plus its own stay within `max_pending_images` (or when no call is in flight, so a valid request larger
than the limit is never refused forever), and released when it ends for any reason (OK, error, cancel,
deadline). Cache hits count too while their call is in flight. A cancelled call stops counting at
once, even though an encode it started keeps running for the cache and for other callers of the same image.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass

import grpc

from common.config import EncoderConfig
from common.images.errors import ImageError
from common.images.provider import EmbeddingProvider, ImageSource, ResolvedImage
from common.images.vision_encoder import VisionEncoder
from common.serving import RpcError, rpc_error
from common.tensor_codec import tensor_to_proto
from encoder_service.metrics import EncoderMetrics
from protos import encoder_pb2, encoder_pb2_grpc

logger = logging.getLogger(__name__)
_PER_IMAGE_OVERHEAD = 256  # bytes of protobuf framing per EncodedImage, generous
try:
    VERSION = importlib.metadata.version("mmserve")
except importlib.metadata.PackageNotFoundError:  # running from a checkout
    VERSION = "0.1.0"


@dataclass(frozen=True)
class EncoderBackend:
    """What the servicer calls once the model is loaded and warm."""

    provider: EmbeddingProvider  # the cache (Redis or an LRU) in front of a LocalEncoder
    encoder: VisionEncoder


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Serves once `attach(backend)` has been called (after the model is loaded and warmed up)."""

    def __init__(self, config: EncoderConfig, metrics: EncoderMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._backend: EncoderBackend | None = None
        self._pending_images = 0
        self.draining = False

    @property
    def pending_images(self) -> int:
        """Images of the Encode calls admitted and not yet finished."""
        return self._pending_images

    def attach(self, backend: EncoderBackend) -> None:
        self._backend = backend

    async def Encode(
        self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeResponse:
        started = time.perf_counter()
        admitted = 0
        error: RpcError | None = None
        try:
            # No await before _admit: two concurrent calls can never both take the last slot.
            backend = self._ready_backend()
            self._validate(request)
            admitted = self._admit(len(request.images))
            response = await self._encode(backend, request)
        except RpcError as exc:
            error = exc
        except ImageError as exc:
            error = rpc_error(exc)
        except Exception:
            logger.exception("Encode failed")
            error = RpcError(grpc.StatusCode.INTERNAL, "internal error while encoding; see the encoder's log")
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
            encoder = self._ready_backend().encoder
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
            family=encoder.family.name,
            tokens_per_image=encoder.tokens_per_image or 0,
            image_embeddings_depend_on_instruction=encoder.family.embedding_condition("") is not None,
            images_before_text=encoder.family.images_before_text,
        )

    def _ready_backend(self) -> EncoderBackend:
        if self.draining:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the encoder is shutting down; retry on another replica")
        if self._backend is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the encoder is still loading its model; retry shortly")
        return self._backend

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

    async def _encode(self, backend: EncoderBackend, request: encoder_pb2.EncodeRequest) -> encoder_pb2.EncodeResponse:
        # The instruction as the family reads it (None for families whose embeddings depend on the image alone).
        condition = backend.encoder.family.embedding_condition(request.instruction)
        sources = [
            ImageSource(data=item.data, condition=condition)
            if item.WhichOneof("source") == "data"
            else ImageSource(embedding_key=item.embedding_key)
            for item in request.images
        ]
        # All images at once, so the images of one request share forward passes.
        embeddings = await backend.provider.resolve(sources)
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

    def _check_response_size(self, embeddings: list[ResolvedImage]) -> None:
        size = sum(e.embedding.numel() * e.embedding.element_size() + _PER_IMAGE_OVERHEAD for e in embeddings)
        limit = self._config.server.max_message_bytes
        if size > limit:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the response would be {size} bytes, over the {limit}-byte message limit: send fewer images per "
                "call, or set return_embeddings=false and read the embeddings by key",
            )

    @staticmethod
    def _to_proto(result: ResolvedImage, return_embeddings: bool) -> encoder_pb2.EncodedImage:
        num_tokens, hidden_size = result.embedding.shape
        message = encoder_pb2.EncodedImage(
            embedding_key=result.key,
            cache_hit=result.cache_hit,
            num_tokens=num_tokens,
            hidden_size=hidden_size,
            layout=result.layout,
        )
        if return_embeddings:
            message.embedding.CopyFrom(tensor_to_proto(result.embedding))
        return message
