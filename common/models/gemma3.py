"""Gemma 3 (`Gemma3ForConditionalGeneration`, gemma-3-4b-it and up): a SigLIP tower, a pooling projector, a Gemma 3
language model whose image tokens attend to each other both ways and whose local layers see a sliding window.

The image features are `Gemma3Model.get_image_features` itself, run on a module holding only the vision submodules:

    pixel_values [B, 3, S, S] --vision_tower (SigLIP)--> last_hidden_state [B, (S/patch)^2, D_vision]
      --multi_modal_projector: avg pool to mm_tokens_per_image, RMSNorm, @ W--> [B, mm_tokens_per_image, hidden]

Prompt layout (Gemma3Processor): the placeholder users write (and the chat template writes) is `<start_of_image>`;
the processor replaces each one by its `full_image_sequence` and tokenizes the whole text:

    "Look: <start_of_image> what?"
      -> "Look: \\n\\n<start_of_image>" + "<image_soft_token>" x T + "<end_of_image>\\n\\n what?"

Attention (Gemma3Model, outside the language model): `token_type_ids` mark the soft tokens only, and each maximal
run of them is a block (`get_block_sequence_ids_for_mask`) whose tokens see each other both ways; `<start_of_image>`
and `<end_of_image>` stay causal. Full layers: causal OR same block; sliding layers: window AND (causal OR same
block). That is `bidirectional_images`: the generator makes each run of an image's tokens a block, and the paged
attention composes it with the window the same way.

Pan and scan (`do_pan_and_scan`, off unless the image-processor config turns it on): an image becomes the whole
image plus 2..max crops, each a view of T tokens in its own `full_image_sequence`, with the processor's own
"Here is the original image ... and here are some crops ..." text around them. One image is then one embedding of
(1 + crops) * T rows in 1 + crops runs, each run its own block, as in HF.

Stored key layouts (all handled): 5.x `save_pretrained` writes `language_model.model.X`, `vision_tower.X`,
`multi_modal_projector.X`; the google/gemma-3-* hub files have `vision_tower.vision_model.X`; in-memory names are
`model.language_model.X`, `model.vision_tower.X`. The head is tied to the embeddings and not stored.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Gemma3Config, PretrainedConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3Model, Gemma3MultiModalProjector

from common.errors import CheckpointError, InvalidPrompt
from common.models.base import (
    CAUSAL_LM_KEY_RULES,
    ImageSize,
    ModelFamily,
    PreparedImage,
    PromptImage,
    VisionModule,
    key_rule,
)

# The image processor's pan-and-scan settings, as Gemma3ImageProcessorPil.pan_and_scan takes them.
PAN_AND_SCAN_SETTINGS = (
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)
_VISION_SETTINGS = ("model_type", "image_size", "patch_size", "num_attention_heads", "hidden_act", "layer_norm_eps")


class Gemma3Vision(VisionModule):
    """The vision half of `Gemma3Model`: its tower and projector under its names, and its own get_image_features."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)

    get_image_features = Gemma3Model.get_image_features


class Gemma3Family(ModelFamily):
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    config_class = Gemma3Config
    example_hub_ids = ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it")
    key_rules = (key_rule(r"^(?:model\.)?(?=vision_tower\.|multi_modal_projector\.)", "vision"), *CAUSAL_LM_KEY_RULES)
    bidirectional_images = True
    config: Gemma3Config

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        if not isinstance(self.config.mm_tokens_per_image, int) or self.config.mm_tokens_per_image < 1:
            raise CheckpointError(
                f"mm_tokens_per_image must be a positive integer, got {self.config.mm_tokens_per_image!r}"
            )
        self.image_tokens: int = self.config.mm_tokens_per_image  # per view: the projector pools to this many rows
        text_config = self.text_config
        if getattr(text_config, "use_bidirectional_attention", False):
            raise CheckpointError(
                "this Gemma 3 language model has use_bidirectional_attention (an embedding model): the generator "
                "serves causal language models only"
            )
        vocab_size = int(text_config.vocab_size)
        if self.image_token_id >= vocab_size:
            # HF swaps such ids for 0 before embedding; the generator embeds the prompt's ids as they are.
            raise CheckpointError(
                f"image_token_index ({self.image_token_id}) is outside the language model's vocabulary "
                f"({vocab_size} tokens): the generator embeds prompt token ids directly, so the image token must "
                "have an embedding row (the google/gemma-3-* checkpoints have one)"
            )

    # --- vision half ------------------------------------------------------------------------------------

    def build_vision(self) -> VisionModule:
        return Gemma3Vision(self.config)

    def prepare_image(self, processor: Any, image: Image.Image, condition: str | None) -> PreparedImage:
        """pixel_values [1, views, 3, S, S]: the image (views = 1), or with pan and scan the image and its crops,
        as `processor(images=..., text=...)` makes them (its own defaults, pan and scan as configured)."""
        kwargs = {**_processor_image_defaults(processor), "do_pan_and_scan": False}
        pan_and_scan = self._pan_and_scan(processor)
        if pan_and_scan is not None:
            kwargs.update(do_pan_and_scan=True, **pan_and_scan)
        outputs = processor.image_processor(images=[image], return_tensors="pt", **kwargs)
        return PreparedImage({"pixel_values": outputs["pixel_values"].unsqueeze(0)})  # [1, views, 3, S, S]

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixel_values = batch["pixel_values"]  # [B, views, 3, S, S]
        num_images, views = pixel_values.shape[:2]
        outputs = cast(Gemma3Vision, vision).get_image_features(pixel_values=pixel_values.flatten(0, 1))
        features = outputs.pooler_output  # [B * views, T, hidden], each image's views in order
        return list(features.reshape(num_images, views * features.shape[1], features.shape[2]))  # B x [views*T, h]

    def tokens_per_image(self, processor: Any) -> int | None:
        """`mm_tokens_per_image` (the processor's `image_seq_length`); None with pan and scan (crops vary)."""
        if self._pan_and_scan(processor) is not None:
            return None
        return self._tokens_per_view(processor)

    def num_image_tokens(self, processor: Any, size: ImageSize) -> int:
        """T per view; with pan and scan the crops are the image processor's own `pan_and_scan` of an image of
        this size (it reads only the shape; Gemma3Processor's own count ignores crops)."""
        pan_and_scan = self._pan_and_scan(processor)
        per_view = self._tokens_per_view(processor)
        if pan_and_scan is None:
            return per_view
        height, width = size
        shape_only = np.broadcast_to(np.zeros((), dtype=np.uint8), (3, height, width))  # channels first, no copy
        crops = processor.image_processor.pan_and_scan(image=shape_only, **pan_and_scan)
        return per_view * (1 + len(crops))

    def embedding_identity(self) -> dict[str, Any]:
        """The image token count and the tower settings the weights' shapes do not imply (the projector's norm
        uses the tower's layer_norm_eps); pan and scan is part of the image-processor config, also fingerprinted."""
        vision_config = self.config.vision_config
        return {
            "mm_tokens_per_image": self.image_tokens,
            "vision_tower": {name: getattr(vision_config, name, None) for name in _VISION_SETTINGS},
        }

    # --- prompt layout ----------------------------------------------------------------------------------

    def image_text(self, processor: Any, placeholder: str, image: PromptImage) -> str:
        """The processor's own replacement of one placeholder: its `full_image_sequence`, or with pan and scan
        the original and crops' sequences in its sentence (`replace_image_token`)."""
        per_view = self._tokens_per_view(processor)
        views, remainder = divmod(image.rows, per_view)
        if remainder or views < 1:
            raise InvalidPrompt(
                f"an image embedding has {image.rows} rows, not a multiple of this checkpoint's {per_view} tokens "
                "per image view: the embedding comes from a different encoder"
            )
        return str(processor.replace_image_token({"num_crops": [views - 1]}, image_idx=0))

    # --- helpers ----------------------------------------------------------------------------------------

    def _tokens_per_view(self, processor: Any) -> int:
        expected = self.image_tokens
        declared = getattr(processor, "image_seq_length", None)
        if declared is None or int(declared) != expected:
            raise CheckpointError(
                f"the processor's image_seq_length ({declared}) differs from the model's mm_tokens_per_image "
                f"({expected}): the processor config does not belong to these weights"
            )
        return expected

    @staticmethod
    def _pan_and_scan(processor: Any) -> dict[str, Any] | None:
        """The pan-and-scan settings when the image-processor config turns it on (None: off, HF's default).

        Gemma3Processor passes its own defaults (off; 256 px, 4 crops, ratio 1.2) to the image processor on every
        call unless told otherwise, so a setting stored in the image-processor config never reaches it by itself;
        here `do_pan_and_scan: true` there is the deployment's choice, served as
        `processor(..., do_pan_and_scan=True, pan_and_scan_*=<the config's values, else those defaults>)`.
        """
        image_processor = processor.image_processor
        if not getattr(image_processor, "do_pan_and_scan", None):
            return None
        defaults = _processor_image_defaults(processor)
        settings = {}
        for name in PAN_AND_SCAN_SETTINGS:
            value = getattr(image_processor, name, None)
            settings[name] = defaults.get(name) if value is None else value
            if settings[name] is None:
                raise CheckpointError(f"pan and scan is on but {name} is not set in the image-processor config")
        return settings


def _processor_image_defaults(processor: Any) -> dict[str, Any]:
    """The image-processor arguments Gemma3Processor passes on every call unless told otherwise (RGB conversion,
    pan and scan off, 256 px, 4 crops, ratio 1.2): its `images_kwargs` class attribute in transformers 5.24, the
    `images_kwargs` of its `Gemma3ProcessorKwargs._defaults` in earlier 5.x releases."""
    defaults = getattr(processor, "images_kwargs", None)
    if not defaults:
        kwargs_class = getattr(processor, "valid_processor_kwargs", None)
        defaults = getattr(kwargs_class, "_defaults", {}).get("images_kwargs", {})
    return dict(defaults)
