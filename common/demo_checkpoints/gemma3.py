"""A random-weight Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`): SigLIP + Gemma 3 with sliding-window layers.

It loads offline with `AutoProcessor.from_pretrained` and `Gemma3ForConditionalGeneration.from_pretrained`, like
`google/gemma-3-4b-it`: `config.json` (tied head, so no `lm_head` tensor), `model.safetensors`, a tokenizer holding
Gemma's special tokens, `processor_config.json` (`Gemma3ImageProcessorPil`, `image_seq_length`) and Gemma 3's chat
template. Shapes (tiny):

    image 48 x 48 --SigLIP, patch 8--> 6 x 6 patches --avg pool 2 x 2--> 3 x 3 = 9 image tokens (mm_tokens_per_image)
    language model: 3 layers [sliding(6), sliding(6), full]: an image (9 tokens) is longer than the window, so a
    sliding layer's mask really is window AND (causal OR same image), not either alone

HF initialises Gemma's RMSNorm gains (`x * (1 + w)`) with w = 0 and the projector's matrix to zeros: every image
would embed alike, and the scaled, tied embeddings dominate the residual stream (greedy output repeats the prompt's
last token). Here w ~ N(0, 2) and the projection is drawn like the other weights, so outputs depend on the image,
on the mask and on positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from common.demo_checkpoints.parts import (
    CORPUS_PATH,
    check_choice,
    prepend_bos,
    save_checkpoint,
    seeded,
    size_preset,
    train_bpe,
)

VISION_CHOICES = ("siglip",)
TEXT_CHOICES = ("gemma3",)
# Gemma's special tokens (the hub tokenizer's ids: pad 0, eos 1, bos 2, unk 3; the turn and image tokens follow).
SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)  # fmt: skip
BOI_TOKEN, EOI_TOKEN, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
NORM_GAIN_STD = 2.0

# google/gemma-3-4b-it's template, without tool use: the system prompt is folded into the first user turn, images
# are written as `<start_of_image>` where they are in the message, the assistant's role is "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Gemma3Shape:
    """What Gemma 3 adds to a size preset: the image grid, the image tokens and the sliding window."""

    image_size: int
    patch_size: int
    mm_tokens_per_image: int  # a square whose side divides image_size // patch_size
    sliding_window: int
    layer_types: tuple[str, ...]


SLIDING, FULL = "sliding_attention", "full_attention"
SHAPES = {
    "tiny": Gemma3Shape(48, 8, 9, 6, (SLIDING, SLIDING, FULL)),
    "bench": Gemma3Shape(224, 16, 49, 128, (SLIDING,) * 5 + (FULL, SLIDING, SLIDING)),  # Gemma 3's 5:1 pattern
}  # fmt: skip


def build(
    out_dir: str | Path,
    *,
    vision: str = "siglip",
    text: str = "gemma3",
    size: str = "tiny",
    seed: int = 0,
    pan_and_scan: bool = False,
) -> Path:
    """Write a random-weight Gemma 3 checkpoint to `out_dir` and return its path. Same arguments, same files.

    `pan_and_scan` writes `do_pan_and_scan: true` into the image-processor config, with a minimum crop size of one
    tower side so that the tiny images get crops (the hub's default, 256 px, would leave them whole)."""
    check_choice("vision", vision, VISION_CHOICES)
    check_choice("text", text, TEXT_CHOICES)
    preset, shape = size_preset(size), SHAPES[size]
    tokenizer = build_tokenizer(preset.vocab_size)
    ids = special_token_ids(tokenizer)
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=len(shape.layer_types),
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        head_dim=preset.text_hidden // preset.text_heads,
        query_pre_attn_scalar=preset.text_hidden // preset.text_heads,
        sliding_window=shape.sliding_window,
        layer_types=list(shape.layer_types),
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.initializer_range,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision_settings: dict[str, Any] = dict(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        vision_use_head=False,  # as in the hub checkpoints: Gemma 3 reads the last hidden state only
        initializer_range=preset.initializer_range,
    )
    vision_config = SiglipVisionConfig(**vision_settings)
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=shape.mm_tokens_per_image,
        boi_token_index=ids[BOI_TOKEN],
        eoi_token_index=ids[EOI_TOKEN],
        image_token_index=ids[IMAGE_SOFT_TOKEN],
        initializer_range=preset.initializer_range,
    )
    seeded(seed)
    model = with_random_gains(Gemma3ForConditionalGeneration(config), preset.initializer_range)
    model.generation_config.eos_token_id = ids["<eos>"]
    pan_and_scan_settings: dict[str, Any] = dict(
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=shape.image_size,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": shape.image_size, "width": shape.image_size},
        **(pan_and_scan_settings if pan_and_scan else {}),
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=shape.mm_tokens_per_image,
        chat_template=CHAT_TEMPLATE,
    )
    description = {
        "family": "gemma3", "vision": vision, "text": text, "size": size, "seed": seed, "pan_and_scan": pan_and_scan,
    }  # fmt: skip
    return save_checkpoint(out_dir, model, processor, description)


def with_random_gains(model: PreTrainedModel, initializer_range: float) -> PreTrainedModel:
    """Draw the RMSNorm gains (HF: zeros, i.e. gain 1) and the projector's matrix (HF: zeros) at random."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("model.vision_tower."):
                continue  # SigLIP's LayerNorms are ordinary (weight 1, bias 0) and its weights already random
            if name.endswith("norm.weight"):
                parameter.normal_(mean=0.0, std=NORM_GAIN_STD)
            elif name.endswith("mm_input_projection_weight"):
                parameter.normal_(mean=0.0, std=initializer_range)
    return model.eval()


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int):
            raise TypeError(f"{token!r} did not map to a single id")
        ids[token] = token_id
    return ids


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the bundled corpus with Gemma's special tokens and `<bos>` prepended (as Gemma's does).

    The corpus is also fed as paragraphs joined by blank lines, so that runs of newlines merge into single tokens
    like in Gemma's vocabulary: the processor's "\\n\\n" around every image then tokenizes together with the text
    next to it, which an expansion that tokenized the pieces separately would get wrong.
    """
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    paragraphs = ["\n\n".join(lines[i : i + 3]) for i in range(len(lines))] + ["\n\n\n\n".join(lines[:4])]
    tokenizer = prepend_bos(train_bpe(vocab_size, SPECIAL_TOKENS, extra_texts=paragraphs), "<bos>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        # Gemma3Processor reads these: boi is the prompt's placeholder, the image token fills the expansion.
        extra_special_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_SOFT_TOKEN},
        model_max_length=4096,
    )
