"""The encoder service as the generator's `ImageEncoder` (common/images/provider.py): gRPC targets, channels,
failover, the fingerprint check, and gRPC errors -> the image path's domain errors.

    --encoder-address ──encoder_targets──▶ one channel per target (round_robin inside each)
    encode(items, deadline) ──▶ Encode on the next target (one call per instruction; return_embeddings=True, the
                                encoder writes Redis); UNAVAILABLE -> the following target, until the targets or
                                min(--encoder-timeout-s, deadline) run out. A target that lists several servers
                                (`ipv4:a,b`) is tried twice per server, after a short pause that doubles: gRPC's
                                round_robin sends each try to the next server it believes live, and the pause lets
                                it learn that a replica died (its picker is updated after the failed calls return).

Image keys are computed here without the encoder, from the fingerprint computed locally from the checkpoint,
and checked against the encoder's `GetModelInfo().fingerprint` (at start-up, and again on use while unverified):
an encoder serving another model is refused (UNAVAILABLE) rather than trusted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from common.checkpoint import encoder_fingerprint
from common.config import ConfigError
from common.images.embedding import ImageEmbedding
from common.images.errors import (
    EmbeddingNotFoundError,
    EncoderOverloadedError,
    ImageDeadlineError,
    ImageError,
    ImageUnavailableError,
    InvalidImageError,
)
from common.images.provider import EncodeItem
from common.security import api_key_metadata
from common.tensor_codec import TensorDecodeError, tensor_from_proto
from protos import encoder_pb2, encoder_pb2_grpc

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_IMAGE_INDEX_RE = re.compile(r"^images\[(\d+)\]:? ?")
_VERIFY_RETRY_S = 5.0  # an unreachable or mismatched encoder is asked again at most this often
_VERIFY_TIMEOUT_S = 2.0
_FAILOVER_PAUSE_S = 0.02  # before retrying a multi-server target on UNAVAILABLE; doubles per retry


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


def _num_servers(target: str) -> int:
    """How many servers a target names: `ipv4:a:1,b:2` two (balanced by round_robin); one for anything else (a
    `dns:` name may resolve to several, but how many is not known here)."""
    if target.startswith(("ipv4:", "ipv6:")):
        return len(target.split(":", 1)[1].split(","))
    return 1


def _tries_on_unavailable(target: str) -> int:
    """How often one call tries `target` before failing over: twice per server when it names several.

    One try per server is not enough: when a replica dies, the calls it held fail at once, and an immediate
    retry can still be picked onto it (round_robin updates its picker a moment later). Two per server, with a
    pause between tries, outlasts that; a target whose servers are all down fails after ~20+40+80 ms.
    """
    servers = _num_servers(target)
    return 2 * servers if servers > 1 else 1


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


class RemoteEncoder:
    """Calls `mmserve.encoder.v1.Encoder` on one or more targets; fails over to the next target on UNAVAILABLE.

    `fingerprint` is this generator's (computed from its checkpoint for `dtype`); `timeout_s` is
    --encoder-timeout-s; `on_error(status_name)` is called for every failed call. Use from one event loop.
    """

    holds_keys = True  # the encoder's own cache may hold keys our caches do not

    def __init__(
        self,
        address: str,
        *,
        fingerprint: str,
        model_path: str,
        dtype: str,
        max_message_bytes: int,
        timeout_s: float = 30.0,
        on_error: Callable[[str], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        """`credentials`: TLS to the encoder (None = plaintext); `api_key`: sent as `authorization: Bearer`."""
        self.address = address
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self._model_path = model_path
        self._dtype = dtype
        self._on_error = on_error
        options = encoder_channel_options(max_message_bytes)
        self._metadata = api_key_metadata(api_key)
        self._channels = [
            grpc.aio.insecure_channel(target, options=options)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options)
            for target in encoder_targets(address)
        ]
        self._stubs = [encoder_pb2_grpc.EncoderStub(channel) for channel in self._channels]
        self._tries = [_tries_on_unavailable(target) for target in encoder_targets(address)]  # per stub
        self._next = itertools.cycle(range(len(self._stubs)))
        self._verified = False
        self._mismatch: str | None = None
        self._last_verify = -float("inf")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # ---- the fingerprint check -----------------------------------------------------------------------------

    async def verify(self, timeout: float = _VERIFY_TIMEOUT_S) -> bool:
        """Compare the encoder's fingerprint with ours; True when they match.

        An encoder that runs another dtype is accepted when its fingerprint equals ours for that dtype (keys
        then use it). A mismatch is logged as an error and image requests are refused until the encoder
        matches; an unreachable encoder is logged and asked again later (cached images still work meanwhile).
        """
        self._last_verify = time.monotonic()
        try:
            request, metadata = encoder_pb2.GetModelInfoRequest(), self._metadata
            info = await self._call(lambda stub, t: stub.GetModelInfo(request, timeout=t, metadata=metadata), timeout)
        except grpc.aio.AioRpcError as exc:
            self._count_error(exc)
            logger.warning(
                "encoder at %s did not answer GetModelInfo (%s); its fingerprint is checked on first use",
                self.address, exc.code().name,
            )  # fmt: skip
            return False
        expected = self.fingerprint
        if info.dtype and info.dtype != self._dtype:
            expected = await asyncio.to_thread(encoder_fingerprint, self._model_path, dtype=info.dtype)
        if info.fingerprint != expected:
            logger.error(
                "the encoder at %s serves a different model (%r, fingerprint %s…) than this generator (%s, "
                "fingerprint %s…): image requests are refused until both run the same checkpoint, image processor "
                "and dtype",
                self.address, info.model_id, info.fingerprint[:12], self._model_path, expected[:12],
            )  # fmt: skip
            self._mismatch = (
                "the encoder service serves a different model than this generator (their fingerprints differ), so "
                "images cannot be used now (text-only requests still work); the operator must fix the deployment"
            )
            self._verified = False
            return False
        if expected != self.fingerprint:
            logger.info("encoder computes in %s: image keys use its fingerprint %s…", info.dtype, expected[:12])
            self.fingerprint = expected
        self._mismatch = None
        self._verified = True
        logger.info("encoder at %s verified (fingerprint %s…)", self.address, expected[:12])
        return True

    async def ready(self, deadline: float | None) -> str:
        if not self._verified and time.monotonic() - self._last_verify >= _VERIFY_RETRY_S:
            timeout = _VERIFY_TIMEOUT_S if deadline is None else min(_VERIFY_TIMEOUT_S, deadline - time.monotonic())
            if timeout > 0:
                await self.verify(timeout)
        if self._mismatch is not None:
            raise ImageUnavailableError(self._mismatch)
        return self.fingerprint

    # ---- encode and fetch ----------------------------------------------------------------------------------

    async def encode(self, items: Sequence[EncodeItem], deadline: float | None) -> list[ImageEmbedding | ImageError]:
        """One Encode call per instruction (usually one in all); raises an ImageError for a failed call."""
        outcomes: dict[int, ImageEmbedding | ImageError] = {}
        by_condition: dict[str | None, list[int]] = {}
        for position, item in enumerate(items):
            by_condition.setdefault(item.condition, []).append(position)
        for condition, positions in by_condition.items():
            images = []
            for position in positions:
                data = items[position].data
                if data is None:
                    raise TypeError("a remote encoder takes image bytes; decoded images are encoded in-process")
                images.append(encoder_pb2.ImageInput(data=data))
            request = encoder_pb2.EncodeRequest(images=images, return_embeddings=True, instruction=condition or "")
            try:
                embeddings = await self._encode([items[p].key for p in positions], request, deadline)
            except ImageError as error:
                # The encoder numbers the images of its own call: number them as the caller passed them.
                raise error.at(None if error.index is None else positions[error.index]) from None
            outcomes.update(zip(positions, embeddings, strict=True))
        return [outcomes[position] for position in range(len(items))]

    async def fetch(self, keys: Sequence[str], deadline: float | None) -> list[ImageEmbedding]:
        request = encoder_pb2.EncodeRequest(
            images=[encoder_pb2.ImageInput(embedding_key=key) for key in keys], return_embeddings=True
        )
        return await self._encode(list(keys), request, deadline)

    async def _encode(
        self, keys: list[str], request: encoder_pb2.EncodeRequest, deadline: float | None
    ) -> list[ImageEmbedding]:
        timeout = self.timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise ImageDeadlineError("the deadline passed before the images were encoded")
        try:
            metadata = self._metadata
            response = await self._call(lambda stub, t: stub.Encode(request, timeout=t, metadata=metadata), timeout)
        except grpc.aio.AioRpcError as exc:
            self._count_error(exc)
            raise self._domain_error(exc, deadline) from None
        return self._embeddings(keys, response)

    def _embeddings(self, keys: list[str], response: encoder_pb2.EncodeResponse) -> list[ImageEmbedding]:
        if len(response.images) != len(keys):
            raise self._bad_answer(f"answered {len(response.images)} images for {len(keys)}")
        embeddings = []
        for key, item in zip(keys, response.images, strict=True):
            if item.embedding_key != key:
                # Same bytes, different key: that replica hashes with another fingerprint (another model).
                self._verified = False
                self._last_verify = -float("inf")
                raise self._bad_answer(
                    f"returned key {item.embedding_key[:12]}… for image key {key[:12]}… "
                    "(it serves a different model or image processor)"
                )
            if not item.HasField("embedding"):
                raise self._bad_answer("returned no embedding although return_embeddings was set")
            try:
                embeddings.append(ImageEmbedding(tensor_from_proto(item.embedding), tuple(item.layout)))
            except TensorDecodeError as exc:
                raise self._bad_answer(f"returned an unreadable tensor: {exc}") from None
        return embeddings

    def _bad_answer(self, what: str) -> ImageUnavailableError:
        logger.error("encoder at %s %s", self.address, what)
        return ImageUnavailableError(f"the encoder service at {self.address} {what}")

    def _count_error(self, exc: grpc.aio.AioRpcError) -> None:
        if self._on_error is not None:
            self._on_error(exc.code().name)

    async def _call(self, call: Callable[[encoder_pb2_grpc.EncoderStub, float], Awaitable[_T]], timeout: float) -> _T:
        deadline = time.monotonic() + timeout
        first = next(self._next)
        rotated = [(first + i) % len(self._stubs) for i in range(len(self._stubs))]
        order = [index for index in rotated for _ in range(self._tries[index])]
        pause = _FAILOVER_PAUSE_S
        for attempt, index in enumerate(order):
            if attempt > 0 and index == order[attempt - 1]:  # the same target again: let its balancer catch up
                await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
                pause *= 2
            remaining = deadline - time.monotonic()
            try:
                return await call(self._stubs[index], max(remaining, 0.001))
            except grpc.aio.AioRpcError as exc:
                last = attempt == len(order) - 1
                if exc.code() != grpc.StatusCode.UNAVAILABLE or last or deadline - time.monotonic() <= 0:
                    raise
                self._count_error(exc)  # this try failed (counted); the caller counts the one it raises
        raise AssertionError("unreachable: the loop returns or raises")

    def _domain_error(self, exc: grpc.aio.AioRpcError, deadline: float | None) -> ImageError:
        code, details = exc.code(), exc.details() or ""
        match = _IMAGE_INDEX_RE.match(details)
        index = int(match.group(1)) if match else None
        message = details[match.end() :] if match else details
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidImageError(message, index=index)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return EncoderOverloadedError(message, index=index)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return EmbeddingNotFoundError(message, index=index)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if deadline is not None and deadline - time.monotonic() <= 0.01:  # the client's own deadline passed
                return ImageDeadlineError("the deadline passed while the images were being encoded")
            return ImageUnavailableError(
                f"the encoder service at {self.address} did not answer within --encoder-timeout-s "
                f"({self.timeout_s:g} s); retry later"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            logger.warning("encoder at %s unavailable: %s", self.address, details)
            return ImageUnavailableError(
                f"the encoder service at {self.address} is unavailable, so images cannot be encoded now "
                "(text-only requests still work); retry later"
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            logger.error(
                "the encoder at %s refused this generator's credentials (%s): set --encoder-api-key to one of the "
                "encoder's --api-key values", self.address, code.name,
            )  # fmt: skip
            return ImageUnavailableError(
                "the encoder service refused this generator's credentials, so images cannot be encoded now "
                "(text-only requests still work); the operator must fix the deployment"
            )
        logger.error("encoder at %s failed: %s: %s", self.address, code.name, details)
        return ImageUnavailableError(f"the encoder service at {self.address} failed ({code.name})")
