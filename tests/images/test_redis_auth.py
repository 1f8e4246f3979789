"""Redis URLs with credentials and TLS: redis://:password@, redis://user:password@ (an ACL user limited to the cache's
keys and commands), rediss:// with a CA given in the URL. A wrong password or an unknown CA is a counted miss,
never a request failure, and no password reaches a log line or an error message; `redacted_url` hides them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from common.config import CacheConfig
from common.hashing import redis_key
from common.images.cache import CacheUnavailableError, RedisEmbeddingCache, redacted_url
from common.images.embedding import ImageEmbedding
from tests.encoder.support import RunningServer, encoder_config, free_port, png_bytes

FINGERPRINT = "a" * 64
DEFAULT_PASSWORD = "default-" + secrets.token_hex(8)  # random per run: a leak is found by searching for it
USER_PASSWORD = "acl-" + secrets.token_hex(8)
# Least privilege for the cache: its own keys and the commands it sends (EVAL runs GET and DEL from its script).
# redis-py's CLIENT SETINFO at connect may be refused: it ignores that.
ACL_USER = ["mmserve", "on", f">{USER_PASSWORD}", "~mmserve:*", "-@all", "+get", "+set", "+del", "+eval"]


class RedisServer:
    """A private redis-server on `port` (named in `arguments`, as --port or --tls-port); `client_kwargs` are what
    a client needs to reach it (password, TLS)."""

    def __init__(self, port: int, arguments: list[str], **client_kwargs: object) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH: install Redis 7 to run these tests")
        self.port = port
        self.process = subprocess.Popen(
            [executable, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, **client_kwargs)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        try:
            while True:  # polling a process we do not control: there is no event to await
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server {' '.join(arguments[:2])} did not start") from None
                    time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        finally:
            client.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RedisServer]:
    """requirepass for the default user, and an ACL user `mmserve` limited to mmserve:* keys."""
    port = free_port()
    arguments = ["--port", str(port), "--requirepass", DEFAULT_PASSWORD, "--user", *ACL_USER]
    server = RedisServer(port, arguments, password=DEFAULT_PASSWORD)
    yield server
    server.close()


def cache_for(url: str, errors: list[str], timeout_ms: float = 500.0) -> RedisEmbeddingCache:
    config = CacheConfig(redis_url=url, redis_timeout_ms=timeout_ms, breaker_failures=100)
    return RedisEmbeddingCache.from_config(config, FINGERPRINT, on_error=errors.append)


def round_trip(url: str) -> tuple[ImageEmbedding | None, list[str]]:
    """put then get one embedding through a cache built from `url`: what get found (None for a miss or an
    unavailable Redis) and the ops that failed."""
    errors: list[str] = []
    key = secrets.token_hex(32)
    stored = ImageEmbedding(torch.randn(2, 4), layout=(2,))

    async def scenario() -> ImageEmbedding | None:
        cache = cache_for(url, errors)
        try:
            await cache.put(key, stored)
            try:
                found = await cache.get(key)
            except CacheUnavailableError:  # the caller's miss when Redis could not answer
                found = None
        finally:
            await cache.close()
        assert found is None or torch.equal(found.tensor, stored.tensor)
        return found

    return asyncio.run(scenario()), errors


def tls_built_in(executable: str) -> bool:
    """Whether this redis-server knows --tls-port. It exits either way ("not listen anywhere" with TLS built in,
    "Bad directive" without)."""
    probe = subprocess.run([executable, "--port", "0", "--tls-port", "0"], capture_output=True, timeout=10)
    return b"Bad directive" not in probe.stdout + probe.stderr


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    """A TLS-only redis-server (no plain port) with a certificate for IP 127.0.0.1 from a CA made here; yields it
    and the CA file."""
    executable = shutil.which("redis-server")
    if executable is None or shutil.which("openssl") is None:
        pytest.skip("redis-server or the openssl CLI is not on PATH")
    if not tls_built_in(executable):
        pytest.skip("this redis-server was built without TLS (BUILD_TLS=no): --tls-port is a bad directive")
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca, key, request, cert = (
        directory / name for name in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem")
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=mmserve test CA")
    openssl("req", *ec, "-keyout", str(key), "-out", str(request), "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(directory / "san.ext"),
    )  # fmt: skip
    port = free_port()
    arguments = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    arguments += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    server = RedisServer(port, arguments, ssl=True, ssl_ca_certs=str(ca))
    yield server, ca
    server.close()


# ------------------------------------------------------------------------------------------- round trips


def test_requirepass_url_round_trips(auth_server: RedisServer) -> None:
    found, errors = round_trip(f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{auth_server.port}/0")
    assert found is not None and errors == []


def test_acl_user_url_round_trips_with_least_privilege(auth_server: RedisServer) -> None:
    """The `mmserve` user may touch only mmserve:* keys with GET, SET, DEL and EVAL: enough for the cache."""
    found, errors = round_trip(f"redis://mmserve:{USER_PASSWORD}@127.0.0.1:{auth_server.port}/0")
    assert found is not None and errors == []


def test_acl_user_can_delete_poisoned_records(auth_server: RedisServer) -> None:
    """The compare-and-delete script runs under the user's ACL (GET and DEL from Lua)."""
    admin = redis.Redis(host="127.0.0.1", port=auth_server.port, password=DEFAULT_PASSWORD, socket_timeout=1.0)
    key = secrets.token_hex(32)
    admin.set(redis_key(key), b"\x00garbage")
    errors: list[str] = []

    async def scenario() -> ImageEmbedding | None:
        cache = cache_for(f"redis://mmserve:{USER_PASSWORD}@127.0.0.1:{auth_server.port}/0", errors)
        try:
            return await cache.get(key)
        finally:
            await cache.close()

    try:
        assert asyncio.run(scenario()) is None
        assert admin.exists(redis_key(key)) == 0 and errors == []
    finally:
        admin.close()


@pytest.mark.parametrize(
    "credentials", ["mmserve:wrong-{secret}", ":wrong-{secret}", "", "nobody:{secret}"], ids=lambda c: c or "none"
)
def test_wrong_credentials_are_a_counted_miss_and_never_logged(
    credentials: str, auth_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = secrets.token_hex(8)
    userinfo = credentials.format(secret=secret)
    url = f"redis://{userinfo}{'@' if userinfo else ''}127.0.0.1:{auth_server.port}/0"
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []

    async def scenario() -> CacheUnavailableError:
        cache = cache_for(url, errors)
        try:
            await cache.put(secrets.token_hex(32), ImageEmbedding(torch.ones(2, 4)))  # never raises
            with pytest.raises(CacheUnavailableError) as unavailable:
                await cache.get(secrets.token_hex(32))
            return unavailable.value
        finally:
            await cache.close()

    error = asyncio.run(scenario())
    assert errors == ["set", "get"]
    assert any("redis get failed" in record.getMessage() for record in caplog.records)  # the failure was logged...
    for text in (caplog.text, str(error), repr(error), str(error.__cause__), str(error.__context__)):
        assert secret not in text  # ...without the password
    assert error.__cause__ is None  # nothing chained that could carry the URL


def test_encoder_with_acl_user_url_hits_on_the_second_encode(tiny_checkpoint: Path, auth_server: RedisServer) -> None:
    url = f"redis://mmserve:{USER_PASSWORD}@127.0.0.1:{auth_server.port}/0"
    server = RunningServer(encoder_config(tiny_checkpoint, cache=CacheConfig(redis_url=url, redis_timeout_ms=5000)))
    try:
        data = png_bytes()
        assert [server.encode(data).images[0].cache_hit for _ in range(2)] == [False, True]
        assert server.metric("mmserve_encoder_cache_errors_total", {"op": "get"}) == 0
    finally:
        server.close()


# ------------------------------------------------------------------------------------------- TLS


def test_tls_url_with_ca_in_the_query_round_trips(tls_server: tuple[RedisServer, Path]) -> None:
    server, ca = tls_server
    found, errors = round_trip(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}")
    assert found is not None and errors == []


def test_tls_server_with_an_unknown_ca_is_a_counted_miss(tls_server: tuple[RedisServer, Path]) -> None:
    """Without the CA the certificate does not verify (the system store does not know our test CA): the client
    really checks it, and the failure is a miss."""
    server, _ = tls_server
    found, errors = round_trip(f"rediss://127.0.0.1:{server.port}/0")
    assert found is None and errors == ["set", "get"]


def test_encoder_over_tls_hits_on_the_second_encode(
    tiny_checkpoint: Path, tls_server: tuple[RedisServer, Path]
) -> None:
    server, ca = tls_server
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    encoder = RunningServer(encoder_config(tiny_checkpoint, cache=CacheConfig(redis_url=url, redis_timeout_ms=5000)))
    try:
        data = png_bytes()
        assert [encoder.encode(data).images[0].cache_hit for _ in range(2)] == [False, True]
    finally:
        encoder.close()


# ------------------------------------------------------------------------------------------- redacted_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/1", "redis://:***@cache:6379/1"),
        ("redis://mmserve:hunter2@cache:6379/0", "redis://mmserve:***@cache:6379/0"),
        ("redis://mmserve@cache:6379/0", "redis://mmserve@cache:6379/0"),
        (
            "rediss://u:p%40ss@cache:6380/0?ssl_ca_certs=/etc/ca.pem",
            "rediss://u:***@cache:6380/0?ssl_ca_certs=/etc/ca.pem",
        ),
        ("redis://cache:6379/0?password=hunter2&db=2", "redis://cache:6379/0?password=***&db=2"),
        ("rediss://cache/0?ssl_password=hunter2", "rediss://cache/0?ssl_password=***"),
        ("redis://:pass/word@cache:6379/0", "redis://***"),  # an unencoded '/' in the password
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
    ],
)
def test_redacted_url_hides_passwords_only(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
