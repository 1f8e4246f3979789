"""The model-family interface: everything mmserve knows about one vision-language architecture.

The engine, scheduler, block manager, caches and servicers are family-agnostic: they see token ids, image spans
and embeddings. What differs between architectures lives behind `ModelFamily`, one subclass per family, chosen
from the checkpoint's config by `common.models.family_for_config`:

    splitting the checkpoint   `vision_parts` / `text_parts` + `part_patterns`: which stored tensor belongs to
                               which half, so each service reads only its own half of the weights
    building the vision half   `build_vision_modules` (Hugging Face's own module classes, empty) and
                               `prepare_vision` (e.g. drop tower layers whose output is never used)
    image embeddings           `image_features`: pixel values -> projected rows, with HF's own modules
    token counts               `tokens_per_image`: the processor's own expansion rule; None when it varies
    embedding identity         `embedding_identity`: what besides the weights and image bytes determines an
                               embedding; it goes into the encoder fingerprint and so into every cache key

Adding a family = one module defining a subclass + `register` in `common/models/__init__.py` + its tests.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

# Stored-key prefixes of the text half, shared by every family whose language model is a `*ForCausalLM` kept
# under `language_model` (5.x in memory: model.language_model.X; save_pretrained and the hub: language_model.model.X).
CAUSAL_LM_PART_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("language_model", re.compile(r"^(?:model\.language_model\.|language_model\.model\.)")),
    ("lm_head", re.compile(r"^(?:language_model\.)?lm_head\.")),
)


class ModelFamily(ABC):
    """One vision-language architecture, bound to one checkpoint's config.

    Subclasses set the class attributes and implement the abstract methods; instances are cheap (no weights)
    and may be built by both services from the same config.
    """

    name: ClassVar[str]  # short id used in logs, GetModelInfo and docs, e.g. "llava"
    architectures: ClassVar[tuple[str, ...]]  # Hugging Face model classes served, e.g. LlavaForConditional...
    config_class: ClassVar[type[PretrainedConfig]]
    example_hub_ids: ClassVar[tuple[str, ...]] = ()
    vision_parts: ClassVar[tuple[str, ...]]
    text_parts: ClassVar[tuple[str, ...]] = ("language_model", "lm_head")
    # Stored tensor key -> (part, name inside the part's module); first match wins. Keys matching none are
    # never read by either half.
    part_patterns: ClassVar[tuple[tuple[str, re.Pattern[str]], ...]]

    def __init__(self, config: PretrainedConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        return isinstance(config, cls.config_class)

    # --- checkpoint split -------------------------------------------------------------------------------

    def classify(self, key: str) -> tuple[str, str] | None:
        """(part, name inside that part's module) of a stored tensor key, or None for tensors no half reads."""
        for part, pattern in self.part_patterns:
            match = pattern.match(key)
            if match:
                return part, key[match.end() :]
        return None

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.get_text_config()

    @abstractmethod
    def build_vision_modules(self) -> dict[str, nn.Module]:
        """One empty module per vision part (keys = `vision_parts`), built from the config; weights come later."""

    def prepare_vision(self, modules: Mapping[str, nn.Module]) -> None:
        """Adjust the loaded vision modules before use (e.g. remove layers whose output is never read)."""
        return None  # most families run their modules as loaded

    # --- images -------------------------------------------------------------------------------------------

    @abstractmethod
    def image_features(self, modules: Mapping[str, nn.Module], pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> projected image embeddings [B, num_tokens, hidden_size].

        Must compute exactly what the Hugging Face model's `get_image_features` computes (bit for bit in float32
        at batch 1), using its own modules.
        """

    @abstractmethod
    def tokens_per_image(self, processor: Any) -> int | None:
        """Placeholder tokens one image expands to under the checkpoint's processor; None when it varies per image."""

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def image_size(self) -> int:
        """The side the processor resizes images to (0 when not fixed); reported by GetModelInfo."""
        vision_config = getattr(self.config, "vision_config", None)
        return int(getattr(vision_config, "image_size", 0) or 0)

    @abstractmethod
    def embedding_identity(self) -> dict[str, Any]:
        """JSON-able settings that, with the vision weights, the processor config and the dtype, fix an embedding."""

    def describe(self) -> dict[str, Any]:
        """Settings worth one log line at start-up."""
        return {"family": self.name, **self.embedding_identity()}
