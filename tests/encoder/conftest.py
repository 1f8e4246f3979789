"""Encoder fixtures: servers on loopback, a real Redis, Hugging Face reference features."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from common.images.intake import decode_image
from tests.encoder.support import RunningServer

StartServer = Callable[..., RunningServer]
Reference = Callable[[Path, list[bytes]], list[torch.Tensor]]


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
