"""Helpers for the generator-service tests: both servers in-process on a private event loop, a private
redis-server, Hugging Face reference generations, images, and small gRPC client helpers."""

from __future__ import annotations

import asyncio
import inspect
import io
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig

from common.checkpoint import load_processor
from common.config import (
    CacheConfig,
    EncoderConfig,
    EngineConfig,
    GeneratorConfig,
    ModelConfig,
    ServerConfig,
)
from common.images.intake import decode_image
from encoder_service.server import EncoderServer
from generator_service.server import GeneratorServer
from protos import encoder_pb2, generator_pb2, generator_pb2_grpc
from tests.engine_mode import ENFORCE_EAGER

_T = TypeVar("_T")
MiB = 1024 * 1024
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nCompare them. ASSISTANT:"


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds; fail the test with `what` if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """`wait_until` for code running on a client event loop (which must keep running meanwhile)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# Servers


def generator_config(
    model: Path,
    *,
    encoder_address: str | None = None,
    redis_url: str | None = None,
    metrics_port: int | None = None,
    shutdown_grace_s: float = 5.0,
    **engine: Any,
) -> GeneratorConfig:
    max_queue_len = engine.pop("max_queue_len", 256)
    encoder_timeout_s = engine.pop("encoder_timeout_s", 30.0)
    engine.setdefault("num_kv_blocks", 256)
    engine.setdefault("block_size", 4)
    return GeneratorConfig(
        engine=EngineConfig(model=ModelConfig(model=str(model), enforce_eager=ENFORCE_EAGER), **engine),
        server=ServerConfig(port=0, metrics_port=metrics_port, shutdown_grace_s=shutdown_grace_s),
        cache=CacheConfig(redis_url=redis_url, redis_timeout_ms=200.0, breaker_cooldown_s=0.5),
        encoder_address=encoder_address,
        encoder_timeout_s=encoder_timeout_s,
        max_queue_len=max_queue_len,
    )


def encoder_config(model: Path, *, redis_url: str | None = None, port: int = 0, **kwargs: Any) -> EncoderConfig:
    return EncoderConfig(
        model=ModelConfig(model=str(model)),
        server=ServerConfig(port=port, shutdown_grace_s=2.0),
        cache=CacheConfig(redis_url=redis_url, redis_timeout_ms=200.0, breaker_cooldown_s=0.5),
        **kwargs,
    )


class EventLoopThread:
    """An asyncio loop on a daemon thread; servers live here, tests call `run(coroutine)` from their thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 120.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class RunningEncoder:
    def __init__(self, loop: EventLoopThread, config: EncoderConfig) -> None:
        self.loop = loop
        self.server = EncoderServer(config)
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.value(name, labels)

    def stop(self) -> None:
        self.loop.run(self.server.stop(0))


class RunningGenerator:
    def __init__(self, loop: EventLoopThread, config: GeneratorConfig) -> None:
        self.loop = loop
        self.config = config
        self.server = GeneratorServer(config)
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.value(name, labels)

    def kv_blocks_used(self) -> float:
        return self.metric("mmserve_kv_blocks_used")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """No call in flight and every KV block back (the contract's `mmserve_kv_blocks_used` is 0)."""
        wait_until(
            lambda: self.server.num_in_flight == 0 and self.kv_blocks_used() == 0,
            timeout,
            "the generator to hold no request and no KV block",
        )

    def stop(self) -> None:
        self.loop.run(self.server.stop(0))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face reference


class Reference:
    """The checkpoint's own Hugging Face model class: `generate(do_sample=False)` on the same prompt and image bytes.

    Any model family: the class is the checkpoint's declared architecture. A text-only prompt to a family whose
    `generate` needs pixel values (BLIP-2, InstructBLIP) is generated by its language model alone, which is what
    that model computes for text.
    """

    def __init__(self, path: Path) -> None:
        self.processor = load_processor(path)  # AutoProcessor's, or the family's images-only subclass of HF's
        config = AutoConfig.from_pretrained(path)
        model_class = getattr(transformers, config.architectures[0])
        self.model = model_class.from_pretrained(path).eval()
        self._memo: dict[tuple[str, tuple[bytes, ...], int], list[int]] = {}

    def generate(self, prompt: str, images: Sequence[bytes], max_tokens: int, *, chat: bool = False) -> list[int]:
        """`chat`: the prompt was rendered by the chat template, and is tokenized as HF's
        `apply_chat_template(tokenize=True)` does (no second BOS when the template wrote one)."""
        key = (prompt, tuple(images), max_tokens)
        if key not in self._memo:
            pil = [decode_image(data) for data in images]  # the encoder's own decoding of the same bytes
            bos = self.processor.tokenizer.bos_token
            special = not (chat and bos is not None and prompt.startswith(bos))
            inputs = self.processor(
                text=prompt, images=pil or None, return_tensors="pt", add_special_tokens=special
            )
            model, kwargs = self.model, dict(inputs)
            if not pil and "pixel_values" in inspect.signature(model.generate).parameters:
                # BLIP-2 style: the text path is the language model alone (the QFormer's inputs go nowhere)
                model = model.language_model
                kwargs = {name: kwargs[name] for name in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                out = model.generate(**kwargs, max_new_tokens=max_tokens, do_sample=False)
            self._memo[key] = [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
        return self._memo[key]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


# ---------------------------------------------------------------------------------------------------------------
# Client side


def request(
    prompt: str = "",
    images: Sequence[bytes | str] = (),
    *,
    max_tokens: int = 8,
    request_id: str = "",
    **sampling: Any,
) -> generator_pb2.GenerateRequest:
    """A GenerateRequest; str images are embedding keys. Greedy unless `temperature` is given."""
    sampling.setdefault("temperature", 0.0)
    return generator_pb2.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        images=[
            encoder_pb2.ImageInput(embedding_key=i) if isinstance(i, str) else encoder_pb2.ImageInput(data=i)
            for i in images
        ],
        sampling=generator_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
    )


@dataclass
class StreamResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    messages: int = 0
    finish_reason: int = generator_pb2.FINISH_REASON_UNSPECIFIED
    usage: generator_pb2.Usage | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""

    def add(self, response: generator_pb2.GenerateResponse) -> None:
        self.messages += 1
        self.token_ids.extend(response.token_ids)
        self.text += response.text
        if response.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = response.finish_reason
            self.usage = response.usage


async def collect(
    stub: generator_pb2_grpc.GeneratorStub,
    message: generator_pb2.GenerateRequest,
    *,
    timeout: float | None = 60.0,
    cancel_after: int | None = None,
) -> StreamResult:
    """Run one Generate; the status lands in `code`/`details`. `cancel_after=N` cancels after N messages."""
    result = StreamResult()
    call = stub.Generate(message, timeout=timeout)
    try:
        async for response in call:
            result.add(response)
            if cancel_after is not None and result.messages >= cancel_after:
                call.cancel()
                result.code = grpc.StatusCode.CANCELLED
                return result
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code(), exc.details() or ""
    return result


def run_client(address: str, work: Callable[[generator_pb2_grpc.GeneratorStub], Awaitable[_T]]) -> _T:
    """Run `work(stub)` on a fresh client event loop (the servers run on their own)."""

    async def main() -> _T:
        async with grpc.aio.insecure_channel(address) as channel:
            return await work(generator_pb2_grpc.GeneratorStub(channel))

    return asyncio.run(main())


def generate(address: str, message: generator_pb2.GenerateRequest, **kwargs: Any) -> StreamResult:
    return run_client(address, lambda stub: collect(stub, message, **kwargs))


def with_id(message: generator_pb2.GenerateRequest, request_id: str) -> generator_pb2.GenerateRequest:
    copy = generator_pb2.GenerateRequest()
    copy.CopyFrom(message)
    copy.request_id = request_id
    return copy
