"""A random-weight LLaVA-1.5 checkpoint (`LlavaForConditionalGeneration`): CLIP or SigLIP + Llama, Qwen2 or Mistral.

It loads offline with `AutoProcessor.from_pretrained` and `LlavaForConditionalGeneration.from_pretrained`, exactly
like an `llava-hf/*` checkpoint: `config.json`, `model.safetensors`, tokenizer files, an image-processor config and
a chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessorPil,
)

from common.demo_checkpoints.parts import (
    IMAGE_TOKEN,
    SizePreset,
    build_tokenizer,
    check_choice,
    instantiate,
    save_checkpoint,
    seeded,
    set_special_ids,
    size_preset,
    special_token_ids,
    text_config,
    vision_config,
)

TEXT_CHOICES = ("llama", "qwen2", "mistral")

# LLaVA-1.5-style conversation: "USER: <image>\n<text> ASSISTANT:". Images of a message come before its text,
# as in llava-hf's template; the assistant's turns end with the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class LlavaLike:
    """A LLaVA-style checkpoint kind (LLaVA, LLaVA-NeXT): names, classes, processor and extra config settings."""

    family: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor: Callable[[str, SizePreset, PreTrainedTokenizerFast, str], ProcessorMixin]
    extra_settings: Callable[[SizePreset], dict[str, Any]] = lambda preset: {}

    def build(
        self,
        out_dir: str | Path,
        *,
        vision: str = "clip",
        text: str = "llama",
        size: str = "tiny",
        seed: int = 0,
        vision_feature_layer: int | list[int] = -2,
        vision_feature_select_strategy: str | None = None,
        device: str = "cpu",
    ) -> Path:
        """Write a random-weight checkpoint of this kind and return its path. Same arguments, same files.

        `device`: where the weights are drawn ("cuda" for the 7b preset: seconds instead of minutes)."""
        config, tokenizer, strategy = self.make_config(
            vision=vision,
            text=text,
            size=size,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
        )
        preset = size_preset(size)
        seeded(seed)
        model = instantiate(self.model_class, config, preset, device)
        description = {"family": self.family, "vision": vision, "text": text, "size": size, "seed": seed}
        return save_checkpoint(out_dir, model, self.processor(vision, preset, tokenizer, strategy), description)

    def make_config(
        self,
        *,
        vision: str = "clip",
        text: str = "llama",
        size: str = "tiny",
        vision_feature_layer: int | list[int] = -2,
        vision_feature_select_strategy: str | None = None,
    ) -> tuple[PretrainedConfig, PreTrainedTokenizerFast, str]:
        """The model config, the tokenizer it is sized for and the feature-select strategy; no weights."""
        check_choice("text", text, TEXT_CHOICES)
        preset = size_preset(size)
        # CLIP has a CLS token that LLaVA's "default" strategy drops; SigLIP has none and uses "full".
        strategy = vision_feature_select_strategy or ("default" if vision == "clip" else "full")
        tokenizer = build_tokenizer(preset.vocab_size, preset.filler_words)
        special_ids = special_token_ids(tokenizer)
        settings: dict[str, Any] = dict(
            vision_config=vision_config(vision, preset),
            text_config=text_config(text, preset, len(tokenizer), special_ids),
            image_token_index=special_ids[IMAGE_TOKEN],
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=strategy,
            image_seq_length=(preset.image_size // preset.patch_size) ** 2,
            initializer_range=preset.initializer_range,
            **self.extra_settings(preset),
        )
        config = self.config_class(**settings)
        set_special_ids(config, special_ids)
        return config, tokenizer, strategy


def processor(vision: str, preset: SizePreset, tokenizer: PreTrainedTokenizerFast, strategy: str) -> LlavaProcessor:
    side = preset.image_size
    image_processor: CLIPImageProcessorPil | SiglipImageProcessorPil
    if vision == "clip":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if vision == "clip" else 0,
    )


LLAVA = LlavaLike("llava", LlavaConfig, LlavaForConditionalGeneration, processor)
