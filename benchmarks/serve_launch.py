"""Both services as child processes on free loopback ports (`serve_bench --launch`, `make bench-serve`, the
soak), and a throw-away redis-server for them.

with launch_services(".cache/models/bench") as services:
    run_benchmark(services.generator_address, BenchConfig())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from common.client import MMServeClient

REPO = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """A launched service exited or did not report SERVING in time; the message holds its output's tail."""


@dataclass
class _Child:
    service: str  # "encoder" | "generator"
    address: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def tail(self, max_lines: int = 30) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()[-max_lines:]
        return "\n".join(f"  | {line}" for line in lines) or "  | (no output)"


@dataclass(frozen=True)
class LaunchedServices:
    generator_address: str
    encoder_address: str
    processes: tuple[subprocess.Popen[bytes], ...]  # encoder, generator
    # Prometheus /metrics ports, when launched with `metrics=True`.
    encoder_metrics_port: int | None = None
    generator_metrics_port: int | None = None
    stop_grace_s: float = 40.0
    _children: tuple[_Child, ...] = field(default=(), repr=False)

    def stop(self) -> dict[str, int]:
        """SIGTERMs the generator, then the encoder (SIGKILL after `stop_grace_s`); returns each service's exit
        status (0 = graceful; negative = killed by that signal). Idempotent: the launcher calls it again."""
        for child in reversed(self._children):
            _stop(child, self.stop_grace_s)
        return {child.service: int(child.process.returncode) for child in self._children}

    def output_tail(self, service: str, max_lines: int = 30) -> str:
        """The last lines the service wrote to stdout/stderr (for error messages)."""
        return next(child.tail(max_lines) for child in self._children if child.service == service)


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets stay bound until every port is picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _wait_serving(children: Sequence[_Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    # Short reconnect backoff: the default grows to minutes while a service is still loading its model.
    fast_retry = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with MMServeClient(children[1].address, children[0].address, extra_options=fast_retry) as client:
        for child in children:
            status = "no answer"
            while status != "SERVING":
                for other in children:
                    if other.process.poll() is not None:
                        raise LaunchError(
                            f"{other.service} exited with status {other.process.returncode} before serving:\n"
                            + other.tail()
                        )
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"{child.service} not SERVING after {timeout_s:.0f} s ({status}):\n{child.tail()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    status = client.health(child.service, timeout_s=1.0)
                if status != "SERVING":
                    time.sleep(0.2)


def _stop(child: _Child, grace_s: float) -> None:
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


@contextlib.contextmanager
def launch_services(
    model: str,
    *,
    encoder_args: Sequence[str] = (),
    generator_args: Sequence[str] = (),
    ready_timeout_s: float = 600.0,
    stop_grace_s: float = 40.0,
    modules: tuple[str, str] = ("encoder_service", "generator_service"),
    metrics: bool = False,
) -> Iterator[LaunchedServices]:
    """Starts `python -m encoder_service` and `python -m generator_service` (the generator using that encoder)
    on free loopback ports, waits until both report SERVING, and SIGTERMs them on exit (SIGKILL after
    `stop_grace_s`). With `metrics`, each also serves Prometheus /metrics on a free port of its own. Other
    settings come from the inherited MMSERVE_* variables and the extra args."""
    model = str(Path(model).resolve()) if Path(model).exists() else model  # children run in the repo root
    env = {k: v for k, v in os.environ.items() if k != "MMSERVE_METRICS_PORT"}  # two services, one port: clash
    ports = _free_ports(4 if metrics else 2)
    encoder_address, generator_address = (f"127.0.0.1:{port}" for port in ports[:2])
    encoder_metrics, generator_metrics = (ports[2], ports[3]) if metrics else (None, None)
    metrics_args = [
        [] if port is None else ["--metrics-port", str(port)] for port in (encoder_metrics, generator_metrics)
    ]
    plans = (
        ("encoder", modules[0], encoder_address, [*metrics_args[0], *encoder_args]),
        (
            "generator",
            modules[1],
            generator_address,
            ["--encoder-address", encoder_address, *metrics_args[1], *generator_args],
        ),
    )
    children: list[_Child] = []
    try:
        for service, module, address, extra in plans:
            port = address.rsplit(":", 1)[1]
            argv = [sys.executable, "-m", module, "--model", model, "--host", "127.0.0.1", "--port", port, *extra]
            log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _stop)
            # Own session: a Ctrl-C reaches only us, and we stop the services in order with SIGTERM.
            process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            children.append(_Child(service, address, process, log))
        _wait_serving(children, ready_timeout_s)
        yield LaunchedServices(
            generator_address,
            encoder_address,
            tuple(c.process for c in children),
            encoder_metrics,
            generator_metrics,
            stop_grace_s,
            tuple(children),
        )
    finally:
        for child in reversed(children):
            _stop(child, stop_grace_s)
            child.log.close()


@contextlib.contextmanager
def private_redis(ready_timeout_s: float = 10.0) -> Iterator[str]:
    """A throw-away `redis-server` on a free loopback port (no persistence), killed on exit; yields its URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise LaunchError("redis-server is not on PATH: install Redis 7, or pass the URL of a running one")
    port = _free_ports(1)[0]
    argv = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:  # ready once it accepts a connection
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise LaunchError(f"redis-server on port {port} did not start (status {process.poll()})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()
