"""The generator's client of the encoder service: `--encoder-address` -> gRPC targets, channels, failover, and
gRPC errors -> `ImageResolveError`s a Generate caller can act on.

    --encoder-address ──encoder_targets──▶ one channel per target (round_robin inside each)
    encode_images(request, deadline) ──▶ Encode on the next target; UNAVAILABLE -> the following one,
                                         until the targets or min(--encoder-timeout-s, deadline) run out
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from common.config import ConfigError
from protos import encoder_pb2, encoder_pb2_grpc

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


class ImageResolveError(Exception):
    """An image the request cannot use; `code` and `message` go to the client as they are."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encoder_targets(address: str) -> list[str]:
    """gRPC targets for `--encoder-address`.

    `dns:///host:port`, `ipv4:a:1,b:2` and other URIs are one target (balanced by gRPC's round_robin policy);
    `host:port,host:port` becomes one `ipv4:`/`ipv6:` target when every host is an IP literal, else one target
    per entry (the client rotates over them and fails over on UNAVAILABLE).
    """
    address = address.strip()
    if "://" in address or address.startswith(_URI_SCHEMES):
        return [address]
    entries = [entry.strip() for entry in address.split(",") if entry.strip()]
    if not entries:
        raise ConfigError(f"--encoder-address {address!r} names no encoder: use host:port, a list or dns:///host:port")
    if len(entries) == 1:
        return entries
    families = {_ip_family(entry) for entry in entries}
    if families == {4}:
        return ["ipv4:" + ",".join(entries)]
    if families == {6}:
        return ["ipv6:" + ",".join(entries)]
    return entries


def _ip_family(entry: str) -> int | None:
    host = entry.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def encoder_channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        # A restarted encoder is found again within seconds (the default backoff grows to 2 minutes).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 1),
    ]


class EncoderClient:
    """Calls `mmserve.encoder.v1.Encoder` on one or more targets; fails over to the next target on UNAVAILABLE.

    `timeout_s` is --encoder-timeout-s; `on_error(status_name)` is called for every failed Encode call.
    """

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int,
        timeout_s: float = 30.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._on_error = on_error
        options = encoder_channel_options(max_message_bytes)
        self._channels = [grpc.aio.insecure_channel(target, options=options) for target in encoder_targets(address)]
        self._stubs = [encoder_pb2_grpc.EncoderStub(channel) for channel in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    async def encode_images(
        self, request: encoder_pb2.EncodeRequest, deadline: float | None
    ) -> encoder_pb2.EncodeResponse:
        """One Encode call within `timeout_s` and the caller's `deadline` (monotonic); raises ImageResolveError."""
        timeout = self.timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise ImageResolveError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the images were encoded"
                )
        try:
            return await self.encode(request, timeout)
        except grpc.aio.AioRpcError as exc:
            if self._on_error is not None:
                self._on_error(exc.code().name)
            raise self._encode_error(exc, deadline) from None

    async def encode(self, request: encoder_pb2.EncodeRequest, timeout: float) -> encoder_pb2.EncodeResponse:
        return await self._call(lambda stub, t: stub.Encode(request, timeout=t), timeout)

    async def model_info(self, timeout: float) -> encoder_pb2.ModelInfo:
        return await self._call(
            lambda stub, t: stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=t), timeout
        )

    async def _call(self, call: Callable[[encoder_pb2_grpc.EncoderStub, float], Awaitable[_T]], timeout: float) -> _T:
        deadline = time.monotonic() + timeout
        first = next(self._next)
        order = [(first + i) % len(self._stubs) for i in range(len(self._stubs))]
        for attempt, index in enumerate(order):
            remaining = deadline - time.monotonic()
            try:
                return await call(self._stubs[index], max(remaining, 0.001))
            except grpc.aio.AioRpcError as exc:
                last = attempt == len(order) - 1
                if exc.code() != grpc.StatusCode.UNAVAILABLE or last or deadline - time.monotonic() <= 0:
                    raise
        raise AssertionError("unreachable: the loop returns or raises")

    def _encode_error(self, exc: grpc.aio.AioRpcError, deadline: float | None) -> ImageResolveError:
        code, details = exc.code(), exc.details() or ""
        address = self.address
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.FAILED_PRECONDITION):  # fmt: skip
            return ImageResolveError(code, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if deadline is not None and deadline - time.monotonic() <= 0.01:  # the client's own deadline passed
                return ImageResolveError(code, "the deadline passed while the images were being encoded")
            return ImageResolveError(
                grpc.StatusCode.UNAVAILABLE,
                f"the encoder service at {address} did not answer within --encoder-timeout-s "
                f"({self.timeout_s:g} s); retry later",
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            logger.warning("encoder at %s unavailable: %s", address, details)
            return ImageResolveError(
                code,
                f"the encoder service at {address} is unavailable, so images cannot be encoded now "
                "(text-only requests still work); retry later",
            )
        logger.error("encoder at %s failed: %s: %s", address, code.name, details)
        return ImageResolveError(grpc.StatusCode.UNAVAILABLE, f"the encoder service at {address} failed ({code.name})")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
