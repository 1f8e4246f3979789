"""The one image path: image -> key -> embedding, through the caches and an encoder, for every caller.

    ImageSource (bytes | decoded image | embedding_key, + condition)
      ──image_key (no decode)──▶ in flight already? join it
      ──▶ cache layers in order (local LRU, then Redis) ──all miss──▶ encoder.encode (one call for the request's
                                                                      new images) ──▶ fill the cache layers
      embedding_key nobody has ──▶ encoder.fetch when the encoder may hold it, else FAILED_PRECONDITION

`EmbeddingProvider` is used alike by the encoder service (caches: Redis or an LRU; encoder: `LocalEncoder`), the
generator service (LRU + Redis; a `RemoteEncoder` over gRPC or a `LocalEncoder`) and the offline `LLM` (LRU +
`LocalEncoder`). Concurrent requests for the same uncached image join one flight: it is looked up and encoded
once. Caches are optional at run time: a cache that cannot answer is skipped (the image is encoded anyway).
Every failure the caller must report is an `ImageError` (common/images/errors.py) naming the image by its index
in the caller's request. Transport-free: no grpc here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from common.hashing import image_key, pil_image_bytes
from common.images.cache import EmbeddingCache
from common.images.embedding import ImageEmbedding
from common.images.errors import (
    CacheUnavailableError,
    EmbeddingNotFoundError,
    ImageDeadlineError,
    ImageError,
    ImageUnavailableError,
    InvalidImageError,
    SkippedImageError,
)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_INLINE_BYTES = 1 << 20  # larger payloads are hashed off the event loop (hashlib releases the GIL)


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: exactly one of file bytes, a decoded RGB image (offline API) or an embedding key.

    `condition` is what the embedding depends on besides the image (`ModelFamily.embedding_condition`).
    """

    data: bytes | None = None
    image: Image.Image | None = None
    embedding_key: str | None = None
    condition: str | None = None


@dataclass(frozen=True)
class EncodeItem:
    """One image an encoder is asked to encode: bytes or a decoded image, and its condition."""

    key: str
    data: bytes | None
    image: Image.Image | None
    condition: str | None


@dataclass(frozen=True)
class ResolvedImage:
    key: str
    embedding: torch.Tensor  # [rows, hidden_size], CPU
    source: str  # the cache layer that had it ("local", "redis") or "encoder"
    layout: tuple[int, ...] = ()  # the family's image layout (see ImageEmbedding)

    @property
    def cache_hit(self) -> bool:
        return self.source != "encoder"


_Found = asyncio.Future[ResolvedImage]  # one key's outcome in a flight
# Outcomes a flight gives for reasons of the request that started it (another image of its encoder call was bad, or
# its deadline passed): a request that only joined the flight tries the image again on its own.
_NOT_MINE = (SkippedImageError, ImageDeadlineError)


class ImageEncoder(Protocol):
    """What turns images into embeddings: `LocalEncoder` in this process, `RemoteEncoder` over gRPC."""

    @property
    def fingerprint(self) -> str:
        """The encoder fingerprint image keys use (part of every key and of every Redis record)."""
        ...

    @property
    def holds_keys(self) -> bool:
        """Whether `fetch` can find embeddings that no cache layer here has (a remote encoder's own cache)."""
        ...

    async def ready(self, deadline: float | None) -> str:
        """The fingerprint image keys use now; raises ImageUnavailableError while the encoder cannot be used."""
        ...

    async def encode(self, items: Sequence[EncodeItem], deadline: float | None) -> list[ImageEmbedding | ImageError]:
        """One embedding or error per item (errors about that item alone); raises an ImageError (index = the
        item's position) when the whole call failed."""
        ...

    async def fetch(self, keys: Sequence[str], deadline: float | None) -> list[ImageEmbedding]:
        """Embeddings stored under `keys`, in order; raises EmbeddingNotFoundError or ImageUnavailableError."""
        ...


@dataclass(frozen=True)
class CacheLayer:
    """One cache the provider reads, in order. `fill`: store what the encoder produced here (off for a shared
    Redis that a remote encoder fills itself). `shared`: a miss here means nobody has it."""

    name: str
    cache: EmbeddingCache
    fill: bool = True
    shared: bool = False


class EmbeddingProvider:
    """Keys and embeddings for the images of a request. Use from one asyncio event loop.

    `hidden_size` and, for families with a fixed token count, `tokens_per_image` are checked on every embedding
    before anyone uses it (a wrong shape would fail a whole engine batch). `on_lookup(source)` is called once per
    image found, `on_coalesced()` for each image that joined another request's flight.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        caches: Sequence[CacheLayer],
        *,
        hidden_size: int,
        tokens_per_image: int | None,
        on_lookup: Callable[[str], None] | None = None,
        on_coalesced: Callable[[], None] | None = None,
        on_cache_miss: Callable[[], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.caches = list(caches)
        self.hidden_size = hidden_size
        self.tokens_per_image = tokens_per_image
        self._on_lookup = on_lookup
        self._on_coalesced = on_coalesced
        self._on_cache_miss = on_cache_miss
        self._in_flight: dict[str, _Found] = {}
        self._fingerprint = encoder.fingerprint

    async def close(self) -> None:
        for layer in self.caches:
            await layer.cache.close()

    # ---- keys ----------------------------------------------------------------------------------------------

    async def key(self, source: ImageSource, fingerprint: str) -> str:
        """The image key of `source` under `fingerprint`, without decoding; InvalidImageError for bad input."""
        if source.embedding_key is not None:
            if not _KEY_RE.match(source.embedding_key):
                raise InvalidImageError("embedding_key must be 64 lowercase hex characters (a key returned by Encode)")
            return source.embedding_key
        if source.image is not None:  # off the event loop: converting and copying pixels is the expensive part
            return await asyncio.to_thread(_decoded_image_key, fingerprint, source.image, source.condition)
        if source.data is None:
            raise InvalidImageError("has neither data nor embedding_key")
        if not source.data:
            raise InvalidImageError("is empty (0 bytes)")
        if len(source.data) <= _HASH_INLINE_BYTES:
            return image_key(fingerprint, source.data, source.condition)
        return await asyncio.to_thread(image_key, fingerprint, source.data, source.condition)

    # ---- resolve -------------------------------------------------------------------------------------------

    async def resolve(self, sources: Sequence[ImageSource], deadline: float | None = None) -> list[ResolvedImage]:
        """Keys and embeddings of `sources`, in order. `deadline` is monotonic time (None: none).

        Raises the first failing image's ImageError, with `index` = its position in `sources`.
        """
        if not sources:
            return []
        fingerprint = await self.encoder.ready(deadline)
        if fingerprint != self._fingerprint:  # a remote encoder computing in another dtype: its keys and records
            self._fingerprint = fingerprint
            for layer in self.caches:
                layer.cache.use_fingerprint(fingerprint)
        keys: list[str] = []
        for index, source in enumerate(sources):
            try:
                keys.append(await self.key(source, fingerprint))
            except ImageError as bad:
                raise bad.at(index) from None
        embeddings = await self._embeddings(keys, sources, deadline)
        errors = [(index, found) for index, key in enumerate(keys) if isinstance(found := embeddings[key], ImageError)]
        if errors:  # the image that failed, rather than the images its failure left unencoded
            index, failed = next(((i, e) for i, e in errors if not isinstance(e, SkippedImageError)), errors[0])
            raise failed.at(index)
        return [found for key in keys if isinstance(found := embeddings[key], ResolvedImage)]

    async def _embeddings(
        self, keys: list[str], sources: Sequence[ImageSource], deadline: float | None
    ) -> dict[str, ResolvedImage | ImageError]:
        """Join the flights already running for some keys and run one flight for the rest; one outcome per key."""
        by_key = dict(zip(keys, sources, strict=True))  # an image sent twice is resolved once
        joined = {key: self._in_flight[key] for key in by_key if key in self._in_flight}
        own = [key for key in by_key if key not in joined]
        loop = asyncio.get_running_loop()
        futures: dict[str, _Found] = {key: loop.create_future() for key in own}
        self._in_flight.update(futures)  # no await since the membership test: no key gets two flights
        if own:
            # Its own task: a caller that is cancelled does not cancel the flight for the requests that joined it.
            flight = asyncio.ensure_future(self._flight(own, by_key, futures, deadline))
            flight.add_done_callback(lambda done: self._land(done, futures))
            await asyncio.shield(flight)
        if joined and self._on_coalesced is not None:
            for _ in joined:
                self._on_coalesced()
        outcomes: dict[str, ResolvedImage | ImageError] = {}
        for key in by_key:
            outcome = await _outcome(futures.get(key) or joined[key])
            if key in joined and isinstance(outcome, _NOT_MINE):  # the other request's failure, not this image's
                outcome = (await self._embeddings([key], [by_key[key]], deadline))[key]
            outcomes[key] = outcome
        return outcomes

    def _land(self, flight: asyncio.Future[None], futures: dict[str, _Found]) -> None:
        """The flight ended: forget its keys; a key it left unsettled gets what ended it."""
        for key, future in futures.items():
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
            if not future.done():
                if flight.cancelled():  # only at shutdown
                    future.set_exception(ImageUnavailableError("the image service is shutting down; retry later"))
                else:
                    future.set_exception(flight.exception() or RuntimeError("flight ended without an outcome"))
            future.exception()  # retrieved: no "never retrieved" noise when nobody was left waiting

    async def _flight(
        self,
        keys: list[str],
        sources: dict[str, ImageSource],
        futures: dict[str, _Found],
        deadline: float | None,
    ) -> None:
        """Look `keys` up, encode or fetch the rest, fill the caches; settle every key's future."""
        missing, unavailable = await self._from_caches(keys, futures)
        to_encode = [key for key in missing if sources[key].embedding_key is None]
        by_key_only = [key for key in missing if sources[key].embedding_key is not None]
        if self._on_cache_miss is not None:
            for _ in missing:
                self._on_cache_miss()
        await asyncio.gather(
            self._encode(to_encode, sources, futures, deadline),
            self._fetch(by_key_only, futures, unavailable, deadline),
        )

    async def _from_caches(
        self, keys: list[str], futures: dict[str, _Found]
    ) -> tuple[list[str], bool]:
        """Settle the keys some cache layer has; returns the rest, and whether a shared cache could not answer."""
        missing, shared_unavailable = keys, False
        for layer in self.caches:
            if not missing:
                break
            results = await asyncio.gather(*(layer.cache.get(key) for key in missing), return_exceptions=True)
            still_missing = []
            for key, result in zip(missing, results, strict=True):
                if isinstance(result, CacheUnavailableError):
                    shared_unavailable |= layer.shared
                    still_missing.append(key)
                elif isinstance(result, BaseException):
                    raise result
                elif result is None:
                    still_missing.append(key)
                else:
                    self._settle(futures[key], key, self._checked(result, f"the {layer.name} cache"), layer.name)
                    await self._fill(key, result, before=layer)
            missing = still_missing
        return missing, shared_unavailable

    async def _encode(
        self,
        keys: list[str],
        sources: dict[str, ImageSource],
        futures: dict[str, _Found],
        deadline: float | None,
    ) -> None:
        if not keys:
            return
        items = [EncodeItem(key, sources[key].data, sources[key].image, sources[key].condition) for key in keys]
        try:
            outcomes = await self.encoder.encode(items, deadline)
        except ImageError as error:
            for position, key in enumerate(keys):
                if error.index is None or error.index == position:
                    self._fail(futures, key, error.at(None))
                else:
                    self._fail(futures, key, SkippedImageError(error.message))
            return
        for key, outcome in zip(keys, outcomes, strict=True):
            if isinstance(outcome, ImageError):
                self._fail(futures, key, outcome.at(None))
                continue
            try:
                embedding = self._checked(outcome, "the encoder")
            except ImageError as error:
                self._fail(futures, key, error)
                continue
            self._settle(futures[key], key, embedding, "encoder")
            await self._fill(key, embedding)

    async def _fetch(
        self,
        keys: list[str],
        futures: dict[str, _Found],
        cache_unavailable: bool,
        deadline: float | None,
    ) -> None:
        """embedding_key inputs no cache layer has. Without an answer from a shared cache, a remote encoder's own
        cache may still hold them."""
        if not keys:
            return
        shared_answered = any(layer.shared for layer in self.caches) and not cache_unavailable
        if not self.encoder.holds_keys or shared_answered:
            for key in keys:
                self._fail(futures, key, _missing(key, cache_unavailable))
            return
        try:
            fetched = await self.encoder.fetch(keys, deadline)
        except EmbeddingNotFoundError:  # the encoder's own answer: nobody has them
            for key in keys:
                self._fail(futures, key, _missing(key, False))
            return
        except ImageError as error:
            for key in keys:
                self._fail(futures, key, error.at(None))
            return
        for key, embedding in zip(keys, fetched, strict=True):
            try:
                self._settle(futures[key], key, self._checked(embedding, "the encoder"), "encoder")
            except ImageError as error:
                self._fail(futures, key, error)

    async def _fill(self, key: str, embedding: ImageEmbedding, before: CacheLayer | None = None) -> None:
        """Store in the cache layers that take fills (those before `before` only, when a later layer had it)."""
        for layer in self.caches:
            if layer is before:
                return
            if layer.fill:
                await layer.cache.put(key, embedding)

    def _fail(self, futures: dict[str, _Found], key: str, error: ImageError) -> None:
        """Settle `key` with `error` and stop offering its flight: a later request tries the key afresh."""
        futures[key].set_exception(error)
        if self._in_flight.get(key) is futures[key]:
            del self._in_flight[key]

    def _settle(self, future: _Found, key: str, embedding: ImageEmbedding, source: str) -> None:
        future.set_result(ResolvedImage(key, embedding.tensor, source, embedding.layout))
        if self._on_lookup is not None:
            self._on_lookup(source)

    def _checked(self, embedding: ImageEmbedding, origin: str) -> ImageEmbedding:
        """The engine trusts embeddings: a wrong shape here would fail a whole batch, so it is caught first."""
        rows, tensor = self.tokens_per_image, embedding.tensor
        if tensor.dim() != 2 or tensor.shape[1] != self.hidden_size or (rows and tensor.shape[0] != rows):
            raise ImageUnavailableError(
                f"{origin} returned an embedding of shape {list(tensor.shape)}; this model needs "
                f"[{rows or 'rows'}, {self.hidden_size}] (encoder and generator run different checkpoints?)"
            )
        return embedding


async def _outcome(future: _Found) -> ResolvedImage | ImageError:
    try:
        return await asyncio.shield(future)
    except ImageError as error:
        return error


def _missing(key: str, cache_unavailable: bool) -> ImageError:
    if cache_unavailable:
        return CacheUnavailableError(
            f"the embedding cache is unreachable, so embedding_key {key} cannot be read now; "
            "retry later or send the image bytes"
        )
    return EmbeddingNotFoundError(
        f"no embedding is cached under embedding_key {key} (expired, evicted or never stored): "
        "send the image bytes instead"
    )


def _decoded_image_key(fingerprint: str, image: Image.Image, condition: str | None) -> str:
    rgb = image.convert("RGB")
    return image_key(fingerprint, pil_image_bytes(rgb.size, rgb.tobytes()), condition)
