"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a ViT on
native-resolution patch grids, a patch merger, a Qwen2 language model with M-RoPE (3-D rotary positions).

The processor resizes an image to multiples of patch_size * merge_size within [min_pixels, max_pixels] and
flattens it to patches; `image_grid_thw` = (t, h, w) is its patch grid (t = 1 for an image). The features are the
HF model's own `get_image_features`, run on a module that holds only the vision tower (`visual`, whose merger is the
projector):

    pixel_values [sum_i t_i*h_i*w_i, 3 * temporal_patch * patch^2]  (the patches of every image, concatenated)
    image_grid_thw [B, 3]
      --visual (Qwen2.5: window attention, full attention in `fullatt_block_indexes`)--> [sum_i t_i*h_i*w_i, D]
      --merger (merge_size^2 neighbouring patches -> one token)--> split per image: [t*h*w / merge^2, hidden]

so a batch is the concatenation of its images' patches (what HF does), one embedding per image, and the token
count depends on the image's size (the processor's rule, `_get_num_multimodal_tokens`). The grid is the image's
`layout`: it travels with the embedding to the generator, which needs it for the positions.

Positions (HF's `get_rope_index`, borrowed): text tokens advance all three axes together; an image's tokens sit
on its merged grid, starting where the text before it stopped; the text after it resumes at the start plus the
grid's longer side. For a 2 x 3 merged grid (image_grid_thw (1, 4, 6)) after 3 text tokens:

    token index:  0 1 2 | 3 4 5 6 7 8 | 9 10 | 11 (generated) ...
    temporal:     0 1 2 | 3 3 3 3 3 3 | 6 7  | 8
    height:       0 1 2 | 3 3 3 4 4 4 | 6 7  | 8
    width:        0 1 2 | 3 4 5 3 4 5 | 6 7  | 8

delta = max position + 1 - prompt length = 8 - 11 = -3: the generated token at index t is at t + delta on every
axis. A text-only prompt has index positions on all axes (delta 0), which is the engine's default (no plan).
HF finds images by grouping equal token types, so two images whose tokens touch would become one image with two
grids; such prompts are refused (the chat template writes <|vision_start|><|image_pad|><|vision_end|> per image).

The language model is HF's `Qwen2VLTextModel` (`Qwen2_5_VLTextModel`) under a small causal-LM wrapper (HF has no
*ForCausalLM for these text configs): `.model` is the decoder stack, `.lm_head` the head (tied to the embeddings
in Qwen2-VL-2B / Qwen2.5-VL-3B, whose flag lives on the outer config).

The processor is HF's own (`Qwen2VLProcessor` / `Qwen2_5_VLProcessor`) less its video processor: HF's
constructor checks that one against a torchvision-only class, and mmserve serves images only. Every processing
method is inherited unchanged.

Stored key layouts: the hub checkpoints and 5.x `save_pretrained` write the first; the second is the in-memory
naming, which some re-saved checkpoints use.

    hub / save_pretrained        in memory                  -> half, name there
    visual.X                     model.visual.X             -> vision, visual.X
    model.X                      model.language_model.X     -> text, model.X
    lm_head.weight (absent when tied)                       -> text, lm_head.weight
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
)

from common.errors import InvalidPrompt
from common.images.errors import InvalidImageError
from common.models.base import (
    CAUSAL_LM_KEY_RULES,
    ImageSize,
    ImagesOnlyProcessor,
    ModelFamily,
    PositionPlan,
    PreparedImage,
    PromptImage,
    VisionModule,
    key_rule,
)

# --- processors: HF's own, without the video processor -----------------------------------------------------------


class ImagesOnlyQwen2VLProcessor(ImagesOnlyProcessor, Qwen2VLProcessor):
    pass


class ImagesOnlyQwen2_5_VLProcessor(ImagesOnlyProcessor, Qwen2_5_VLProcessor):
    pass


# --- vision half -------------------------------------------------------------------------------------------------


class Qwen2VLVision(VisionModule):
    """The vision half of `Qwen2VLModel`: its tower (`visual`, merger included) and its own get_image_features."""

    tower_class: ClassVar[type[PreTrainedModel]] = Qwen2VisionTransformerPretrainedModel

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.visual = self.tower_class._from_config(config.vision_config)

    get_image_features = Qwen2VLModel.get_image_features


class Qwen2_5_VLVision(Qwen2VLVision):
    tower_class = Qwen2_5_VisionTransformerPretrainedModel
    get_image_features = Qwen2_5_VLModel.get_image_features


# --- text half ---------------------------------------------------------------------------------------------------


class Qwen2VLTextCausalLM(Qwen2VLPreTrainedModel):
    """HF's text model (`.model`) and a head (`.lm_head`), named as the checkpoint stores them (`model.X`,
    `lm_head.weight`); the generator calls `.model` with 3-D `position_ids` [3, 1, T]."""

    text_model_class: ClassVar[type[PreTrainedModel]] = Qwen2VLTextModel

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = self.text_model_class._from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class Qwen2_5_VLTextCausalLM(Qwen2VLTextCausalLM):
    text_model_class = Qwen2_5_VLTextModel


# --- positions ---------------------------------------------------------------------------------------------------


class Qwen2VLRopeIndex:
    """HF's `get_rope_index` on an object holding only the config it reads (and the helper it calls)."""

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    # (input_ids [B, T], mm_token_type_ids [B, T], image_grid_thw [N, 3]) -> positions [3, B, T], deltas [B, 1]
    get_rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]] = Qwen2VLModel.get_rope_index
    get_vision_position_ids: Callable[..., torch.Tensor] = Qwen2VLModel.get_vision_position_ids


class Qwen2_5_VLRopeIndex(Qwen2VLRopeIndex):
    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids


# --- the families ------------------------------------------------------------------------------------------------


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    config_class: ClassVar[type[PretrainedConfig]] = Qwen2VLConfig
    example_hub_ids = ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-72B-Instruct")
    key_rules = (
        key_rule(r"^(?:model\.)?(?=visual\.)", "vision"),
        *CAUSAL_LM_KEY_RULES,  # model.language_model.X (in memory), lm_head.X
        key_rule(r"^model\.", "text", "model."),  # the hub's decoder stack
    )
    position_dims = 3
    processor_class: ClassVar[type[ProcessorMixin] | None] = ImagesOnlyQwen2VLProcessor
    vision_class: ClassVar[type[Qwen2VLVision]] = Qwen2VLVision
    text_class: ClassVar[type[Qwen2VLTextCausalLM]] = Qwen2VLTextCausalLM
    rope_index_class: ClassVar[type[Qwen2VLRopeIndex]] = Qwen2VLRopeIndex
    # Vision config fields that fix an embedding and that the weights' shapes do not imply.
    vision_settings: ClassVar[tuple[str, ...]] = (
        "hidden_act", "num_heads", "patch_size", "temporal_patch_size", "spatial_merge_size", "rope_parameters",
    )  # fmt: skip

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self._rope_index = self.rope_index_class(config)

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def build_text(self) -> PreTrainedModel:
        return self.text_class._from_config(self.text_config)

    # --- vision half ------------------------------------------------------------------------------------

    def build_vision(self) -> VisionModule:
        return self.vision_class(self.config)

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # pixel_values [sum of patches, patch_dim], image_grid_thw [B, 3] -> one [t*h*w / merge^2, hidden] per image
        outputs = cast(Qwen2VLVision, vision).get_image_features(
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
        )
        return list(outputs.pooler_output)

    def resized_size(self, processor: Any, size: ImageSize) -> ImageSize:
        """HF's `smart_resize` with the image processor's settings (multiples of patch * merge, the pixel count
        within [min_pixels, max_pixels] = size's shortest_edge / longest_edge), as its `resize` calls it.
        smart_resize refuses aspect ratios above 200:1 with a ValueError: here that is the client's image."""
        image_processor = processor.image_processor
        if not image_processor.do_resize:
            return size
        height, width = size
        try:
            resized = smart_resize(
                height,
                width,
                factor=image_processor.patch_size * image_processor.merge_size,
                min_pixels=image_processor.size.shortest_edge,
                max_pixels=image_processor.size.longest_edge,
            )
        except ValueError as e:
            raise InvalidImageError(
                f"image is {width} x {height}, which {type(image_processor).__name__} cannot resize: {e}"
            ) from e
        return int(resized[0]), int(resized[1])

    def image_layout(self, image: PreparedImage) -> tuple[int, ...]:
        """The image's patch grid (t, h, w), as `image_grid_thw` (before merging)."""
        return tuple(int(size) for size in image.tensors["image_grid_thw"][0].tolist())

    def tokens_per_image(self, processor: Any) -> int | None:
        return None  # t*h*w / merge^2 of the resized image: `num_image_tokens` asks the processor

    def embedding_identity(self) -> dict[str, Any]:
        vision_config = self.config.vision_config
        return {"vision": {name: getattr(vision_config, name, None) for name in self.vision_settings}}

    # --- the language model's side ----------------------------------------------------------------------

    def positions(
        self, token_ids: Sequence[int], image_runs: Sequence[tuple[int, int]], images: Sequence[PromptImage]
    ) -> PositionPlan | None:
        """HF's `get_rope_index` over the prompt (see the module docstring); None for a text-only prompt."""
        if not images:
            return None
        self._check_images(image_runs, images)
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long)  # [1, T]
        token_types = torch.zeros_like(input_ids)  # [1, T]: 0 text, 1 image (HF's mm_token_type_ids)
        for start, end in image_runs:
            token_types[0, start:end] = 1
        grids = torch.tensor([image.layout for image in images], dtype=torch.long)  # [N, 3] image_grid_thw
        positions, deltas = self._rope_index.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grids
        )  # [3, 1, T], [1, 1]
        return PositionPlan(positions=tuple(tuple(axis) for axis in positions[:, 0].tolist()), delta=int(deltas[0, 0]))

    def _check_images(self, image_runs: Sequence[tuple[int, int]], images: Sequence[PromptImage]) -> None:
        """One run of tokens per image, runs apart, and each image's grid matching its rows."""
        if len(image_runs) != len(images):
            raise InvalidPrompt(f"{len(images)} image(s) but {len(image_runs)} runs of image tokens")
        for (_, end), (start, _) in itertools.pairwise(image_runs):
            if end == start:
                raise InvalidPrompt(
                    f"the tokens of two images touch at token {start}: {self.architectures[0]} would read them as "
                    "one image; put text between the placeholders (its chat template writes "
                    "<|vision_start|><|image_pad|><|vision_end|> for each image)"
                )
        for index, image in enumerate(images):
            if len(image.layout) != 3:
                raise InvalidPrompt(
                    f"image {index} has no patch grid (t, h, w) (layout {image.layout}): its embedding comes from "
                    "an encoder that does not report one"
                )
            t, h, w = image.layout
            if t * h * w != image.rows * self.merge_size**2:
                raise InvalidPrompt(
                    f"image {index} has {image.rows} embedding rows but its grid {image.layout} makes "
                    f"{t * h * w // self.merge_size**2} tokens: the embedding comes from a different encoder"
                )


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2-VL's rules; the tower adds window attention (and RMSNorm, SwiGLU), the LM is the same."""

    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    config_class = Qwen2_5_VLConfig
    example_hub_ids = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct")
    processor_class = ImagesOnlyQwen2_5_VLProcessor
    vision_class = Qwen2_5_VLVision
    text_class = Qwen2_5_VLTextCausalLM
    rope_index_class = Qwen2_5_VLRopeIndex
    vision_settings = (*Qwen2VLFamily.vision_settings, "window_size", "fullatt_block_indexes")
