"""BLIP-2 (`Blip2ForConditionalGeneration`) and InstructBLIP (`InstructBlipForConditionalGeneration`): a ViT,
a QFormer that turns the image into `num_query_tokens` query outputs, a linear projection, a causal LM.

The image features are the HF model's own `get_image_features`, run on a module holding only the vision
submodules under HF's names:

    pixel_values [B, 3, S, S] --vision_model--> last_hidden_state          [B, patches + 1, D_vision]
    query_tokens [1, Q, D_qformer] (expanded to B)
      (InstructBLIP: + the instruction, qformer_input_ids [B, L], read by the queries' self-attention)
      --qformer (self-attention, cross-attention to the image)--> [B, Q(+L), D_qformer] -> first Q rows
      --language_projection--> [B, Q, hidden_size]

Prompt layout (Blip2Processor / InstructBlipProcessor): the text has no placeholder; the processor puts Q image
tokens in front of the tokenized text, even before BOS, and at most one image goes with a prompt:

    "Question: what is it? Answer:"  ->  [<image> x Q, <s>, Question, :, ...]

Stored key layouts: 5.x `save_pretrained` writes the in-memory names, and the Salesforce hub checkpoints (made
by HF's conversion scripts) use the same names; no conversion mapping exists for these classes. Older
checkpoints may also hold buffers that are no longer saved (InstructBLIP's `qformer.embeddings.position_ids`,
Llama's `rotary_emb.inv_freq`): they are classified with their half and skipped by the loader.

    vision_model.X  query_tokens  qformer.X  language_projection.X      -> vision half, same names
    language_model.model.X (OPT: .decoder.X; Llama: .layers.X)         -> text half, model.X
    language_model.lm_head.weight (absent when tied, as OPT's is)      -> text half, lm_head.weight

Checkpoints whose language model is an encoder-decoder (Flan-T5) are refused: the generator runs decoder-only
language models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from PIL import Image
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerModel,
    Blip2VisionModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
    PretrainedConfig,
    PreTrainedModel,
)

from common.errors import CheckpointError, InvalidPrompt, UnsupportedArchitectureError
from common.models.base import (
    CAUSAL_LM_KEY_RULES,
    ModelFamily,
    PreparedImage,
    PromptImage,
    VisionModule,
    key_rule,
)

# Config fields that, besides the weights and the image processor, fix an image's embedding.
_VISION_SETTINGS = ("hidden_act", "layer_norm_eps", "num_attention_heads", "image_size", "patch_size", "qkv_bias")
_QFORMER_SETTINGS = (
    "hidden_act",
    "layer_norm_eps",
    "num_attention_heads",
    "cross_attention_frequency",
    "max_position_embeddings",
)


def sub_config(config: PretrainedConfig, name: str) -> PretrainedConfig:
    """`config.vision_config` / `config.qformer_config`, which the composite config always builds."""
    sub = getattr(config, name, None)
    if not isinstance(sub, PretrainedConfig):
        raise CheckpointError(f"{type(config).__name__} has no {name}")
    return sub


class QFormerVision(VisionModule):
    """The vision half of a BLIP-2-style model: its tower, query tokens, QFormer and projection under its names.

    Subclasses take `get_image_features` from their HF model class, so the features are HF's own computation.
    """

    vision_model_class: ClassVar[type[PreTrainedModel]]
    qformer_class: ClassVar[type[PreTrainedModel]]
    get_image_features: Callable[..., Any]  # the HF model class's own method

    def __init__(self, config: Blip2Config | InstructBlipConfig) -> None:
        super().__init__(config)
        qformer = sub_config(config, "qformer_config")
        self.vision_model = self.vision_model_class._from_config(sub_config(config, "vision_config"))
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer.hidden_size))
        self.qformer = self.qformer_class._from_config(qformer)
        self.language_projection = nn.Linear(qformer.hidden_size, config.get_text_config().hidden_size)


class Blip2Vision(QFormerVision):
    vision_model_class = Blip2VisionModel
    qformer_class = Blip2QFormerModel
    get_image_features = Blip2ForConditionalGeneration.get_image_features


class InstructBlipVision(QFormerVision):
    vision_model_class = InstructBlipVisionModel
    qformer_class = InstructBlipQFormerModel
    get_image_features = InstructBlipForConditionalGeneration.get_image_features


class QFormerFamily(ModelFamily):
    """What BLIP-2 and InstructBLIP share: the split, the features, the prompt layout, the refusals."""

    vision_class: ClassVar[type[QFormerVision]]
    images_before_text = True
    key_rules = (
        key_rule(r"^(?=vision_model\.|query_tokens$|qformer\.|language_projection\.)", "vision"),
        *CAUSAL_LM_KEY_RULES,
    )
    config: Blip2Config | InstructBlipConfig

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.refuse_unsupported(config)
        if getattr(config, "image_token_index", None) is None:
            raise CheckpointError(
                f"this {self.architectures[0]} config.json has no image_token_index: it predates the processor's "
                "image tokens; use a current revision of the checkpoint (the hub repos have been updated)"
            )

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        if type(config) is not cls.config_class:
            return False
        cls.refuse_unsupported(config)
        return True

    @classmethod
    def refuse_unsupported(cls, config: PretrainedConfig) -> None:
        """Raise UnsupportedArchitectureError for an encoder-decoder (Flan-T5) language model."""
        if getattr(config, "use_decoder_only_language_model", True):
            return
        from common.models import supported_architectures  # the registry imports this module

        text_type = config.get_text_config().model_type
        raise UnsupportedArchitectureError(
            f"mmserve does not serve {cls.architectures[0]} with a {text_type!r} language model (model_type "
            f"{config.model_type!r}): it is an encoder-decoder (use_decoder_only_language_model is false), and "
            f"the generator runs decoder-only language models only. Served: {cls.architectures[0]} with a "
            f"decoder-only language model (e.g. {', '.join(cls.example_hub_ids)}); "
            f"supported architectures: {', '.join(supported_architectures())}"
        )

    # --- vision half ------------------------------------------------------------------------------------

    def build_vision(self) -> VisionModule:
        return self.vision_class(self.config)

    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # pixel_values (+ InstructBLIP's qformer_input_ids / qformer_attention_mask), as prepare_image made them
        outputs = cast(QFormerVision, vision).get_image_features(**batch)
        return list(outputs.pooler_output)  # [B, num_query_tokens, hidden_size] -> B x [Q, hidden_size]

    def tokens_per_image(self, processor: Any) -> int | None:
        """The processor's `num_query_tokens`: it puts that many image tokens in front of the text."""
        expected = int(self.config.num_query_tokens)
        declared = getattr(processor, "num_query_tokens", None)
        if declared is None:
            raise CheckpointError(
                "the processor config has no num_query_tokens, so the processor would put no image tokens in "
                f'front of the text: add "num_query_tokens": {expected} to processor_config.json'
            )
        if int(declared) != expected:
            raise CheckpointError(
                f"the processor's num_query_tokens ({declared}) differs from the model's ({expected}): "
                "the processor config does not belong to these weights"
            )
        return expected

    def embedding_identity(self) -> dict[str, Any]:
        vision, qformer = sub_config(self.config, "vision_config"), sub_config(self.config, "qformer_config")
        return {
            "num_query_tokens": int(self.config.num_query_tokens),
            "vision": {name: getattr(vision, name, None) for name in _VISION_SETTINGS},
            "qformer": {name: getattr(qformer, name, None) for name in _QFORMER_SETTINGS},
        }

    # --- prompt layout ----------------------------------------------------------------------------------

    def check_prompt(self, prompt: str, num_images: int, placeholder: str) -> None:
        """At most one image, and no placeholder in the text: the processor places the image tokens itself."""
        if num_images > 1:
            raise InvalidPrompt(f"{self.architectures[0]} takes at most one image per prompt, got {num_images}")
        if placeholder in prompt:
            raise InvalidPrompt(
                f"the prompt contains the image placeholder {placeholder!r}: {self.architectures[0]} puts the "
                "image's tokens in front of the text by itself; send the text without it"
            )

    def prompt_token_ids(
        self,
        processor: Any,
        prompt: str,
        placeholder: str,
        images: Sequence[PromptImage],
        add_special_tokens: bool = True,
    ) -> list[int]:
        """The image's tokens (no BOS, no padding), then the tokenized prompt, as Blip2Processor lays them out."""
        tokenizer = processor.tokenizer
        image_text = "".join(self.image_text(processor, placeholder, image) for image in images)
        image_ids = tokenizer(image_text, add_special_tokens=False).input_ids if image_text else []
        text_ids = tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        return [int(token) for token in [*image_ids, *text_ids]]


class Blip2Family(QFormerFamily):
    name = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    config_class = Blip2Config
    example_hub_ids = ("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b")
    vision_class = Blip2Vision
    # Blip2ForConditionalGeneration._keep_in_fp32_modules: get_image_features casts the QFormer's output back.
    float32_modules = ("query_tokens", "qformer")


class InstructBlipFamily(QFormerFamily):
    name = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    config_class = InstructBlipConfig
    example_hub_ids = ("Salesforce/instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-13b")
    vision_class = InstructBlipVision
    # InstructBlipForConditionalGeneration._keep_in_fp32_modules: only the query tokens (its QFormer runs in
    # the model's dtype).
    float32_modules = ("query_tokens",)

    def embedding_condition(self, prompt: str) -> str | None:
        """The whole prompt: InstructBlipProcessor gives the QFormer tokenizer the same text as the LM's."""
        return prompt

    def prepare_image(self, processor: Any, image: Image.Image, condition: str | None) -> PreparedImage:
        """pixel_values, plus the instruction as the QFormer reads it (`processor.qformer_tokenizer(text)`)."""
        if condition is None:
            raise ValueError(
                "InstructBLIP image embeddings depend on the instruction: pass embedding_condition(prompt)"
            )
        prepared = super().prepare_image(processor, image, condition)
        instruction = processor.qformer_tokenizer(condition, return_tensors="pt")
        length, limit = (
            instruction["input_ids"].shape[1],
            sub_config(self.config, "qformer_config").max_position_embeddings,
        )
        if length > limit:  # HF would fail with a shape error in the QFormer's position embeddings
            raise InvalidPrompt(
                f"the instruction is {length} QFormer tokens; InstructBLIP's QFormer reads at most {limit}: "
                "shorten the prompt"
            )
        return PreparedImage(
            {
                **prepared.tensors,
                "qformer_input_ids": instruction["input_ids"],  # [1, L]
                "qformer_attention_mask": instruction["attention_mask"],  # [1, L]
            }
        )
