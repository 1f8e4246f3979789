"""Random-weight Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`)
checkpoints: a SigLIP-style tower on square tiles, the pixel-shuffle connector, a Llama language model.

They load offline with `AutoProcessor.from_pretrained` and the HF classes' `from_pretrained`, like
`HuggingFaceM4/Idefics3-8B-Llama3` and `HuggingFaceTB/SmolVLM2-*`: `config.json`, `model.safetensors`, the tokenizer
with Idefics3's special tokens (`<fake_token_around_image>`, `<image>`, `<global-img>`, `<end_of_utterance>`,
`<row_i_col_j>`), the family's processor with its PIL image processor, and a chat template (SmolVLM's processor
is saved without its video processor, which needs torchvision: `ImagesOnlyProcessor`). The processor's sizes are
Idefics3's, scaled down from its 364-px tile:

    Idefics3-8B:  tile 364, patch 14 -> 26 x 26 patches -> pixel shuffle (2) -> 169 tokens, longest edge 4 x 364
    tiny here:    tile  48, patch  8 ->  6 x  6 patches -> pixel shuffle (2) ->   9 tokens, longest edge 3 x 48

The processor resizes every image's longest edge to 3 tiles and splits it into a grid of up to 3 x 3 tiles (plus
the whole image as one more tile), so images of different aspect ratios get different grids and token counts.
`image_splitting=False` makes a checkpoint whose processor never splits (every image one tile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    BaseImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

# From their modules: without torchvision, transformers 5.17 exports the PIL image processors at the top level as
# placeholders that refuse to build.
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from common.demo_checkpoints.parts import (
    IMAGE_TOKEN,
    SizePreset,
    build_tokenizer,
    check_choice,
    save_checkpoint,
    seeded,
    set_special_ids,
    size_preset,
    special_token_ids,
    text_config,
)
from common.models.idefics3 import ImagesOnlySmolVLMProcessor

SCALE_FACTOR = 2  # the connector's pixel shuffle: every 2 x 2 patch features become one token
MAX_TILES_PER_SIDE = 3  # the processor's longest edge, in tiles (Idefics3-8B: 4)
# The tile side (the tower's image size) per size preset: a multiple of patch_size * SCALE_FACTOR.
TILE_SIDE = {"tiny": 48, "bench": 224}
GRID_SIDE = 6  # the processor writes <row_i_col_j> tags for grids of up to 6 x 6 tiles, as Idefics3's does
IDEFICS3_TOKENS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{row}_col_{col}>" for row in range(1, GRID_SIDE + 1) for col in range(1, GRID_SIDE + 1)),
)

# Idefics3's layout ("User:<image>What is it?<end_of_utterance>\nAssistant:"), without the template's own BOS
# (the demo tokenizer adds <s>). Images and text of a message in their order.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The demo BPE tokenizer plus Idefics3's special tokens (single ids that never merge with text)."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_tokens(list(IDEFICS3_TOKENS), special_tokens=True)
    return tokenizer


def tile_side(size: str) -> int:
    if size not in TILE_SIDE:
        raise ValueError(f"size must be one of {tuple(TILE_SIDE)}, got {size!r}")
    return TILE_SIDE[size]


def image_seq_len(preset: SizePreset, tile: int) -> int:
    """Tokens per tile: (tile / patch)^2 patches, SCALE_FACTOR^2 of them shuffled into one token."""
    return (tile // preset.patch_size) ** 2 // SCALE_FACTOR**2


@dataclass(frozen=True)
class Idefics3Like:
    """An Idefics3-style checkpoint kind (Idefics3, SmolVLM): names, HF classes and its own processor."""

    family: str
    config_class: Callable[..., PretrainedConfig]
    vision_config_class: Callable[..., PretrainedConfig]
    model_class: Callable[..., PreTrainedModel]
    image_processor_class: Callable[..., BaseImageProcessor]  # SmolVLM's is a copy of Idefics3's, no subclass
    processor_class: Callable[..., ProcessorMixin]
    hf_processor_name: str | None = None  # the class the saved configs name, when processor_class is images-only

    def build(
        self,
        out_dir: str | Path,
        *,
        vision: str = "siglip",
        text: str = "llama",
        size: str = "tiny",
        seed: int = 0,
        image_splitting: bool = True,
    ) -> Path:
        """Write a random-weight checkpoint of this kind and return its path. Same arguments, same files.

        `image_splitting=False` makes its image processor resize every image to one tile instead of splitting it.
        """
        check_choice("vision", vision, ("siglip",))
        check_choice("text", text, ("llama",))
        preset, tile = size_preset(size), tile_side(size)
        tokenizer = build_idefics3_tokenizer(preset.vocab_size)
        image_processor = self.image_processor_class(
            size={"longest_edge": MAX_TILES_PER_SIDE * tile},
            max_image_size={"longest_edge": tile},
            do_image_splitting=image_splitting,
        )
        made_processor = self.processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=image_seq_len(preset, tile),
            chat_template=CHAT_TEMPLATE,
        )
        special_ids = special_token_ids(tokenizer)
        vision_config = self.vision_config_class(
            hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_intermediate,
            num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads,
            image_size=tile,
            patch_size=preset.patch_size,
            initializer_range=preset.initializer_range,
        )
        config = self.config_class(
            vision_config=vision_config,
            text_config=text_config("llama", preset, len(tokenizer), special_ids),
            image_token_id=special_ids[IMAGE_TOKEN],
            scale_factor=SCALE_FACTOR,
            tie_word_embeddings=False,  # as Idefics3-8B: a separate head (HF ties by this top-level flag)
            initializer_range=preset.initializer_range,
        )
        set_special_ids(config.get_text_config(), special_ids)
        seeded(seed)
        model = self.model_class(config).eval()
        description: dict[str, Any] = {
            "family": self.family, "vision": vision, "text": text, "size": size, "seed": seed,
            "image_splitting": image_splitting,
        }  # fmt: skip
        return save_checkpoint(out_dir, model, made_processor, description, self.hf_processor_name)


IDEFICS3 = Idefics3Like(
    "idefics3",
    Idefics3Config,
    Idefics3VisionConfig,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
)
SMOLVLM = Idefics3Like(
    "smolvlm",
    SmolVLMConfig,
    SmolVLMVisionConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    ImagesOnlySmolVLMProcessor,
    hf_processor_name="SmolVLMProcessor",
)
