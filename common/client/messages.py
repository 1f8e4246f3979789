"""Building `GenerateRequest`s from Python values, and collecting a `Generate` stream into one result."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

from grpc_health.v1 import health_pb2

from protos import encoder_pb2, generator_pb2

SERVICE_NAMES = {"generator": "mmserve.generator.v1.Generator", "encoder": "mmserve.encoder.v1.Encoder"}


@dataclass(frozen=True)
class EmbeddingKey:
    """An image named by the key of an embedding already in the cache (`EncodedImage.embedding_key`)."""

    key: str


ImageLike = bytes | str | os.PathLike[str] | EmbeddingKey | encoder_pb2.ImageInput
# {"role": "user", "content": "text" | [{"type": "text", "text": ...}, {"type": "image", "image": ImageLike}]}
Message = Mapping[str, Any] | generator_pb2.ChatMessage


class SamplingKwargs(TypedDict, total=False):
    """The `SamplingParams` fields; None or absent = the server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    stop: Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool | None
    logprobs: int | None


class GenerateResult(NamedTuple):
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "abort"; "unspecified" when the stream ended without one
    usage: generator_pb2.Usage


def image_input(image: ImageLike) -> encoder_pb2.ImageInput:
    if isinstance(image, encoder_pb2.ImageInput):
        return image
    if isinstance(image, EmbeddingKey):
        return encoder_pb2.ImageInput(embedding_key=image.key)
    if isinstance(image, bytes | bytearray | memoryview):
        return encoder_pb2.ImageInput(data=bytes(image))
    if isinstance(image, str | os.PathLike):
        return encoder_pb2.ImageInput(data=Path(image).read_bytes())
    raise TypeError(f"image of type {type(image).__name__}: use bytes, a path, EmbeddingKey or ImageInput")


def chat_message(message: Message) -> generator_pb2.ChatMessage:
    if isinstance(message, generator_pb2.ChatMessage):
        return message
    content = message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    return generator_pb2.ChatMessage(role=message["role"], content=[_content_part(part) for part in parts])


def _content_part(part: Mapping[str, Any]) -> generator_pb2.ContentPart:
    if part.get("type") == "text":
        return generator_pb2.ContentPart(text=part["text"])
    if part.get("type") == "image" and "image" in part:
        return generator_pb2.ContentPart(image=image_input(part["image"]))
    raise ValueError(
        f"content part with keys {sorted(part)}: use {{'type': 'text', 'text': str}} "
        "or {'type': 'image', 'image': bytes | path | EmbeddingKey}"
    )


def build_request(
    prompt: str | None,
    messages: Sequence[Message] | None,
    images: Sequence[ImageLike],
    request_id: str | None,
    sampling: Mapping[str, Any],
) -> generator_pb2.GenerateRequest:
    """A `GenerateRequest`: a verbatim `prompt` with `images` in placeholder order, or chat `messages`."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt or messages")
    if messages is not None and images:
        raise ValueError("with messages, put the images in the messages' image parts")
    params = generator_pb2.SamplingParams(**{name: value for name, value in sampling.items() if value is not None})
    return generator_pb2.GenerateRequest(
        request_id=request_id or "",
        prompt=prompt or "",
        messages=[chat_message(message) for message in messages or ()],
        images=[image_input(image) for image in images],
        sampling=params,
    )


def encode_request(
    images: Sequence[ImageLike], return_embeddings: bool, instruction: str = ""
) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(
        images=[image_input(image) for image in images], return_embeddings=return_embeddings, instruction=instruction
    )


def format_prompt(info: encoder_pb2.ModelInfo, text: str, num_images: int) -> str:
    """A raw prompt for `num_images` images on this model: one placeholder line per image before the text (the
    LLaVA convention), unless the text already has them or the model puts images before the text itself."""
    if num_images == 0 or info.images_before_text or info.image_placeholder in text:
        return text
    return f"{info.image_placeholder}\n" * num_images + text


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service])


class ResponseCollector:
    """Joins a `Generate` stream: all text and token ids, the finish reason and usage of the last message."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason = generator_pb2.FINISH_REASON_UNSPECIFIED
        self.usage = generator_pb2.Usage()

    def add(self, response: generator_pb2.GenerateResponse) -> None:
        self.texts.append(response.text)
        self.token_ids.extend(response.token_ids)
        if response.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = response.finish_reason
        if response.HasField("usage"):
            self.usage = response.usage

    def result(self) -> GenerateResult:
        reason = generator_pb2.FinishReason.Name(self.finish_reason).removeprefix("FINISH_REASON_").lower()
        return GenerateResult("".join(self.texts), self.token_ids, reason, self.usage)
