"""Images -> projected image embeddings: synchronous, transport-free, exact against Hugging Face.

`VisionEncoder` is the one place that runs the vision half of a checkpoint. The encoder service calls it from its
batcher thread and the generator's in-process path does the same, so its public API (below) is stable:

    encoder = VisionEncoder(ModelConfig(model="path/to/checkpoint"))
    encoder.family                    # the checkpoint's model family (common/models/): it computes the features
    encoder.fingerprint               # identity of everything that determines an embedding (part of every key)
    encoder.hidden_size               # columns of an embedding = the language model's hidden size
    encoder.image_placeholder         # "<image>"
    encoder.tokens_per_image          # rows of every embedding, or None when they depend on the image's size
    encoder.num_image_tokens(img)     # rows of the embedding of `img`
    encoder.prepare(img, condition)   # -> PreparedImage (the processor's tensors for one image)
    encoder.encode_prepared([...])    # prepared images of one batch signature -> ImageEmbeddings (+ layout)
    encoder.encode([img, ...])        # -> [tensor [rows, hidden_size] on CPU, in the configured dtype]

    PIL RGB (+ condition) --family.prepare_image (the checkpoint's processor, PIL backend)--> PreparedImage
      --family.image_features (the HF model's own get_image_features)--> one [rows, hidden_size] per image

The family's features equal its Hugging Face model's `get_image_features` bit for bit in float32 at batch 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from common.checkpoint import (
    encoder_fingerprint,
    image_placeholder,
    load_processor,
    load_vision_half,
    resolve_checkpoint,
    torch_dtype,
)
from common.config import ModelConfig
from common.images.embedding import ImageEmbedding
from common.images.errors import InvalidImageError
from common.models.base import PreparedImage, collate

# The largest array, in values (3 channels x height x width), the processor's resize step may make of one image,
# before any crop, tile or patch split (`ModelFamily.resized_size`). The ratio alone is harmless for fixed-size
# (BLIP, SigLIP), pinpoint (LLaVA-NeXT), smart_resize (Qwen2-VL) and longest-edge (Idefics3) processors; what blows
# up is a shortest-edge resize (CLIP / LLaVA), which stretches the long edge to S * aspect ratio: a 1 x 16384 image
# at S = 336 would become 336 x 5505024 pixels, 5.5 G values (22 GB as float32). 64 M values (256 MiB as float32)
# is ~10x what any supported processor makes of an ordinary photo (Qwen2-VL at a 12.8 M-pixel max_pixels: 38 M),
# yet lets a 1:180 strip through at S = 336 (a 20 x 2000 strip becomes 336 x 33600 = 34 M values).
MAX_RESIZED_VALUES = 64 * 1024 * 1024
_CHANNELS = 3  # the processor's arrays are RGB


class UnsupportedImageError(InvalidImageError):
    """A decoded image this encoder will not process; str(e) is safe to send to a client."""


class VisionEncoder:
    """The vision half of one checkpoint, with the checkpoint's processor.

    Construction loads only the vision half (no language-model tensor is read). `encode*` may be called from any
    single thread at a time; they run under `torch.inference_mode()`.
    """

    def __init__(self, model_config: ModelConfig) -> None:
        self.model_config = model_config
        self.path = resolve_checkpoint(model_config.model, model_config.revision)
        self.device = torch.device(model_config.device)
        self.dtype = model_config.dtype
        self.torch_dtype = torch_dtype(model_config.dtype)
        half = load_vision_half(self.path, dtype=model_config.dtype, device=model_config.device)
        self.family = half.family
        self._vision = half.module
        self._prepared_notes = self.family.prepare_vision(self._vision)  # e.g. drops never-read tower layers
        self.hidden_size = self.family.hidden_size
        self.image_token_id = self.family.image_token_id
        self.image_size = self.family.image_size
        self.fingerprint = encoder_fingerprint(self.path, dtype=model_config.dtype)
        self._processor = load_processor(self.path)
        self.image_placeholder = image_placeholder(self._processor)
        self.tokens_per_image = self.family.tokens_per_image(self._processor)
        # A processor size rule the family cannot read fails here, at start-up, rather than on the first request.
        self.family.resized_size(self._processor, (64, 64))

    def num_image_tokens(self, image: Image.Image) -> int:
        """Rows of the embedding of `image` (the processor's rule; the same for every image of fixed-size families)."""
        self.check_image(image)
        width, height = image.size
        return self.family.num_image_tokens(self._processor, (height, width))

    def check_image(self, image: Image.Image) -> None:
        """Raises InvalidImageError for an image the processor refuses, and UnsupportedImageError (one) for an
        image its resize step would make larger than MAX_RESIZED_VALUES; touches no pixel."""
        width, height = image.size
        resized_height, resized_width = self.family.resized_size(self._processor, (height, width))
        values = _CHANNELS * resized_height * resized_width
        if values > MAX_RESIZED_VALUES:
            raise UnsupportedImageError(
                f"image is {width} x {height}: the processor would resize it to {resized_width} x {resized_height} "
                f"pixels ({_count(values)} values), more than the limit of {_count(MAX_RESIZED_VALUES)} values"
            )

    def prepare(self, image: Image.Image, condition: str | None = None) -> PreparedImage:
        """One RGB image (+ its embedding condition) -> the processor's tensors for it, on CPU, as HF makes them."""
        self.check_image(image)
        return self.family.prepare_image(self._processor, image, condition)

    def encode_prepared(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        """Prepared images of one batch signature -> one embedding [rows, hidden_size] each (CPU, configured dtype),
        with the family's layout of each image."""
        with torch.inference_mode():
            batch = {
                name: tensor.to(self.device, dtype=self.torch_dtype if tensor.is_floating_point() else tensor.dtype)
                for name, tensor in collate(images).items()
            }
            features = self.family.image_features(self._vision, batch)  # one [rows, hidden_size] per image
            # One owned CPU tensor per image: a view would keep the whole batch alive in a cache.
            return [
                ImageEmbedding(feature.to("cpu", dtype=self.torch_dtype).clone(), self.family.image_layout(image))
                for feature, image in zip(features, images, strict=True)
            ]

    def encode(self, images: Sequence[Image.Image], condition: str | None = None) -> list[torch.Tensor]:
        """RGB PIL images -> one embedding [rows, hidden_size] each (CPU, configured dtype), in order.

        Images whose prepared tensors have the same shapes share a forward pass.
        """
        prepared = [self.prepare(image, condition) for image in images]
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(prepared):
            groups.setdefault(item.batch_signature, []).append(index)
        results: list[torch.Tensor | None] = [None] * len(prepared)
        for indices in groups.values():
            for index, embedding in zip(indices, self.encode_prepared([prepared[i] for i in indices]), strict=True):
                results[index] = embedding.tensor
        return [result for result in results if result is not None]

    def describe(self) -> dict[str, Any]:
        """Settings worth one log line at start-up."""
        return {
            "model": self.model_config.model,
            "device": str(self.device),
            "dtype": self.dtype,
            **self.family.describe(),
            **self._prepared_notes,
            "tokens_per_image": self.tokens_per_image or "varies",
            "hidden_size": self.hidden_size,
            "processor": type(self._processor.image_processor).__name__,
            "fingerprint": self.fingerprint[:16],
        }


def _count(values: int) -> str:
    """5548965888 -> "5.5 G", 67108864 -> "64 M" (binary multiples, as the limit is written)."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("k", 1024)):
        if values >= scale:
            return f"{values / scale:.3g} {unit}"
    return str(values)
