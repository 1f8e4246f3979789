"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "LLaVA-1.6"): LLaVA with "anyres" image tiling.

The processor picks, for each image, the grid pinpoint (a multiple of the tower's tile side S) that fits the image
best, resizes and pads the image to it, cuts it into S x S tiles and puts a resized copy of the whole image first.
The features are `LlavaNextModel.get_image_features` itself, run on a module that holds only the vision submodules
(tower, projector and the learned `image_newline` row):

    pixel_values [B, n_crops, 3, S, S], image_sizes [B, 2] (original height, width)
      --tower + feature layer (+ "default" drops CLS) + projector, every crop--> [sum n_crops, (S/p)^2, hidden]
      --pack_image_features: base crop's rows, then the tile grid re-assembled, the padding rows/columns the
        processor added removed ("unpad"), and one `image_newline` row after every grid row-->
      one [rows, hidden] per image, rows = (S/p)^2 + h * (w + 1) for an unpadded grid of h x w patches

so the row count depends on each image's size and aspect ratio (`processor._get_num_multimodal_tokens`), and
images whose tiles are equal in number share a forward pass without padding.

Stored key layouts (both handled):

    in-memory name (5.x)           save_pretrained (5.x)        llava-hf hub (legacy)
    model.vision_tower.X           vision_tower.X               vision_tower.vision_model.X
    model.multi_modal_projector.X  multi_modal_projector.X      multi_modal_projector.X
    model.image_newline            image_newline                image_newline
    model.language_model.X         language_model.model.X       language_model.model.X
    lm_head.X                      language_model.lm_head.X     language_model.lm_head.X
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModel, LlavaNextConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, LlavaNextMultiModalProjector

from common.models.base import CAUSAL_LM_KEY_RULES, ImageSize, VisionModule, key_rule
from common.models.llava import LlavaFamily


class LlavaNextVision(VisionModule):
    """The vision half of `LlavaNextModel`: its tower, projector and newline row under its names, and its own
    get_image_features / pack_image_features."""

    def __init__(self, config: LlavaNextConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        hidden_size = config.get_text_config().hidden_size
        self.image_newline = nn.Parameter(torch.empty(hidden_size))  # [hidden_size], loaded from the checkpoint

    get_image_features = LlavaNextModel.get_image_features
    pack_image_features = LlavaNextModel.pack_image_features


class LlavaNextFamily(LlavaFamily):
    """LLaVA's rules (checkpoint layout, feature layer selection, layer dropping) plus anyres tiling."""

    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    config_class = LlavaNextConfig
    example_hub_ids = (
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-hf/llava-v1.6-34b-hf",
    )
    # The vision half is the tower, the projector and the newline row, stored with or without `model.`.
    key_rules = (
        key_rule(r"^(?:model\.)?(?=vision_tower\.|multi_modal_projector\.|image_newline$)", "vision"),
        *CAUSAL_LM_KEY_RULES,
    )
    config: LlavaNextConfig  # type: ignore[assignment]

    def build_vision(self) -> VisionModule:
        return LlavaNextVision(self.config)

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # pixel_values [B, n_crops, 3, S, S], image_sizes [B, 2] -> one [rows_i, hidden] per image
        outputs = cast(LlavaNextVision, vision).get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        )
        return list(outputs.pooler_output)

    def resized_size(self, processor: Any, size: ImageSize) -> ImageSize:
        """The grid pinpoint HF's `select_best_resolution` picks: the image is resized to fit it (aspect kept) and
        padded to it, the largest array before the tiles are cut; the other crops are tile-sized. Any aspect
        ratio stays within the largest pinpoint."""
        best = select_best_resolution(size, processor.image_processor.image_grid_pinpoints)
        return int(best[0]), int(best[1])

    def tokens_per_image(self, processor: Any) -> int | None:
        return None  # depends on each image's size: `num_image_tokens` asks the processor

    def embedding_identity(self) -> dict[str, Any]:
        """LLaVA's, plus the pinpoints of the model config (the processor has its own copy, in the processor
        config), which decide how `pack_image_features` re-assembles the tile grid."""
        return {**super().embedding_identity(), "image_grid_pinpoints": self.config.image_grid_pinpoints}
