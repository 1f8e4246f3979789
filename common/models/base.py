"""The model-family interface: everything mmserve knows about one vision-language architecture.

The engine, scheduler, block manager, caches and servicers are family-agnostic: they see token ids, image spans
and embeddings. What differs between architectures lives behind `ModelFamily`, one subclass per family, chosen
from the checkpoint's config by `common.models.family_for_config`:

    splitting the checkpoint   `classify`: which stored tensor belongs to which half ("vision" or "text") and
                               under which name, so each service reads only its own half of the weights
    building the vision half   `build_vision`: one module holding Hugging Face's own vision submodules under
                               their HF names, whose `get_image_features` is HF's own method; `prepare_vision`
                               (e.g. drop tower layers whose output is never used)
    image inputs               `prepare_image`: one decoded image (+ its condition) -> the processor's tensors;
                               `resized_size`: how large the processor's resize step would make it (checked
                               before the processor runs, so a 1 x 16384 strip is refused, not stretched)
    image embeddings           `image_features`: a batch of prepared images -> one [rows, hidden] per image
    token counts               `tokens_per_image` (None when it varies) and `num_image_tokens(size)`: the
                               processor's own expansion rule, for an image of any size
    prompt layout              `check_prompt` / `prompt_token_ids`: where image tokens go (placeholders expanded
                               in place, or image tokens in front of the text)
    embedding identity         `embedding_identity` (settings, in the encoder fingerprint) and
                               `embedding_condition` (per request, e.g. InstructBLIP's instruction): both go
                               into every image key

Adding a family = one module defining a subclass + its entry in `common/models/__init__.py` + its demo
checkpoint and its tests.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM, AutoProcessor, PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import ChannelDimension, SizeDict, get_image_size_for_max_height_width

from common.errors import CheckpointError, InvalidPrompt

Half = Literal["vision", "text"]
ImageSize = tuple[int, int]  # (height, width) in pixels, as Hugging Face processors take it


class ImagesOnlyProcessor:
    """Mix in before an HF processor class to leave its `video_processor` out.

    `ProcessorMixin` takes its sub-processors from the `__init__` signature, so the subclass neither builds, checks,
    loads nor saves a video processor; everything else is HF's, inherited. mmserve serves images only, and HF's
    video processors need torchvision (not a dependency). Checkpoints keep naming HF's class.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        # video_processor=None for HF classes that require the argument; with it absent from this signature,
        # ProcessorMixin keeps no video processor.
        super().__init__(  # type: ignore[call-arg]
            image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs
        )


@dataclass(frozen=True)
class KeyRule:
    """Stored tensor keys matching `pattern` belong to `half`, named `prefix` + the rest of the key there."""

    pattern: re.Pattern[str]
    half: Half
    prefix: str = ""


def key_rule(pattern: str, half: Half, prefix: str = "") -> KeyRule:
    return KeyRule(re.compile(pattern), half, prefix)


# The text half is a `*ForCausalLM` (`model.` = the decoder stack, `lm_head.`), stored under `language_model`:
#   in memory (5.x): model.language_model.X   save_pretrained and the hub: language_model.model.X
#   head:            lm_head.X                 language_model.lm_head.X
CAUSAL_LM_KEY_RULES: tuple[KeyRule, ...] = (
    key_rule(r"^(?:model\.language_model\.|language_model\.model\.)", "text", "model."),
    key_rule(r"^(?:language_model\.)?lm_head\.", "text", "lm_head."),
)


@dataclass(frozen=True)
class PromptImage:
    """What the prompt of a request knows about one of its images: its embedding's rows and its layout."""

    rows: int
    layout: tuple[int, ...] = ()


@dataclass(frozen=True)
class PositionPlan:
    """Rotary positions of a prompt when they are not the token indices (M-RoPE).

    `positions[d][i]` is the position of prompt token i on axis d (`position_dims` axes); the token at index
    t >= len(prompt) (generated) is at t + `delta` on every axis.
    """

    positions: tuple[tuple[int, ...], ...]
    delta: int


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision half takes it: the processor's tensors, each with a leading batch dimension of 1.

    Images whose tensors have equal shapes (`batch_signature`) can share one forward pass: `collate` concatenates
    them, and padding (which would change the numbers) is never needed.
    """

    tensors: dict[str, torch.Tensor]

    @property
    def batch_signature(self) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
        return tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in sorted(self.tensors.items()))


class VisionModule(nn.Module):
    """A family's vision half: Hugging Face's own submodules under their HF names, and the config that the HF
    methods a subclass borrows (`get_image_features = LlavaModel.get_image_features`) read as `self.config`."""

    config: PretrainedConfig

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config


def shape_only(size: ImageSize) -> np.ndarray:
    """A [3, height, width] array that holds one byte: what Hugging Face's size helpers read (`image.shape`) without
    an image of that size in memory (every element is the same zero, by a stride of 0)."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (3, *size))


def backend_resized_size(image_processor: Any, size: ImageSize) -> ImageSize:
    """(height, width) that HF's image-processor backends' `resize` makes of an image of `size`, by the same
    dispatch on the processor's `size` and with HF's own helpers (CLIP, SigLIP, BLIP, Gemma 3...)."""
    if not getattr(image_processor, "do_resize", True):
        return size
    target = image_processor.size
    target = target if isinstance(target, SizeDict) else SizeDict(**target)
    if target.shortest_edge and target.longest_edge:
        height, width = get_size_with_aspect_ratio(size, target.shortest_edge, target.longest_edge)
        return int(height), int(width)
    if target.shortest_edge:  # the long edge is stretched to shortest_edge * aspect ratio
        resized = get_resize_output_image_size(
            shape_only(size), target.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        return int(resized[0]), int(resized[1])
    if target.max_height and target.max_width:
        return get_image_size_for_max_height_width(size, target.max_height, target.max_width)
    if target.height and target.width:
        return int(target.height), int(target.width)
    raise CheckpointError(
        f"{type(image_processor).__name__} has a size mmserve cannot read ({target}): "
        "set height and width, or shortest_edge, in preprocessor_config.json"
    )


def collate(images: Sequence[PreparedImage]) -> dict[str, torch.Tensor]:
    """Prepared images of one `batch_signature` -> the batched keyword arguments of `get_image_features`."""
    names = images[0].tensors
    return {name: torch.cat([image.tensors[name] for image in images]) for name in names}


class ModelFamily(ABC):
    """One vision-language architecture, bound to one checkpoint's config.

    Subclasses set the class attributes and implement the abstract methods; instances are cheap (no weights)
    and may be built by both services from the same config.
    """

    name: ClassVar[str]  # short id used in logs, GetModelInfo and docs, e.g. "llava"
    architectures: ClassVar[tuple[str, ...]]  # Hugging Face model classes served, e.g. LlavaForConditional...
    config_class: ClassVar[type[PretrainedConfig]]
    example_hub_ids: ClassVar[tuple[str, ...]] = ()
    # Stored tensor key -> (half, name inside that half's module); the first matching rule wins. Keys matching
    # none are never read by either half.
    key_rules: ClassVar[tuple[KeyRule, ...]]
    # The processor puts image tokens in front of the text and the prompt has no placeholder (BLIP-2); reported
    # by GetModelInfo so that clients know how to write prompts. `check_prompt` / `prompt_token_ids` enforce it.
    images_before_text: ClassVar[bool] = False
    # Vision-half submodules Hugging Face keeps in float32 when the model runs in float16 (its
    # `_keep_in_fp32_modules`, e.g. BLIP-2's QFormer; HF applies them to float16 only, so do we): names inside the
    # vision module, matched as prefixes.
    float32_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PretrainedConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        """Whether this family serves `config`; refusals with a reason raise UnsupportedArchitectureError."""
        return type(config) is cls.config_class

    # --- checkpoint split -------------------------------------------------------------------------------

    def classify(self, key: str) -> tuple[Half, str] | None:
        """(half, name inside that half's module) of a stored tensor key, or None for tensors no half reads."""
        for rule in self.key_rules:
            match = rule.pattern.match(key)
            if match:
                return rule.half, rule.prefix + key[match.end() :]
        return None

    # The processor class to load, when not AutoProcessor's choice: an images-only subclass of HF's processor
    # (`ImagesOnlyProcessor`) where HF's insists on a video processor, which needs torchvision.
    processor_class: ClassVar[type[ProcessorMixin] | None] = None

    def load_processor(self, path: Path) -> Any:
        """The checkpoint's processor: `processor_class`, or the class `AutoProcessor` picks."""
        return (self.processor_class or AutoProcessor).from_pretrained(path)

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        """Columns of every image embedding: the language model's hidden size."""
        return int(self.text_config.hidden_size)

    def build_text(self) -> PreTrainedModel:
        """The empty text half (weights come later): a causal LM whose `.model` is the decoder stack (called with
        `inputs_embeds`, `position_ids`) and `.lm_head` the head, named as `classify` maps the stored text keys.
        Default: the text config's own `*ForCausalLM`."""
        return AutoModelForCausalLM.from_config(self.text_config)

    @abstractmethod
    def build_vision(self) -> VisionModule:
        """The empty vision half (weights come later): HF's own submodules under the names `classify` gives."""

    def prepare_vision(self, vision: VisionModule) -> dict[str, Any]:
        """Adjust the loaded vision half before use (e.g. remove layers whose output is never read); returns what
        was changed, for the start-up log."""
        return {}  # most families run their modules as loaded

    # --- images -------------------------------------------------------------------------------------------

    def prepare_image(self, processor: Any, image: Image.Image, condition: str | None) -> PreparedImage:
        """One RGB image (and its `embedding_condition`) -> the tensors the checkpoint's processor makes of it."""
        outputs = processor.image_processor(images=[image], return_tensors="pt")
        return PreparedImage({name: value for name, value in outputs.items() if isinstance(value, torch.Tensor)})

    def resized_size(self, processor: Any, size: ImageSize) -> ImageSize:
        """(height, width) of the image the checkpoint's processor resizes an image of `size` to (its resize step,
        before any crop, pad, tile or patch split), computed from the processor's own config and size rule with
        no pixel touched. Raises InvalidImageError for a size the processor itself refuses.

        Default: the rule of HF's image-processor backends (`backend_resized_size`).
        """
        return backend_resized_size(processor.image_processor, size)

    @abstractmethod
    def image_features(self, vision: VisionModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Collated prepared images -> one projected embedding [rows, hidden_size] per image, in order.

        Must compute exactly what the Hugging Face model's `get_image_features` computes (bit for bit in float32
        at batch 1), by calling it.
        """

    def image_layout(self, image: PreparedImage) -> tuple[int, ...]:
        """What the language-model side needs to know about one image besides its rows, read off its prepared
        tensors (Qwen2-VL: the patch grid for M-RoPE positions; Idefics3: the tile grid for the prompt's row/column
        tokens). It travels with the embedding through caches and the wire. Default: nothing."""
        return ()

    @abstractmethod
    def tokens_per_image(self, processor: Any) -> int | None:
        """Placeholder tokens one image expands to under the checkpoint's processor; None when it varies."""

    def num_image_tokens(self, processor: Any, size: ImageSize) -> int:
        """Placeholder tokens an image of `size` (height, width) expands to: the processor's own rule."""
        fixed = self.tokens_per_image(processor)
        if fixed is not None:
            return fixed
        return int(processor._get_num_multimodal_tokens(image_sizes=[list(size)]).num_image_tokens[0])

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def image_size(self) -> int:
        """The side the processor resizes images (or tiles) to (0 when not fixed); reported by GetModelInfo."""
        vision_config = getattr(self.config, "vision_config", None)
        return int(getattr(vision_config, "image_size", 0) or 0)

    def embedding_condition(self, prompt: str) -> str | None:
        """What of the request besides the image bytes its image embeddings depend on (None: nothing).

        InstructBLIP's QFormer reads the instruction, so there the prompt is returned; it becomes part of each
        image's key, so the same image under two instructions is two cache entries.
        """
        return None

    @abstractmethod
    def embedding_identity(self) -> dict[str, Any]:
        """JSON-able settings that, with the vision weights, the processor config and the dtype, fix an embedding."""

    def describe(self) -> dict[str, Any]:
        """Settings worth one log line at start-up."""
        return {"family": self.name, **self.embedding_identity()}

    # --- prompt layout ------------------------------------------------------------------------------------

    def check_prompt(self, prompt: str, num_images: int, placeholder: str) -> None:
        """Raise InvalidPrompt unless the prompt has exactly one placeholder per image (before any encoding)."""
        num_placeholders = prompt.count(placeholder)
        if num_placeholders != num_images:
            raise InvalidPrompt(
                f"the prompt has {num_placeholders} image placeholder(s) {placeholder!r} "
                f"but {num_images} image(s) were given: put one placeholder per image, in order"
            )

    def prompt_token_ids(
        self,
        processor: Any,
        prompt: str,
        placeholder: str,
        images: Sequence[PromptImage],
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Token ids of `prompt` with every image expanded, as the processor lays them out: exactly `rows` image
        tokens per image, in order (possibly interleaved with other tokens, e.g. Idefics3's row/column tags).
        `add_special_tokens`: whether the tokenizer adds its own (BOS...), as `processor(text=...)` does.

        Default: each placeholder is replaced in place by `image_text`, then the whole text is tokenized.
        """
        pieces = prompt.split(placeholder)
        expanded = pieces[0]
        for image, piece in zip(images, pieces[1:], strict=True):
            expanded += self.image_text(processor, placeholder, image) + piece
        return [int(token) for token in processor.tokenizer(expanded, add_special_tokens=add_special_tokens).input_ids]

    def image_text(self, processor: Any, placeholder: str, image: PromptImage) -> str:
        """The text one image's placeholder becomes (default: the placeholder once per embedding row)."""
        return placeholder * image.rows

    # --- the language model's side ----------------------------------------------------------------------

    # Axes of the rotary positions the language model takes: 1 (positions are token indices unless
    # `positions` says otherwise) or 3 (M-RoPE: temporal, height, width).
    position_dims: ClassVar[int] = 1
    # Image tokens attend to every token of their own image (Gemma 3), not only to earlier ones: each contiguous
    # run of an image's tokens is a bidirectional block, which a prefill chunk never splits.
    bidirectional_images: ClassVar[bool] = False

    def positions(
        self, token_ids: Sequence[int], image_runs: Sequence[tuple[int, int]], images: Sequence[PromptImage]
    ) -> PositionPlan | None:
        """The prompt's rotary positions when they are not its token indices; None (default) when they are.

        `image_runs` are the (start, end) token ranges of image tokens, in order; `images` the prompt's images.
        """
        return None
