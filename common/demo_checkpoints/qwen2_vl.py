"""Random-weight Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`)
checkpoints: the family's own ViT and patch merger, a Qwen2 language model with M-RoPE.

They load offline with the HF model classes' `from_pretrained` and `common.checkpoint.load_processor`, like a
`Qwen/Qwen2-VL-*` / `Qwen/Qwen2.5-VL-*` checkpoint: `config.json`, `model.safetensors`, a byte-level BPE tokenizer
with Qwen's special tokens (no BOS, `<|im_end|>` ends a turn), Qwen's chat template and a `processor_config.json`
naming HF's processor class. (`AutoProcessor` cannot load it without torchvision: HF's processor insists on a video
processor; mmserve's family loads the same class less its video processor.)

The image processor is Qwen's, with the pixel budget scaled down so that tiny images become a handful of tokens
and different sizes really give different grids (one token = merge_size^2 patches = (patch_size * 2)^2 pixels):

    Qwen2-VL-7B:  patch 14 -> 28 x 28 px per token, 4 .. 16384 tokens (min_pixels 3136, max_pixels 12845056)
    tiny here:    patch  8 -> 16 x 16 px per token, 4 .. 24 tokens    (min_pixels 1024, max_pixels 6144)

The M-RoPE sections split the rotary half of a head like Qwen's [16, 24, 24] of 64 (tiny: [2, 3, 3] of 8); the
Qwen2.5 tower's windows are 2 x 2 merged tokens (Qwen2.5-VL: 112 px = 4 x 4 at patch 14), so images larger
than that really use several windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common.demo_checkpoints.parts import SizePreset, check_choice, save_checkpoint, seeded, size_preset, train_bpe
from common.models.qwen2_vl import ImagesOnlyQwen2_5_VLProcessor, ImagesOnlyQwen2VLProcessor

MERGE_SIZE = 2  # the patch merger: 2 x 2 neighbouring patches -> one token, as in every Qwen2(.5)-VL
TEMPORAL_PATCH_SIZE = 2  # an image is its own frame twice
TOKENS_PER_IMAGE = {"tiny": (4, 24), "bench": (16, 256)}  # (min, max) tokens per image: the pixel budget
WINDOW_TOKENS = 2  # Qwen2.5's window side in merged tokens (Qwen2.5-VL: 4)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL's template, images only: a default system turn, then each message's parts in order, an image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to the image's tokens).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the bundled corpus with Qwen's special tokens; like Qwen's, it adds no BOS."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, SPECIAL_TOKENS, unk_token=None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        model_max_length=32768,
    )


def mrope_section(head_dim: int) -> list[int]:
    """Temporal, height and width shares of the head's rotary half, in Qwen's 2 : 3 : 3 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def text_settings(preset: SizePreset, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos", "<|endoftext|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}  # fmt: skip
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section(preset.text_hidden // preset.text_heads)},
        initializer_range=preset.initializer_range,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def qwen2_vl_vision(preset: SizePreset) -> dict[str, Any]:
    return dict(
        embed_dim=preset.vision_hidden,
        hidden_size=preset.text_hidden,  # the merger's output: the language model's width
        num_heads=preset.vision_heads,
        depth=preset.vision_layers,
        mlp_ratio=preset.vision_intermediate // preset.vision_hidden,
    )


def qwen2_5_vl_vision(preset: SizePreset) -> dict[str, Any]:
    depth = preset.vision_layers
    return dict(
        hidden_size=preset.vision_hidden,
        out_hidden_size=preset.text_hidden,  # the merger's output: the language model's width
        intermediate_size=preset.vision_intermediate,
        num_heads=preset.vision_heads,
        depth=depth,
        window_size=WINDOW_TOKENS * MERGE_SIZE * preset.patch_size,
        # Qwen2.5-VL: full attention in every 8th block of 32; here every 4th, at least one.
        fullatt_block_indexes=[i for i in range(depth) if i % 4 == 3] or [depth // 2],
    )


@dataclass(frozen=True)
class QwenVLLike:
    """A Qwen-VL checkpoint kind: names, HF classes, its vision settings and the images-only processor class."""

    family: str
    config_class: Callable[..., PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    hf_processor_name: str  # the class a hub checkpoint's processor config names
    vision_settings: Callable[[SizePreset], dict[str, Any]]  # the vision config's settings for a size

    def build(
        self,
        out_dir: str | Path,
        *,
        vision: str = "vit",
        text: str = "qwen2",
        size: str = "tiny",
        seed: int = 0,
        tie_word_embeddings: bool = False,
    ) -> Path:
        """Write a random-weight checkpoint of this kind and return its path. Same arguments, same files.

        `tie_word_embeddings=True` makes the head share the embedding matrix (Qwen2-VL-2B, Qwen2.5-VL-3B): the
        checkpoint then stores no `lm_head.weight`."""
        check_choice("vision", vision, ("vit",))
        check_choice("text", text, ("qwen2",))
        preset = size_preset(size)
        tokenizer = build_tokenizer(preset.vocab_size)
        token_pixels = (preset.patch_size * MERGE_SIZE) ** 2
        min_tokens, max_tokens = TOKENS_PER_IMAGE[size]
        processor = self.processor_class(
            image_processor=Qwen2VLImageProcessorPil(
                min_pixels=min_tokens * token_pixels,
                max_pixels=max_tokens * token_pixels,
                patch_size=preset.patch_size,
                temporal_patch_size=TEMPORAL_PATCH_SIZE,
                merge_size=MERGE_SIZE,
            ),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
        )
        vision_config = dict(
            patch_size=preset.patch_size,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            initializer_range=preset.initializer_range,
            **self.vision_settings(preset),
        )
        config = self.config_class(
            text_config=text_settings(preset, tokenizer),
            vision_config=vision_config,
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=tie_word_embeddings,
        )
        seeded(seed)
        model = self.model_class(config).eval()
        description = {
            "family": self.family, "vision": vision, "text": text, "size": size, "seed": seed,
            "tie_word_embeddings": tie_word_embeddings,
        }  # fmt: skip
        return save_checkpoint(out_dir, model, processor, description, hf_processor_name=self.hf_processor_name)



QWEN2_VL = QwenVLLike(
    "qwen2_vl",
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    ImagesOnlyQwen2VLProcessor,
    "Qwen2VLProcessor",
    qwen2_vl_vision,
)
QWEN2_5_VL = QwenVLLike(
    "qwen2_5_vl",
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    ImagesOnlyQwen2_5_VLProcessor,
    "Qwen2_5_VLProcessor",
    qwen2_5_vl_vision,
)
