"""LLaVA-NeXT ("anyres" tiling, a token count per image size) against Hugging Face, float32 on CPU.

The checkpoint split, the processor's token counts, `get_image_features` bit for bit, and greedy tokens through the
engine equal `LlavaNextForConditionalGeneration.generate(do_sample=False)` in every batch composition the
scheduler makes: images of different sizes together, text-only and two-image prompts, staggered arrivals, an image
split across prefill chunks, preemption, prefix-cache hits and aborts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

from common.checkpoint import encoder_fingerprint, load_text_half, load_vision_half
from common.config import EngineConfig, ModelConfig
from common.images.vision_encoder import VisionEncoder
from common.models import family_for_config
from common.models.base import collate
from common.models.llava_next import LlavaNextFamily
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor
from tests.conftest import CheckpointFactory, to_legacy_hub_layout
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER
from tests.families.support import abort_in_phases

MAX_TOKENS = 12
BLOCK_SIZE = 4
# (height, width): squares, both orientations of 1:2 and 1:3 and beyond, a 1-pixel line, tiny and huge images.
SIZES = [
    (1, 1), (5, 3), (32, 32), (31, 33), (64, 32), (32, 64), (96, 32), (32, 96), (60, 40), (40, 60), (300, 10),
    (10, 300), (1, 200), (200, 1), (17, 200), (700, 1000), (1000, 700), (2000, 2000), (451, 300), (97, 33),
]  # fmt: skip


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A structured RGB image (a Mandelbrot view differing per seed): flat colours would hide layout bugs."""
    left = -2.0 + 0.1 * seed
    return Image.effect_mandelbrot((width, height), (left, -1.5, left + 3.0, 1.5), 40).convert("RGB")


def _engine_images() -> list[Image.Image]:
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    strip = Image.linear_gradient("L").convert("RGB").resize((96, 24))  # 1:4 landscape: a 1 x 3 tile grid
    return [cat, _image(60, 40, seed=1), _image(64, 64, seed=2), strip, _image(90, 20, seed=3)]


@pytest.fixture(scope="module")
def path(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory(vision="clip", text="mistral", family="llava_next")


@pytest.fixture(scope="module")
def model(path: Path) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def processor(path: Path) -> object:
    return AutoProcessor.from_pretrained(path)


# --- 1. the checkpoint split --------------------------------------------------------------------------------------


def _stored_keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_legacy"])
def test_every_stored_tensor_belongs_to_one_half_and_halves_equal_hf(
    path: Path, model: LlavaNextForConditionalGeneration, tmp_path: Path, layout: str
) -> None:
    if layout == "hub_legacy":
        path = to_legacy_hub_layout(path, tmp_path / "hub")
        assert any(key.startswith("vision_tower.vision_model.") for key in _stored_keys(path))
    family = family_for_config(AutoConfig.from_pretrained(path))
    assert isinstance(family, LlavaNextFamily) and family.name == "llava_next"
    halves = {key: family.classify(key) for key in _stored_keys(path)}
    assert [key for key, half in halves.items() if half is None] == []
    assert halves["image_newline"] == ("vision", "image_newline")  # the newline row goes to the encoder
    assert {half[0] for half in halves.values() if half is not None} == {"vision", "text"}

    # Each half reads every tensor of its own half, equal to the saved model's (and to what HF loads from the
    # same files: the renamed copy really is a layout Hugging Face reads).
    vision, text = load_vision_half(path), load_text_half(path)
    num_vision = sum(1 for half in halves.values() if half is not None and half[0] == "vision")
    assert len(vision.report.tensors_read) == num_vision and vision.report.tensors_skipped == 0
    assert len(text.report.tensors_read) == len(halves) - num_vision
    saved = model.model.state_dict()
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(path).model.state_dict()
    for name, tensor in vision.module.state_dict().items():
        assert torch.equal(tensor, saved[name]) and torch.equal(tensor, reloaded[name]), name
    for name, tensor in text.model.model.state_dict().items():
        assert torch.equal(tensor, saved[f"language_model.{name}"]), name
    assert torch.equal(text.model.lm_head.weight, model.lm_head.weight)


def test_fingerprint_follows_the_model_config_settings_of_an_embedding(path: Path, tmp_path: Path) -> None:
    """An embedding computed under other pinpoints (how the tile grid is re-assembled) or another feature
    strategy must not be served from the cache: the encoder fingerprint, part of every image key, changes."""
    fingerprint = encoder_fingerprint(path, dtype="float32")
    copy = shutil.copytree(path, tmp_path / "copy")
    assert encoder_fingerprint(copy, dtype="float32") == fingerprint  # same files, same key
    edits = {
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "relu",
    }
    for name, value in edits.items():
        edited = shutil.copytree(path, tmp_path / name)
        config = json.loads((edited / "config.json").read_text())
        config[name] = value
        (edited / "config.json").write_text(json.dumps(config))
        assert encoder_fingerprint(edited, dtype="float32") != fingerprint, name


# --- 2. token counts ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["clip-default", "siglip-full"])
def any_path(request: pytest.FixtureRequest, checkpoint_factory: CheckpointFactory, path: Path) -> Path:
    if request.param == "clip-default":
        return path
    return checkpoint_factory(vision="siglip", text="qwen2", family="llava_next")


def test_num_image_tokens_is_what_the_processor_expands_to(any_path: Path) -> None:
    processor = AutoProcessor.from_pretrained(any_path)
    family = family_for_config(AutoConfig.from_pretrained(any_path))
    assert family.tokens_per_image(processor) is None
    counts = set()
    for height, width in SIZES:
        inputs = processor(text=f"a {processor.image_token} b", images=[_image(height, width)], return_tensors="pt")
        expanded = int((inputs["input_ids"] == family.image_token_id).sum())
        assert family.num_image_tokens(processor, (height, width)) == expanded, (height, width)
        counts.add(expanded)
    assert len(counts) >= 5  # the tiny pinpoints really give different counts for different sizes


# --- 3. image features --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_feature_layer", [-2, [-3, 0, -1]], ids=["layer-2", "layer-list"])
def test_features_equal_hf_get_image_features_bit_for_bit(
    checkpoint_factory: CheckpointFactory, vision_feature_layer: int | list[int]
) -> None:
    path = checkpoint_factory(vision="clip", family="llava_next", vision_feature_layer=vision_feature_layer)
    processor = AutoProcessor.from_pretrained(path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    half = load_vision_half(path)
    family = half.family
    family.prepare_vision(half.module)  # drops never-read tower layers: the features must not change
    for height, width in [(32, 32), (60, 40), (24, 96), (300, 10), (1000, 700), (97, 33)]:
        image = _image(height, width)
        inputs = processor(text=processor.image_token, images=[image], return_tensors="pt")
        with torch.inference_mode():
            reference = hf.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            ours = family.image_features(half.module, collate([family.prepare_image(processor, image, None)]))
        assert len(ours) == 1
        assert ours[0].shape[0] == int((inputs["input_ids"] == family.image_token_id).sum())
        assert torch.equal(ours[0], reference.pooler_output[0]), (height, width)


def test_vision_encoder_encodes_images_of_different_sizes_in_one_call(
    path: Path, model: LlavaNextForConditionalGeneration, processor: object
) -> None:
    encoder = VisionEncoder(ModelConfig(model=str(path)))
    assert encoder.tokens_per_image is None
    # (60, 40) and (1000, 700) both get a 2 x 2 grid (5 crops): they share one forward pass.
    sizes = [(60, 40), (24, 96), (1000, 700), (32, 32), (300, 10)]
    images = [_image(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    embeddings = encoder.encode(images)
    for image, embedding in zip(images, embeddings, strict=True):
        inputs = processor.image_processor(images=[image], return_tensors="pt")  # type: ignore[attr-defined]
        with torch.inference_mode():
            reference = model.get_image_features(**inputs).pooler_output[0]
        assert embedding.shape == reference.shape
        assert embedding.shape[0] == encoder.num_image_tokens(image)
        # Batched with another image of the same crop count: equal within float32 noise (bit for bit alone).
        torch.testing.assert_close(embedding, reference, rtol=0, atol=1e-5)
    assert torch.equal(encoder.encode(images[3:4])[0], embeddings[3])  # alone in its batch either way


# --- 4. the engine against generate -------------------------------------------------------------------------------


@dataclass
class Case:
    prompt: str
    images: list[int]
    reference: list[int] = field(default_factory=list)


def _prompt(question: str, num_images: int) -> str:
    return f"[INST] {'<image>' * num_images}\n{question} [/INST]"


class Harness:
    """HF's model and processor for one checkpoint; HF's own features per image, and engine requests."""

    def __init__(self, path: Path, model: LlavaNextForConditionalGeneration, processor: object) -> None:
        self.path = path
        self.model = model
        self.processor = processor
        self.inputs = InputProcessor(processor, family_for_config(model.config))
        self.images = _engine_images()
        self._features: dict[int, torch.Tensor] = {}

    def reference(self, case: Case) -> list[int]:
        images = [self.images[i] for i in case.images] or None
        inputs = self.processor(text=case.prompt, images=images, return_tensors="pt")  # type: ignore[operator]
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]

    def features(self, index: int) -> torch.Tensor:
        if index not in self._features:
            image_processor = self.processor.image_processor  # type: ignore[attr-defined]
            inputs = image_processor(images=[self.images[index]], return_tensors="pt")
            with torch.inference_mode():
                self._features[index] = self.model.get_image_features(**inputs).pooler_output[0]
        return self._features[index]

    def request(self, request_id: str, case: Case) -> EngineRequest:
        features = [self.features(i) for i in case.images]
        tokenized = self.inputs.tokenize(case.prompt, [f"image-{i}" for i in case.images], [len(f) for f in features])
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=tokenized.token_ids,
            sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            image_spans=tokenized.image_spans,
            image_embeddings=tuple(features),
        )

    def engine(self, **overrides: object) -> LLMEngine:
        settings: dict = {"block_size": BLOCK_SIZE, "num_kv_blocks": 256, "max_num_batched_tokens": 512}
        settings.update(overrides)
        model = ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER)
        return LLMEngine.from_config(EngineConfig(model=model, **settings))


@pytest.fixture(scope="module")
def harness(path: Path, model: LlavaNextForConditionalGeneration, processor: object) -> Harness:
    return Harness(path, model, processor)


@pytest.fixture(scope="module")
def cases(harness: Harness) -> list[Case]:
    built = [
        Case(_prompt("What is in the picture?", 1), [0]),
        Case(_prompt("hello there, how are you doing today? Tell me about cats.", 0), []),
        Case(_prompt("Compare the two images.", 2), [1, 3]),
        Case(_prompt("Describe the image in one sentence.", 1), [4]),
        Case(_prompt("Is it day or night?", 1), [2]),
        Case(_prompt("Numbers: 1 2 3 4 5 6 7 8 9 10 and some more words", 0), []),
        Case(_prompt("What changed?", 2), [3, 0]),
        Case(_prompt("Colours?", 1), [1]),
    ]
    for case in built:
        case.reference = harness.reference(case)
    return built


def test_chat_template_renders_the_prompts_tested_here(harness: Harness) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    assert harness.inputs.render_chat(messages) == _prompt("What is in the picture?", 1)


def test_engine_images_have_different_token_counts(harness: Harness) -> None:
    rows = [harness.features(i).shape[0] for i in range(len(harness.images))]
    assert len(set(rows)) == len(rows), rows


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-prefill"),
        pytest.param({"num_kv_blocks": 48, "max_num_batched_tokens": 16}, id="preemption"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, cases: list[Case], settings: dict) -> None:
    engine = harness.engine(**settings)
    # Two at once, then one every other step: images of different sizes, text-only and two-image prompts mixed.
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(cases):
        arrivals.setdefault(max(0, 2 * i - 1), []).append(harness.request(f"r{i}", case))
    outputs = drive(engine, arrivals)
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption
    if settings.get("max_num_batched_tokens", 512) < 16:
        # Every image is longer than one step's budget: each was split across prefill chunks.
        assert min(harness.features(i).shape[0] for i in range(len(harness.images))) > 7


def test_prefix_cache_hits_same_image_and_separates_different_images(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine()
    first = cases[0]
    second = Case(first.prompt, [2])  # same text, another image (of another token count)
    second.reference = harness.reference(second)
    out = drive(engine, {0: [harness.request("a", first)]})
    again = drive(engine, {0: [harness.request("b", first)]})
    other = drive(engine, {0: [harness.request("c", second)]})
    assert tokens(out["a"]) == tokens(again["b"]) == first.reference
    assert tokens(other["c"]) == second.reference
    assert second.reference != first.reference  # the image really decides the output
    usage_a, usage_b, usage_c = (o[-1].usage for o in (out["a"], again["b"], other["c"]))
    assert usage_a is not None and usage_b is not None and usage_c is not None
    assert usage_a.cached_prompt_tokens == 0
    assert usage_b.cached_prompt_tokens == (usage_b.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    image_start = harness.request("x", second).image_spans[0].offset
    assert usage_c.cached_prompt_tokens <= image_start // BLOCK_SIZE * BLOCK_SIZE


def test_abort_mid_way_leaves_others_unchanged(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_batched_tokens=9)
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases[:6])]}
    # r1 (text) mid-prefill, r2 (two images) with its prefill stopped inside an image, r4 while decoding.
    phases = {"r1": "prefill", "r2": "inside-image", "r4": "decode"}
    abort_in_phases(engine, arrivals, phases, [case.reference for case in cases[:6]])
