"""Images -> projected image embeddings: synchronous, transport-free, exact against Hugging Face.

`VisionEncoder` is the one place that runs the vision half of a checkpoint. The gRPC encoder service calls it
from its batcher thread and the generator's offline API imports it and calls it in-process, so its public API
(below) is stable:

    encoder = VisionEncoder(ModelConfig(model="path/to/checkpoint"))
    encoder.family                 # the checkpoint's model family (common/models/): it computes the features
    encoder.fingerprint            # identity of everything that determines an embedding (part of every key)
    encoder.hidden_size            # columns of an embedding = the language model's hidden size
    encoder.image_placeholder      # "<image>"
    encoder.num_image_tokens(img)  # rows of an embedding
    encoder.encode([img, ...])     # -> [tensor [num_tokens, hidden_size] on CPU, in the configured dtype]

    PIL RGB --checkpoint's image processor (PIL backend)--> pixel_values [B, 3, H, W]
      --family.image_features (Hugging Face's own modules)--> [B, num_tokens, hidden_size]

The family's features equal its Hugging Face model's `get_image_features` bit for bit in float32 at batch 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from common.checkpoint import encoder_fingerprint, load_vision_half, resolve_checkpoint, torch_dtype
from common.config import ModelConfig

DEFAULT_IMAGE_PLACEHOLDER = "<image>"
# Processors that resize the shortest edge to S stretch the long edge to S * aspect before cropping: a 1 x 16384
# image would become a 336 x 5.5M float array. Such images are rejected before the processor runs.
MAX_ASPECT_RATIO = 32.0


class UnsupportedImageError(ValueError):
    """A decoded image this encoder will not process; str(e) is safe to send to a client."""


def load_image_processor(path: Path) -> Any:
    """The checkpoint's own image processor, PIL backend (torchvision is not a dependency).

    Reads `processor_config.json` (5.x) or `preprocessor_config.json` (llava-hf hub layout) offline. The class
    comes from the auto module itself: without torchvision, transformers 5.17 exports `AutoImageProcessor` at the
    top level as a placeholder that refuses to load even the PIL processors.
    """
    try:
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    except TypeError:
        processor = None
    if processor is None or type(processor).__name__.endswith("Fast"):
        # transformers releases before the `backend` argument: there the slow processor is the PIL one.
        processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    return processor


class VisionEncoder:
    """The vision half of one checkpoint, with the checkpoint's image processor.

    Construction loads only the vision half (no language-model tensor is read) and runs one forward pass on a
    blank image to learn the token count and warm up kernels. `encode` may be called from any single thread at a
    time; it runs under `torch.inference_mode()`.
    """

    def __init__(self, model_config: ModelConfig) -> None:
        self.model_config = model_config
        self.path = resolve_checkpoint(model_config.model, model_config.revision)
        self.device = torch.device(model_config.device)
        self.dtype = model_config.dtype
        self.torch_dtype = torch_dtype(model_config.dtype)
        half = load_vision_half(self.path, dtype=model_config.dtype, device=model_config.device)
        self.family = half.family
        self._modules = half.modules
        self.family.prepare_vision(self._modules)  # e.g. drops tower layers whose output is never read
        self.hidden_size = int(self.family.text_config.hidden_size)
        self.image_token_id = self.family.image_token_id
        self.image_size = self.family.image_size
        self.image_placeholder = _image_placeholder(self.path)
        self.fingerprint = encoder_fingerprint(self.path, dtype=model_config.dtype)
        self._processor = load_image_processor(self.path)
        # Families whose processor gives every image one size (LLaVA-1.5) have one token count for every image.
        self._tokens_per_image = int(self.encode([Image.new("RGB", (64, 64), (127, 127, 127))])[0].shape[0])

    @property
    def tokens_per_image(self) -> int:
        return self._tokens_per_image

    def num_image_tokens(self, image: Image.Image | None = None) -> int:
        """Rows of the embedding of `image` (the same for every image with a fixed-resolution processor)."""
        return self._tokens_per_image

    def check_image(self, image: Image.Image) -> None:
        """Raises UnsupportedImageError for images the processor would blow up (extreme aspect ratios)."""
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise UnsupportedImageError(
                f"image is {width} x {height}; the aspect ratio must be at most {MAX_ASPECT_RATIO:g}:1"
            )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel_values [B, 3, H, W] float32 on CPU, exactly as the checkpoint's processor makes them."""
        for image in images:
            self.check_image(image)
        pixel_values = self._processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixel_values  # [B, 3, H, W]

    def encode_pixels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [B, 3, H, W] -> B embeddings [num_tokens, hidden_size], on CPU, in the configured dtype."""
        with torch.inference_mode():
            pixels = pixel_values.to(device=self.device, dtype=self.torch_dtype)  # [B, 3, H, W]
            projected = self.family.image_features(self._modules, pixels)  # [B, num_tokens, hidden_size]
            # One owned CPU tensor per image: a view would keep the whole batch alive in a cache.
            return [row.to("cpu").clone() for row in projected.unbind(0)]

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB PIL images -> one embedding [num_tokens, hidden_size] each (CPU, configured dtype), in order."""
        if not images:
            return []
        return self.encode_pixels(self.preprocess(images))

    def describe(self) -> dict[str, Any]:
        """Settings worth one log line at start-up."""
        return {
            "model": self.model_config.model,
            "device": str(self.device),
            "dtype": self.dtype,
            **self.family.describe(),
            "tokens_per_image": self._tokens_per_image,
            "hidden_size": self.hidden_size,
            "processor": type(self._processor).__name__,
            "fingerprint": self.fingerprint[:16],
        }


def _image_placeholder(path: Path) -> str:
    """The processor's image token (`processor_config.json` "image_token"), `<image>` when the file has none."""
    processor_file = path / "processor_config.json"
    if processor_file.is_file():
        token = json.loads(processor_file.read_text()).get("image_token")
        if isinstance(token, str) and token:
            return token
    return DEFAULT_IMAGE_PLACEHOLDER
