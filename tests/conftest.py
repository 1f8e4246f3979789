"""Shared fixtures: tiny random-weight LLaVA checkpoints built locally (no hub downloads)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from safetensors.torch import load_file, save_file

from common.demo_checkpoints import build_checkpoint
from common.hashing import redis_key
from tests.grpc_support import RedisProcess

CheckpointFactory = Callable[..., Path]


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """Undo a service `main()` run in-process: its `logging.basicConfig(force=True)` binds a handler to this
    test's captured stderr, which pytest closes afterwards, and later tests' server threads would log into it
    ("--- Logging error --- ValueError: I/O operation on closed file" in CI output)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`factory(vision=None, text=None, seed=0, family="llava", **kwargs)` -> a checkpoint dir, built once per
    session (None: the family's usual vision tower / language model, e.g. CLIP + Llama for LLaVA)."""
    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def factory(
        vision: str | None = None, text: str | None = None, seed: int = 0, family: str = "llava", **kwargs: object
    ) -> Path:
        key = (family, vision, text, seed, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in built:
            name = f"{family}-{vision}-{text}-{seed}-{len(built)}"
            if vision is not None:
                kwargs["vision"] = vision
            built[key] = build_checkpoint(root / name, family=family, text=text, seed=seed, **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory()


def to_legacy_hub_layout(src: Path, dst: Path) -> Path:
    """Copy a checkpoint, renaming vision keys to the llava-hf hub layout (`vision_tower.vision_model.*`)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    legacy_prefix = "vision_tower.vision_model."
    renamed = {
        (legacy_prefix + key.removeprefix("vision_tower.") if key.startswith("vision_tower.") else key): tensor
        for key, tensor in tensors.items()
    }
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at 127.0.0.1:6379 when it answers, else a private redis-server for this session."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        process = RedisProcess()
        yield process.url
        process.kill()
    else:
        yield "redis://127.0.0.1:6379/0"
    finally:
        client.close()


class RedisKeys:
    """A redis-py client that deletes, after the test, every image key the test registered."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self._names: set[str] = set()

    def name(self, image_key: str) -> str:
        self._names.add(redis_key(image_key))
        return redis_key(image_key)

    def cleanup(self) -> None:
        if self._names:
            self.client.delete(*self._names)
        self.client.close()


@pytest.fixture
def redis_keys(redis_url: str) -> Iterator[RedisKeys]:
    keys = RedisKeys(redis_url)
    yield keys
    keys.cleanup()
