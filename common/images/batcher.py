"""Dynamic batching of single-image encodes. No grpc, no redis (single flight per key is the provider's).

    submit(image) ──▶ asyncio queue ──▶ batch loop ──▶ run_batch([image, ...]) on ONE worker thread
         ▲                                    │
         └─────────── future per item ◀───────┘

The batch loop takes the first waiting item, then keeps collecting until `max_batch_size` items or until
`max_wait_s` has passed since that first item was queued. Items that queued while the previous forward pass
was running are therefore already "late" and go into the next batch at once: under load batches fill up,
and a lone request waits at most `max_wait_s`. The model runs off the event loop, one batch at a time.

Items still being decoded (`submit_prepared`) are known to be coming: while any are in flight the batch waits
for them up to `max_pending_wait_s` instead. Without this, closed-loop clients split into alternating tiny and
large batches (the first decoded image fires a forward pass alone while its peers are a few ms behind).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from common.images.embedding import ImageEmbedding
from common.models.base import PreparedImage

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

RunBatch = Callable[[list[PreparedImage]], list[ImageEmbedding]]


class BatcherClosedError(Exception):
    """The batcher is shutting down; the item was not encoded."""


@dataclass
class _Item:
    image: PreparedImage
    future: asyncio.Future[ImageEmbedding]
    queued_at: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Groups concurrent `submit` calls into batched calls of `run_batch`, in a dedicated worker thread.

    `run_batch` maps B prepared images to B outputs; `on_batch(size, seconds)` is called after each. Items with
    different batch signatures (tensor shapes) never share a batch.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_pending_wait_s: float | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        # Default: 10x the plain wait (5 ms -> 50 ms), a small fraction of a forward pass on CPU.
        self.max_pending_wait_s = 10 * max_wait_s if max_pending_wait_s is None else max_pending_wait_s
        self._preparing = 0  # submit_prepared calls whose pixels are still being made
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmserve-encode")
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the batch loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop(), name="mmserve-batcher")

    async def submit(self, image: PreparedImage) -> ImageEmbedding:
        """Encode one prepared image; resolves when its batch has run."""
        if self._closed or self._loop_task is None:
            raise BatcherClosedError("the encoder is not running")
        item = _Item(image, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        return await item.future

    async def submit_prepared(self, prepare: Callable[[], PreparedImage], executor: Executor) -> ImageEmbedding:
        """Run `prepare()` (decode + preprocess) on `executor`, then `submit` its result.

        Exceptions of `prepare` propagate to the caller. While it runs, batches being collected wait for it.
        """
        self._preparing += 1
        try:
            image = await asyncio.get_running_loop().run_in_executor(executor, prepare)
        finally:
            # No await between here and the queue put in submit(): the batch loop never sees this item as
            # neither preparing nor queued.
            self._preparing -= 1
        return await self.submit(image)

    async def close(self) -> None:
        """Stop taking work; the batch in progress finishes, queued items fail with BatcherClosedError."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the encoder is shutting down"))
        self._executor.shutdown(wait=True)

    async def _batch_loop(self) -> None:
        while True:
            batch: list[_Item] = []
            try:
                await self._collect(batch)
                live = [item for item in batch if not item.future.done()]  # callers may have been cancelled
                for group in _group_by_shape(live):
                    await self._run(group)
            finally:  # only reached with pending items when close() cancelled this loop
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BatcherClosedError("the encoder is shutting down"))

    async def _collect(self, batch: list[_Item]) -> None:
        batch.append(await self._queue.get())
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                wait = max(self.max_wait_s, self.max_pending_wait_s) if self._preparing else self.max_wait_s
                remaining = batch[0].queued_at + wait - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            else:
                batch.append(self._queue.get_nowait())

    async def _run(self, items: list[_Item]) -> None:
        images = [item.image for item in items]
        started = time.perf_counter()
        work = asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, images)
        try:
            await asyncio.wait([work])
        except asyncio.CancelledError:
            # close(): the forward pass in the thread cannot be interrupted; let it finish and deliver its
            # results, so callers already in this batch are answered, then stop.
            await asyncio.wait([work])
            self._deliver(items, work, started)
            raise
        self._deliver(items, work, started)

    def _deliver(self, items: list[_Item], work: asyncio.Future[list[ImageEmbedding]], started: float) -> None:
        error = work.exception()
        if error is not None:  # a model failure fails this batch only; the loop keeps serving
            logger.error("encode batch of %d failed: %s: %s", len(items), type(error).__name__, error)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if self._on_batch is not None:
            self._on_batch(len(items), time.perf_counter() - started)
        for item, output in zip(items, work.result(), strict=True):
            if not item.future.done():
                item.future.set_result(output)


def _group_by_shape(items: list[_Item]) -> list[list[_Item]]:
    groups: dict[tuple, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.image.batch_signature, []).append(item)
    return list(groups.values())
