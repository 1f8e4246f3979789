"""The offline API: `LLM.generate` with images (PIL, path, bytes) equals HF generate; chat; prefix reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from generator_service import LLM, SamplingParams
from generator_service.inputs import InvalidPrompt
from tests.conftest import CheckpointFactory
from tests.engine_mode import ENFORCE_EAGER

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _reference(path: Path, prompt: str, images: list[Image.Image], max_tokens: int) -> list[int]:
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


@pytest.mark.parametrize(("vision", "text"), [("clip", "llama"), ("siglip", "qwen2")])
def test_generate_with_images_matches_hf(checkpoint_factory: CheckpointFactory, vision: str, text: str) -> None:
    path = checkpoint_factory(vision=vision, text=text)
    llm = LLM(str(path), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=128)
    cat = Image.open(CAT)
    two = "USER: <image>\n<image>\nCompare them. ASSISTANT:"
    square = Image.new("RGB", (48, 48), "green")
    greedy = SamplingParams(max_tokens=10, temperature=0)
    outputs = llm.generate(
        [
            {"prompt": PROMPT, "multi_modal_data": {"image": cat}},
            {"prompt": PROMPT, "multi_modal_data": {"image": str(CAT)}},
            {"prompt": PROMPT, "multi_modal_data": {"image": CAT.read_bytes()}},
            {"prompt": two, "multi_modal_data": {"image": [square, cat]}},
            "USER: hello, who are you? ASSISTANT:",
        ],
        greedy,
    )
    cat_reference = _reference(path, PROMPT, [cat.convert("RGB")], 10)
    assert [o.token_ids for o in outputs[:3]] == [cat_reference] * 3
    assert outputs[3].token_ids == _reference(path, two, [square, cat.convert("RGB")], 10)
    assert outputs[4].token_ids == _reference(path, "USER: hello, who are you? ASSISTANT:", [], 10)
    assert outputs[0].usage.image_tokens == 16 and outputs[3].usage.image_tokens == 32
    assert outputs[0].prompt_token_ids[0] == llm.engine.tokenizer.bos_token_id


def test_repeated_image_hits_prefix_cache_and_chat(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=128)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    first = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": str(CAT)}}, greedy)[0]
    second = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": str(CAT)}}, greedy)[0]
    assert first.token_ids == second.token_ids
    assert first.usage.cached_prompt_tokens == 0 and second.usage.cached_prompt_tokens >= 16
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    chatted = llm.chat(messages, greedy, images=[str(CAT)])
    assert chatted.token_ids == first.token_ids  # the template renders exactly PROMPT


def test_bad_prompts(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=64)
    with pytest.raises(InvalidPrompt, match="1 image placeholder"):
        llm.generate({"prompt": PROMPT})
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_every_eos_id_of_the_generation_config_stops_like_hf(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Chat checkpoints list several end ids in generation_config.json (gemma-3-it: <eos>, <end_of_turn>): HF
    generate stops at any of them, so must the engine."""
    prompt = "USER: hello, who are you? ASSISTANT:"
    baseline = _reference(tiny_checkpoint, prompt, [], 10)
    stop_at = next(token for token in baseline[2:] if token not in baseline[:2])  # a token first emitted later
    path = tmp_path / "two-eos"
    shutil.copytree(tiny_checkpoint, path)
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], stop_at]
    (path / "generation_config.json").write_text(json.dumps(generation))
    expected = _reference(path, prompt, [], 10)
    assert expected == baseline[: baseline.index(stop_at) + 1]  # HF stops there
    with LLM(str(path), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=64) as llm:
        output = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0]
    assert output.token_ids == expected
    assert output.finish_reason == "stop" and output.stop_reason == stop_at
