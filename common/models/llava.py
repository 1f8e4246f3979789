"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP or SigLIP tower, an MLP projector, a causal LM.

Every image is resized (and cropped) to one size, so every image becomes the same number of tokens. The image
features are `LlavaModel.get_image_features` itself, run on a module that holds only the vision submodules:

    pixel_values [B, 3, H, W]
      --vision tower (hidden states of the selected layers only)--> hidden_states[layer]   [B, T(+CLS), D_vision]
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

import copy
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import AutoModel, LlavaConfig, PretrainedConfig, PreTrainedModel
from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector

from common.models.base import CAUSAL_LM_KEY_RULES, ModelFamily, VisionModule, key_rule


class LlavaVision(VisionModule):
    """The vision half of `LlavaModel`: its tower and projector under its names, and its own get_image_features."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)

    get_image_features = LlavaModel.get_image_features


class LlavaFamily(ModelFamily):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    config_class: ClassVar[type[PretrainedConfig]] = LlavaConfig
    example_hub_ids = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "llava-hf/bakLlava-v1-hf")
    key_rules = (key_rule(r"^(?:model\.)?(?=vision_tower\.|multi_modal_projector\.)", "vision"), *CAUSAL_LM_KEY_RULES)
    config: LlavaConfig

    def build_vision(self) -> VisionModule:
        return LlavaVision(self.config)

    def prepare_vision(self, vision: VisionModule) -> dict[str, Any]:
        """Drop the tower layers after the deepest selected one (see `drop_unused_layers`)."""
        tower = vision.get_submodule("vision_tower")
        if not isinstance(tower, PreTrainedModel):
            return {}
        feature_layer = self.config.vision_feature_layer
        layers = drop_unused_layers(tower, feature_layer)
        # The truncated tower returns fewer hidden states: select them by absolute index from now on (in a copy:
        # the family's config, and so the fingerprint, keep the checkpoint's indices).
        config = copy.copy(self.config)
        config.vision_feature_layer = layers[0] if isinstance(feature_layer, int) else layers
        vision.config = config
        return {"layers_run": max(layers) if min(layers) >= 0 else int(tower.config.num_hidden_layers)}

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outputs = cast(LlavaVision, vision).get_image_features(pixel_values=batch["pixel_values"])
        return list(outputs.pooler_output)

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
        """The feature layer and strategy, and the tower and projector settings the weights' shapes do not imply."""
        vision_config = self.config.vision_config
        return {
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
            "projector_hidden_act": self.config.projector_hidden_act,
            "vision_tower": {
                name: getattr(vision_config, name, None)
                for name in ("model_type", "image_size", "patch_size", "num_attention_heads", "hidden_act",
                             "layer_norm_eps")
            },
        }  # fmt: skip


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
