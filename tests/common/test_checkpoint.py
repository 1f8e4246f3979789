"""Half-loading: bit-identical to the full model's submodules, for both key layouts, never reading the other half."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import safetensors
import torch
from transformers import LlavaForConditionalGeneration

import common.checkpoint as checkpoint
from common.checkpoint import (
    CheckpointError,
    encoder_fingerprint,
    load_text_half,
    load_vision_half,
    vision_weights_digest,
)
from common.models.llava import LlavaVision
from tests.conftest import CheckpointFactory, to_legacy_hub_layout


class ReadCounter:
    """Counts the tensors read through safetensors, at the library boundary (not through our own report)."""

    def __init__(self) -> None:
        self.keys: list[str] = []


@pytest.fixture
def read_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadCounter]:
    counter = ReadCounter()
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, filename: str, framework: str) -> None:
            self._handle = real_open(filename, framework=framework)

        def __enter__(self) -> CountingHandle:
            self._handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self._handle.keys())

        def get_tensor(self, key: str) -> torch.Tensor:
            counter.keys.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(checkpoint, "safe_open", CountingHandle)
    yield counter


def _assert_equal_modules(part: torch.nn.Module, full: torch.nn.Module) -> None:
    part_state, full_state = part.state_dict(), full.state_dict()
    assert set(part_state) == set(full_state)
    for name, tensor in part_state.items():
        assert tensor.dtype == full_state[name].dtype, name
        assert torch.equal(tensor, full_state[name]), name


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_legacy"])
@pytest.mark.parametrize(("vision", "text"), [("clip", "llama"), ("siglip", "qwen2")])
def test_halves_equal_full_model(
    checkpoint_factory: CheckpointFactory,
    tmp_path: Path,
    read_counter: ReadCounter,
    layout: str,
    vision: str,
    text: str,
) -> None:
    path = checkpoint_factory(vision=vision, text=text)
    if layout == "hub_legacy":
        path = to_legacy_hub_layout(path, tmp_path / "legacy")
    full = LlavaForConditionalGeneration.from_pretrained(path).eval()

    read_counter.keys.clear()
    vision_half = load_vision_half(path)
    vision_module = cast(LlavaVision, vision_half.module)
    vision_keys = list(read_counter.keys)
    _assert_equal_modules(vision_module.vision_tower, full.model.vision_tower)
    _assert_equal_modules(vision_module.multi_modal_projector, full.model.multi_modal_projector)

    read_counter.keys.clear()
    text_half = load_text_half(path)
    text_keys = list(read_counter.keys)
    _assert_equal_modules(text_half.model.model, full.model.language_model)
    _assert_equal_modules(text_half.model.lm_head, full.lm_head)

    # Measured at the safetensors boundary: neither half reads a single tensor of the other.
    assert vision_keys and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in vision_keys)
    assert text_keys and all(k.startswith("language_model.") for k in text_keys)
    assert vision_half.report.bytes_read == sum(
        t.numel() * t.element_size() for t in full.model.vision_tower.state_dict().values()
    ) + sum(t.numel() * t.element_size() for t in full.model.multi_modal_projector.state_dict().values())
    text_bytes = sum(t.numel() * t.element_size() for t in full.model.language_model.state_dict().values())
    assert text_half.report.bytes_read == text_bytes + full.lm_head.weight.numel() * 4


def test_halves_reproduce_full_model_outputs(tiny_checkpoint: Path) -> None:
    full = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    vision_half, text_half = load_vision_half(tiny_checkpoint), load_text_half(tiny_checkpoint)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = torch.stack(list(full.get_image_features(pixel_values=pixels).pooler_output))
        vision = cast(LlavaVision, vision_half.module)
        hidden = vision.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(vision.multi_modal_projector(hidden), reference)
        ids = torch.tensor([[1, 50, 60, 70, 80]])
        assert torch.equal(text_half.model(input_ids=ids).logits, full(input_ids=ids).logits)


def test_dtype_and_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    half = load_text_half(tiny_checkpoint, dtype="bfloat16")
    assert half.model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_text_half(tiny_checkpoint, dtype="int8")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub id"):
        load_text_half(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_vision_half(tmp_path / "empty")


def test_fingerprint_is_content_defined(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    base = checkpoint_factory()
    legacy = to_legacy_hub_layout(base, tmp_path / "legacy")
    other_seed = checkpoint_factory(seed=1)
    other_layer = checkpoint_factory(vision_feature_layer=-1)
    assert vision_weights_digest(base) == vision_weights_digest(legacy)  # same weights, other key layout
    fingerprints = {
        encoder_fingerprint(base, dtype="float32"),
        encoder_fingerprint(base, dtype="bfloat16"),
        encoder_fingerprint(other_seed, dtype="float32"),
        encoder_fingerprint(other_layer, dtype="float32"),
    }
    assert len(fingerprints) == 4
    assert encoder_fingerprint(legacy, dtype="float32") == encoder_fingerprint(base, dtype="float32")
