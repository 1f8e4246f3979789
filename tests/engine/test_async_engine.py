"""The engine thread: streams, early exit aborts and frees blocks, rejections fail only their request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import EngineConfig, ModelConfig
from generator_service.engine.async_engine import AsyncEngine, DuplicateRequestError, EngineDeadError
from generator_service.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from generator_service.engine.request import ImageSpan
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import RequestRejected
from tests.engine_mode import ENFORCE_EAGER


@pytest.fixture
def engine(tiny_checkpoint: Path) -> Iterator[AsyncEngine]:
    model = ModelConfig(str(tiny_checkpoint), enforce_eager=ENFORCE_EAGER)
    config = EngineConfig(model=model, block_size=4, num_kv_blocks=64, max_model_len=64)
    async_engine = AsyncEngine(LLMEngine.from_config(config))
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


def _request(request_id: str, max_tokens: int = 8, **kwargs: object) -> EngineRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return EngineRequest(request_id, [1, 40, 41, 42, 43], sampling, **kwargs)  # type: ignore[arg-type]


async def _collect(engine: AsyncEngine, request: EngineRequest) -> list[RequestOutput]:
    return [output async for output in engine.generate(request)]


def test_streams_concurrent_requests_to_completion(engine: AsyncEngine) -> None:
    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(_collect(engine, _request(f"r{i}", 4 + i)) for i in range(4)))

    results = asyncio.run(main())
    for i, outputs in enumerate(results):
        assert sum(len(o.new_token_ids) for o in outputs) == 4 + i
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert all(results[0][k].new_token_ids == results[1][k].new_token_ids for k in range(4))  # same prompt, greedy
    assert engine.engine.block_manager.num_used_blocks == 0


def test_leaving_early_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = engine.generate(_request("long", max_tokens=50))
        first = await stream.__anext__()
        assert first.new_token_ids and not first.finished
        await stream.aclose()  # what a cancelled gRPC handler does
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0 and not engine.engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks still held: {engine.stats()}")

    asyncio.run(main())


def test_rejections_reach_the_caller_and_the_loop_goes_on(engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(RequestRejected, match="max_model_len"):
            await _collect(engine, _request("too-long", max_tokens=100))
        bad_tensor = _request("bad", image_spans=(ImageSpan("k", 1, 2),), image_embeddings=("not a tensor",))
        with pytest.raises(AttributeError):
            await _collect(engine, bad_tensor)
        slow = engine.generate(_request("dup", max_tokens=30))
        await slow.__anext__()
        with pytest.raises(DuplicateRequestError, match="already in flight"):
            await _collect(engine, _request("dup"))
        await slow.aclose()
        outputs = await _collect(engine, _request("after", max_tokens=3))
        assert outputs[-1].finished and sum(len(o.new_token_ids) for o in outputs) == 3

    asyncio.run(main())
    assert engine.is_alive


def test_generate_after_shutdown_fails_clearly(engine: AsyncEngine) -> None:
    engine.shutdown()

    async def main() -> None:
        with pytest.raises(EngineDeadError, match="not running"):
            await _collect(engine, _request("late"))

    asyncio.run(main())
