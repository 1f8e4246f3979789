"""Prompt text + images -> the engine's token ids and image spans, exactly as the checkpoint's processor does.

The processor expands every image placeholder (`<image>`) of the text into one placeholder token per image
embedding row, then tokenizes the expanded text. We do the same with the checkpoint's own tokenizer, using the
embedding row counts the encoder produced, and check them against what the model family says the processor
expects (`ModelFamily.tokens_per_image`), so the number of placeholder tokens always equals the number of rows.

    "USER: <image>\\nWhat is this? ASSISTANT:"   with one image of 16 rows
    -> [<s>, USER, :, <image> x16, \\n, What, ...]        ImageSpan(key, offset=3, length=16)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.models import ModelFamily
from generator_service.engine.request import ImageSpan


class InvalidPrompt(ValueError):
    """The prompt and its images do not fit together; the message says how (sent as INVALID_ARGUMENT)."""


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
        self.image_token: str = processor.image_token
        self.image_token_id: int = int(processor.image_token_id)
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

    def count_placeholders(self, prompt: str) -> int:
        return prompt.count(self.image_token)

    def check_placeholders(self, prompt: str, num_images: int) -> None:
        """Raise InvalidPrompt unless the prompt has exactly one placeholder per image (before any encoding)."""
        num_placeholders = self.count_placeholders(prompt)
        if num_placeholders != num_images:
            raise InvalidPrompt(
                f"the prompt has {num_placeholders} image placeholder(s) {self.image_token!r} "
                f"but {num_images} image(s) were given: put one placeholder per image, in order"
            )

    def tokenize(self, prompt: str, image_keys: Sequence[str], image_rows: Sequence[int]) -> TokenizedPrompt:
        """Expand each placeholder to its image's row count, tokenize, and locate every image's tokens."""
        self.check_placeholders(prompt, len(image_keys))
        for index, rows in enumerate(image_rows):
            if self.tokens_per_image is not None and rows != self.tokens_per_image:
                raise InvalidPrompt(
                    f"image {index} has {rows} embedding rows but this checkpoint's processor expands an image "
                    f"to {self.tokens_per_image} tokens: the embedding comes from a different encoder"
                )
        pieces = prompt.split(self.image_token)
        expanded = pieces[0] + "".join(
            self.image_token * rows + piece for rows, piece in zip(image_rows, pieces[1:], strict=True)
        )
        token_ids = [int(t) for t in self.tokenizer(expanded).input_ids]
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

