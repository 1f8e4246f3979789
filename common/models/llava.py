"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP or SigLIP tower, an MLP projector, a causal LM.

Every image is resized (and cropped) to one size, so every image becomes the same number of tokens. The image
features mirror `LlavaModel.get_image_features` (transformers 5.x) step for step:

    pixel_values [B, 3, H, W]
      --vision tower(output_hidden_states=True)--> hidden_states[layer]         [B, T(+CLS), D_vision]
         (a list of layers: each selected, then concatenated on the feature dim -> [B, T, D_vision * n])
      --"default" strategy drops CLS: [:, 1:]--> --projector--> [B, num_tokens, hidden_size]

Stored key layouts (all handled):

    in-memory name (5.x)           save_pretrained (5.x)        llava-hf hub (legacy)
    model.vision_tower.X           vision_tower.X               vision_tower.vision_model.X
    model.multi_modal_projector.X  multi_modal_projector.X      multi_modal_projector.X
    model.language_model.X         language_model.model.X       language_model.model.X
    lm_head.X                      language_model.lm_head.X     language_model.lm_head.X
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, LlavaConfig, PreTrainedModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from common.models.base import CAUSAL_LM_PART_PATTERNS, ModelFamily


class LlavaFamily(ModelFamily):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    config_class = LlavaConfig
    example_hub_ids = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "llava-hf/bakLlava-v1-hf")
    vision_parts = ("vision_tower", "projector")
    part_patterns = (
        ("vision_tower", re.compile(r"^(?:model\.)?vision_tower\.")),
        ("projector", re.compile(r"^(?:model\.)?multi_modal_projector\.")),
        *CAUSAL_LM_PART_PATTERNS,
    )
    config: LlavaConfig

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        feature_layer = config.vision_feature_layer
        self.feature_layer: int | list[int] = feature_layer
        self.select_strategy: str = config.vision_feature_select_strategy
        # Hidden-state indices to select; made absolute by `prepare_vision` when it truncates the tower.
        self._layer_indices: list[int] = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)

    def build_vision_modules(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": AutoModel.from_config(self.config.vision_config),
            "projector": LlavaMultiModalProjector(self.config),
        }

    def prepare_vision(self, modules: Mapping[str, nn.Module]) -> None:
        tower = modules["vision_tower"]
        if isinstance(tower, PreTrainedModel):
            self._layer_indices = drop_unused_layers(tower, self.feature_layer)

    @property
    def layers_run(self) -> int:
        return max(self._layer_indices) if self._layer_indices and min(self._layer_indices) >= 0 else 0

    def image_features(self, modules: Mapping[str, nn.Module], pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = modules["vision_tower"](pixel_values, output_hidden_states=True, return_dict=True)
        features = self._select_features(outputs.hidden_states)  # [B, num_tokens, D_vision * n_layers]
        projected: torch.Tensor = modules["projector"](features)  # [B, num_tokens, hidden_size]
        return projected

    def _select_features(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        # Same selection as LlavaModel.get_image_features: "default" drops the CLS token of each selected layer.
        selected = [hidden_states[layer] for layer in self._layer_indices]  # each [B, T, D_vision]
        if self.select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def tokens_per_image(self, processor: Any) -> int | None:
        """Mirrors `LlavaProcessor`'s expansion: patches of the resized (cropped) image, plus extra tokens such
        as CLS, minus CLS again when the "default" feature strategy drops it."""
        patch_size = getattr(processor, "patch_size", None)
        image_processor = processor.image_processor
        cropping = getattr(image_processor, "do_center_crop", False)
        crop = getattr(image_processor, "crop_size", None) if cropping else None
        size = crop or getattr(image_processor, "size", None) or {}
        height, width = size.get("height"), size.get("width")
        if height is None and "shortest_edge" in size:
            height = width = size["shortest_edge"]
        if not patch_size or height is None or width is None:
            return None
        tokens = (height // patch_size) * (width // patch_size)
        tokens += int(getattr(processor, "num_additional_image_tokens", 0))
        if getattr(processor, "vision_feature_select_strategy", None) == "default":
            tokens -= 1
        return tokens

    def embedding_identity(self) -> dict[str, Any]:
        return {
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layers_run": self.layers_run}


def drop_unused_layers(tower: PreTrainedModel, feature_layer: int | list[int]) -> list[int]:
    """Remove the encoder layers after the deepest selected one; returns the selected hidden-state indices.

    `hidden_states` holds the embeddings plus one entry per layer, so with the usual `vision_feature_layer=-2`
    the last layer's output is never used: like vLLM, we do not run it (1/24 of a CLIP-L tower). Earlier layers
    compute exactly what they computed before, so the features are bit-identical. Negative indices are made
    absolute first, since the truncated tower returns fewer hidden states.
    """
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    num_layers = int(tower.config.num_hidden_layers)
    absolute = [layer % (num_layers + 1) for layer in layers]  # hidden_states has num_layers + 1 entries
    stacks = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(stacks) != 1:  # an unfamiliar tower layout: run it whole, select as Hugging Face does
        return layers
    del stacks[0][max(absolute) :]
    return absolute
