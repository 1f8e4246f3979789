"""Test helpers both service test suites share: free loopback ports and a private redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A throw-away redis-server on a free port (no persistence), for tests that kill it.

    `client` is a redis-py client of it (closed by `kill()`), for tests that look at the stored records.
    """

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH: install Redis 7 to run these tests")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:  # wait until it accepts connections
            try:
                self.client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.client.close()


@contextlib.contextmanager
def generator_process(
    model: Path, args: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`python -m generator_service --model MODEL --port <free> ARGS` as a real process, with its output in a log
    file: yields (process, address, log path); the process is killed on exit if it still runs."""
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "generator.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "generator_service", "--model", str(model), "--port", str(port), *args],
                cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ if env is None else env),
            )  # fmt: skip
            try:
                yield process, f"127.0.0.1:{port}", log_path
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
