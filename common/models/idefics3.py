"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`): a SigLIP-style
tower on square tiles, a pixel-shuffle connector, a causal LM (Llama; SmolLM2 in SmolVLM).

The processor resizes an image (longest edge to `size`), and unless it fits one tile cuts it into a rows x cols
grid of tiles of `max_image_size` plus the whole image resized to one tile, the "global" tile, last. The features
are `Idefics3Model.get_image_features` (`SmolVLMModel`'s for SmolVLM) itself, run on a module that holds only the
vision submodules:

    pixel_values [B, N_tiles, 3, S, S], pixel_attention_mask [B, N_tiles, S, S]   (N_tiles = rows * cols + 1)
      --drop all-zero padding tiles (none: every image is prepared alone)-->
      --vision_model (the tower, patches of the mask's valid pixels)--> [B * N_tiles, (S/p)^2, D_vision]
      --connector: pixel shuffle (scale_factor^2 patches -> one) + linear--> [B * N_tiles, image_seq_len, hidden]
      one [N_tiles * image_seq_len, hidden] per image: the tiles' rows in tile order, the global tile's last

The prompt: the processor replaces each `<image>` by text that depends on the tile grid (`replace_image_token`);
for a 2 x 2 grid with image_seq_len 3 (`F` = <fake_token_around_image>, `I` = <image>):

    F<row_1_col_1>III F<row_1_col_2>III \\n F<row_2_col_1>III F<row_2_col_2>III \\n \\n F<global-img>III F
      run 0: rows 0-2   run 1: rows 3-5       run 2: rows 6-8     run 3: rows 9-11          run 4: rows 12-14

so an image's tokens come in rows * cols + 1 runs; HF's `masked_scatter` fills image tokens in order from the
concatenated features, i.e. run k holds rows [k * image_seq_len, (k + 1) * image_seq_len), which is how the
generator gives embedding rows to runs. The grid (rows, cols) is the image's `layout`: the image processor returns
it (`return_row_col_info`), `prepare_image` keeps it beside the tensors, and it travels with the embedding to the
generator's `image_text`. An unsplit image (rows = cols = 0) is one run: F<global-img>I...IF.

The language model is `model.text_model` (1-D RoPE, causal), served as the text config's *ForCausalLM.

Stored key layouts: `save_pretrained` (5.x) writes the in-memory names and the hub checkpoints
(HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-*, SmolVLM2-*) use the same names (no conversion
mapping exists for these classes); a bare `Idefics3Model` / `SmolVLMModel` save has them without `model.`:

    model.vision_model.X   model.connector.X   -> vision half, vision_model.X / connector.X
    model.text_model.X                         -> text half, model.X
    lm_head.X                                  -> text half, lm_head.X
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import transformers
from packaging.version import Version
from PIL import Image
from torch import nn
from transformers import (
    Idefics3Config,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    SmolVLMConfig,
)
from transformers.models.idefics3.modeling_idefics3 import (
    Idefics3Connector,
    Idefics3Model,
    Idefics3VisionTransformer,
)
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMModel, SmolVLMVisionTransformer
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

from common.errors import CheckpointError, InvalidPrompt
from common.models.base import (
    ImageSize,
    ImagesOnlyProcessor,
    ModelFamily,
    PreparedImage,
    PromptImage,
    VisionModule,
    backend_resized_size,
    key_rule,
    shape_only,
)

# Older releases (5.17 seen) resolve these families' PIL image processor to torchvision's, and fail without it.
MIN_TRANSFORMERS = "5.24"


def processor_loads_without_torchvision() -> bool:
    """Whether this transformers release loads Idefics3 / SmolVLM processors without torchvision."""
    return Version(transformers.__version__) >= Version(MIN_TRANSFORMERS)


# Not an input of get_image_features: the (rows, cols) tile grid the image processor chose, [1, 2] per image.
TILE_GRID = "tile_grid"
# Tower settings that, besides the weights, fix an embedding.
_VISION_SETTINGS = ("image_size", "patch_size", "num_attention_heads", "hidden_act", "layer_norm_eps")


class Idefics3Vision(VisionModule):
    """The vision half of `Idefics3Model`: its tower and connector under its names, and its get_image_features."""

    vision_model_class: ClassVar[type[PreTrainedModel]] = Idefics3VisionTransformer
    connector_class: ClassVar[type[nn.Module]] = Idefics3Connector
    get_image_features = Idefics3Model.get_image_features

    def __init__(self, config: Idefics3Config | SmolVLMConfig) -> None:
        super().__init__(config)
        vision_config = cast(PretrainedConfig, config.vision_config)
        self.vision_model = self.vision_model_class._from_config(vision_config)
        self.connector = self.connector_class(config)

    @property
    def dtype(self) -> torch.dtype:
        """What `PreTrainedModel.dtype` gives the HF model: get_image_features casts the pixels to it."""
        return next(self.parameters()).dtype


class SmolVLMVision(Idefics3Vision):
    vision_model_class = SmolVLMVisionTransformer
    connector_class = SmolVLMConnector
    get_image_features = SmolVLMModel.get_image_features


class Idefics3Family(ModelFamily):
    name = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    config_class: ClassVar[type[PretrainedConfig]] = Idefics3Config
    # SmolVLM (v1) checkpoints are Idefics3ForConditionalGeneration.
    example_hub_ids = (
        "HuggingFaceM4/Idefics3-8B-Llama3",
        "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
    )
    key_rules = (
        key_rule(r"^(?:model\.)?(?=vision_model\.|connector\.)", "vision"),
        key_rule(r"^(?:model\.)?text_model\.", "text", "model."),
        key_rule(r"^lm_head\.", "text", "lm_head."),
    )
    vision_class: ClassVar[type[Idefics3Vision]] = Idefics3Vision
    # The image processor's module: its `get_resize_output_image_size` is the rule for `size={"longest_edge": L}`.
    # Imported when first used: on older releases (5.17) importing it needs torchvision, and those releases are
    # refused for this family with a clear message before any image is processed.
    image_processing_module: ClassVar[str] = "transformers.models.idefics3.image_processing_pil_idefics3"
    config: Idefics3Config | SmolVLMConfig  # transformers generates SmolVLM's classes: not subclasses of Idefics3's

    # --- checkpoint split ---------------------------------------------------------------------------------

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config with the head tied as HF ties it: `Idefics3ForConditionalGeneration`'s
        `_tied_weights_keys` follow the top-level `tie_word_embeddings`, not the text config's (a copy: the
        checkpoint's config is not changed)."""
        text_config = copy.copy(self.config.get_text_config())
        text_config.tie_word_embeddings = bool(self.config.tie_word_embeddings)
        return text_config

    def build_vision(self) -> VisionModule:
        return self.vision_class(self.config)

    # --- images -------------------------------------------------------------------------------------------

    def prepare_image(self, processor: Any, image: Image.Image, condition: str | None) -> PreparedImage:
        """pixel_values [1, N_tiles, 3, S, S] and pixel_attention_mask [1, N_tiles, S, S] as the processor makes
        them, and the tile grid it chose (the processor asks its image processor for it the same way)."""
        outputs = processor.image_processor(images=[image], return_tensors="pt", return_row_col_info=True)
        rows, cols = int(outputs["rows"][0][0]), int(outputs["cols"][0][0])
        return PreparedImage(
            {
                "pixel_values": outputs["pixel_values"],
                "pixel_attention_mask": outputs["pixel_attention_mask"],
                TILE_GRID: torch.tensor([[rows, cols]]),  # [1, 2]
            }
        )

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # pixel_values [B, N_tiles, 3, S, S], pixel_attention_mask [B, N_tiles, S, S] -> B x [N_tiles * seq, hidden]
        outputs = cast(Idefics3Vision, vision).get_image_features(
            pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"]
        )
        return list(outputs.pooler_output)

    def resized_size(self, processor: Any, size: ImageSize) -> ImageSize:
        """The first resize, longest edge to `size["longest_edge"]` (capped by HF at 4096 px), as the image
        processor's `resize` computes it; the tiles and the global tile are cut from that. Any aspect ratio stays
        within longest_edge^2."""
        image_processor = processor.image_processor
        if image_processor.do_resize and image_processor.size.longest_edge:
            longest_edge_rule: Callable[..., tuple[int, int]] = importlib.import_module(
                self.image_processing_module
            ).get_resize_output_image_size
            resized = longest_edge_rule(shape_only(size), resolution_max_side=image_processor.size.longest_edge)
            return int(resized[0]), int(resized[1])
        return backend_resized_size(image_processor, size)  # height and width, or no resize

    def image_layout(self, image: PreparedImage) -> tuple[int, ...]:
        """(rows, cols) of the image's tile grid; (0, 0) when the processor did not split it."""
        rows, cols = image.tensors[TILE_GRID][0].tolist()
        return int(rows), int(cols)

    def load_processor(self, path: Path) -> Any:
        if not processor_loads_without_torchvision():
            raise CheckpointError(
                f"transformers {transformers.__version__} loads the {self.architectures[0]} processor only with "
                f"torchvision, which mmserve does not install: use transformers >= {MIN_TRANSFORMERS} (as pinned)"
            )
        return super().load_processor(path)

    def tokens_per_image(self, processor: Any) -> int | None:
        """One tile's tokens when the processor never splits images; None when the tile count varies."""
        seq_len = self.image_seq_len(processor)
        return None if processor.image_processor.do_image_splitting else seq_len

    def num_image_tokens(self, processor: Any, size: ImageSize) -> int:
        """image_seq_len tokens per tile, rows * cols + 1 tiles (the global one; just it when unsplit).

        Not `processor._get_num_multimodal_tokens`: it counts the whole replacement text (tags, newlines), and what
        the generator needs is the embedding's rows. The grid is the image processor's own rule.
        """
        _, rows, cols = processor.image_processor.get_number_of_image_patches(*size, {})
        return self.image_seq_len(processor) * (rows * cols + 1)

    def image_seq_len(self, processor: Any) -> int:
        """Tokens per tile, the processor's `image_seq_len`; it must be what the connector makes of one tile."""
        vision_config = cast(PretrainedConfig, self.config.vision_config)
        patches_per_side = int(vision_config.image_size) // int(vision_config.patch_size)
        expected = patches_per_side**2 // int(self.config.scale_factor) ** 2
        declared = int(processor.image_seq_len)
        if declared != expected:
            raise CheckpointError(
                f"the processor's image_seq_len ({declared}) differs from the tokens the model makes of one tile "
                f"({expected} = ({vision_config.image_size} / {vision_config.patch_size})^2 / "
                f"{self.config.scale_factor}^2): the processor config does not belong to these weights"
            )
        return declared

    def embedding_identity(self) -> dict[str, Any]:
        """The pixel shuffle's factor and the tower settings the weights' shapes do not imply (the tile split is
        the image processor's, whose config is in the fingerprint already)."""
        vision_config = self.config.vision_config
        return {
            "scale_factor": int(self.config.scale_factor),
            "vision_model": {name: getattr(vision_config, name, None) for name in _VISION_SETTINGS},
        }

    # --- prompt layout ------------------------------------------------------------------------------------

    def image_text(self, processor: Any, placeholder: str, image: PromptImage) -> str:
        """The processor's own replacement text for an image of this tile grid (`replace_image_token`)."""
        if len(image.layout) != 2:
            raise InvalidPrompt(
                f"an {self.architectures[0]} image needs its tile grid (rows, cols) to be laid out in the prompt, "
                f"got layout {list(image.layout)}: the embedding comes from an encoder that did not report it"
            )
        rows, cols = image.layout
        expected = self.image_seq_len(processor) * (rows * cols + 1)
        if image.rows != expected:
            raise InvalidPrompt(
                f"an image with a {rows} x {cols} tile grid has {expected} embedding rows under this checkpoint's "
                f"processor, got {image.rows}: the embedding comes from a different encoder"
            )
        return str(processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, image_idx=0))


class ImagesOnlySmolVLMProcessor(ImagesOnlyProcessor, SmolVLMProcessor):
    """SmolVLM's processor without its video processor (which needs torchvision; checkpoints name HF's class)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_len: int = 169,  # in the signature, so that it is saved and loaded with the processor
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_seq_len=image_seq_len, **kwargs)

    # SmolVLM's own override only adds its video processor's frame-sampling defaults (and a video template).
    apply_chat_template = ProcessorMixin.apply_chat_template


class SmolVLMFamily(Idefics3Family):
    """Idefics3's rules; SmolVLM's own model classes (its get_image_features keeps one tile when all are padding)
    and processor (`replace_image_token` writes the same text)."""

    name = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)
    config_class = SmolVLMConfig
    example_hub_ids = (
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    )
    vision_class = SmolVLMVision
    processor_class = ImagesOnlySmolVLMProcessor
    image_processing_module = "transformers.models.smolvlm.image_processing_pil_smolvlm"
