"""The model-family layer: selection from the config, refusal of other architectures, LLaVA's rules vs HF's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, MllamaConfig

from common.checkpoint import load_processor, load_text_half, load_vision_half
from common.errors import CheckpointError, UnsupportedArchitectureError
from common.models import FAMILIES, family_for_config, supported_architectures
from common.models.llava import LlavaFamily
from encoder_service.__main__ import main as encoder_main
from generator_service.__main__ import main as generator_main
from tests.conftest import CheckpointFactory, to_legacy_hub_layout

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unsupported_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face config of an architecture mmserve does not serve (Llama 3.2 Vision's cross-attention;
    config only: it is refused first)."""
    path = tmp_path_factory.mktemp("mllama")
    MllamaConfig(architectures=["MllamaForConditionalGeneration"]).save_pretrained(path)
    return path


def test_llava_config_selects_the_llava_family(tiny_checkpoint: Path) -> None:
    family = family_for_config(AutoConfig.from_pretrained(tiny_checkpoint))
    assert isinstance(family, LlavaFamily)
    assert family.name == "llava"
    assert "LlavaForConditionalGeneration" in supported_architectures()


def test_unsupported_architecture_is_refused_with_the_supported_list(unsupported_checkpoint: Path) -> None:
    for load in (load_vision_half, load_text_half):
        with pytest.raises(UnsupportedArchitectureError) as error:
            load(unsupported_checkpoint)
        message = str(error.value)
        assert "MllamaForConditionalGeneration" in message and "'mllama'" in message  # the class and model_type
        for architecture in supported_architectures():
            assert architecture in message


def test_unknown_model_type_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(CheckpointError, match="could not be read as a Hugging Face config"):
        load_vision_half(tmp_path)


@pytest.mark.parametrize("main", [encoder_main, generator_main], ids=["encoder", "generator"])
def test_services_refuse_an_unsupported_checkpoint_at_start(
    main: object, unsupported_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(main)
    assert main(["--model", str(unsupported_checkpoint), "--port", "0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: mmserve does not serve MllamaForConditionalGeneration" in err
    assert "supported architectures: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration" in err


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_legacy"])
def test_every_stored_tensor_belongs_to_exactly_one_half(
    checkpoint_factory: CheckpointFactory, tmp_path: Path, layout: str
) -> None:
    path = checkpoint_factory(vision="siglip", text="qwen2")
    if layout == "hub_legacy":
        path = to_legacy_hub_layout(path, tmp_path / "legacy")
    family = family_for_config(AutoConfig.from_pretrained(path))
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    parts = {key: family.classify(key) for key in keys}
    assert all(part is not None for part in parts.values()), [k for k, p in parts.items() if p is None]
    assert {part[0] for part in parts.values() if part is not None} == {"vision", "text"}


@pytest.mark.parametrize(
    ("vision", "kwargs"),
    [("clip", {}), ("siglip", {}), ("clip", {"vision_feature_layer": [-3, 0, -1]})],
    ids=["clip-default", "siglip-full", "clip-layer-list"],
)
def test_llava_rules_match_hugging_face(checkpoint_factory: CheckpointFactory, vision: str, kwargs: dict) -> None:
    """Token count = what the processor expands an image to; features = `get_image_features`, bit for bit."""
    path = checkpoint_factory(vision=vision, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    full = LlavaForConditionalGeneration.from_pretrained(path).eval()
    half = load_vision_half(path)
    family = half.family
    family.prepare_vision(half.module)  # truncates the tower: the features must not change
    for size in [(32, 32), (80, 20), (17, 200)]:
        image = Image.new("RGB", size, (200, 30, 90))
        inputs = processor(text=processor.image_token, images=[image], return_tensors="pt")
        expanded = int((inputs["input_ids"] == family.image_token_id).sum())
        assert family.tokens_per_image(processor) == expanded
        with torch.inference_mode():
            reference = full.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            ours = family.image_features(half.module, {"pixel_values": inputs["pixel_values"]})
        assert torch.equal(ours[0], reference[0])


def test_no_family_names_outside_the_family_layer() -> None:
    """The engine, scheduler, caches and servicers are family-agnostic: no family class or name appears there."""
    names = {cls.__name__ for cls in FAMILIES} | {a for cls in FAMILIES for a in cls.architectures}
    names |= {cls.config_class.__name__ for cls in FAMILIES}
    pattern = re.compile("|".join(sorted(names)) + r"|family\s*==|\.name\s*==\s*['\"]")
    offenders = []
    for package in ("generator_service", "encoder_service"):
        for file in (REPO_ROOT / package).rglob("*.py"):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{file.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_transformers_release_that_cannot_load_a_family_processor_is_named(
    checkpoint_factory: CheckpointFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 5.17 resolves Idefics3's PIL image processor to torchvision's: refused, saying what to do."""
    path = checkpoint_factory(family="idefics3")
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(CheckpointError, match=r"transformers 5\.17\.0 loads the Idefics3ForConditionalGeneration "
                       r"processor only with torchvision.*>= 5\.24"):
        load_processor(path)
