"""DynamicBatcher (batch size, wait, shapes, failures, close), with a fake model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.images.batcher import BatcherClosedError, DynamicBatcher
from common.images.embedding import ImageEmbedding
from common.models.base import PreparedImage, collate


class FakeModel:
    """Returns pixels.sum() per image; records batch sizes and the thread it ran on."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, images: list[PreparedImage]) -> list[ImageEmbedding]:
        pixels = collate(images)["pixel_values"]
        self.batches.append(pixels.shape[0])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("model exploded")
        return [ImageEmbedding(p.sum().reshape(1, 1)) for p in pixels]


def pixels(value: float, shape: tuple[int, ...] = (3, 2, 2)) -> PreparedImage:
    return PreparedImage({"pixel_values": torch.full((1, *shape), value)})


async def _submit_all(batcher: DynamicBatcher, values: list[float]) -> list[float]:
    results = await asyncio.gather(*(batcher.submit(pixels(v)) for v in values))
    return [r.tensor.item() for r in results]


def test_concurrent_submits_share_batches_up_to_the_max_size() -> None:
    model = FakeModel()

    async def scenario() -> list[float]:
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.2)
        batcher.start()
        try:
            return await _submit_all(batcher, [float(i) for i in range(10)])
        finally:
            await batcher.close()

    started = time.perf_counter()
    assert asyncio.run(scenario()) == [12.0 * i for i in range(10)]  # each result goes back to its caller
    assert model.batches == [4, 4, 2]
    # Full batches do not wait; only the last partial one waits (up to 0.2 s).
    assert time.perf_counter() - started < 2.0
    assert all(name.startswith("mmserve-encode") for name in model.threads)  # off the event loop


def test_a_lone_request_waits_at_most_max_wait() -> None:
    model = FakeModel()

    async def scenario() -> float:
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.05)
        batcher.start()
        try:
            started = time.perf_counter()
            await batcher.submit(pixels(1.0))
            return time.perf_counter() - started
        finally:
            await batcher.close()

    elapsed = asyncio.run(scenario())
    assert model.batches == [1]
    assert 0.04 <= elapsed < 1.0


def test_items_queued_during_a_forward_pass_form_the_next_batch() -> None:
    model = FakeModel(delay_s=0.2)
    sizes: list[int] = []

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=16, max_wait_s=0.0, on_batch=lambda n, s: sizes.append(n))
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(pixels(1.0)))
            await asyncio.sleep(0.05)  # the first forward pass is now running
            await _submit_all(batcher, [2.0] * 5)
            await first
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [1, 5] and sizes == [1, 5]


def test_different_shapes_never_share_a_batch() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.1)
        batcher.start()
        try:
            jobs = [batcher.submit(pixels(1.0, (3, 2, 2))) for _ in range(3)]
            jobs += [batcher.submit(pixels(1.0, (3, 4, 4))) for _ in range(2)]
            await asyncio.gather(*jobs)
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert sorted(model.batches) == [2, 3]


def test_a_failed_batch_fails_its_callers_and_the_next_batch_succeeds() -> None:
    model = FakeModel(fail_on=1)

    async def scenario() -> float:
        batcher = DynamicBatcher(model, max_batch_size=2, max_wait_s=0.5)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(pixels(1.0)) for _ in range(2)), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) for r in results)
            return (await batcher.submit(pixels(2.0))).tensor.item()
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) == 24.0


def test_close_finishes_the_running_batch_and_fails_queued_items() -> None:
    model = FakeModel(delay_s=0.3)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit(pixels(float(i)))) for i in range(3)]
        await asyncio.sleep(0.1)  # item 0 is in the model; items 1 and 2 are queued
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(pixels(0.0))
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    results = asyncio.run(scenario())
    assert isinstance(results[0], ImageEmbedding) and results[0].tensor.item() == 0.0
    assert all(isinstance(r, BatcherClosedError) for r in results[1:])


def test_a_batch_waits_for_images_still_being_decoded() -> None:
    """Closed-loop clients: without the pending wait the first decoded image would run alone."""
    executor = ThreadPoolExecutor(max_workers=3)

    def prepare(delay_s: float) -> Callable[[], PreparedImage]:
        def run() -> PreparedImage:
            time.sleep(delay_s)
            return pixels(delay_s)

        return run

    async def scenario(pending_wait_s: float) -> list[int]:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.005, max_pending_wait_s=pending_wait_s)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.submit_prepared(prepare(d), executor) for d in (0.0, 0.1, 0.2)))
        finally:
            await batcher.close()
        return model.batches

    assert asyncio.run(scenario(pending_wait_s=2.0)) == [3]
    assert asyncio.run(scenario(pending_wait_s=0.0))[0] == 1
    executor.shutdown()
