"""Encoder fixtures: servers on loopback, a real Redis, Hugging Face reference features."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from common.hashing import redis_key
from common.images.intake import decode_image
from tests.encoder.support import RedisProcess, RunningServer

StartServer = Callable[..., RunningServer]
Reference = Callable[[Path, list[bytes]], list[torch.Tensor]]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at 127.0.0.1:6379 when it answers, else a private redis-server for this session."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        process = RedisProcess()
        yield process.url
        process.kill()
    else:
        yield "redis://127.0.0.1:6379/0"
    finally:
        client.close()


class RedisKeys:
    """A redis-py client that deletes, after the test, every image key the test registered."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self._names: set[str] = set()

    def name(self, image_key: str) -> str:
        self._names.add(redis_key(image_key))
        return redis_key(image_key)

    def cleanup(self) -> None:
        if self._names:
            self.client.delete(*self._names)
        self.client.close()


@pytest.fixture
def redis_keys(redis_url: str) -> Iterator[RedisKeys]:
    keys = RedisKeys(redis_url)
    yield keys
    keys.cleanup()


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """`start_server(config, **EncoderServer kwargs)` -> a started server, stopped after the test."""
    servers: list[RunningServer] = []

    def start(config: Any, **kwargs: Any) -> RunningServer:
        server = RunningServer(config, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def hf_reference() -> Reference:
    """`reference(checkpoint, [image bytes])` -> `LlavaForConditionalGeneration.get_image_features`, one image
    per call (a batch of one), pixel values from `AutoProcessor`'s image processor on the decoded image."""
    loaded: dict[Path, tuple[Any, Any]] = {}

    def reference(path: Path, images: list[bytes]) -> list[torch.Tensor]:
        if path not in loaded:
            model = LlavaForConditionalGeneration.from_pretrained(path).eval()
            loaded[path] = (model, AutoProcessor.from_pretrained(path).image_processor)
        model, processor = loaded[path]
        outputs = []
        for data in images:
            pixel_values = processor(images=[decode_image(data)], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                pooled = model.get_image_features(pixel_values=pixel_values).pooler_output
            # transformers 5.24: a list of per-image tensors; 5.17: one [B, T, H] tensor.
            outputs.append(pooled[0])
        return outputs

    return reference
