"""A random-weight LLaVA-NeXT checkpoint (`LlavaNextForConditionalGeneration`): CLIP or SigLIP + Mistral, Llama or
Qwen2, with the "anyres" image processor.

It loads offline with `AutoProcessor.from_pretrained` and `LlavaNextForConditionalGeneration.from_pretrained`,
like an `llava-hf/llava-v1.6-*` checkpoint. The grid pinpoints are llava-v1.6's, scaled from its 336-px tile to the
tiny tower's side, so images of different sizes and aspect ratios really get different crop grids and token counts:

    llava-v1.6 (tile 336):  [336, 672] [672, 336] [672, 672] [1008, 336] [336, 1008]   (height, width)
    here (tile S):          [S, 2S]    [2S, S]    [2S, 2S]   [3S, S]     [S, 3S]
"""

from __future__ import annotations

from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from common.demo_checkpoints.llava import LlavaLike
from common.demo_checkpoints.parts import IMAGE_TOKEN, SizePreset

# llava-v1.6-mistral's layout: "[INST] <image>\n<text> [/INST]". Images of a message come before its text; the
# assistant's turns end with the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
)

# llava-v1.6's pinpoints in units of one tile (height, width).
GRID_IN_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def grid_pinpoints(tile: int) -> list[list[int]]:
    return [[rows * tile, cols * tile] for rows, cols in GRID_IN_TILES]


def processor(vision: str, preset: SizePreset, tokenizer: PreTrainedTokenizerFast, strategy: str) -> LlavaNextProcessor:
    side = preset.image_size
    # llava-v1.6's image processor settings (CLIP mean/std, bicubic, resize + center crop of every tile).
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=grid_pinpoints(side),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if vision == "clip" else 0,
    )


LLAVA_NEXT = LlavaLike(
    "llava_next",
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    processor,
    extra_settings=lambda preset: {"image_grid_pinpoints": grid_pinpoints(preset.image_size)},
)
