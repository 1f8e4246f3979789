"""Server plumbing both services share: errors -> status codes, /metrics, health, the serve loop, the CLI entry.

    rpc_error(exc)                  a domain error -> RpcError(code, client-safe message): THE table (below)
    cli_main(parse_config, serve)   flags -> config (bad ones: `error: ...`, exit 2) -> asyncio.run(serve(config))
    run_until_signal(server, ...)   listen(); load() until SIGTERM/SIGINT (a failed load raises); then stop()

Nothing here knows which service it runs: the services pass their own server, logger and service name.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, start_http_server

from common.config import ConfigError, ServerConfig
from common.errors import CheckpointError, InvalidPrompt
from common.host_memory import tune_malloc_for_tensors
from common.images.errors import (
    EmbeddingNotFoundError,
    EncoderOverloadedError,
    ImageDeadlineError,
    ImageError,
    ImageUnavailableError,
    InvalidImageError,
)
from common.security import server_credentials, server_interceptors

_C = TypeVar("_C")

DomainError = ImageError | InvalidPrompt
# Domain error -> gRPC status code, for both services; the first matching class wins. Other exceptions are bugs:
# the servicers log them and answer INTERNAL.
STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidPrompt, grpc.StatusCode.INVALID_ARGUMENT),
    (EmbeddingNotFoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (EncoderOverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ImageDeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ImageUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ImageError, grpc.StatusCode.UNAVAILABLE),  # any other image failure: retrying later or elsewhere may work
)


class RpcError(Exception):
    """A call that ends with `code`; `message` is sent to the client verbatim."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def rpc_error(error: DomainError) -> RpcError:
    """The status a client gets for a domain error; its message is client-safe and goes out as it is."""
    code = next(code for error_type, code in STATUS_CODES if isinstance(error, error_type))
    return RpcError(code, str(error))


class MetricsHttpServer:
    """Serves one registry at /metrics on its own daemon thread; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_http(registry: CollectorRegistry, host: str, port: int | None) -> MetricsHttpServer | None:
    """The /metrics endpoint of `registry`, or None when no metrics port is configured."""
    return None if port is None else MetricsHttpServer(registry, host, port)


def listen_address(host: str, port: int) -> str:
    """`host:port` for `add_insecure_port`, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def grpc_server(config: ServerConfig, options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
    """A gRPC server with the API-key check (when keys are configured) and the undecodable-request guard."""
    return grpc.aio.server(interceptors=server_interceptors(config.api_keys), options=list(options))


async def bind_and_start(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind `server` to the configured host:port (0 picks a free port), over TLS when configured, start it, and
    return the bound port."""
    address = listen_address(config.host, config.port)
    credentials = server_credentials(config.tls)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    return bound


async def set_health(
    servicer: health.aio.HealthServicer, service_name: str, status: health_pb2.HealthCheckResponse.ServingStatus
) -> None:
    """Report `status` for the whole server ("") and for `service_name`."""
    for service in ("", service_name):
        await servicer.set(service, status)


class Servable(Protocol):
    async def listen(self) -> None: ...

    async def load(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


async def run_until_signal(server: Servable, *, shutdown_grace_s: float, logger: logging.Logger) -> int:
    """Listen, then load while watching for SIGTERM/SIGINT; run until one arrives, then drain gracefully.

    A signal during loading cancels the load; a failed load raises (after `stop()`). Returns the exit code (0).
    """
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await server.listen()
        loading = asyncio.ensure_future(server.load())
        stopped = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a failed load raises here
            await stopped
        else:
            loading.cancel()
        logger.info("signal received: draining for up to %.1f s", shutdown_grace_s)
    finally:
        await server.stop()
    return 0


def cli_main(
    parse_config: Callable[[Sequence[str] | None], _C],
    serve: Callable[[_C], Coroutine[Any, Any, int]],
    argv: Sequence[str] | None,
    *,
    configure_logging: Callable[[], None],
) -> int:
    """A service's `main`: an invalid setting or unusable checkpoint prints `error: ...` and returns 2."""
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    tune_malloc_for_tensors()  # before the server starts its threads (each would get its own arena otherwise)
    try:
        return asyncio.run(serve(config))
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def describe_security(config: ServerConfig) -> str:
    """`mutual TLS, API key` / `plaintext, no API key`: for the start-up log line."""
    transport = "plaintext" if not config.tls.certfile else "mutual TLS" if config.tls.ca_certs else "TLS"
    return f"{transport}, {'API key required' if config.api_keys.enabled else 'no API key'}"
