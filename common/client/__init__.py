"""Client of the mmserve services: a sync and an asyncio library, and a command line.

    with MMServeClient("127.0.0.1:50052") as client:
        for chunk in client.generate("<image>\\nWhat is this?", images=["cat.jpg"], max_tokens=32):
            print(chunk.text, end="", flush=True)

An image is file bytes (`bytes`), a file path (`str` or `os.PathLike`, read here), `EmbeddingKey(hex)` (an
embedding an earlier `encode` stored) or a ready `ImageInput`. Sampling keywords left out (or None) take the
server's defaults. Failures raise `grpc.RpcError` (`grpc.aio.AioRpcError` in the async client) with the
server's status code. Closing a `generate` iterator early cancels the RPC, which frees the request's KV blocks.

Command line (common/client/cli.py): `python -m common.client {generate,encode,info,health} --help`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Generator, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client.messages import (
    SERVICE_NAMES,
    EmbeddingKey,
    GenerateResult,
    ImageLike,
    Message,
    ResponseCollector,
    SamplingKwargs,
    build_request,
    chat_message,
    encode_request,
    format_prompt,
    health_request,
    image_input,
)
from common.security import api_key_metadata
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc

__all__ = [
    "SERVICE_NAMES",
    "AsyncMMServeClient",
    "EmbeddingKey",
    "GenerateResult",
    "ImageLike",
    "MMServeClient",
    "Message",
    "SamplingKwargs",
    "build_request",
    "channel_options",
    "chat_message",
    "default_address",
    "format_prompt",
    "image_input",
]

MiB = 1024 * 1024
DEFAULT_ADDRESSES = {"generator": "127.0.0.1:50052", "encoder": "127.0.0.1:50051"}
ADDRESS_ENV = {"generator": "MMSERVE_GENERATOR_ADDRESS", "encoder": "MMSERVE_ENCODER_ADDRESS"}
IMAGE_PLACEHOLDER = "<image>"


def default_address(service: str) -> str:
    return os.environ.get(ADDRESS_ENV[service]) or DEFAULT_ADDRESSES[service]


def channel_options(max_message_bytes: int = 256 * MiB) -> list[tuple[str, int | str]]:
    """Large messages (one fp16 LLaVA-1.5 embedding is ~4.5 MiB), keepalive, round_robin over `dns:///` targets."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ]


class _ClientBase:
    def __init__(
        self,
        generator_address: str | None,
        encoder_address: str | None,
        timeout_s: float | None,
        max_message_bytes: int,
        extra_options: Sequence[tuple[str, Any]],
        channel_module: Any,
        credentials: grpc.ChannelCredentials | None,
        api_key: str | None,
    ) -> None:
        self._timeout_s = timeout_s
        self._metadata = api_key_metadata(api_key)
        addresses = {"generator": generator_address, "encoder": encoder_address}
        options = [*channel_options(max_message_bytes), *extra_options]

        def make_channel(address: str) -> Any:
            if credentials is None:
                return channel_module.insecure_channel(address, options=options)
            return channel_module.secure_channel(address, credentials, options=options)

        self._channels = {name: make_channel(address) for name, address in addresses.items() if address}

    def _channel(self, service: str) -> Any:
        if service not in SERVICE_NAMES:
            raise ValueError(f"service {service!r}: use one of {', '.join(SERVICE_NAMES)}")
        if service not in self._channels:
            raise ValueError(f"this client has no {service} address: pass {service}_address='HOST:PORT'")
        return self._channels[service]

    def _deadline(self, timeout_s: float | None) -> float | None:
        return self._timeout_s if timeout_s is None else timeout_s

    def _call_options(self, timeout_s: float | None) -> dict[str, Any]:
        """The deadline and the API-key metadata of one call."""
        return {"timeout": self._deadline(timeout_s), "metadata": self._metadata}

    def _info_stub(self, service: str) -> Any:
        stub = encoder_pb2_grpc.EncoderStub if service == "encoder" else generator_pb2_grpc.GeneratorStub
        return stub(self._channel(service))


class MMServeClient(_ClientBase):
    """Blocking client; one channel per service given (`extra_options` are appended to `channel_options()`).
    `credentials`: TLS (`common.security.tls_credentials(ca_certs, certfile, keyfile)`; None = plaintext);
    `api_key`: sent as `authorization: Bearer <key>` on every call. Use it as a context manager or call `close()`."""

    def __init__(
        self,
        generator_address: str | None = None,
        encoder_address: str | None = None,
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = 256 * MiB,
        extra_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        addresses = (generator_address, encoder_address)
        super().__init__(*addresses, timeout_s, max_message_bytes, extra_options, grpc, credentials, api_key)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        images: Sequence[ImageLike] = (),
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> Generator[generator_pb2.GenerateResponse, None, None]:
        """Streams the responses; the RPC starts at the first `next()` and is cancelled by `close()`."""
        request = build_request(prompt, messages, images, request_id, sampling)
        return self._stream(request, self._deadline(timeout_s))

    def _stream(
        self, request: generator_pb2.GenerateRequest, timeout: float | None
    ) -> Generator[generator_pb2.GenerateResponse, None, None]:
        stub = generator_pb2_grpc.GeneratorStub(self._channel("generator"))
        call = stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def generate_text(self, prompt: str | None = None, **kwargs: Any) -> GenerateResult:
        """`generate` run to the end: (text, token_ids, finish_reason, usage)."""
        collector = ResponseCollector()
        for response in self.generate(prompt, **kwargs):
            collector.add(response)
        return collector.result()

    def encode(
        self,
        images: Sequence[ImageLike],
        return_embeddings: bool = False,
        *,
        instruction: str = "",
        timeout_s: float | None = None,
    ) -> list[encoder_pb2.EncodedImage]:
        """`instruction`: the prompt, for models whose embeddings read it (ModelInfo says so); else ignored."""
        request = encode_request(images, return_embeddings, instruction)
        stub = encoder_pb2_grpc.EncoderStub(self._channel("encoder"))
        return list(stub.Encode(request, **self._call_options(timeout_s)).images)

    def model_info(self, service: str = "generator", *, timeout_s: float | None = None) -> encoder_pb2.ModelInfo:
        request = encoder_pb2.GetModelInfoRequest()
        return self._info_stub(service).GetModelInfo(request, **self._call_options(timeout_s))

    def health(self, service: str = "generator", *, timeout_s: float | None = None) -> str:
        """The service's health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        stub = health_pb2_grpc.HealthStub(self._channel(service))
        response = stub.Check(health_request(service), **self._call_options(timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncMMServeClient(_ClientBase):
    """The `MMServeClient` methods over `grpc.aio`; build it inside the event loop that uses it."""

    def __init__(
        self,
        generator_address: str | None = None,
        encoder_address: str | None = None,
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = 256 * MiB,
        extra_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        addresses = (generator_address, encoder_address)
        super().__init__(*addresses, timeout_s, max_message_bytes, extra_options, grpc.aio, credentials, api_key)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        images: Sequence[ImageLike] = (),
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        """Streams the responses; the RPC starts at the first `__anext__()` and is cancelled by `aclose()`."""
        request = build_request(prompt, messages, images, request_id, sampling)
        return self._stream(request, self._deadline(timeout_s))

    async def _stream(
        self, request: generator_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        stub = generator_pb2_grpc.GeneratorStub(self._channel("generator"))
        call = stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate_text(self, prompt: str | None = None, **kwargs: Any) -> GenerateResult:
        collector = ResponseCollector()
        async for response in self.generate(prompt, **kwargs):
            collector.add(response)
        return collector.result()

    async def encode(
        self,
        images: Sequence[ImageLike],
        return_embeddings: bool = False,
        *,
        instruction: str = "",
        timeout_s: float | None = None,
    ) -> list[encoder_pb2.EncodedImage]:
        request = encode_request(images, return_embeddings, instruction)
        stub = encoder_pb2_grpc.EncoderStub(self._channel("encoder"))
        return list((await stub.Encode(request, **self._call_options(timeout_s))).images)

    async def model_info(self, service: str = "generator", *, timeout_s: float | None = None) -> encoder_pb2.ModelInfo:
        request = encoder_pb2.GetModelInfoRequest()
        return await self._info_stub(service).GetModelInfo(request, **self._call_options(timeout_s))

    async def health(self, service: str = "generator", *, timeout_s: float | None = None) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel(service))
        response = await stub.Check(health_request(service), **self._call_options(timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
