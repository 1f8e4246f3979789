"""Shared fixtures: tiny random-weight LLaVA checkpoints built locally (no hub downloads)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from common.demo_checkpoints import build_checkpoint

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`factory(vision="clip", text="llama", seed=0, family="llava", **kwargs)` -> a checkpoint dir, built once
    per session (`text=None`: the family's usual language model)."""
    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def factory(
        vision: str = "clip", text: str | None = None, seed: int = 0, family: str = "llava", **kwargs: object
    ) -> Path:
        key = (family, vision, text, seed, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in built:
            name = f"{family}-{vision}-{text}-{seed}-{len(built)}"
            built[key] = build_checkpoint(root / name, family=family, vision=vision, text=text, seed=seed, **kwargs)
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
