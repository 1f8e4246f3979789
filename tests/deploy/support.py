"""Checks shared by the deployment tests (docker-compose files, Kubernetes manifests): settings are compared with
the code they configure, i.e. the services' flag parsers and the client's CLI, never with a copy of them."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.client.cli import build_parser
from common.config import (
    encoder_arg_parser,
    encoder_config_from_args,
    env_name,
    generator_arg_parser,
    generator_config_from_args,
)
from protos import encoder_pb2, generator_pb2

REPO = Path(__file__).resolve().parents[2]
PARSERS: dict[str, tuple[Callable[..., argparse.ArgumentParser], Callable[..., Any]]] = {
    "encoder": (encoder_arg_parser, encoder_config_from_args),
    "generator": (generator_arg_parser, generator_config_from_args),
}
HEALTH_DEADLINE_S = 5.0  # `python -m common.client health` without --timeout
# The names the services register their health under (besides ""), as kubelet's gRPC probes ask for them.
SERVICE_NAMES = {
    "encoder": encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name,
    "generator": generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
}
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def service_flags(service: str) -> set[str]:
    """Every `--flag` of `python -m <service>_service`."""
    parser = PARSERS[service][0]({"MMSERVE_MODEL": "x"})
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def service_env_names(service: str) -> set[str]:
    """Every MMSERVE_* variable the service reads (one per flag)."""
    return {env_name(flag) for flag in service_flags(service)}


def flags_in(argv: Sequence[str]) -> list[str]:
    """The `--flag` words of a command line (`--flag=value` counts as `--flag`)."""
    return [match.group(0) for word in argv if (match := _FLAG.fullmatch(word.split("=", 1)[0]))]


def build_config(service: str, environ: Mapping[str, str], argv: Sequence[str] = ()) -> Any:
    """The service's validated config from its command-line arguments and MMSERVE_* environment."""
    return PARSERS[service][1](list(argv), environ=dict(environ))


def parse_client(argv: Sequence[str]) -> argparse.Namespace:
    """`python -m common.client ARGV` parsed as the CLI would (argparse exits on an unknown flag)."""
    return build_parser().parse_args(list(argv))


def health_args(command: Sequence[str]) -> argparse.Namespace:
    """A healthcheck/probe command line `python -m common.client health ...`, parsed."""
    assert list(command[:3]) == ["python", "-m", "common.client"], command
    args = parse_client(command[3:])
    assert args.command == "health", command
    return args


def with_files(environ: Mapping[str, str], mounts: Iterable[str], root: Path) -> dict[str, str]:
    """`environ` with every path under one of `mounts` moved below `root`, where a file now stands.

    The configs check that certificate and key files are readable when they are built, so a test builds them
    against stand-ins; each holds one line, which is also a valid API key for the `*_API_KEY_FILE` settings.
    """
    prefixes = tuple(mount.rstrip("/") + "/" for mount in mounts)
    moved = dict(environ)
    for name, value in environ.items():
        if value.startswith(prefixes):
            stand_in = root / value.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("stand-in-key\n")
            moved[name] = str(stand_in)
    return moved
