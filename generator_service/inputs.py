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

import torch

from common.checkpoint import image_placeholder
from common.errors import InvalidPrompt
from common.images.provider import ResolvedImage
from common.models import ModelFamily
from common.models.base import PositionPlan, PromptImage
from generator_service.engine.llm_engine import EngineRequest
from generator_service.engine.request import ImageSpan
from generator_service.engine.sampling_params import SamplingParams

__all__ = ["InputProcessor", "InvalidPrompt", "RenderedChat", "TokenizedPrompt"]


class RenderedChat(str):
    """A prompt the checkpoint's chat template rendered. It is tokenized as HF's `apply_chat_template(tokenize=True)`
    does: without the tokenizer's own special tokens when the template already wrote the BOS token (Gemma), so the
    prompt never starts with two."""


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    image_spans: tuple[ImageSpan, ...]  # one per contiguous run of an image's tokens, in prompt order
    positions: PositionPlan | None = None  # None: rotary positions are the token indices
    attention_blocks: tuple[tuple[int, int], ...] = ()  # bidirectional (start, end) token ranges

    def engine_request(
        self, request_id: str, sampling: SamplingParams, embeddings: Mapping[str, torch.Tensor]
    ) -> EngineRequest:
        """The engine's request: for each span its image's whole embedding (looked up by key, not copied)."""
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=self.token_ids,
            sampling=sampling,
            image_spans=self.image_spans,
            image_embeddings=tuple(embeddings[span.key] for span in self.image_spans),
            positions=self.positions,
            attention_blocks=self.attention_blocks,
        )


class InputProcessor:
    """Wraps the checkpoint's processor: chat rendering, placeholder expansion, tokenization."""

    def __init__(self, processor: Any, family: ModelFamily) -> None:
        self.processor = processor
        self.family = family
        self.tokenizer = processor.tokenizer
        self.image_token: str = image_placeholder(processor)
        self.image_token_id: int = family.image_token_id
        self.tokens_per_image = family.tokens_per_image(processor)  # None: it varies per image

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> RenderedChat:
        """The prompt `processor.apply_chat_template(messages, add_generation_prompt=True)` renders."""
        if not messages:
            raise InvalidPrompt("messages is empty")
        if getattr(self.processor, "chat_template", None) is None:
            raise InvalidPrompt("this checkpoint has no chat template: send a formatted prompt instead")
        try:
            rendered = self.processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors: the template rejected the conversation's shape
            raise InvalidPrompt(f"the chat template could not render these messages: {exc}") from None
        return RenderedChat(rendered)

    def check_placeholders(self, prompt: str, num_images: int) -> None:
        """Raise InvalidPrompt unless the prompt fits its images (before any encoding)."""
        self.family.check_prompt(prompt, num_images, self.image_token)

    def embedding_condition(self, prompt: str) -> str | None:
        """What the prompt's image embeddings depend on besides the images (see ModelFamily.embedding_condition)."""
        return self.family.embedding_condition(prompt)

    def tokenize_images(self, prompt: str, images: Sequence[ResolvedImage]) -> TokenizedPrompt:
        """`tokenize` with the keys, rows and layouts of resolved images."""
        return self.tokenize(
            prompt,
            [image.key for image in images],
            [int(image.embedding.shape[0]) for image in images],
            [image.layout for image in images],
        )

    def tokenize(
        self,
        prompt: str,
        image_keys: Sequence[str],
        image_rows: Sequence[int],
        image_layouts: Sequence[tuple[int, ...]] | None = None,
    ) -> TokenizedPrompt:
        """Expand each image to its rows (and layout), tokenize, locate every image's tokens.

        An image's tokens may come in several runs (Idefics3 puts row/column tags between tiles): each run is one
        `ImageSpan` whose `row_offset` says which rows of the image's embedding it holds.
        """
        self.check_placeholders(prompt, len(image_keys))
        for index, rows in enumerate(image_rows):
            if self.tokens_per_image is not None and rows != self.tokens_per_image:
                raise InvalidPrompt(
                    f"image {index} has {rows} embedding rows but this checkpoint's processor expands an image "
                    f"to {self.tokens_per_image} tokens: the embedding comes from a different encoder"
                )
        layouts = image_layouts if image_layouts is not None else [()] * len(image_rows)
        images = [PromptImage(rows, tuple(layout)) for rows, layout in zip(image_rows, layouts, strict=True)]
        bos = self.tokenizer.bos_token
        template_wrote_bos = isinstance(prompt, RenderedChat) and bos is not None and prompt.startswith(bos)
        token_ids = self.family.prompt_token_ids(
            self.processor, prompt, self.image_token, images, add_special_tokens=not template_wrote_bos
        )
        runs = _runs_of(token_ids, self.image_token_id)
        if sum(end - start for start, end in runs) != sum(image_rows):
            raise InvalidPrompt(
                f"the prompt text contains {sum(end - start for start, end in runs) - sum(image_rows)} extra image "
                f"token(s): use {self.image_token!r} only as an image placeholder"
            )
        spans = _spans(runs, image_keys, image_rows)
        image_runs = [(span.offset, span.end) for span in spans]
        return TokenizedPrompt(
            token_ids=token_ids,
            image_spans=spans,
            positions=self.family.positions(token_ids, image_runs, images) if images else None,
            attention_blocks=tuple(image_runs) if self.family.bidirectional_images else (),
        )


def _runs_of(token_ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of `token_id` in `token_ids`."""
    runs: list[tuple[int, int]] = []
    for index, token in enumerate(token_ids):
        if token != token_id:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _spans(runs: list[tuple[int, int]], keys: Sequence[str], rows: Sequence[int]) -> tuple[ImageSpan, ...]:
    """Give the image tokens to the images in order, `rows[i]` tokens to image i, cutting runs where needed.

        runs:    [ooo]  [oooooo]   [oooo]          rows: image 0 -> 5, image 1 -> 8
        spans:   [000]  [00][1111] [1111]          row_offset: 0, 3 | 0, 4
    """
    spans: list[ImageSpan] = []
    image, used = 0, 0  # the image being filled, and how many of its rows are placed
    for start, end in runs:
        position = start
        while position < end:
            take = min(end - position, rows[image] - used)
            spans.append(ImageSpan(key=keys[image], offset=position, length=take, row_offset=used))
            position, used = position + take, used + take
            if used == rows[image]:
                image, used = image + 1, 0
    return tuple(spans)
