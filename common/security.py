"""Who may call, and over what: TLS credentials, API keys, and the guard that turns undecodable requests into
INVALID_ARGUMENT. Both servers install the same two interceptors; clients (the CLI, the generator's channel to
the encoder) build their credentials and key metadata here.

    server side                                          client side
    server_credentials(TlsConfig) -> add_secure_port     channel_credentials(TlsConfig) -> secure_channel
    ApiKeyInterceptor: `authorization: Bearer <key>`     api_key_metadata(key) -> the call metadata
        on every RPC but gRPC health, else
        UNAUTHENTICATED before any work
    RequestGuardInterceptor: bytes that are not the method's request message -> INVALID_ARGUMENT, one log line

Keys are compared in constant time (SHA-256 of both sides, then `hmac.compare_digest` against every accepted
key, without stopping at a match), so neither a key's prefix nor its length nor which key matched leaks through
timing. A key file is re-read when it changes (a rotated Kubernetes secret takes effect without a restart).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool

from common.config import ApiKeyConfig, ConfigError, TlsConfig, read_key_file

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Probes (kubelet, compose healthchecks, load balancers) call health without credentials.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send metadata `authorization: Bearer <key>`"
_KEY_FILE_CHECK_PERIOD_S = 1.0
_JUNK_LOG_PERIOD_S = 10.0

Handler: TypeAlias = Any  # a grpc.RpcMethodHandler (grpc ships no type hints)
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


# ---------------------------------------------------------------------------------------------------------------
# TLS


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for a server, or None for plaintext. With `ca_certs`, clients must present a certificate
    signed by it (mutual TLS)."""
    if tls.certfile is None or tls.keyfile is None:
        return None
    root = _read(tls.ca_certs) if tls.ca_certs is not None else None
    try:
        return grpc.ssl_server_credentials(
            [(_read(tls.keyfile), _read(tls.certfile))], root_certificates=root, require_client_auth=root is not None
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{tls.flag_prefix}-certfile / -keyfile: cannot use them: {exc}") from None


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client channel, or None when no TLS file is configured (plaintext)."""
    if not tls.enabled:
        return None
    return tls_credentials(ca_certs=tls.ca_certs, certfile=tls.certfile, keyfile=tls.keyfile)


def tls_credentials(
    ca_certs: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca_certs` (None = the system roots); present `certfile`/`keyfile` for mutual TLS."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("a client certificate needs both certfile and keyfile")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_certs) if ca_certs is not None else None,
        private_key=_read(keyfile) if keyfile is not None else None,
        certificate_chain=_read(certfile) if certfile is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# API keys


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata that carries `api_key`, or None without a key."""
    return None if not api_key else ((AUTHORIZATION, f"Bearer {api_key}"),)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys: the configured ones plus those of the key file, re-read (at most once a second) when
    its modification time changes. An unreadable or empty file keeps the keys read last (and logs it), so a
    half-written secret never locks everyone out or lets everyone in."""

    def __init__(self, config: ApiKeyConfig) -> None:
        self._static = [_digest(key) for key in config.keys]
        self._path = config.key_file
        self._from_file: list[bytes] = []
        self._mtime_ns: int | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        if self._path is not None:
            self._reload(force=True)
            if not self._from_file and not self._static:
                raise ConfigError(f"--api-key-file {self._path!r} holds no key")

    def _reload(self, *, force: bool = False) -> None:
        assert self._path is not None
        now = time.monotonic()
        if not force and now - self._checked_at < _KEY_FILE_CHECK_PERIOD_S:
            return
        self._checked_at = now
        try:
            mtime_ns = os.stat(self._path).st_mtime_ns
            if mtime_ns == self._mtime_ns:
                return
            keys = read_key_file(self._path)
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("API key file %s unreadable (%s): keeping the keys read last", self._path, exc)
            return
        if not keys:
            logger.warning("API key file %s holds no key: keeping the keys read last", self._path)
            return
        self._from_file = [_digest(key) for key in keys]
        self._mtime_ns = mtime_ns
        if not force:
            logger.info("API key file %s changed: %d key(s) loaded", self._path, len(keys))

    def accepts(self, presented: str | None) -> bool:
        """True when `presented` equals an accepted key; constant time in the key's content."""
        if self._path is not None:
            with self._lock:
                self._reload()
        candidate = _digest(presented or "")
        matched = False
        for accepted in (*self._static, *self._from_file):
            matched |= hmac.compare_digest(candidate, accepted)
        return matched and presented is not None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer <token>`, or None."""
    for name, value in metadata or ():
        if name.lower() == AUTHORIZATION and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


def service_of(method: str) -> str:
    """`/mmserve.encoder.v1.Encoder/Encode` -> `mmserve.encoder.v1.Encoder`."""
    return method.strip("/").rsplit("/", 1)[0]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC outside OPEN_SERVICES needs an accepted key; others end UNAUTHENTICATED before any work: the
    request is not even decoded and the servicer never runs."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        if service_of(method) in OPEN_SERVICES or self._keys.accepts(bearer_token(details.invocation_metadata)):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method stays UNIMPLEMENTED
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same shape as `handler` that ends every call with `code` without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this only makes the function an async generator

    return _make_handler(handler, refuse, refuse_streaming, request_deserializer=None)


def _make_handler(
    like: Handler,
    unary_response: Callable[..., Any],
    streaming_response: Callable[..., Any],
    *,
    request_deserializer: Callable[[bytes], Any] | None,
) -> Handler:
    kwargs = {"request_deserializer": request_deserializer, "response_serializer": like.response_serializer}
    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming_response, **kwargs)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming_response, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Undecodable requests


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the guarded handler refuses it."""


_UNDECODABLE = _Undecodable()


def request_type_name(method: str) -> str:
    """The full name of `method`'s request message (`mmserve.encoder.v1.EncodeRequest`), or "request" when the
    method is not in the default descriptor pool."""
    try:
        service = descriptor_pool.Default().FindServiceByName(service_of(method))
        return str(service.FindMethodByName(method.rsplit("/", 1)[-1]).input_type.full_name)
    except (KeyError, AttributeError):
        return "request"


class _JunkLog:
    """One log line per undecodable request, but at most one per period (with a count of the rest), so that a
    flood of junk cannot flood the log."""

    def __init__(self, period_s: float = _JUNK_LOG_PERIOD_S) -> None:
        self._period_s = period_s
        self._last = float("-inf")
        self._suppressed = 0

    def record(self, method: str, peer: str) -> None:
        now = time.monotonic()
        if now - self._last < self._period_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        logger.warning("refused an undecodable request to %s from %s%s", method, peer, more)
        self._last, self._suppressed = now, 0


class RequestGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message end INVALID_ARGUMENT ("request is not a valid <type>") instead of
    gRPC's UNKNOWN with an exception class name and a traceback in the log."""

    def __init__(self) -> None:
        self._log = _JunkLog()
        # method -> (the registered handler, its guarded twin): built once per method, not on every call
        self._guarded_handlers: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = details.method
        cached = self._guarded_handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded_handlers[method] = (handler, self._guarded(handler, method))
        return cached[1]

    def _guarded(self, handler: Handler, method: str) -> Handler:
        deserialize = handler.request_deserializer
        message = f"request is not a valid {request_type_name(method)}"
        log = self._log

        def lenient(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:  # DecodeError and kin: whatever the parser raises, the bytes are not a request
                return _UNDECODABLE

        async def refuse(context: grpc.aio.ServicerContext) -> None:
            log.record(method, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if request is _UNDECODABLE:
                    await refuse(context)
                yield request

        behavior = _behavior(handler)
        request_streaming = handler.request_streaming

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request_streaming:
                request = checked(request, context)
            elif request is _UNDECODABLE:
                await refuse(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        async def streaming_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request_streaming:
                request = checked(request, context)
            elif request is _UNDECODABLE:
                await refuse(context)
            async for response in behavior(request, context):
                yield response

        # A response-streaming servicer is either an async generator or a coroutine that writes with
        # context.write(); the wrapper keeps its shape, because gRPC treats the two differently.
        if not inspect.isasyncgenfunction(behavior):
            streaming_response = unary_response  # type: ignore[assignment]
        return _make_handler(handler, unary_response, streaming_response, request_deserializer=lenient)


def _behavior(handler: Handler) -> Callable[..., Any]:
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert behavior is not None
    return behavior


def server_interceptors(api_keys: ApiKeyConfig) -> list[grpc.aio.ServerInterceptor]:
    """Authentication first (an unauthenticated call is refused before its bytes are even parsed), then the
    request guard."""
    interceptors: list[grpc.aio.ServerInterceptor] = [ApiKeyInterceptor(ApiKeys(api_keys))] if api_keys.enabled else []
    return [*interceptors, RequestGuardInterceptor()]
