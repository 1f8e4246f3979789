"""Images encoded in this process: decode and prepare on a thread pool, dynamic batching on one model thread.

    EncodeItem (bytes or a decoded image, + condition)
      ──decode_image + VisionEncoder.prepare (thread pool)──▶ PreparedImage
      ──DynamicBatcher (one forward pass per batch signature)──▶ embedding [rows, hidden_size]

`LocalEncoder` is the `ImageEncoder` of the encoder service and of every single-process deployment (the
generator without --encoder-address, the offline `LLM`). Caching and single flight are the provider's
(`common/images/provider.py`); this class only turns images into embeddings.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from common.images.batcher import BatcherClosedError, DynamicBatcher
from common.images.embedding import ImageEmbedding
from common.images.errors import EmbeddingNotFoundError, ImageError, ImageUnavailableError
from common.images.intake import ImageLimits, decode_image
from common.images.provider import EncodeItem
from common.images.vision_encoder import VisionEncoder
from common.models.base import PreparedImage

_SHUTTING_DOWN = "the encoder is shutting down; retry on another replica"


class LocalEncoder:
    """An `ImageEncoder` around one `VisionEncoder`. Use from one asyncio event loop: `start()` inside it, `await
    close()` when done."""

    holds_keys = False  # its only cache is the provider's

    def __init__(
        self,
        encoder: VisionEncoder,
        *,
        limits: ImageLimits | None = None,
        max_batch_size: int = 16,
        max_batch_wait_s: float = 0.005,
        on_batch: Callable[[int, float], None] | None = None,
        decode_workers: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.limits = limits or ImageLimits()
        self.batcher = DynamicBatcher(
            encoder.encode_prepared, max_batch_size=max_batch_size, max_wait_s=max_batch_wait_s, on_batch=on_batch
        )
        workers = decode_workers or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmserve-decode")

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        """Stop the batcher (the running batch finishes), then the decode threads."""
        await self.batcher.close()
        self._decode_pool.shutdown(wait=True)

    async def ready(self, deadline: float | None) -> str:
        return self.fingerprint

    async def warm_up(self) -> None:
        """One forward pass on a blank image through the batcher thread (kernels, allocator, thread pools)."""
        blank = Image.new("RGB", (64, 64), (127, 127, 127))
        condition = self.encoder.family.embedding_condition("")  # what an empty prompt conditions on, if anything
        prepare = functools.partial(self.encoder.prepare, blank, condition)
        prepared = await asyncio.get_running_loop().run_in_executor(self._decode_pool, prepare)
        await self.batcher.submit(prepared)

    async def encode(self, items: Sequence[EncodeItem], deadline: float | None) -> list[ImageEmbedding | ImageError]:
        """One embedding or error per item; every item is decoded and batched on its own, so one bad image fails
        only itself. Local work is not cut short by `deadline`: the caller's own cancellation stops waiting."""
        jobs = [self.batcher.submit_prepared(self._preparer(item), self._decode_pool) for item in items]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        outcomes: list[ImageEmbedding | ImageError] = []
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BatcherClosedError):
                outcomes.append(ImageUnavailableError(_SHUTTING_DOWN))
            elif isinstance(result, ImageError | ImageEmbedding):
                outcomes.append(result)
            else:
                raise result  # a model failure: the caller answers INTERNAL
        return outcomes

    async def fetch(self, keys: Sequence[str], deadline: float | None) -> list[ImageEmbedding]:
        raise EmbeddingNotFoundError(f"no embedding is cached under key {keys[0]}: send the image bytes instead")

    def _preparer(self, item: EncodeItem) -> Callable[[], PreparedImage]:
        def prepare() -> PreparedImage:
            image = item.image if item.image is not None else decode_image(item.data or b"", self.limits)
            return self.encoder.prepare(image, item.condition)

        return prepare
