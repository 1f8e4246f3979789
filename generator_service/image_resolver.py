"""The images of one Generate call -> their keys and embeddings, through the caches and the encoder service.

    ImageInput.data ──image_key──┐
    ImageInput.embedding_key ────┴─▶ local LRU ──miss──▶ Redis ──miss──▶ ONE Encode call for all misses
                                                                         (return_embeddings=True, remaining
                                                                          deadline; the encoder writes Redis)

An `embedding_key` nobody has is FAILED_PRECONDITION. The key of image bytes is computed here, without decoding
the image, from the encoder fingerprint: computed locally from the checkpoint and checked against the encoder's
`GetModelInfo().fingerprint` (at start-up and again on first use while unverified). With no encoder address the
images are decoded and encoded in this process (`EncoderCore` around a `VisionEncoder`), still through the caches.

The caches are optional: Redis down or slow costs a time-boxed call (then the circuit breaker skips it) and the
image is encoded anyway. Every failure the caller must report is an `ImageResolveError` carrying its gRPC code
and a client-safe message. The gRPC side of the encoder (targets, failover, error mapping) is in
`encoder_client.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from common.checkpoint import encoder_fingerprint, resolve_checkpoint
from common.config import GeneratorConfig
from common.hashing import image_key
from common.tensor_codec import TensorDecodeError, tensor_from_proto
from encoder_service.embedding_cache import CacheUnavailableError, LocalEmbeddingCache, RedisEmbeddingCache
from generator_service.encoder_client import EncoderClient, ImageResolveError
from generator_service.metrics import GeneratorMetrics
from protos import encoder_pb2

if TYPE_CHECKING:
    from encoder_service.core import EncoderCore

logger = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_INLINE_BYTES = 1 << 20  # larger images are hashed off the event loop (hashlib releases the GIL)
_VERIFY_RETRY_S = 5.0  # an unreachable or mismatched encoder is asked again at most this often
_VERIFY_TIMEOUT_S = 2.0
_IMAGE_INDEX_RE = re.compile(r"^images\[(\d+)\]")


@dataclass(frozen=True)
class ResolvedImage:
    key: str
    embedding: torch.Tensor  # [num_tokens, hidden_size], CPU
    source: str  # "local", "redis" or "encoder"


class ImageResolver:
    """Keys and embeddings for the images of a request. Use from one asyncio event loop.

    Exactly one of `encoder` (a remote encoder service) or `core` (in-process encoding) is given.
    `hidden_size` is the language model's; `tokens_per_image` (when known) is checked on every embedding.
    """

    def __init__(
        self,
        *,
        fingerprint: str,
        model_path: str,
        dtype: str,
        hidden_size: int,
        tokens_per_image: int | None,
        local: LocalEmbeddingCache,
        redis: RedisEmbeddingCache | None,
        metrics: GeneratorMetrics,
        encoder: EncoderClient | None = None,
        core: EncoderCore | None = None,
    ) -> None:
        if (encoder is None) == (core is None):
            raise ValueError("give exactly one of encoder (remote) or core (in-process)")
        self.fingerprint = fingerprint
        self._model_path = model_path
        self._dtype = dtype
        self.hidden_size = hidden_size
        self.tokens_per_image = tokens_per_image
        self.local = local
        self.redis = redis
        self.metrics = metrics
        self.encoder = encoder
        self.core = core
        self._verified = core is not None  # in-process: the fingerprint is the encoder's own
        self._mismatch: str | None = None
        self._last_verify = -float("inf")

    @classmethod
    def from_config(
        cls,
        config: GeneratorConfig,
        *,
        hidden_size: int,
        tokens_per_image: int | None,
        metrics: GeneratorMetrics,
        core: EncoderCore | None = None,
    ) -> ImageResolver:
        """The resolver for a generator: remote when `config.encoder_address` is set, else `core` is required."""
        model = config.engine.model
        path = str(resolve_checkpoint(model.model, model.revision))
        fingerprint = core.fingerprint if core is not None else encoder_fingerprint(path, dtype=model.dtype)
        redis = None
        if config.cache.redis_url is not None:
            redis = RedisEmbeddingCache.from_config(
                config.cache,
                fingerprint,
                expected_rows=tokens_per_image,
                expected_hidden_size=hidden_size,
                on_error=lambda op: metrics.redis_errors.labels(op=op).inc(),
            )
        encoder = None
        if config.encoder_address is not None:
            encoder = EncoderClient(
                config.encoder_address,
                max_message_bytes=config.server.max_message_bytes,
                timeout_s=config.encoder_timeout_s,
                on_error=lambda status: metrics.encoder_errors.labels(status=status).inc(),
            )
        return cls(
            fingerprint=fingerprint,
            model_path=path,
            dtype=model.dtype,
            hidden_size=hidden_size,
            tokens_per_image=tokens_per_image,
            local=LocalEmbeddingCache(config.cache.local_cache_bytes),
            redis=redis,
            metrics=metrics,
            encoder=encoder,
            core=core,
        )

    async def close(self) -> None:
        if self.encoder is not None:
            await self.encoder.close()
        if self.core is not None:
            await self.core.close()
        if self.redis is not None:
            await self.redis.close()
        await self.local.close()

    # ---- fingerprint check ---------------------------------------------------------------------------------

    async def verify_encoder(self, timeout: float = _VERIFY_TIMEOUT_S) -> bool:
        """Compare the encoder's fingerprint with ours; True when they match.

        An encoder that runs another dtype is accepted when its fingerprint equals ours for that dtype (keys
        then use it). A mismatch is logged as an error and image requests are refused until the encoder
        matches; an unreachable encoder is logged and asked again later (cached images still work meanwhile).
        """
        if self.encoder is None:
            return True
        self._last_verify = time.monotonic()
        try:
            info = await self.encoder.model_info(timeout)
        except grpc.aio.AioRpcError as exc:
            self.metrics.encoder_errors.labels(status=exc.code().name).inc()
            logger.warning(
                "encoder at %s did not answer GetModelInfo (%s); its fingerprint is checked on first use",
                self.encoder.address, exc.code().name,
            )  # fmt: skip
            return False
        expected = self.fingerprint
        if info.dtype and info.dtype != self._dtype:
            expected = await asyncio.to_thread(encoder_fingerprint, self._model_path, dtype=info.dtype)
        if info.fingerprint != expected:
            logger.error(
                "the encoder at %s serves a different model (%r, fingerprint %s…) than this generator (%s, "
                "fingerprint %s…): image requests are refused until both run the same checkpoint, image processor "
                "and dtype",
                self.encoder.address, info.model_id, info.fingerprint[:12], self._model_path, expected[:12],
            )  # fmt: skip
            self._mismatch = (
                "the encoder service serves a different model than this generator (their fingerprints differ), so "
                "images cannot be used now (text-only requests still work); the operator must fix the deployment"
            )
            self._verified = False
            return False
        if expected != self.fingerprint:
            logger.info("encoder computes in %s: image keys use its fingerprint %s…", info.dtype, expected[:12])
            self.fingerprint = expected
            if self.redis is not None:
                self.redis.fingerprint = expected
        self._mismatch = None
        self._verified = True
        logger.info("encoder at %s verified (fingerprint %s…)", self.encoder.address, expected[:12])
        return True

    async def _ensure_verified(self, deadline: float | None) -> None:
        if self._verified or time.monotonic() - self._last_verify < _VERIFY_RETRY_S:
            if self._mismatch is not None:
                raise ImageResolveError(grpc.StatusCode.UNAVAILABLE, self._mismatch)
            return
        timeout = _VERIFY_TIMEOUT_S if deadline is None else min(_VERIFY_TIMEOUT_S, deadline - time.monotonic())
        if timeout > 0:
            await self.verify_encoder(timeout)
        if self._mismatch is not None:
            raise ImageResolveError(grpc.StatusCode.UNAVAILABLE, self._mismatch)

    # ---- resolve -------------------------------------------------------------------------------------------

    async def resolve(self, images: Sequence[encoder_pb2.ImageInput], timeout: float | None) -> list[ResolvedImage]:
        """Keys and embeddings of `images`, in order; `timeout` is what is left of the caller's deadline."""
        if not images:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._ensure_verified(deadline)
        keys = [await self._key(index, image) for index, image in enumerate(images)]
        data = {key: image.data for key, image in zip(keys, images, strict=True) if image.HasField("data")}
        found: dict[str, ResolvedImage] = {}
        missing = list(dict.fromkeys(keys))  # unique, in order: an image sent twice is looked up once
        missing = self._from_local(missing, found)
        missing, redis_down = await self._from_redis(missing, found)
        by_key = [key for key in missing if key not in data]
        if by_key:
            await self._fetch_keys(by_key, found, redis_down, deadline)
        to_encode = [key for key in missing if key in data]
        if to_encode:
            try:
                await self._encode(to_encode, [data[key] for key in to_encode], found, deadline)
            except ImageResolveError as exc:
                # The encoder numbers the images of its own call: name them as the client sent them.
                positions = [keys.index(key) for key in to_encode]
                raise ImageResolveError(exc.code, _renumbered(exc.message, positions)) from None
        return [found[key] for key in keys]

    async def _key(self, index: int, image: encoder_pb2.ImageInput) -> str:
        source = image.WhichOneof("source")
        if source == "data":
            if not image.data:
                raise ImageResolveError(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}] is empty (0 bytes)")
            if len(image.data) <= _HASH_INLINE_BYTES:
                return image_key(self.fingerprint, image.data)
            return await asyncio.to_thread(image_key, self.fingerprint, image.data)
        if source == "embedding_key":
            if not _KEY_RE.match(image.embedding_key):
                raise ImageResolveError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"images[{index}].embedding_key must be 64 lowercase hex characters (a key returned by Encode)",
                )
            return image.embedding_key
        raise ImageResolveError(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}] has neither data nor embedding_key")

    def _from_local(self, keys: list[str], found: dict[str, ResolvedImage]) -> list[str]:
        missing = []
        for key in keys:
            embedding = self.local.get_sync(key)
            if embedding is None:
                missing.append(key)
            else:
                self._found(found, key, embedding, "local", store_local=False)
        return missing

    async def _from_redis(self, keys: list[str], found: dict[str, ResolvedImage]) -> tuple[list[str], bool]:
        """Look the keys up in Redis concurrently; returns the misses and whether Redis failed to answer."""
        if self.redis is None or not keys:
            return keys, False
        redis = self.redis
        results = await asyncio.gather(*(redis.get(key) for key in keys), return_exceptions=True)
        missing, unavailable = [], False
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, CacheUnavailableError):
                unavailable = True
                missing.append(key)
            elif isinstance(result, BaseException):
                raise result
            elif result is None:
                missing.append(key)
            else:
                self._found(found, key, self._checked(result, "Redis"), "redis")
        return missing, unavailable

    async def _fetch_keys(
        self, keys: list[str], found: dict[str, ResolvedImage], redis_down: bool, deadline: float | None
    ) -> None:
        """embedding_key inputs none of our caches has. Without a shared Redis answer, the encoder's own cache
        (its in-process LRU when it runs without Redis) may still hold them."""
        if self.encoder is None or (self.redis is not None and not redis_down):
            raise _missing_key_error(keys[0], redis_down)
        request = encoder_pb2.EncodeRequest(
            images=[encoder_pb2.ImageInput(embedding_key=key) for key in keys], return_embeddings=True
        )
        try:
            response = await self._call_encoder(request, deadline)
        except ImageResolveError as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise _missing_key_error(keys[0], False) from None
            raise
        self._store(keys, response, found)

    async def _encode(
        self, keys: list[str], data: list[bytes], found: dict[str, ResolvedImage], deadline: float | None
    ) -> None:
        if self.core is not None:
            embeddings = await self._encode_in_process(data)
            for key, embedding in zip(keys, embeddings, strict=True):
                self._found(found, key, embedding, "encoder")
                if self.redis is not None:
                    await self.redis.put(key, embedding)  # we are the encoder: share it with the other replicas
            return
        request = encoder_pb2.EncodeRequest(
            images=[encoder_pb2.ImageInput(data=item) for item in data], return_embeddings=True
        )
        self._store(keys, await self._call_encoder(request, deadline), found)

    async def _encode_in_process(self, data: list[bytes]) -> list[torch.Tensor]:
        from encoder_service.image_io import ImageDecodeError
        from encoder_service.vision_encoder import UnsupportedImageError

        assert self.core is not None
        core = self.core
        results = await asyncio.gather(*(core.encode_image(item) for item in data), return_exceptions=True)
        embeddings = []
        for index, result in enumerate(results):
            if isinstance(result, ImageDecodeError | UnsupportedImageError):
                raise ImageResolveError(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}]: {result}")
            if isinstance(result, BaseException):
                raise result
            embeddings.append(self._checked(result.embedding, "the in-process encoder"))
        return embeddings

    async def _call_encoder(
        self, request: encoder_pb2.EncodeRequest, deadline: float | None
    ) -> encoder_pb2.EncodeResponse:
        assert self.encoder is not None
        return await self.encoder.encode_images(request, deadline)

    def _store(self, keys: list[str], response: encoder_pb2.EncodeResponse, found: dict[str, ResolvedImage]) -> None:
        if len(response.images) != len(keys):
            raise self._bad_encoder(f"answered {len(response.images)} images for {len(keys)}")
        for key, item in zip(keys, response.images, strict=True):
            if item.embedding_key != key:
                # Same bytes, different key: that replica hashes with another fingerprint (another model).
                self._verified = False
                self._last_verify = -float("inf")
                raise self._bad_encoder(
                    f"returned key {item.embedding_key[:12]}… for image key {key[:12]}… "
                    "(it serves a different model or image processor)"
                )
            if not item.HasField("embedding"):
                raise self._bad_encoder("returned no embedding although return_embeddings was set")
            try:
                embedding = tensor_from_proto(item.embedding)
            except TensorDecodeError as exc:
                raise self._bad_encoder(f"returned an unreadable tensor: {exc}") from None
            self._found(found, key, self._checked(embedding, "the encoder"), "encoder")

    def _bad_encoder(self, what: str) -> ImageResolveError:
        address = self.encoder.address if self.encoder is not None else "in-process"
        logger.error("encoder at %s %s", address, what)
        return ImageResolveError(grpc.StatusCode.UNAVAILABLE, f"the encoder service at {address} {what}")

    def _checked(self, embedding: torch.Tensor, origin: str) -> torch.Tensor:
        """The engine trusts embeddings: a wrong shape here would fail a whole batch, so it is caught first."""
        rows = self.tokens_per_image
        if embedding.dim() != 2 or embedding.shape[1] != self.hidden_size or (rows and embedding.shape[0] != rows):
            raise ImageResolveError(
                grpc.StatusCode.UNAVAILABLE,
                f"{origin} returned an embedding of shape {list(embedding.shape)}; this model needs "
                f"[{rows or 'num_tokens'}, {self.hidden_size}] (encoder and generator run different checkpoints?)",
            )
        return embedding

    def _found(
        self, found: dict[str, ResolvedImage], key: str, embedding: torch.Tensor, source: str, store_local: bool = True
    ) -> None:
        if store_local:
            self.local.put_sync(key, embedding)
        found[key] = ResolvedImage(key, embedding, source)
        self.metrics.image_lookups.labels(source=source).inc()


def _renumbered(message: str, positions: list[int]) -> str:
    """'images[j]: ...' about the j-th image of an Encode call -> the index of that image in the request."""
    match = _IMAGE_INDEX_RE.match(message)
    if match is None or int(match.group(1)) >= len(positions):
        return message
    return f"images[{positions[int(match.group(1))]}]" + message[match.end() :]


def _missing_key_error(key: str, cache_unavailable: bool) -> ImageResolveError:
    if cache_unavailable:
        return ImageResolveError(
            grpc.StatusCode.UNAVAILABLE,
            f"the embedding cache is unreachable, so embedding_key {key} cannot be read now; "
            "retry later or send the image bytes",
        )
    return ImageResolveError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"no embedding is cached under embedding_key {key} (expired, evicted or never stored): "
        "send the image bytes instead",
    )
