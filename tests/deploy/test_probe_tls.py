"""The TLS healthchecks as shipped (docker-compose.tls.yml, deploy/k8s/base) run against a real gRPC server that
uses the certificates deploy/secrets/make-dev-certs.sh writes: the certificate names 127.0.0.1 (the checks
connect over loopback) and serves as a client certificate (the encoder requires mutual TLS)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.support import REPO, SERVICE_NAMES

MOUNTS = ("/run/secrets/", "/etc/mmserve/tls/")  # where compose and Kubernetes put the TLS files


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    script = REPO / "deploy" / "secrets" / "make-dev-certs.sh"
    run = subprocess.run(["sh", str(script), str(directory)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return directory


def serve_health(certs: Path, *, mutual: bool) -> tuple[grpc.Server, int]:
    """A server reporting SERVING for both mmserve services, with the development certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    for name in ("", *SERVICE_NAMES.values()):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((certs / "tls.key").read_bytes(), (certs / "tls.crt").read_bytes())],
        root_certificates=(certs / "ca.crt").read_bytes() if mutual else None,
        require_client_auth=mutual,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def mutual_tls_server(certs: Path) -> Iterator[int]:
    """The encoder's setting: TLS, client certificates signed by the CA required. Yields the port."""
    server, port = serve_health(certs, mutual=True)
    yield port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[int]:
    """The generator's setting: TLS, no client certificate asked for. Yields the port."""
    server, port = serve_health(certs, mutual=False)
    yield port
    server.stop(grace=None)


def run_check(command: Sequence[str], certs: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Run a shipped `python -m common.client health` command with its file paths and port moved here."""
    assert command[0] == "python"
    local = [sys.executable]
    for word in command[1:]:
        for mount in MOUNTS:
            word = word.replace(mount, f"{certs}/")
        local.append(f"127.0.0.1:{port}" if word.startswith("127.0.0.1:") else word)
    return subprocess.run(local, cwd=REPO, capture_output=True, text=True, timeout=60)


def shipped_checks() -> dict[str, list[str]]:
    """The TLS health commands of both services, from compose and from the Kubernetes base."""
    compose = yaml.safe_load((REPO / "docker-compose.tls.yml").read_text())["services"]
    checks = {f"compose-{name}": spec["healthcheck"]["test"][1:] for name, spec in compose.items()}
    for name in SERVICE_NAMES:
        (deployment,) = [
            doc
            for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / f"{name}.yaml").read_text())
            if doc["kind"] == "Deployment"
        ]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        checks[f"k8s-{name}"] = container["readinessProbe"]["exec"]["command"]
    return checks


@pytest.mark.parametrize("check", sorted(shipped_checks()))
def test_shipped_tls_health_check_passes(check: str, certs: Path, mutual_tls_server: int, tls_server: int) -> None:
    """Each check against a server set up like the service it checks (the encoder: mutual TLS)."""
    port = mutual_tls_server if check.endswith("encoder") else tls_server
    run = run_check(shipped_checks()[check], certs, port)
    assert run.returncode == 0 and run.stdout.strip() == "SERVING", run.stderr


def without(command: Sequence[str], *flags: str) -> list[str]:
    """`command` less each `--flag VALUE` pair named."""
    kept: list[str] = []
    words = iter(command)
    for word in words:
        if word in flags:
            next(words)
        else:
            kept.append(word)
    return kept


def test_encoder_check_without_its_certificate_is_refused(certs: Path, mutual_tls_server: int) -> None:
    """So the encoder checks pass because they present the certificate, not because anything is accepted."""
    check = shipped_checks()["k8s-encoder"]
    bare = without(check, "--ssl-certfile", "--ssl-keyfile")
    assert len(bare) == len(check) - 4
    run = run_check(bare, certs, mutual_tls_server)
    assert run.returncode == 1 and "SERVING" not in run.stdout
