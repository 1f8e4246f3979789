"""The local checkpoint builder: loads with the HF auto classes offline, generates, and is deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from common.demo_checkpoints import BUILDERS
from common.demo_model import build_checkpoint, main
from tests.conftest import CheckpointFactory

EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"


@pytest.mark.parametrize(("vision", "text"), [("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral")])
def test_checkpoint_loads_with_auto_classes_and_generates(
    checkpoint_factory: CheckpointFactory, vision: str, text: str
) -> None:
    path = checkpoint_factory(vision=vision, text=text)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    assert model.config.text_config.model_type == text
    assert model.config.vision_config.model_type == f"{vision}_vision_model"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? 猫 🐱"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    inputs = processor(text=prompt, images=Image.open(EXAMPLE_IMAGE), return_tensors="pt")
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert num_image_tokens == patches  # CLIP drops CLS ("default"), SigLIP has none ("full")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    # Random weights at initializer_range 0.2: the output depends on the image.
    inputs_other = processor(text=prompt, images=Image.new("RGB", (40, 40), "blue"), return_tensors="pt")
    out_other = model.generate(**inputs_other, max_new_tokens=8, do_sample=False)
    assert not torch.equal(out, out_other)


def test_tokenizer_round_trips_any_utf8(tiny_checkpoint: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    text = "naïve café — Привет 猫 🐱👍🏽 \u0000 tab\tend"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_tokens_to_ids("<image>") == tokenizer("<image>", add_special_tokens=False).input_ids[0]


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (subfolders too: InstructBLIP keeps its QFormer tokenizer in one)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    first = _digest(build_checkpoint(tmp_path / "a", seed=3))
    second = _digest(build_checkpoint(tmp_path / "b", seed=3))
    third = _digest(build_checkpoint(tmp_path / "c", seed=4))
    assert first == second
    assert first["model.safetensors"] != third["model.safetensors"]
    assert first["tokenizer.json"] == third["tokenizer.json"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_family_builds_the_same_files_twice(family: str, tmp_path: Path) -> None:
    """Same arguments, same files, tokenizers included (a trained vocabulary must not depend on hash order)."""
    first = _digest(build_checkpoint(tmp_path / "a", family=family))
    assert first == _digest(build_checkpoint(tmp_path / "b", family=family))


def test_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "m"), "--vision", "siglip", "--text", "mistral", "--seed", "1"]) == 0
    assert "llava checkpoint (siglip + mistral" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--vision", "vit"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--family", "llava", "--text", "opt"])  # LLaVA has no OPT language model
    assert "text must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size must be one of"):
        build_checkpoint(tmp_path / "y", size="huge")
