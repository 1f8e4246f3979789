"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine: structure, and every setting
against the code it configures (the services' flag parsers, the client's CLI, the repository's files)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.client.cli import build_parser
from common.config import (
    encoder_arg_parser,
    encoder_config_from_args,
    env_name,
    generator_arg_parser,
    generator_config_from_args,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
PARSERS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "encoder": (encoder_arg_parser, encoder_config_from_args),
    "generator": (generator_arg_parser, generator_config_from_args),
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set on the host."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", value)


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service]["environment"]
    assert isinstance(env, Mapping) and all(isinstance(v, str) for v in env.values()), "quote every value"
    return {key: interpolate(value) for key, value in env.items()}


def config(service: str) -> Any:
    return PARSERS[service][1]([], environ=environment(service))


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
    parser = PARSERS[service][0]({"MMSERVE_MODEL": "x"})
    known = {env_name(opt) for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    assert set(environment(service)) - known == set(), "every MMSERVE_* variable must be a flag of the service"
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
    assert check["test"][:4] == ["CMD", "python", "-m", "common.client"]
    args = build_parser().parse_args(check["test"][4:])
    assert (args.command, args.service) == ("health", service)
    assert args.address == f"127.0.0.1:{config(service).server.port}"
    assert seconds(check["timeout"]) > 5  # longer than the command's own 5 s deadline, so it reports the error
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
