"""The model-family layer: one module per supported architecture, chosen from the checkpoint's config.

    family = family_for_config(AutoConfig.from_pretrained(path))   # UnsupportedArchitectureError otherwise
    family.image_features(modules, pixel_values)                    # see common/models/base.py

To add a family: write `common/models/<name>.py` with a `ModelFamily` subclass, add it to `FAMILIES` below,
add its demo checkpoint and its exactness tests. Nothing else in the code base names a family.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from common.errors import UnsupportedArchitectureError
from common.models.base import ModelFamily
from common.models.blip2 import Blip2Family, InstructBlipFamily
from common.models.gemma3 import Gemma3Family
from common.models.idefics3 import Idefics3Family, SmolVLMFamily
from common.models.llava import LlavaFamily
from common.models.llava_next import LlavaNextFamily
from common.models.qwen2_vl import Qwen2_5_VLFamily, Qwen2VLFamily

# Tried in order; the first family whose config class matches serves the checkpoint.
FAMILIES: tuple[type[ModelFamily], ...] = (
    LlavaFamily,
    LlavaNextFamily,
    Blip2Family,
    InstructBlipFamily,
    Gemma3Family,
    Idefics3Family,
    SmolVLMFamily,
    Qwen2VLFamily,
    Qwen2_5_VLFamily,
)

__all__ = ["FAMILIES", "ModelFamily", "family_for_config", "supported_architectures"]


def supported_architectures() -> list[str]:
    return [architecture for family in FAMILIES for architecture in family.architectures]


def family_for_config(config: PretrainedConfig) -> ModelFamily:
    """The family serving this config; refuses any other architecture with the list of supported ones."""
    for family in FAMILIES:
        if family.matches(config):
            return family(config)
    declared = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    raise UnsupportedArchitectureError(
        f"mmserve does not serve {declared} (model_type {config.model_type!r}); "
        f"supported architectures: {', '.join(supported_architectures())}"
    )
