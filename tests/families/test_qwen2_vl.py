"""Qwen2-VL and Qwen2.5-VL (native-resolution patch grids, M-RoPE) against Hugging Face, float32 on CPU.

Selection, the checkpoint split in both key layouts and with a tied head, the processor's token counts, the
features (`get_image_features` bit for bit), the prompt's token ids and 3-D positions (`get_rope_index`), and
greedy tokens through the engine equal `generate(do_sample=False)` of the checkpoint's own class in every batch
composition the scheduler makes: images of different sizes together, two images per prompt, text-only, staggered
arrivals, prefill chunks ending at every token in and around an image, preemption, prefix-cache hits and aborts.
Negative controls show that the positions matter: index positions, or the plan without its delta, change the
tokens.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from common.checkpoint import encoder_fingerprint, load_processor, load_text_half, load_vision_half
from common.config import EngineConfig, ModelConfig
from common.errors import InvalidPrompt
from common.images.vision_encoder import VisionEncoder
from common.models import family_for_config, supported_architectures
from common.models.base import ModelFamily, PreparedImage, collate
from common.models.qwen2_vl import Qwen2_5_VLFamily, Qwen2VLFamily
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor, TokenizedPrompt
from tests.conftest import CheckpointFactory
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER
from tests.families.support import abort_in_phases

MAX_TOKENS = 12
BLOCK_SIZE = 4
FAMILIES: dict[str, tuple[type[ModelFamily], type[PreTrainedModel]]] = {
    "qwen2_vl": (Qwen2VLFamily, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLFamily, Qwen2_5_VLForConditionalGeneration),
}
HF_PROCESSORS: dict[str, type[Qwen2VLProcessor] | type[Qwen2_5_VLProcessor]] = {
    "qwen2_vl": Qwen2VLProcessor,
    "qwen2_5_vl": Qwen2_5_VLProcessor,
}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # what the chat template writes for each image
# (height, width): squares, both orientations, 1-pixel lines, tiny and huge images, extreme aspect ratios.
SIZES = [
    (1, 1), (5, 3), (16, 16), (32, 32), (31, 33), (64, 32), (32, 64), (96, 32), (32, 96), (60, 40), (40, 60),
    (300, 10), (10, 300), (1, 200), (200, 1), (17, 200), (700, 1000), (1000, 700), (2000, 2000), (451, 300),
]  # fmt: skip


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A structured RGB image (a Mandelbrot view differing per seed): flat colours would hide layout bugs."""
    left = -2.0 + 0.1 * seed
    return Image.effect_mandelbrot((width, height), (left, -1.5, left + 3.0, 1.5), 40).convert("RGB")


def _engine_images() -> list[Image.Image]:
    """Merged grids (rows x cols): 3 x 6, 2 x 3, 4 x 2, 2 x 6, 3 x 3, and 6 x 1 (whose delta is 0)."""
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    strip = Image.linear_gradient("L").convert("RGB").resize((96, 24))
    return [cat, _image(30, 50, 1), _image(64, 40, 2), strip, _image(48, 48, 5), _image(90, 20, 3)]


def _prompt(question: str, num_images: int) -> str:
    """The chat template's rendering of one user turn with `num_images` images, then the question."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE * num_images}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def _stored_keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@dataclass
class Case:
    prompt: str
    images: list[int]
    reference: list[int] = field(default_factory=list)


class Harness:
    """One checkpoint: HF's model and processor, HF's features and grid per image, and engine requests."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.family_class, self.model_class = FAMILIES[name]
        self.model = self.model_class.from_pretrained(path).eval()
        self.processor = load_processor(path)
        self.family = family_for_config(self.model.config)
        self.inputs = InputProcessor(self.processor, self.family)
        self.images = _engine_images()
        self._features: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._references: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def hf_inputs(self, case: Case) -> dict[str, torch.Tensor]:
        images = [self.images[i] for i in case.images] or None
        return dict(self.processor(text=case.prompt, images=images, return_tensors="pt"))

    def reference(self, case: Case) -> list[int]:
        key = (case.prompt, tuple(case.images))
        if key not in self._references:
            inputs = self.hf_inputs(case)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            self._references[key] = [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
        return self._references[key]

    def features(self, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """HF's embedding of image `index` and its grid (t, h, w), from the processor's own tensors."""
        if index not in self._features:
            inputs = self.processor.image_processor(images=[self.images[index]], return_tensors="pt")
            with torch.inference_mode():
                pooled = self.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            self._features[index] = (pooled[0], tuple(inputs["image_grid_thw"][0].tolist()))
        return self._features[index]

    def tokenize(self, case: Case) -> TokenizedPrompt:
        features = [self.features(i) for i in case.images]
        return self.inputs.tokenize(
            case.prompt,
            [f"image-{i}" for i in case.images],
            [len(embedding) for embedding, _ in features],
            [grid for _, grid in features],
        )

    def request(self, request_id: str, case: Case, tokenized: TokenizedPrompt | None = None) -> EngineRequest:
        embeddings = {f"image-{i}": self.features(i)[0] for i in case.images}
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        return (tokenized or self.tokenize(case)).engine_request(request_id, sampling, embeddings)

    def engine(self, **overrides: object) -> LLMEngine:
        settings: dict = {"block_size": BLOCK_SIZE, "num_kv_blocks": 256, "max_num_batched_tokens": 512}
        settings.update(overrides)
        model = ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER)
        return LLMEngine.from_config(EngineConfig(model=model, **settings))


@pytest.fixture(scope="module", params=list(FAMILIES))
def harness(request: pytest.FixtureRequest, checkpoint_factory: CheckpointFactory) -> Harness:
    return Harness(request.param, checkpoint_factory(family=request.param))


@pytest.fixture(scope="module")
def cases(harness: Harness) -> list[Case]:
    built = [
        Case(_prompt("What is in the picture?", 1), [0]),
        Case(_prompt("hello there, how are you doing today? Tell me about cats.", 0), []),
        Case(_prompt("Compare the two images.", 2), [1, 3]),
        Case(_prompt("Describe it.", 1), [4]),
        Case(_prompt("Is it day or night?", 1), [2]),
        Case(_prompt("Numbers: 1 2 3 4 5 6 7 8 9 10 and some more words", 0), []),
        Case(_prompt("What changed?", 2), [3, 0]),
        Case(_prompt("Colours?", 1), [5]),
    ]
    for case in built:
        case.reference = harness.reference(case)
    return built


# --- 1. selection and the checkpoint split ------------------------------------------------------------------------


def test_the_config_selects_its_family(harness: Harness) -> None:
    family = family_for_config(AutoConfig.from_pretrained(harness.path))
    assert type(family) is harness.family_class and family.name == harness.name
    assert harness.family_class.architectures[0] in supported_architectures()
    assert family.position_dims == 3 and family.tokens_per_image(harness.processor) is None
    # Neither family takes the other's config (Qwen2_5_VLFamily subclasses Qwen2VLFamily).
    others = [cls for cls, _ in FAMILIES.values() if cls is not harness.family_class]
    assert not any(other.matches(harness.model.config) for other in others)


def _in_memory_layout(src: Path, dst: Path) -> Path:
    """A copy with the in-memory names: model.visual.X, model.language_model.X, lm_head.weight."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {
        ("model." + key if key.startswith("visual.") else key.replace("model.", "model.language_model.", 1)): tensor
        for key, tensor in tensors.items()
    }
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _check_halves(path: Path, model: PreTrainedModel, family: ModelFamily) -> None:
    halves = {key: family.classify(key) for key in _stored_keys(path)}
    assert [key for key, half in halves.items() if half is None] == []
    assert {half[0] for half in halves.values() if half is not None} == {"vision", "text"}
    num_vision = sum(1 for half in halves.values() if half is not None and half[0] == "vision")
    vision, text = load_vision_half(path), load_text_half(path)
    assert len(vision.report.tensors_read) == num_vision and vision.report.tensors_skipped == 0
    assert len(text.report.tensors_read) == len(halves) - num_vision and text.report.tensors_skipped == 0
    saved = model.model.state_dict()
    for name, tensor in vision.module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    for name, tensor in text.model.model.state_dict().items():
        assert torch.equal(tensor, saved[f"language_model.{name}"]), name
    assert torch.equal(text.model.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_every_stored_tensor_belongs_to_one_half_and_halves_equal_hf(
    harness: Harness, tmp_path: Path, layout: str
) -> None:
    path = harness.path
    keys = _stored_keys(path)
    assert {key.split(".")[0] for key in keys} == {"visual", "model", "lm_head"}  # the hub layout
    if layout == "in_memory":
        path = _in_memory_layout(path, tmp_path / "in_memory")
        reloaded = harness.model_class.from_pretrained(path).state_dict()  # HF reads this layout too
        assert all(torch.equal(tensor, reloaded[name]) for name, tensor in harness.model.state_dict().items())
    _check_halves(path, harness.model, harness.family)


def test_tied_head_is_absent_from_the_checkpoint_and_shared(
    harness: Harness, checkpoint_factory: CheckpointFactory
) -> None:
    """Qwen2-VL-2B / Qwen2.5-VL-3B: `tie_word_embeddings` on the outer config only, no lm_head tensor stored."""
    path = checkpoint_factory(family=harness.name, tie_word_embeddings=True)
    assert "lm_head.weight" not in _stored_keys(path)
    model = harness.model_class.from_pretrained(path).eval()
    _check_halves(path, model, family_for_config(model.config))
    text = load_text_half(path)
    assert text.model.lm_head.weight is text.model.get_input_embeddings().weight
    # The engine on the tied checkpoint still equals HF.
    tied = Harness(harness.name, path)
    case = Case(_prompt("What is in the picture?", 1), [1])
    outputs = drive(tied.engine(), {0: [tied.request("tied", case)]})
    assert tokens(outputs["tied"]) == tied.reference(case)


def test_fingerprint_follows_the_vision_settings(harness: Harness, tmp_path: Path) -> None:
    """Settings the weights' shapes do not imply change every image key."""
    fingerprint = encoder_fingerprint(harness.path, dtype="float32")
    edits = {"hidden_act": "gelu", "num_heads": 2}
    if harness.name == "qwen2_5_vl":
        edits |= {"window_size": 64, "fullatt_block_indexes": [0, 2]}
    for name, value in edits.items():
        edited = shutil.copytree(harness.path, tmp_path / name)
        config = json.loads((edited / "config.json").read_text())
        config["vision_config"][name] = value
        (edited / "config.json").write_text(json.dumps(config))
        assert encoder_fingerprint(edited, dtype="float32") != fingerprint, name


def test_the_images_only_processor_is_hf_processor(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The family's processor is HF's class less its video processor: same outputs as HF's own class (built here
    with its torchvision-only class check switched off), and the checkpoint names HF's class as the hub's do."""
    processor = harness.processor
    hf_class = HF_PROCESSORS[harness.name]
    assert isinstance(processor, hf_class) and type(processor).get_attributes() == ["image_processor", "tokenizer"]
    assert json.loads((harness.path / "processor_config.json").read_text())["processor_class"] == hf_class.__name__
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None)
    hf = hf_class(processor.image_processor, processor.tokenizer, None, chat_template=processor.chat_template)
    images = [_image(30, 50), _image(97, 33, 1)]
    prompt = _prompt("Compare the two images.", 2)
    ours = processor(text=prompt, images=images, return_tensors="pt")
    theirs = hf(text=prompt, images=images, return_tensors="pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sizes = [[30, 50], [97, 33], [700, 1000]]
    assert processor._get_num_multimodal_tokens(image_sizes=sizes) == hf._get_num_multimodal_tokens(image_sizes=sizes)


# --- 2. token counts and features -----------------------------------------------------------------------------------


def test_num_image_tokens_is_what_the_processor_expands_to(harness: Harness) -> None:
    family, processor = harness.family, harness.processor
    counts = set()
    for height, width in SIZES:
        inputs = processor(text=f"a {IMAGE} b", images=[_image(height, width)], return_tensors="pt")
        expanded = int((inputs["input_ids"] == family.image_token_id).sum())
        assert family.num_image_tokens(processor, (height, width)) == expanded, (height, width)
        counts.add(expanded)
    assert len(counts) >= 5  # the small pixel budget really gives different counts for different sizes


def test_features_and_layout_equal_hf_bit_for_bit(harness: Harness) -> None:
    half = load_vision_half(harness.path)
    family, processor = half.family, harness.processor
    prepared: list[PreparedImage] = []
    for height, width in [(32, 32), (30, 50), (64, 40), (24, 96), (300, 10), (1000, 700), (97, 33)]:
        image = _image(height, width)
        inputs = processor(text=IMAGE, images=[image], return_tensors="pt")
        item = family.prepare_image(processor, image, None)
        prepared.append(item)
        with torch.inference_mode():
            reference = harness.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            ours = family.image_features(half.module, collate([item]))
        assert family.image_layout(item) == tuple(inputs["image_grid_thw"][0].tolist())
        assert len(ours) == 1 and ours[0].shape[0] == int((inputs["input_ids"] == family.image_token_id).sum())
        assert torch.equal(ours[0], reference.pooler_output[0]), (height, width)
    # Images of different sizes in one forward: their patches concatenated, exactly as HF batches them.
    batch = collate(prepared[:3])
    with torch.inference_mode():
        reference = harness.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        ours = family.image_features(half.module, batch)
    assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_vision_encoder_encodes_images_of_different_sizes_in_one_call(harness: Harness) -> None:
    encoder = VisionEncoder(ModelConfig(model=str(harness.path)))
    assert encoder.tokens_per_image is None and encoder.image_placeholder == "<|image_pad|>"
    # (30, 50) twice (other seeds): the same grid, so they share one forward pass.
    sizes = [(30, 50), (64, 40), (1000, 700), (30, 50), (300, 10)]
    images = [_image(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    embeddings = encoder.encode(images)
    for image, embedding in zip(images, embeddings, strict=True):
        inputs = harness.processor.image_processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            reference = harness.model.get_image_features(**inputs).pooler_output[0]
        assert embedding.shape == reference.shape and embedding.shape[0] == encoder.num_image_tokens(image)
        torch.testing.assert_close(embedding, reference, rtol=0, atol=1e-5)  # bit for bit when alone
        prepared = encoder.prepare(image)
        (alone,) = encoder.encode_prepared([prepared])
        assert torch.equal(alone.tensor, reference) and alone.layout == tuple(inputs["image_grid_thw"][0].tolist())


# --- 3. token ids and positions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [[], [1], [0, 3], [4, 5]], ids=["text", "one", "two", "two-delta0-last"])
def test_token_ids_and_positions_equal_hf(harness: Harness, images: list[int]) -> None:
    case = Case(_prompt("What is it?", len(images)), images)
    tokenized = harness.tokenize(case)
    inputs = harness.hf_inputs(case)
    assert tokenized.token_ids == inputs["input_ids"][0].tolist()
    grid = inputs.get("image_grid_thw")
    positions, delta = harness.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid
    )  # [3, 1, T], [1, 1]
    if not images:
        # HF's text-only positions are the indices on every axis, delta 0: the engine's default (no plan).
        assert tokenized.positions is None
        assert torch.equal(positions[:, 0], torch.arange(len(tokenized.token_ids)).expand(3, -1))
        assert int(delta) == 0
        return
    assert tokenized.positions is not None
    assert torch.equal(torch.tensor(tokenized.positions.positions), positions[:, 0])
    assert tokenized.positions.delta == int(delta) != 0
    assert [(span.offset, span.length) for span in tokenized.image_spans] == [
        (start, int(length)) for start, length in _runs(inputs["mm_token_type_ids"][0])
    ]


def _runs(token_types: torch.Tensor) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index, kind in enumerate(token_types.tolist()):
        if kind and runs and sum(runs[-1]) == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif kind:
            runs.append((index, 1))
    return runs


def test_prompts_the_positions_cannot_serve_are_refused(harness: Harness) -> None:
    (first, grid_a), (second, grid_b) = harness.features(1), harness.features(3)
    keys, rows = ["a", "b"], [len(first), len(second)]
    with pytest.raises(InvalidPrompt, match="touch"):  # HF would read two touching images as one
        touching = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        harness.inputs.tokenize(touching, keys, rows, [grid_a, grid_b])
    with pytest.raises(InvalidPrompt, match="no patch grid"):
        harness.inputs.tokenize(_prompt("hi", 1), keys[:1], rows[:1], [()])
    with pytest.raises(InvalidPrompt, match="embedding rows"):
        harness.inputs.tokenize(_prompt("hi", 1), keys[:1], rows[:1], [grid_b])
    assert harness.inputs.tokenize(_prompt("hi", 2), keys, rows, [grid_a, grid_b]).positions is not None


def test_chat_template_renders_the_prompts_tested_here(harness: Harness) -> None:
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}]
    assert harness.inputs.render_chat([{"role": "user", "content": content}]) == _prompt("Compare the two images.", 2)


# --- 4. the engine against generate ---------------------------------------------------------------------------------


def _arrivals(harness: Harness, cases: list[Case], **tokenized: TokenizedPrompt) -> dict[int, list[EngineRequest]]:
    """Two at once, then one every other step (request r{i} for case i)."""
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(cases):
        request = harness.request(f"r{i}", case, tokenized.get(f"r{i}"))
        arrivals.setdefault(max(0, 2 * i - 1), []).append(request)
    return arrivals


def test_engine_images_have_different_token_counts(harness: Harness) -> None:
    rows = [len(harness.features(i)[0]) for i in range(5)]
    assert len(set(rows)) == len(rows), rows
    assert harness.tokenize(Case(_prompt("x", 1), [5])).positions.delta == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"num_kv_blocks": 40, "max_num_batched_tokens": 16}, id="preemption"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, cases: list[Case], settings: dict) -> None:
    engine = harness.engine(**settings)
    outputs = drive(engine, _arrivals(harness, cases))
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption


def test_prefill_chunks_end_at_every_token_in_and_around_the_images(harness: Harness, cases: list[Case]) -> None:
    """A two-image prompt (with a one-image prompt beside it) under token budgets 1..8: over the sweep its prefill
    chunks end at every token from just before the first image to just after the second."""
    two, one = cases[2], cases[3]
    spans = harness.tokenize(two).image_spans
    wanted = set(range(spans[0].offset - 1, spans[-1].end + 2))
    boundaries: set[int] = set()
    for budget in range(1, 9):

        def record(step: int, engine: LLMEngine) -> None:
            request = engine.scheduler.get_request("two")
            if request is not None and request.num_output_tokens == 0:
                boundaries.add(request.num_computed_tokens)

        engine = harness.engine(max_num_batched_tokens=budget)
        outputs = drive(engine, {0: [harness.request("two", two), harness.request("one", one)]}, record)
        assert tokens(outputs["two"]) == two.reference, f"budget {budget}"
        assert tokens(outputs["one"]) == one.reference, f"budget {budget}"
    assert wanted <= boundaries, sorted(wanted - boundaries)


def test_index_positions_or_a_dropped_delta_change_the_tokens(harness: Harness, cases: list[Case]) -> None:
    """Negative controls: the same batch with M-RoPE replaced by token indices, or with the plan's delta set to
    0, gives other tokens than HF, so the exact matches above depend on the planned positions."""
    planned = {f"r{i}": harness.tokenize(case) for i, case in enumerate(cases)}
    with_images = [i for i, case in enumerate(cases) if case.images]
    index_positions = {rid: replace(t, positions=None) for rid, t in planned.items()}
    no_delta = {
        rid: replace(t, positions=replace(t.positions, delta=0)) if t.positions else t for rid, t in planned.items()
    }
    for variant, affected in (
        (index_positions, with_images),
        (no_delta, [i for i in with_images if planned[f"r{i}"].positions.delta != 0]),  # type: ignore[union-attr]
    ):
        # Long enough references to show a difference (a random model may emit <|im_end|> at once).
        assert affected and all(len(cases[i].reference) >= 3 for i in affected)
        outputs = drive(harness.engine(max_num_batched_tokens=16), _arrivals(harness, cases, **variant))
        for i, case in enumerate(cases):
            generated = tokens(outputs[f"r{i}"])
            assert (generated != case.reference) == (i in affected), f"request r{i} (images {case.images})"


def test_prefix_cache_hits_same_image_and_separates_different_images(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine()
    first = cases[0]
    second = Case(first.prompt, [2])  # same text, another image (another grid and token count)
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
    image_start = harness.tokenize(second).image_spans[0].offset
    assert 0 < usage_c.cached_prompt_tokens <= image_start // BLOCK_SIZE * BLOCK_SIZE
    # Same image, another question: the hit ends inside the image (its last block is shared only in part), and
    # the rest of the prompt is computed from there with the planned positions.
    third = Case(_prompt("Tell me more, please.", 1), [2])
    third.reference = harness.reference(third)
    hit = drive(engine, {0: [harness.request("d", third)]})
    assert tokens(hit["d"]) == third.reference
    usage_d, span = hit["d"][-1].usage, harness.tokenize(third).image_spans[0]
    assert usage_d is not None and span.offset < usage_d.cached_prompt_tokens < span.end


def test_abort_mid_way_leaves_others_unchanged(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_batched_tokens=9)
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases[:6])]}
    # r1 (text) mid-prefill, r2 (two images) with its prefill stopped inside an image, r4 while decoding.
    phases = {"r1": "prefill", "r2": "inside-image", "r4": "decode"}
    abort_in_phases(engine, arrivals, phases, [case.reference for case in cases[:6]])
