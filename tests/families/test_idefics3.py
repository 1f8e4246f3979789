"""Idefics3 and SmolVLM (image splitting into a tile grid, pixel-shuffle connector) against Hugging Face, float32 CPU.

The checkpoint split (both stored layouts, the head tied as HF ties it), the processor's tile grid and token count,
`get_image_features` bit for bit, the prompt's token ids and image runs (an image is rows * cols + 1 runs of image
tokens between the processor's row/column tags), and greedy tokens through the engine equal to the checkpoint's own
class's `generate(do_sample=False)` in every batch composition the scheduler makes: images of different grids
together, several images per prompt, text-only prompts, staggered arrivals, prefill chunks that end inside a tile
and between tiles, preemption, prefix-cache hits and aborts.

SmolVLM's own processor (`SmolVLMProcessor`) cannot be constructed without torchvision in transformers 5.24, so the
SmolVLM checkpoint here carries Idefics3's processor with SmolVLM's image processor: the image tensors and the image
prompt text are the same (`test_smolvlm_prompt_text_is_idefics3s`), the model classes are SmolVLM's own.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    Idefics3ForConditionalGeneration,
    PreTrainedModel,
    SmolVLMForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor, get_image_prompt_string

from common.checkpoint import load_processor, load_text_half, load_vision_half
from common.config import EngineConfig, ModelConfig
from common.images.vision_encoder import VisionEncoder
from common.models import family_for_config, supported_architectures
from common.models.base import ModelFamily, collate
from common.models.idefics3 import Idefics3Family, SmolVLMFamily, processor_loads_without_torchvision
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.request import Request
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor, InvalidPrompt, TokenizedPrompt
from tests.conftest import CheckpointFactory
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER
from tests.families.support import abort_in_phases

pytestmark = pytest.mark.skipif(
    not processor_loads_without_torchvision(),
    reason="this transformers release loads Idefics3/SmolVLM processors only with torchvision (not installed)",
)

MAX_TOKENS = 12
BLOCK_SIZE = 4
TILE_TOKENS = 9  # the tiny builder's image_seq_len: (48 / 8)^2 patches / 2^2
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "unsplit": Idefics3ForConditionalGeneration,
}
FAMILY_CLASSES: dict[str, type[ModelFamily]] = {
    "idefics3": Idefics3Family,
    "smolvlm": SmolVLMFamily,
    "unsplit": Idefics3Family,
}
# (height, width): every grid the tiny processor makes (longest edge 3 tiles), both orientations, lines, huge.
SIZES = [
    (1, 1), (5, 3), (48, 48), (47, 49), (64, 32), (32, 64), (96, 32), (32, 96), (60, 40), (40, 60), (300, 10),
    (10, 300), (1, 200), (200, 1), (17, 200), (700, 1000), (1000, 700), (2000, 2000), (451, 300), (97, 33),
    (145, 96), (96, 145), (144, 48), (49, 144),
]  # fmt: skip


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A structured RGB image (a Mandelbrot view differing per seed): flat colours would hide layout bugs."""
    left = -2.0 + 0.1 * seed
    return Image.effect_mandelbrot((width, height), (left, -1.5, left + 3.0, 1.5), 40).convert("RGB")


def _engine_images() -> list[Image.Image]:
    """Grids 2 x 3 (the cat), 3 x 2, 3 x 3, 1 x 3 and 3 x 1: three token counts (63, 90, 36); then another 2 x 3
    image (the same prompt tokens as the cat's, only the image differs)."""
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    strip = Image.linear_gradient("L").convert("RGB").resize((96, 24))
    return [cat, _image(60, 40, seed=1), _image(64, 64, seed=2), strip, _image(90, 20, seed=3), _image(200, 300, 4)]


def _prompt(question: str, num_images: int) -> str:
    """What the demo chat template renders for one user message (images first)."""
    return f"User:{'<image>' * num_images}{question}<end_of_utterance>\nAssistant:"


@pytest.fixture(scope="module")
def paths(checkpoint_factory: CheckpointFactory) -> dict[str, Path]:
    return {
        "idefics3": checkpoint_factory(family="idefics3"),
        "smolvlm": checkpoint_factory(family="smolvlm"),
        "unsplit": checkpoint_factory(family="idefics3", image_splitting=False),
    }


@dataclass
class Case:
    prompt: str
    images: list[int]
    reference: list[int] = field(default_factory=list)


class Harness:
    """HF's model and processor for one checkpoint; HF's own features per image, and engine requests."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.processor = load_processor(path)  # SmolVLM: HF's processor less its video processor
        self.model = MODEL_CLASSES[name].from_pretrained(path).eval()
        self.family = family_for_config(self.model.config)
        self.inputs = InputProcessor(self.processor, self.family)
        self.images = _engine_images()
        self._features: dict[int, torch.Tensor] = {}
        self._cases: list[Case] | None = None

    def hf_inputs(self, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return dict(self.processor(text=prompt, images=images or None, return_tensors="pt"))

    def reference(self, case: Case) -> list[int]:
        inputs = self.hf_inputs(case.prompt, [self.images[i] for i in case.images])
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]

    def features(self, index: int) -> torch.Tensor:
        """HF's get_image_features for one image alone: [tiles * TILE_TOKENS, hidden]."""
        if index not in self._features:
            inputs = self.processor.image_processor(images=[self.images[index]], return_tensors="pt")
            with torch.inference_mode():
                self._features[index] = self.model.get_image_features(**inputs).pooler_output[0]
        return self._features[index]

    def layout(self, index: int) -> tuple[int, int]:
        out = self.processor.image_processor(images=[self.images[index]], return_row_col_info=True)
        return int(out["rows"][0][0]), int(out["cols"][0][0])

    def tokenized(self, case: Case) -> TokenizedPrompt:
        return self.inputs.tokenize(
            case.prompt,
            [f"image-{i}" for i in case.images],
            [self.features(i).shape[0] for i in case.images],
            [self.layout(i) for i in case.images],
        )

    def request(self, request_id: str, case: Case) -> EngineRequest:
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        return self.tokenized(case).engine_request(
            request_id, sampling, {f"image-{i}": self.features(i) for i in case.images}
        )

    def engine(self, **overrides: object) -> LLMEngine:
        settings: dict = {"block_size": BLOCK_SIZE, "num_kv_blocks": 512, "max_num_batched_tokens": 512}
        settings.update(overrides)
        model = ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER)
        return LLMEngine.from_config(EngineConfig(model=model, **settings))

    @property
    def cases(self) -> list[Case]:
        """The engine prompts with HF's references, computed once."""
        if self._cases is None:
            self._cases = [
                Case(_prompt("What is in the picture?", 1), [0]),
                Case(_prompt("hello there, how are you doing today? Tell me about cats.", 0), []),
                Case(_prompt("Compare the two images.", 2), [1, 3]),
                Case(_prompt("Describe the image in one sentence.", 1), [4]),
                Case(_prompt("Is it day or night?", 1), [2]),
                Case(_prompt("Numbers: 1 2 3 4 5 6 7 8 9 10 and some more words", 0), []),
                Case(_prompt("What changed?", 2), [3, 0]),
                Case(_prompt("Colours?", 1), [1]),
            ]
            for case in self._cases:
                case.reference = self.reference(case)
        return self._cases


@pytest.fixture(scope="module")
def harnesses(paths: dict[str, Path]) -> dict[str, Harness]:
    return {name: Harness(name, path) for name, path in paths.items()}


# --- 1. family selection and the checkpoint split -----------------------------------------------------------------


def test_config_selects_the_family(harnesses: dict[str, Harness]) -> None:
    for name, harness in harnesses.items():
        family = family_for_config(AutoConfig.from_pretrained(harness.path))
        assert type(family) is FAMILY_CLASSES[name], name
        assert family.architectures[0] in supported_architectures()
        assert family.architectures[0] == harness.model.config.architectures[0]
    assert harnesses["idefics3"].family.tokens_per_image(harnesses["idefics3"].processor) is None  # grids vary
    assert harnesses["unsplit"].family.tokens_per_image(harnesses["unsplit"].processor) == TILE_TOKENS


def _stored_keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def _without_model_prefix(src: Path, dst: Path) -> Path:
    """A copy in the layout of a bare `Idefics3Model` save (+ the head): `vision_model.X`, `text_model.X`, ..."""
    dst.mkdir()
    for file in src.iterdir():
        if file.name != "model.safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    tensors = {key.removeprefix("model."): tensor for key, tensor in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", ["save_pretrained", "bare_model"])
@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_every_stored_tensor_belongs_to_one_half_and_halves_equal_hf(
    harnesses: dict[str, Harness], tmp_path: Path, name: str, layout: str
) -> None:
    """5.x save_pretrained writes the in-memory names, which are also the hub checkpoints' names (no conversion
    mapping exists for these classes); a bare-model layout (no `model.` prefix) is read too."""
    harness = harnesses[name]
    path = harness.path
    if layout == "bare_model":
        path = _without_model_prefix(path, tmp_path / "bare")
        assert any(key.startswith("text_model.") for key in _stored_keys(path))
    else:
        assert {key.split(".")[0] for key in _stored_keys(path)} == {"model", "lm_head"}
    family = family_for_config(AutoConfig.from_pretrained(path))
    halves = {key: family.classify(key) for key in _stored_keys(path)}
    assert [key for key, half in halves.items() if half is None] == []
    assert {half[1].split(".")[0] for half in halves.values() if half is not None} == {
        "vision_model", "connector", "model", "lm_head",
    }  # fmt: skip
    vision, text = load_vision_half(path), load_text_half(path)
    num_vision = sum(1 for half in halves.values() if half is not None and half[0] == "vision")
    assert len(vision.report.tensors_read) == num_vision and vision.report.tensors_skipped == 0
    assert len(text.report.tensors_read) == len(halves) - num_vision and text.report.tensors_skipped == 0
    # Equal to the saved model's tensors, and to what HF itself loads from these files.
    saved = harness.model.model.state_dict()
    reloaded = MODEL_CLASSES[name].from_pretrained(path).model.state_dict()
    for tensor_name, tensor in vision.module.state_dict().items():
        assert torch.equal(tensor, saved[tensor_name]) and torch.equal(tensor, reloaded[tensor_name]), tensor_name
    for tensor_name, tensor in text.model.model.state_dict().items():
        assert torch.equal(tensor, saved[f"text_model.{tensor_name}"]), tensor_name
    assert torch.equal(text.model.lm_head.weight, harness.model.lm_head.weight)


@pytest.mark.parametrize("tied", [False, True], ids=["text-config-says-tied", "top-level-says-tied"])
def test_head_is_tied_as_hf_ties_it(harnesses: dict[str, Harness], tmp_path: Path, tied: bool) -> None:
    """HF ties Idefics3's head by the top-level `tie_word_embeddings`, whatever the text config says."""
    path = _without_model_prefix(harnesses["idefics3"].path, tmp_path / "copy")  # any layout; a writable copy
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    config["text_config"]["tie_word_embeddings"] = not tied
    (path / "config.json").write_text(json.dumps(config))
    if tied:  # a tied checkpoint stores no head
        tensors = load_file(str(path / "model.safetensors"))
        del tensors["lm_head.weight"]
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = Idefics3ForConditionalGeneration.from_pretrained(path)
    text = load_text_half(path)
    embedding = text.model.get_input_embeddings().weight
    assert isinstance(embedding, torch.Tensor)
    assert torch.equal(text.model.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(text.model.lm_head.weight, embedding) is tied


# --- 2. image features, tile grids and token counts ---------------------------------------------------------------


def _grid_in_text(processor: Any, input_ids: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) from the <row_i_col_j> tags the processor wrote ((0, 0) for an unsplit image)."""
    tags = processor.tokenizer.convert_ids_to_tokens(input_ids.tolist())
    cells = [tuple(map(int, match.groups())) for tag in tags if (match := re.fullmatch(r"<row_(\d+)_col_(\d+)>", tag))]
    return (max(row for row, _ in cells), max(col for _, col in cells)) if cells else (0, 0)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm", "unsplit"])
def test_features_equal_hf_get_image_features_bit_for_bit(harnesses: dict[str, Harness], name: str) -> None:
    harness = harnesses[name]
    half = load_vision_half(harness.path)
    family, processor = half.family, harness.processor
    grids = set()
    for height, width in [(48, 48), (60, 40), (24, 96), (300, 10), (1000, 700), (97, 33), (5, 3)]:
        image = _image(height, width)
        inputs = processor(text="<image>", images=[image], return_tensors="pt")
        prepared = family.prepare_image(processor, image, None)
        with torch.inference_mode():
            reference = harness.model.get_image_features(
                pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
            )
            ours = family.image_features(half.module, collate([prepared]))
        assert len(ours) == 1
        assert torch.equal(ours[0], reference.pooler_output[0]), (height, width)
        assert ours[0].shape[0] == int((inputs["input_ids"] == family.image_token_id).sum())
        layout = family.image_layout(prepared)
        assert layout == _grid_in_text(processor, inputs["input_ids"][0]), (height, width)
        rows, cols = layout
        assert inputs["pixel_values"].shape[1] == rows * cols + 1  # the tiles, then the global image
        grids.add(layout)
    if name == "unsplit":
        assert grids == {(0, 0)}
    else:
        assert len(grids) >= 4  # the sizes really give different grids


@pytest.mark.parametrize("name", ["idefics3", "unsplit"])
def test_num_image_tokens_is_what_the_processor_expands_to(harnesses: dict[str, Harness], name: str) -> None:
    harness = harnesses[name]
    family, processor = harness.family, harness.processor
    counts = set()
    for height, width in SIZES:
        inputs = processor(text="a <image> b", images=[_image(height, width)], return_tensors="pt")
        expanded = int((inputs["input_ids"] == family.image_token_id).sum())
        assert family.num_image_tokens(processor, (height, width)) == expanded, (height, width)
        counts.add(expanded)
    # Split: the longest edge is always 3 tiles, so 1 x 3, 2 x 3 and 3 x 3 grids (either way round) and the
    # global tile: 4, 7 or 10 tiles. Unsplit: always one tile.
    assert counts == ({TILE_TOKENS} if name == "unsplit" else {TILE_TOKENS * n for n in (4, 7, 10)})


# --- 3. the prompt ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["idefics3", "smolvlm", "unsplit"])
@pytest.mark.parametrize("images", [[], [2], [3, 0], [1, 1]], ids=["text", "one", "two", "same-twice"])
def test_prompt_token_ids_and_image_runs_equal_hf(harnesses: dict[str, Harness], name: str, images: list[int]) -> None:
    harness = harnesses[name]
    case = Case(_prompt("What is it?", len(images)), images)
    expected = harness.hf_inputs(case.prompt, [harness.images[i] for i in images])["input_ids"][0].tolist()
    tokenized = harness.tokenized(case)
    assert tokenized.token_ids == expected
    # The spans cover exactly the image tokens; each image's runs hold its rows in order, one tile each (the
    # order in which HF's masked_scatter fills them).
    image_positions = [i for i, token in enumerate(expected) if token == harness.family.image_token_id]
    assert [p for span in tokenized.image_spans for p in range(span.offset, span.end)] == image_positions
    expected_spans = []
    for image in images:
        rows, cols = harness.layout(image)
        expected_spans += [(f"image-{image}", TILE_TOKENS, TILE_TOKENS * k) for k in range(rows * cols + 1)]
    assert [(span.key, span.length, span.row_offset) for span in tokenized.image_spans] == expected_spans


def test_tile_order_decides_the_output(harnesses: dict[str, Harness]) -> None:
    """Negative control for the run order: the same rows with two tiles swapped give HF other tokens, so the
    engine's exact match means each run got its own tile's rows."""
    harness = harnesses["idefics3"]
    case = harness.cases[0]
    features = harness.features(case.images[0])  # [7 tiles * 9, hidden]: a 2 x 3 grid and the global tile
    swapped = torch.cat([features[TILE_TOKENS : 2 * TILE_TOKENS], features[:TILE_TOKENS], features[2 * TILE_TOKENS :]])
    inputs = harness.hf_inputs(case.prompt, [harness.images[i] for i in case.images])
    with torch.inference_mode():
        out = harness.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=swapped)},
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    assert [int(t) for t in out[0, inputs["input_ids"].shape[1] :]] != case.reference


def test_prompt_needs_the_layout_and_matching_rows(harnesses: dict[str, Harness]) -> None:
    harness = harnesses["idefics3"]
    prompt = _prompt("What is it?", 1)
    rows = harness.features(2).shape[0]  # a 3 x 3 grid: 90 rows
    with pytest.raises(InvalidPrompt, match="tile grid"):
        harness.inputs.tokenize(prompt, ["k"], [rows])  # no layout
    with pytest.raises(InvalidPrompt, match="90 embedding rows"):
        harness.inputs.tokenize(prompt, ["k"], [rows - TILE_TOKENS], [(3, 3)])


def test_smolvlm_prompt_text_is_idefics3s(harnesses: dict[str, Harness]) -> None:
    """SmolVLMProcessor's image text (its module function) equals Idefics3Processor's for every grid, so the
    Idefics3 processor the test checkpoint carries writes SmolVLM's prompts."""
    processor = harnesses["smolvlm"].processor
    for rows, cols in [(0, 0), *((r, c) for r in range(1, 7) for c in range(1, 7))]:
        smolvlm = get_image_prompt_string(
            rows, cols, TILE_TOKENS, "<fake_token_around_image>", "<image>", "<global-img>"
        )
        idefics3 = processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, image_idx=0)
        assert smolvlm == idefics3, (rows, cols)


def test_smolvlm_checkpoint_names_hf_processor_and_loads_images_only(harnesses: dict[str, Harness]) -> None:
    """SmolVLM's own processor class, less its video processor (torchvision): the saved config names HF's."""
    path = harnesses["smolvlm"].path
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    processor = load_processor(path)
    assert isinstance(processor, SmolVLMProcessor) and not hasattr(processor, "video_processor")


# --- 4. the engine against generate -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def harness(request: pytest.FixtureRequest, harnesses: dict[str, Harness]) -> Harness:
    return harnesses[request.param]


def test_chat_template_renders_the_prompts_tested_here(harness: Harness) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert harness.inputs.render_chat(messages) == _prompt("What is it?", 1)


def test_engine_images_have_different_grids(harness: Harness) -> None:
    layouts = [harness.layout(i) for i in range(5)]
    assert len(set(layouts)) == len(layouts) and (0, 0) not in layouts, layouts
    assert harness.layout(5) == layouts[0]
    rows = [harness.features(i).shape[0] for i in range(5)]
    assert rows == [TILE_TOKENS * (r * c + 1) for r, c in layouts] and len(set(rows)) == 3, rows


def _split_points(request_id: str, engine: LLMEngine, seen: set[str]) -> None:
    """Record where a request's prefill stopped: inside a tile's run, or between two runs of one image."""
    request = engine.scheduler.get_request(request_id)
    if request is None or not 0 < request.num_computed_tokens < request.num_prompt_tokens:
        return
    computed, spans = request.num_computed_tokens, request.image_spans
    if any(span.offset < computed < span.end for span in spans):
        seen.add("inside-tile")
    if any(a.key == b.key and a.end <= computed <= b.offset for a, b in itertools.pairwise(spans)):
        seen.add("between-tiles")


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-prefill"),
        pytest.param({"num_kv_blocks": 72, "max_num_batched_tokens": 32}, id="preemption"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, settings: dict) -> None:
    engine = harness.engine(**settings)
    # Two at once, then one every other step: images of different grids, text-only and two-image prompts mixed.
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(harness.cases):
        arrivals.setdefault(max(0, 2 * i - 1), []).append(harness.request(f"r{i}", case))
    seen: set[str] = set()

    def record_split_points(step: int, engine: LLMEngine) -> None:
        for i in range(len(harness.cases)):
            _split_points(f"r{i}", engine, seen)

    outputs = drive(engine, arrivals, record_split_points)
    for i, case in enumerate(harness.cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption
    if settings.get("max_num_batched_tokens") == 7:
        assert seen == {"inside-tile", "between-tiles"}  # chunks really ended inside tiles and between them


def test_unsplit_images_match_hf(harnesses: dict[str, Harness]) -> None:
    harness = harnesses["unsplit"]
    engine = harness.engine(max_num_batched_tokens=7)
    cases = harness.cases[:4]
    outputs = drive(engine, {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases)]})
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"


@pytest.mark.parametrize("other", [2, 5], ids=["other-grid", "same-grid"])
def test_prefix_cache_hits_same_image_and_separates_different_images(harness: Harness, other: int) -> None:
    engine = harness.engine()
    first = harness.cases[0]
    # Same text, another image: of another grid, or of the same grid (then the prompt's tokens are the same as
    # the first's; only the image keys in the block hashes keep the two apart).
    second = Case(first.prompt, [other])
    second.reference = harness.reference(second)
    out = drive(engine, {0: [harness.request("a", first)]})
    again = drive(engine, {0: [harness.request("b", first)]})
    other_out = drive(engine, {0: [harness.request("c", second)]})
    assert tokens(out["a"]) == tokens(again["b"]) == first.reference
    assert tokens(other_out["c"]) == second.reference
    assert second.reference != first.reference  # the image really decides the output
    if other == 5:
        assert harness.request("x", second).prompt_token_ids == harness.request("y", first).prompt_token_ids
    usage_a, usage_b, usage_c = (o[-1].usage for o in (out["a"], again["b"], other_out["c"]))
    assert usage_a is not None and usage_b is not None and usage_c is not None
    assert usage_a.cached_prompt_tokens == 0
    assert usage_b.cached_prompt_tokens == (usage_b.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    image_start = harness.request("x", second).image_spans[0].offset
    assert 0 < usage_c.cached_prompt_tokens <= image_start // BLOCK_SIZE * BLOCK_SIZE


def test_abort_mid_way_leaves_others_unchanged(harness: Harness) -> None:
    engine = harness.engine(max_num_batched_tokens=9)
    cases = harness.cases[:6]
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases)]}
    # r1 (text) mid-prefill, r2 (two images) with its prefill stopped inside an image, r4 while decoding.
    phases = {"r1": "prefill", "r2": "inside-image", "r4": "decode"}
    abort_in_phases(
        engine, arrivals, phases, [case.reference for case in cases], inside_image=_between_first_and_last_run
    )


def _between_first_and_last_run(request: Request, computed: int) -> bool:
    """Inside an image's tokens, which come in several runs (between tiles too)."""
    spans = request.image_spans
    return bool(spans) and spans[0].offset < computed < spans[-1].end


# --- 5. the vision encoder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_vision_encoder_encodes_images_of_different_grids_in_one_call(harnesses: dict[str, Harness], name: str) -> None:
    harness = harnesses[name]
    encoder = VisionEncoder(ModelConfig(model=str(harness.path)))
    assert encoder.tokens_per_image is None
    # (60, 40) and (600, 400) both get a 3 x 2 grid (7 tiles): they share one forward pass.
    sizes = [(60, 40), (24, 96), (600, 400), (48, 48), (300, 10)]
    images = [_image(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    embeddings = encoder.encode(images)
    prepared = [encoder.prepare(image) for image in images]
    assert prepared[0].batch_signature == prepared[2].batch_signature
    for image, item, embedding in zip(images, prepared, embeddings, strict=True):
        inputs = harness.processor.image_processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            reference = harness.model.get_image_features(**inputs).pooler_output[0]
        assert embedding.shape == reference.shape
        assert embedding.shape[0] == encoder.num_image_tokens(image)
        # Batched with another image of the same tile count: equal within float32 noise (bit for bit alone).
        torch.testing.assert_close(embedding, reference, rtol=0, atol=1e-5)
        alone = encoder.encode_prepared([item])[0]
        assert torch.equal(alone.tensor, reference)
        assert (
            alone.layout
            == harness.family.image_layout(item)
            == _grid_in_text(harness.processor, harness.hf_inputs("<image>", [image])["input_ids"][0])
        )
