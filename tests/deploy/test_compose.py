"""docker-compose.yml (+ the docker-compose.tls.yml override) and docker/Dockerfile, checked without a Docker
engine: structure, and every setting against the code it configures (the services' flag parsers, the client's
CLI, the repository's files)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    HEALTH_DEADLINE_S,
    PARSERS,
    REPO,
    build_config,
    health_args,
    service_env_names,
    with_files,
)

COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
TLS_OVERRIDE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.tls.yml").read_text())
SECRETS_DIR = "/run/secrets"  # where compose mounts `secrets:` (read-only)
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
# Compose merges these sequences of an override into the base one; any other sequence (command, healthcheck
# test) is replaced, and mappings merge key by key.
_MERGED_SEQUENCES = {"ports", "expose", "volumes", "secrets", "configs", "dns", "dns_search", "tmpfs"}


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set on the host."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", value)


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override`, for the kinds of values these files hold."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key in _MERGED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return override


TLS_SERVICES: dict[str, Any] = merge(COMPOSE, TLS_OVERRIDE)["services"]


def environment(service: str, services: Mapping[str, Any] = SERVICES) -> dict[str, str]:
    env = services[service]["environment"]
    assert isinstance(env, Mapping) and all(isinstance(v, str) for v in env.values()), "quote every value"
    return {key: interpolate(value) for key, value in env.items()}


def config(service: str) -> Any:
    return build_config(service, environment(service))


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_compose_has_the_stack_and_one_image_built_from_the_dockerfile() -> None:
    assert set(SERVICES) == {"redis", "encoder", "generator"}
    assert SERVICES["redis"]["image"].startswith("redis:7-alpine")
    for name in PARSERS:
        build = SERVICES[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).is_file()
        assert SERVICES[name]["image"] == SERVICES["encoder"]["image"]


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_command_environment_and_ports_match_the_service(service: str) -> None:
    spec = SERVICES[service]
    module = f"{service}_service"
    assert spec["command"] == ["python", "-m", module] and (REPO / module / "__main__.py").is_file()
    assert set(environment(service)) - service_env_names(service) == set(), "every MMSERVE_* must be a flag"
    built = config(service)  # the values parse and validate
    assert built.server.host == "0.0.0.0" and built.cache.redis_url == "redis://redis:6379/0"
    assert built.server.metrics_port is not None
    published = [port.split(":") for port in spec["ports"]]
    assert all(ip == "127.0.0.1" and host == container for ip, host, container in published)
    assert sorted(int(c) for _, _, c in published) == sorted([built.server.port, built.server.metrics_port])
    assert seconds(spec["stop_grace_period"]) > built.server.shutdown_grace_s


def test_generator_reaches_the_encoder_service_by_name() -> None:
    target = config("generator").encoder_address
    assert target == f"dns:///encoder:{config('encoder').server.port}"


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_healthcheck_runs_the_client_health_command(service: str) -> None:
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] == "CMD"
    args = health_args(check["test"][1:])
    assert args.service == service and args.ssl_ca_certs is None  # plaintext by default
    assert args.address == f"127.0.0.1:{config(service).server.port}"
    # longer than the command's own deadline, so that it reports the error itself
    assert seconds(check["timeout"]) > HEALTH_DEADLINE_S
    assert (REPO / "common" / "client" / "__main__.py").is_file()


def test_client_module_help_runs() -> None:
    run = subprocess.run([sys.executable, "-m", "common.client", "--help"], cwd=REPO, capture_output=True, timeout=60)
    assert run.returncode == 0 and b"health" in run.stdout


def test_startup_order_waits_for_healthy_dependencies() -> None:
    assert set(SERVICES["generator"]["depends_on"]) == {"encoder", "redis"}
    assert set(SERVICES["encoder"]["depends_on"]) == {"redis"}
    for name, spec in SERVICES.items():
        for dependency, condition in spec.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in SERVICES[dependency]


def test_redis_is_a_bounded_volatile_cache() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server" and "ports" not in redis
    assert flags == {"--maxmemory": "2gb", "--maxmemory-policy": "allkeys-lru", "--save": "", "--appendonly": "no"}
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_model_volume_is_read_only_and_holds_the_model() -> None:
    for name in PARSERS:
        source, target, mode = interpolate(SERVICES[name]["volumes"][0]).split(":")
        assert mode == "ro"
        model = environment(name)["MMSERVE_MODEL"]
        assert model == target or model.startswith(target + "/")
        assert source == "./.cache/models/demo-llava-tiny"  # `make demo-model` builds it: `make up` just works


def test_commented_gpu_reservation_parses_when_enabled() -> None:
    lines = COMPOSE_TEXT.splitlines()
    start = lines.index("  # deploy:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  #   "))
    uncommented = [line.replace("# ", "", 1) for line in lines[start:end]]
    enabled = yaml.safe_load("\n".join(lines[:start] + uncommented + lines[end:]))
    for name in PARSERS:
        devices = enabled["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_copies_what_exists_and_runs_as_a_user() -> None:
    instructions = dockerfile()
    values = {kind: [rest for k, rest in instructions if k == kind] for kind, _ in instructions}
    assert values["FROM"] == ["python:3.11-slim"]
    copied = [source.rstrip("/") for rest in values["COPY"] for source in rest.split()[:-1]]
    assert copied and all((REPO / source).exists() for source in copied)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {package.split(".")[0] for package in packages} <= set(copied)
    position = {(k, rest.split()[0]): i for i, (k, rest) in enumerate(instructions) if k == "COPY"}
    install = next(i for i, (k, rest) in enumerate(instructions) if k == "RUN" and "-r requirements.txt" in rest)
    # requirements.txt first and the code after the install, so that code changes reuse the dependency layer
    assert position["COPY", "requirements.txt"] < install < position["COPY", "common/"]
    assert any("TORCH_INDEX_URL" in rest for rest in values["RUN"]) and values["ARG"][0].startswith("TORCH_INDEX_URL=")
    assert "PYTHONPATH=/app" in " ".join(values["ENV"]) and values["WORKDIR"] == ["/app"]
    assert values["USER"] and values["USER"][-1] not in ("root", "0")
    assert {int(port) for rest in values["EXPOSE"] for port in rest.split()} == {50051, 50052, 9100, 9101}
    (cmd,) = values["CMD"]
    python, dash_m, module = yaml.safe_load(cmd)
    assert (python, dash_m) == ("python", "-m") and (REPO / module / "__main__.py").is_file()


# docker-compose.tls.yml: TLS and API keys on, as an override that the default stack does not need.

SECURITY_VARIABLES = {"MMSERVE_API_KEY", "MMSERVE_API_KEY_FILE", "MMSERVE_ENCODER_API_KEY"}


def is_security_variable(name: str) -> bool:
    return "_SSL_" in name or name.endswith("API_KEY_FILE") or name in SECURITY_VARIABLES


def test_default_stack_is_plaintext_without_keys() -> None:
    assert "secrets" not in COMPOSE
    for name in PARSERS:
        assert not any(is_security_variable(variable) for variable in environment(name))
        built = config(name)
        assert not built.server.tls.enabled and not built.server.api_keys.enabled


def test_tls_override_only_adds_security_settings() -> None:
    assert set(TLS_OVERRIDE) == {"services", "secrets"} and set(TLS_OVERRIDE["services"]) == set(PARSERS)
    for name, spec in TLS_OVERRIDE["services"].items():
        assert set(spec) == {"environment", "secrets", "healthcheck"}, name
        assert set(spec["environment"]).isdisjoint(SERVICES[name]["environment"]), "override, not replace"
        assert all(is_security_variable(variable) for variable in spec["environment"]), name
        assert set(spec["healthcheck"]) == {"test"}, "interval, timeout and start_period stay those of the base"


def tls_environment(service: str, tmp_path: Path) -> dict[str, str]:
    return with_files(environment(service, TLS_SERVICES), [SECRETS_DIR], tmp_path)


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_tls_settings_are_flags_of_the_service_and_validate(service: str, tmp_path: Path) -> None:
    env = environment(service, TLS_SERVICES)
    assert set(env) - service_env_names(service) == set(), "every MMSERVE_* variable must be a flag of the service"
    built = build_config(service, tls_environment(service, tmp_path))
    assert built.server.tls.certfile and built.server.tls.keyfile and built.server.api_keys.key_file
    # only the generator calls the encoder: it must present a certificate; clients of the generator need not
    assert (built.server.tls.ca_certs is not None) == (service == "encoder")


def test_generator_meets_the_encoders_tls_and_key() -> None:
    encoder, generator = environment("encoder", TLS_SERVICES), environment("generator", TLS_SERVICES)
    assert generator["MMSERVE_ENCODER_SSL_CA_CERTS"] == encoder["MMSERVE_SSL_CA_CERTS"]
    # the encoder requires a client certificate signed by that CA: the generator presents the shared one
    assert generator["MMSERVE_ENCODER_SSL_CERTFILE"] == encoder["MMSERVE_SSL_CERTFILE"]
    assert generator["MMSERVE_ENCODER_SSL_KEYFILE"] == encoder["MMSERVE_SSL_KEYFILE"]
    # it sends the first key of the file the encoder accepts keys from
    assert generator["MMSERVE_ENCODER_API_KEY_FILE"] == encoder["MMSERVE_API_KEY_FILE"]
    assert generator["MMSERVE_API_KEY_FILE"] != encoder["MMSERVE_API_KEY_FILE"], "client keys open no encoder"


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_tls_files_are_read_only_secrets_of_the_service(service: str) -> None:
    spec = TLS_SERVICES[service]
    mounted = {f"{SECRETS_DIR}/{name}" for name in spec["secrets"]}
    probe = health_args(spec["healthcheck"]["test"][1:])
    used = {value for value in environment(service, TLS_SERVICES).values() if value.startswith("/")}
    used |= {path for path in (probe.ssl_ca_certs, probe.ssl_certfile, probe.ssl_keyfile) if path}
    used.discard("/models/checkpoint")
    assert used == mounted, "every file is a compose secret (mounted read-only), and every secret is used"
    assert all(":ro" in volume for volume in spec["volumes"]), "no writable mount next to the secrets"
    for name in spec["secrets"]:
        source = Path(TLS_OVERRIDE["secrets"][name]["file"])
        assert source.parent == Path("deploy/secrets") and source.name == name


def test_dev_certificate_script_writes_every_secret_file(tmp_path: Path) -> None:
    run = subprocess.run(
        ["sh", str(REPO / "deploy" / "secrets" / "make-dev-certs.sh"), str(tmp_path)], capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr.decode()
    for secret in TLS_OVERRIDE["secrets"].values():
        assert (tmp_path / Path(secret["file"]).name).stat().st_size > 0, secret


@pytest.mark.parametrize("service", ["encoder", "generator"])
def test_tls_healthchecks_speak_tls_to_the_service(service: str, tmp_path: Path) -> None:
    check = TLS_SERVICES[service]["healthcheck"]
    assert check["test"][0] == "CMD" and seconds(check["timeout"]) > HEALTH_DEADLINE_S
    args = health_args(check["test"][1:])
    env = environment(service, TLS_SERVICES)
    built = build_config(service, tls_environment(service, tmp_path))
    assert args.service == service and args.address == f"127.0.0.1:{built.server.port}"
    trusted = env.get("MMSERVE_SSL_CA_CERTS") or env["MMSERVE_ENCODER_SSL_CA_CERTS"]  # one CA signs both
    assert args.ssl_ca_certs == trusted
    if built.server.tls.ca_certs is not None:  # mutual TLS: the check presents the service's own certificate
        assert (args.ssl_certfile, args.ssl_keyfile) == (env["MMSERVE_SSL_CERTFILE"], env["MMSERVE_SSL_KEYFILE"])
