"""TLS, mutual TLS and API keys on both services, over real gRPC with certificates made at test time.

One encoder and one generator run with mutual TLS and API keys; the generator reaches the encoder over mutual TLS
with its own key. Each case names what a client presents and what it must get back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.client import MMServeClient
from common.client import cli as client_cli
from common.config import (
    ApiKeyConfig,
    ConfigError,
    GeneratorConfig,
    ServerConfig,
    TlsConfig,
    encoder_config_from_args,
    generator_config_from_args,
)
from common.security import tls_credentials
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2_grpc
from tests.generator_service.support import (
    EventLoopThread,
    Reference,
    RunningEncoder,
    RunningGenerator,
    encoder_config,
    generator_config,
    png_bytes,
)
from tests.security.certs import Pki, make_pki

ENCODER_KEY = "encoder-key-0123456789"
GENERATOR_KEYS = ("generator-key-old", "generator-key-new")  # two keys accepted at once: rotation
HANDSHAKE_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


def _secured(server: ServerConfig, pki: Pki, keys: tuple[str, ...]) -> ServerConfig:
    """`server` with mutual TLS and `keys`."""
    tls = TlsConfig(certfile=pki.server.certfile, keyfile=pki.server.keyfile, ca_certs=pki.ca_certs)
    return dataclasses.replace(server, tls=tls, api_keys=ApiKeyConfig(keys=keys))


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path, loop: EventLoopThread, pki: Pki) -> Iterator[RunningEncoder]:
    config = encoder_config(tiny_checkpoint, max_batch_size=1)
    running = RunningEncoder(loop, dataclasses.replace(config, server=_secured(config.server, pki, (ENCODER_KEY,))))
    yield running
    running.stop()


def _generator_config(
    model: Path, pki: Pki, encoder: RunningEncoder, *, encoder_api_key: str | None
) -> GeneratorConfig:
    config = generator_config(model, encoder_address=f"localhost:{encoder.server.port}")
    encoder_tls = TlsConfig(
        certfile=pki.client.certfile, keyfile=pki.client.keyfile, ca_certs=pki.ca_certs, flag_prefix="--encoder-ssl"
    )
    server = _secured(config.server, pki, GENERATOR_KEYS)
    return dataclasses.replace(config, server=server, encoder_tls=encoder_tls, encoder_api_key=encoder_api_key)


@pytest.fixture(scope="module")
def generator(
    tiny_checkpoint: Path, loop: EventLoopThread, pki: Pki, encoder: RunningEncoder
) -> Iterator[RunningGenerator]:
    running = RunningGenerator(loop, _generator_config(tiny_checkpoint, pki, encoder, encoder_api_key=ENCODER_KEY))
    yield running
    running.stop()


def _client(
    pki: Pki, service: str, port: int, *, ca: str | None = None, client: str = "right", api_key: str | None = None
) -> MMServeClient:
    """A client of `service` on localhost:`port` trusting `ca` (default: the test CA), presenting the `client`
    certificate ("right", "rogue" or "none") and `api_key`."""
    pair = {"right": pki.client, "rogue": pki.rogue_client}.get(client)
    credentials = tls_credentials(
        ca_certs=ca or pki.ca_certs,
        certfile=pair.certfile if pair else None,
        keyfile=pair.keyfile if pair else None,
    )
    address = f"localhost:{port}"
    addresses = (address, None) if service == "generator" else (None, address)
    return MMServeClient(*addresses, credentials=credentials, api_key=api_key, timeout_s=HANDSHAKE_TIMEOUT_S)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


# ---------------------------------------------------------------------------------------------------------------
# Transport: who may connect at all


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_mutual_tls_refuses_clients_without_the_right_certificate(
    service: str, pki: Pki, encoder: RunningEncoder, generator: RunningGenerator
) -> None:
    port = (encoder if service == "encoder" else generator).server.port
    with _client(pki, service, port, client="none") as no_certificate:
        assert _code(lambda: no_certificate.health(service)) == grpc.StatusCode.UNAVAILABLE
    with _client(pki, service, port, client="rogue") as wrong_ca:
        assert _code(lambda: wrong_ca.health(service)) == grpc.StatusCode.UNAVAILABLE
    with _client(pki, service, port, ca=pki.rogue_ca_certs) as distrusts_server:
        assert _code(lambda: distrusts_server.health(service)) == grpc.StatusCode.UNAVAILABLE
    plain = f"localhost:{port}"
    with MMServeClient(*((plain, None) if service == "generator" else (None, plain)), timeout_s=10) as plaintext:
        assert _code(lambda: plaintext.health(service)) == grpc.StatusCode.UNAVAILABLE
    with _client(pki, service, port) as right:
        assert right.health(service) == "SERVING"  # health needs the certificate, but no API key


# ---------------------------------------------------------------------------------------------------------------
# API keys: every RPC but health


def _reflection_services(channel: grpc.Channel, api_key: str | None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    metadata = None if api_key is None else (("authorization", f"Bearer {api_key}"),)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10
    )
    return [service.name for response in responses for service in response.list_services_response.service]


def _secure_channel(pki: Pki, port: int) -> grpc.Channel:
    credentials = tls_credentials(pki.ca_certs, pki.client.certfile, pki.client.keyfile)
    return grpc.secure_channel(f"localhost:{port}", credentials)


@pytest.mark.parametrize("key", [None, "wrong-key", ENCODER_KEY + "x", ENCODER_KEY[:-1], GENERATOR_KEYS[0]])
def test_encoder_refuses_missing_or_wrong_keys_on_every_rpc(key: str | None, pki: Pki, encoder: RunningEncoder) -> None:
    encoded_before = encoder.metric("mmserve_encoder_images_encoded")
    with _client(pki, "encoder", encoder.server.port, api_key=key) as client:
        assert _code(lambda: client.encode([png_bytes(1)])) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: client.model_info("encoder")) == grpc.StatusCode.UNAUTHENTICATED
        assert client.health("encoder") == "SERVING"
    with _secure_channel(pki, encoder.server.port) as channel:
        assert _code(lambda: _reflection_services(channel, key)) == grpc.StatusCode.UNAUTHENTICATED
    assert encoder.metric("mmserve_encoder_images_encoded") == encoded_before  # refused before any work


def test_encoder_serves_the_right_key(pki: Pki, encoder: RunningEncoder) -> None:
    with _client(pki, "encoder", encoder.server.port, api_key=ENCODER_KEY) as client:
        (encoded,) = client.encode([png_bytes(2)])
        assert encoded.num_tokens > 0
        assert client.model_info("encoder").fingerprint
    with _secure_channel(pki, encoder.server.port) as channel:
        assert "mmserve.encoder.v1.Encoder" in _reflection_services(channel, ENCODER_KEY)


@pytest.mark.parametrize("key", [None, "wrong-key", ENCODER_KEY])
def test_generator_refuses_missing_or_wrong_keys_on_every_rpc(
    key: str | None, pki: Pki, generator: RunningGenerator
) -> None:
    with _client(pki, "generator", generator.server.port, api_key=key) as client:
        assert _code(lambda: client.generate_text("Hello", max_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: client.model_info()) == grpc.StatusCode.UNAUTHENTICATED
        assert client.health() == "SERVING"
    with _secure_channel(pki, generator.server.port) as channel:
        assert _code(lambda: _reflection_services(channel, key)) == grpc.StatusCode.UNAUTHENTICATED
    generator.wait_idle()


def test_generator_through_encoder_over_mutual_tls_with_keys_matches_hugging_face(
    pki: Pki, generator: RunningGenerator, tiny_checkpoint: Path
) -> None:
    """End to end: client -(mTLS, key)-> generator -(mTLS, its own key)-> encoder; greedy tokens equal HF's."""
    image = png_bytes(3)
    reference = Reference(tiny_checkpoint).generate("<image>\nWhat is this?", [image], max_tokens=6)
    for key in GENERATOR_KEYS:  # both keys of a rotation are accepted
        with _client(pki, "generator", generator.server.port, api_key=key) as client:
            result = client.generate_text("<image>\nWhat is this?", images=[image], max_tokens=6, temperature=0)
            assert result.token_ids == reference
            assert result.usage.image_tokens > 0
            with _secure_channel(pki, generator.server.port) as channel:
                assert "mmserve.generator.v1.Generator" in _reflection_services(channel, key)
    generator.wait_idle()


def test_generator_with_a_wrong_encoder_key_says_so_and_still_serves_text(
    tiny_checkpoint: Path, loop: EventLoopThread, pki: Pki, encoder: RunningEncoder
) -> None:
    running = RunningGenerator(loop, _generator_config(tiny_checkpoint, pki, encoder, encoder_api_key="not-the-key"))
    try:
        with _client(pki, "generator", running.server.port, api_key=GENERATOR_KEYS[1]) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate_text("<image>\nWhat is this?", images=[png_bytes(4)], max_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "refused this generator's credentials" in (caught.value.details() or "")
            assert client.generate_text("Hello", max_tokens=2).finish_reason in ("length", "stop")
        running.wait_idle()
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------------------------
# Key files: rotation without a restart


def test_a_rotated_key_file_takes_effect_without_a_restart(
    tiny_checkpoint: Path, loop: EventLoopThread, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text("# mounted secret\nfirst-key\n")
    config = encoder_config(tiny_checkpoint)
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, api_keys=ApiKeyConfig(key_file=str(key_file)))
    )
    running = RunningEncoder(loop, config)
    try:

        def info_code(key: str) -> grpc.StatusCode:
            with MMServeClient(encoder_address=running.address, api_key=key, timeout_s=10) as client:
                try:
                    client.model_info("encoder")
                except grpc.RpcError as exc:
                    code: grpc.StatusCode = exc.code()
                    return code
                return grpc.StatusCode.OK

        assert info_code("first-key") == grpc.StatusCode.OK
        assert info_code("second-key") == grpc.StatusCode.UNAUTHENTICATED
        key_file.write_text("second-key\n")
        later = time.time() + 5
        os.utime(key_file, (later, later))  # a new mtime even on coarse file-system clocks
        deadline = time.monotonic() + 10
        while info_code("second-key") != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the rotated key was not picked up"
            time.sleep(0.2)
        assert info_code("first-key") == grpc.StatusCode.UNAUTHENTICATED
        key_file.write_text("")  # a half-written secret keeps the keys read last
        os.utime(key_file, (later + 5, later + 5))
        time.sleep(1.2)
        assert info_code("second-key") == grpc.StatusCode.OK
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------------------------
# The command line and the configuration


def test_cli_health_info_and_generate_against_tls_with_keys(
    pki: Pki, generator: RunningGenerator, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--address", f"localhost:{generator.server.port}", "--ssl-ca-certs", pki.ca_certs]
    client_cert = ["--ssl-certfile", pki.client.certfile, "--ssl-keyfile", pki.client.keyfile]
    assert client_cli.main(["health", *address, *client_cert]) == 0  # a container healthcheck: no key needed
    assert capsys.readouterr().out.strip() == "SERVING"
    assert client_cli.main(["info", *address, *client_cert]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    os.environ["MMSERVE_API_KEY"] = GENERATOR_KEYS[0]
    try:
        assert client_cli.main(["generate", "Hello", "--max-tokens", "2", *address, *client_cert]) == 0
    finally:
        del os.environ["MMSERVE_API_KEY"]
    assert "finish_reason=" in capsys.readouterr().err
    assert client_cli.main(["health", *address]) == 1  # no client certificate: the handshake fails
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_security_flags_and_variables(pki: Pki, tmp_path: Path) -> None:
    base = ["--model", "m"]
    config = encoder_config_from_args(
        [*base, "--ssl-certfile", pki.server.certfile, "--ssl-keyfile", pki.server.keyfile, "--api-key", "a, b"],
        environ={"MMSERVE_SSL_CA_CERTS": pki.ca_certs},
    )
    assert config.server.tls.ca_certs == pki.ca_certs
    assert config.server.api_keys.keys == ("a", "b")
    with pytest.raises(ConfigError, match="--ssl-certfile and --ssl-keyfile go together"):
        encoder_config_from_args([*base, "--ssl-certfile", pki.server.certfile])
    with pytest.raises(ConfigError, match=r"--ssl-ca-certs \(mutual TLS\) needs"):
        encoder_config_from_args([*base, "--ssl-ca-certs", pki.ca_certs])
    with pytest.raises(ConfigError, match="no such readable file"):
        encoder_config_from_args([*base, "--api-key-file", str(tmp_path / "missing")])
    key_file = tmp_path / "encoder-key"
    key_file.write_text("\n# comment\nthe-key\n")
    generator = generator_config_from_args(
        [*base, "--encoder-address", "enc:50051", "--encoder-api-key-file", str(key_file)],
        environ={"MMSERVE_ENCODER_SSL_CA_CERTS": pki.ca_certs},
    )
    assert generator.encoder_api_key == "the-key"
    assert generator.encoder_tls.enabled and generator.encoder_tls.ca_certs == pki.ca_certs
    with pytest.raises(ConfigError, match="need --encoder-address"):
        generator_config_from_args([*base, "--encoder-api-key", "k"])


# ---------------------------------------------------------------------------------------------------------------
# Bytes that are not a request


JUNK = b"\xff\xff\xff\xff\x0f not a protobuf"


@pytest.mark.parametrize(
    ("method", "type_name", "streaming"),
    [
        ("/mmserve.encoder.v1.Encoder/Encode", "mmserve.encoder.v1.EncodeRequest", False),
        ("/mmserve.encoder.v1.Encoder/GetModelInfo", "mmserve.encoder.v1.GetModelInfoRequest", False),
    ],
)
def test_undecodable_requests_are_invalid_argument_with_one_log_line(
    method: str,
    type_name: str,
    streaming: bool,
    tiny_checkpoint: Path,
    loop: EventLoopThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = RunningEncoder(loop, encoder_config(tiny_checkpoint))
    try:
        with grpc.insecure_channel(running.address) as channel, caplog.at_level(logging.INFO):
            call = channel.unary_unary(method)  # no serializers: raw bytes on the wire
            for _ in range(20):  # a flood of junk
                with pytest.raises(grpc.RpcError) as caught:
                    call(JUNK, timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details() == f"request is not a valid {type_name}"
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            (encoded,) = (
                encoder_pb2_grpc.EncoderStub(channel)
                .Encode(encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=png_bytes(5))]), timeout=30)
                .images
            )
            assert encoded.num_tokens > 0  # still serving
        junk_lines = [record for record in caplog.records if "undecodable" in record.getMessage()]
        assert len(junk_lines) == 1  # one line, not twenty, and no traceback
        assert not any(record.exc_info for record in caplog.records)
        assert "DecodeError" not in caplog.text
    finally:
        running.stop()


def test_undecodable_generate_request_is_invalid_argument(generator_loop_generator: RunningGenerator) -> None:
    with grpc.insecure_channel(generator_loop_generator.address) as channel:
        call = channel.unary_stream("/mmserve.generator.v1.Generator/Generate")
        with pytest.raises(grpc.RpcError) as caught:
            list(call(JUNK, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "request is not a valid mmserve.generator.v1.GenerateRequest"
        stub = generator_pb2_grpc.GeneratorStub(channel)
        assert stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).model_id
    generator_loop_generator.wait_idle()


def test_junk_without_a_key_is_unauthenticated_before_it_is_parsed(pki: Pki, encoder: RunningEncoder) -> None:
    with _secure_channel(pki, encoder.server.port) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/mmserve.encoder.v1.Encoder/Encode")(JUNK, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def generator_loop_generator(tiny_checkpoint: Path, loop: EventLoopThread) -> Iterator[RunningGenerator]:
    """A plaintext generator without keys (in-process encoder)."""
    running = RunningGenerator(loop, generator_config(tiny_checkpoint))
    yield running
    running.stop()
