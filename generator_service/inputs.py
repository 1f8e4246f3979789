"""Prompt text + images -> the engine's token ids and image spans, exactly as the checkpoint's processor does.

The processor puts one image token per image embedding row where each image goes: LLaVA-style families replace
each placeholder (`<image>`) of the text in place, BLIP-2-style families put the image tokens in front of the
tokenized text. Where they go is the model family's rule (`ModelFamily.prompt_token_ids`); here we apply it with
the embedding row counts the encoder produced, check them against what the family says the processor expects,
and locate every image's tokens.

    "USER: <image>\\nWhat is this? ASSISTANT:"   with one image of 16 rows
    -> [<s>, USER, :, <image> x16, \\n, What, ...]        ImageSpan(key, offset=3, length=16)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.checkpoint import image_placeholder
from common.errors import InvalidPrompt
from common.models import ModelFamily
from generator_service.engine.request import ImageSpan

__all__ = ["InputProcessor", "InvalidPrompt", "TokenizedPrompt"]


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    image_spans: tuple[ImageSpan, ...]


class InputProcessor:
    """Wraps the checkpoint's processor: chat rendering, placeholder expansion, tokenization."""

    def __init__(self, processor: Any, family: ModelFamily) -> None:
        self.processor = processor
        self.family = family
        self.tokenizer = processor.tokenizer
        self.image_token: str = image_placeholder(processor)
        self.image_token_id: int = family.image_token_id
        self.tokens_per_image = family.tokens_per_image(processor)  # None: it varies per image

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({int(eos)})

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt `processor.apply_chat_template(messages, add_generation_prompt=True)` renders."""
        if not messages:
            raise InvalidPrompt("messages is empty")
        if getattr(self.processor, "chat_template", None) is None:
            raise InvalidPrompt("this checkpoint has no chat template: send a formatted prompt instead")
        try:
            return str(self.processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # jinja errors: the template rejected the conversation's shape
            raise InvalidPrompt(f"the chat template could not render these messages: {exc}") from None

    def check_placeholders(self, prompt: str, num_images: int) -> None:
        """Raise InvalidPrompt unless the prompt fits its images (before any encoding)."""
        self.family.check_prompt(prompt, num_images, self.image_token)

    def embedding_condition(self, prompt: str) -> str | None:
        """What the prompt's image embeddings depend on besides the images (see ModelFamily.embedding_condition)."""
        return self.family.embedding_condition(prompt)

    def tokenize(self, prompt: str, image_keys: Sequence[str], image_rows: Sequence[int]) -> TokenizedPrompt:
        """Expand each image to its row count, tokenize, and locate every image's tokens."""
        self.check_placeholders(prompt, len(image_keys))
        for index, rows in enumerate(image_rows):
            if self.tokens_per_image is not None and rows != self.tokens_per_image:
                raise InvalidPrompt(
                    f"image {index} has {rows} embedding rows but this checkpoint's processor expands an image "
                    f"to {self.tokens_per_image} tokens: the embedding comes from a different encoder"
                )
        token_ids = self.family.prompt_token_ids(self.tokenizer, prompt, self.image_token, image_rows)
        positions = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(positions) != sum(image_rows):
            raise InvalidPrompt(
                f"the prompt text contains {len(positions) - sum(image_rows)} extra image token(s): "
                f"use {self.image_token!r} only as an image placeholder"
            )
        spans, cursor = [], 0
        for key, rows in zip(image_keys, image_rows, strict=True):
            spans.append(ImageSpan(key=key, offset=positions[cursor], length=rows))
            cursor += rows
        return TokenizedPrompt(token_ids=token_ids, image_spans=tuple(spans))
