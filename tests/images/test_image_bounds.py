"""The encoder refuses an image only when its processor would really blow up, not for its aspect ratio.

`VisionEncoder.check_image` asks the family how large the checkpoint's processor would resize the image
(`ModelFamily.resized_size`, the processor's own size rule, no pixel touched) and refuses more than
MAX_RESIZED_VALUES. So strips such as 20 x 2000 are encoded by every family, exactly as Hugging Face encodes them,
while a 1 x 16384 line under a shortest-edge (CLIP / LLaVA) processor, which would be stretched to 336 x 5.5 M
pixels, is refused with a message that says why; Qwen2-VL's own refusal of ratios above 200:1 is an
InvalidImageError, not an internal error. `resized_size` is checked against the processor's real resize calls.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, PreTrainedModel

from common.config import ModelConfig
from common.images.errors import InvalidImageError
from common.images.vision_encoder import MAX_RESIZED_VALUES, UnsupportedImageError, VisionEncoder
from common.models.idefics3 import processor_loads_without_torchvision
from tests.conftest import CheckpointFactory

# The tiny builders' families whose processors differ: shortest-edge + crop (llava), anyres tiling (llava_next),
# fixed size (blip2, gemma3), smart_resize (qwen2_vl, qwen2_5_vl), longest edge + tiles (idefics3, smolvlm).
_NEEDS_TORCHVISION_HERE = pytest.mark.skipif(
    not processor_loads_without_torchvision(),
    reason="this transformers release loads the Idefics3/SmolVLM image processor only with torchvision",
)
FAMILIES = (
    "llava", "llava_next", "blip2", "gemma3", "qwen2_vl", "qwen2_5_vl",
    pytest.param("idefics3", marks=_NEEDS_TORCHVISION_HERE), pytest.param("smolvlm", marks=_NEEDS_TORCHVISION_HERE),
)  # fmt: skip
STRIPS = [(20, 2000), (2000, 20)]  # (width, height): a receipt and a banner, 1:100
S = 336  # LLaVA-1.5's shortest edge (and crop), which the tiny builder scales down to 32


def _image(width: int, height: int) -> Image.Image:
    """Structured pixels (a Mandelbrot view): a flat colour would hide a resize or layout bug."""
    return Image.effect_mandelbrot((width, height), (-2.0, -1.5, 1.0, 1.5), 30).convert("RGB")


def _hf_model(path: Path) -> PreTrainedModel:
    """The checkpoint's own Hugging Face class (config.json's architectures), float32, eval."""
    architecture = AutoConfig.from_pretrained(path).architectures[0]
    model: PreTrainedModel = getattr(transformers, architecture).from_pretrained(path).eval()
    return model


def _hf_features(model: PreTrainedModel, encoder: VisionEncoder, image: Image.Image) -> torch.Tensor:
    """HF's `get_image_features` on what the whole processor makes of a one-image prompt: [rows, hidden]."""
    processor = encoder._processor
    text = "" if encoder.family.images_before_text else encoder.image_placeholder
    inputs = processor(text=text, images=[image], return_tensors="pt")
    get_image_features: Callable[..., Any] = model.get_image_features  # type: ignore[assignment]
    accepted = inspect.signature(get_image_features).parameters
    with torch.inference_mode():
        pooled = get_image_features(**{k: v for k, v in inputs.items() if k in accepted}).pooler_output
    return pooled[0]


@pytest.fixture(scope="module")
def llava_336(checkpoint_factory: CheckpointFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA with LLaVA-1.5's resize (shortest edge 336), then its own 32 x 32 center crop: the weights
    are unchanged and the stretched long edge is as long as the real model's."""
    path = tmp_path_factory.mktemp("llava-336") / "checkpoint"
    shutil.copytree(checkpoint_factory(family="llava"), path)
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    assert config["image_processor"]["size"] == {"shortest_edge": 32}
    config["image_processor"]["size"] = {"shortest_edge": S}
    config_file.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def encoder_336(llava_336: Path) -> VisionEncoder:
    return VisionEncoder(ModelConfig(model=str(llava_336)))


# --- strips are accepted and encoded as HF encodes them ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_strips_encode_equal_to_hf(checkpoint_factory: CheckpointFactory, family: str) -> None:
    path = checkpoint_factory(family=family)
    encoder = VisionEncoder(ModelConfig(model=str(path)))
    model = _hf_model(path)
    for width, height in STRIPS:
        image = _image(width, height)
        (ours,) = encoder.encode([image])
        reference = _hf_features(model, encoder, image)
        assert ours.shape == reference.shape and ours.shape[0] == encoder.num_image_tokens(image), (width, height)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)  # float32, batch of one: bit for bit


def test_strips_encode_equal_to_hf_at_llava_scale(llava_336: Path, encoder_336: VisionEncoder) -> None:
    """At S = 336 a 20 x 2000 strip is resized to 336 x 33600 (34 M values) before the crop: under the bound."""
    model = _hf_model(llava_336)
    for width, height in STRIPS:
        image = _image(width, height)
        (ours,) = encoder_336.encode([image])
        torch.testing.assert_close(ours, _hf_features(model, encoder_336, image), rtol=0, atol=0)


# --- what would blow up is refused, with the reason --------------------------------------------------------------


def test_a_line_stretched_past_the_bound_is_refused_with_the_reason(encoder_336: VisionEncoder) -> None:
    line = Image.new("RGB", (1, 16384))  # the tallest image intake lets through, 1 px wide
    started = time.perf_counter()
    with pytest.raises(UnsupportedImageError) as error:
        encoder_336.encode([line])
    assert time.perf_counter() - started < 1.0  # refused before the processor touched a pixel
    assert isinstance(error.value, InvalidImageError)  # INVALID_ARGUMENT over gRPC
    assert str(error.value) == (
        "image is 1 x 16384: the processor would resize it to 336 x 5505024 pixels (5.17 G values), "
        "more than the limit of 64 M values"
    )
    with pytest.raises(UnsupportedImageError):  # the token count asks the same question first
        encoder_336.num_image_tokens(line)


def test_the_bound_is_on_values_exactly(encoder_336: VisionEncoder) -> None:
    """1 x n is resized to 336 x 336n: 3 * 336 * 336 * n values, n = 198 is the last under 64 M."""
    assert 3 * S * S * 198 <= MAX_RESIZED_VALUES < 3 * S * S * 199
    encoder_336.check_image(Image.new("RGB", (198, 1)))
    with pytest.raises(UnsupportedImageError, match=r"^image is 199 x 1: .* 66864 x 336 pixels"):
        encoder_336.check_image(Image.new("RGB", (199, 1)))


def test_the_tiny_checkpoint_takes_what_intake_takes_but_not_more(checkpoint_factory: CheckpointFactory) -> None:
    """At S = 32 even 1 x 16384 (32 x 524288, 48 M values) fits; 1 x 100000 (307 M values) does not."""
    encoder = VisionEncoder(ModelConfig(model=str(checkpoint_factory(family="llava"))))
    (embedding,) = encoder.encode([Image.new("RGB", (16384, 1), (200, 30, 10))])
    assert embedding.shape == (16, 64) and bool(torch.isfinite(embedding).all())
    with pytest.raises(UnsupportedImageError, match=r"^image is 100000 x 1: .* \(293 M values\)"):
        encoder.encode([Image.new("RGB", (100000, 1))])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_ratio_refusal_is_an_invalid_image(checkpoint_factory: CheckpointFactory, family: str) -> None:
    """HF's smart_resize raises ValueError above 200:1; the encoder says so as the client's error. 200:1 passes."""
    encoder = VisionEncoder(ModelConfig(model=str(checkpoint_factory(family=family))))
    for size in [(201, 1), (1, 16384), (3, 1000)]:
        with pytest.raises(InvalidImageError, match=r"cannot resize: absolute aspect ratio must be smaller than 200"):
            encoder.encode([Image.new("RGB", size)])
    assert encoder.encode([_image(200, 1)])[0].shape[0] == encoder.num_image_tokens(_image(200, 1))


# --- resized_size is what the processor really does --------------------------------------------------------------


class ResizeSpy:
    """Records the (height, width) of every array the image processor's own `resize` returns."""

    def __init__(self, image_processor: Any) -> None:
        self.sizes: list[tuple[int, int]] = []
        self._resize = image_processor.resize

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        resized: np.ndarray = self._resize(*args, **kwargs)
        self.sizes.append((int(resized.shape[-2]), int(resized.shape[-1])))
        return resized


SIZES = [(1, 1), (20, 2000), (2000, 20), (33, 17), (640, 480), (1, 150), (150, 1), (4000, 3)]  # (width, height)


@pytest.mark.parametrize("family", FAMILIES)
def test_resized_size_is_the_processors_first_resize(checkpoint_factory: CheckpointFactory, family: str) -> None:
    """Every family but LLaVA-NeXT: the first array the processor's `resize` makes is `resized_size`. LLaVA-NeXT:
    every resized array fits in `resized_size`, the grid pinpoint the image is padded to."""
    encoder = VisionEncoder(ModelConfig(model=str(checkpoint_factory(family=family))))
    image_processor = encoder._processor.image_processor
    spy = ResizeSpy(image_processor)
    image_processor.resize = spy  # the instance attribute: `self.resize` inside the processor finds it
    for width, height in SIZES:
        if family.startswith("qwen2") and max(width, height) > 200 * min(width, height):
            continue  # refused (see above)
        spy.sizes.clear()
        encoder.prepare(_image(width, height))
        predicted = encoder.family.resized_size(encoder._processor, (height, width))
        if family == "llava_next":
            assert list(predicted) in [list(p) for p in image_processor.image_grid_pinpoints]
            assert all(h <= predicted[0] and w <= predicted[1] for h, w in spy.sizes), (width, height, spy.sizes)
        else:
            assert spy.sizes[0] == predicted, (width, height, spy.sizes)
