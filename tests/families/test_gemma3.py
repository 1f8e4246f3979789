"""Gemma 3 (SigLIP + pooling projector + Gemma 3 with image blocks and sliding windows) against Hugging Face.

Float32 on CPU, tiny random checkpoints (an image is 9 tokens; the sliding layers' window is 6, shorter than an
image). Selection and refusals; the checkpoint split in three stored layouts; the features bit for bit; token
counts, prompt ids and attention blocks equal to the processor's, and the prefill masks equal to the ones
`Gemma3Model` builds for every chunk the scheduler may cut; greedy tokens through the engine equal
`Gemma3ForConditionalGeneration.generate(do_sample=False)` in every batch composition (several images, text-only,
staggered arrivals, chunked prefill at every boundary around an image, preemption, prefix hits, aborts), with
negative controls showing that a causal-only mask, wrongly placed blocks or an ignored window change the tokens.
Pan and scan (crops: one image in several runs, each its own block) is covered the same way.
"""

from __future__ import annotations

import copy
import inspect
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration

from common.checkpoint import TextHalf, load_processor, load_text_half, load_vision_half
from common.config import EngineConfig, ModelConfig
from common.errors import CheckpointError
from common.images.vision_encoder import VisionEncoder
from common.models import family_for_config
from common.models.base import collate
from common.models.gemma3 import PAN_AND_SCAN_SETTINGS, Gemma3Family
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.model_runner import ModelRunner
from generator_service.engine.paged_attention import PrefillChunk
from generator_service.engine.request import Request
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import RequestRejected
from generator_service.inputs import InputProcessor
from tests.conftest import CheckpointFactory, to_legacy_hub_layout
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER
from tests.families.support import abort_in_phases

MAX_TOKENS = 12
BLOCK_SIZE = 4
IMAGE_TOKENS = 9  # the tiny builder's mm_tokens_per_image
WINDOW = 6  # the tiny builder's sliding window
PLACEHOLDER = "<start_of_image>"
SIZES = [
    (48, 48), (1, 1), (5, 3), (60, 40), (40, 60), (48, 150), (150, 48), (48, 200), (200, 60), (30, 200), (97, 33),
    (700, 1000),
]  # fmt: skip


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A structured RGB image (a Mandelbrot view differing per seed): flat colours would hide layout bugs."""
    left = -2.0 + 0.1 * seed
    return Image.effect_mandelbrot((width, height), (left, -1.5, left + 3.0, 1.5), 40).convert("RGB")


def _engine_images() -> list[Image.Image]:
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    strip = Image.linear_gradient("L").convert("RGB").resize((200, 50))  # 4:1, pan and scan makes 4 crops
    return [cat, _image(60, 40, seed=1), _image(64, 64, seed=2), strip, _image(90, 20, seed=3)]


def _prompt(question: str, num_images: int) -> str:
    """A user turn as Gemma 3's chat template writes it (BOS comes from the tokenizer)."""
    return f"<start_of_turn>user\n{PLACEHOLDER * num_images}{question}<end_of_turn>\n<start_of_turn>model\n"


def _pan_and_scan_kwargs(processor: Any) -> dict[str, Any]:
    """What `processor(...)` must be told to pan and scan as the checkpoint's image-processor config says."""
    image_processor = processor.image_processor
    if not image_processor.do_pan_and_scan:
        return {}
    return {"do_pan_and_scan": True, **{name: getattr(image_processor, name) for name in PAN_AND_SCAN_SETTINGS}}


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        elif flag:
            runs.append((index, index + 1))
    return runs


@dataclass
class Case:
    prompt: str
    images: list[int]
    reference: list[int] = field(default_factory=list)


class Harness:
    """HF's model and processor for one checkpoint; HF's own features per image, and engine requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = Gemma3ForConditionalGeneration.from_pretrained(path).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.call_kwargs = _pan_and_scan_kwargs(self.processor)
        self.family = family_for_config(self.model.config)
        self.inputs = InputProcessor(load_processor(path), self.family)
        self.images = _engine_images()
        self._features: dict[int, torch.Tensor] = {}
        self._text_half: TextHalf | None = None

    def hf_inputs(self, prompt: str, images: list[Image.Image] | None) -> Any:
        return self.processor(text=prompt, images=images, return_tensors="pt", **self.call_kwargs)

    def reference(self, case: Case) -> list[int]:
        inputs = self.hf_inputs(case.prompt, [self.images[i] for i in case.images] or None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]

    def features(self, index: int) -> torch.Tensor:
        """HF's features of one image: [views * 9, hidden] (views = 1 + pan-and-scan crops)."""
        if index not in self._features:
            inputs = self.processor.image_processor(
                images=[self.images[index]], return_tensors="pt", **self.call_kwargs
            )
            with torch.inference_mode():
                pooled = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            self._features[index] = pooled.flatten(0, 1)
        return self._features[index]

    def request(self, request_id: str, case: Case) -> EngineRequest:
        keys = [f"image-{i}" for i in case.images]
        features = {key: self.features(i) for key, i in zip(keys, case.images, strict=True)}
        tokenized = self.inputs.tokenize(case.prompt, keys, [len(features[key]) for key in keys])
        return tokenized.engine_request(request_id, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), features)

    def engine(self, *, own_model: bool = False, **overrides: object) -> LLMEngine:
        """An engine on the shared text half (loaded once), or on its own copy when a test alters the model."""
        settings: dict = {"block_size": BLOCK_SIZE, "num_kv_blocks": 256, "max_num_batched_tokens": 512}
        settings.update(overrides)
        config = EngineConfig(model=ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER), **settings)
        if own_model:
            return LLMEngine.from_config(config)
        if self._text_half is None:
            self._text_half = load_text_half(self.path)
        return LLMEngine(config, self._text_half, self.inputs.processor)


@pytest.fixture(scope="module")
def path(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory(family="gemma3")


@pytest.fixture(scope="module")
def pas_path(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory(family="gemma3", pan_and_scan=True)


@pytest.fixture(scope="module")
def harness(path: Path) -> Harness:
    return Harness(path)


@pytest.fixture(scope="module")
def pas_harness(pas_path: Path) -> Harness:
    return Harness(pas_path)


@pytest.fixture(scope="module")
def cases(harness: Harness) -> list[Case]:
    built = [
        Case(_prompt("What is in the picture?", 1), [0]),
        Case(_prompt("hello there, how are you doing today? Tell me about cats.", 0), []),
        Case(_prompt("Compare the two images.", 2), [1, 3]),
        Case(_prompt("Describe the image in one sentence.", 1), [4]),
        Case(_prompt("Is it day or night?", 1), [2]),
        Case(_prompt("Numbers: 1 2 3 4 5 6 7 8 9 10 and some more words", 0), []),
        Case(_prompt("Which one is the cat? Answer with one word.", 3), [3, 0, 2]),
        Case(_prompt("Colours?", 1), [1]),
    ]
    for case in built:
        case.reference = harness.reference(case)
    return built


# --- selection, refusals, the checkpoint split ---------------------------------------------------------------------


def test_config_selects_the_family(harness: Harness) -> None:
    family = family_for_config(AutoConfig.from_pretrained(harness.path))
    assert isinstance(family, Gemma3Family) and family.name == "gemma3" and family.bidirectional_images
    assert family.image_token_id == harness.processor.tokenizer.image_token_id  # the soft token, not <start_of_image>
    assert family.tokens_per_image(harness.processor) == IMAGE_TOKENS


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.text_config, "use_bidirectional_attention", True), "use_bidirectional_attention"),
        (lambda c: setattr(c, "image_token_index", c.text_config.vocab_size), "outside the language model's vocab"),
    ],
    ids=["bidirectional-text-model", "image-token-outside-vocab"],
)
def test_configs_the_generator_cannot_serve_are_refused(
    harness: Harness, edit: Callable[[Any], None], message: str
) -> None:
    config = copy.deepcopy(harness.model.config)
    edit(config)
    with pytest.raises(CheckpointError, match=message):
        family_for_config(config)


def test_processor_of_other_weights_is_refused(harness: Harness) -> None:
    processor = copy.copy(harness.processor)
    processor.image_seq_length = IMAGE_TOKENS + 1
    with pytest.raises(CheckpointError, match="image_seq_length"):
        harness.family.tokens_per_image(processor)


def _stored_keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def _in_memory_name(key: str) -> str:
    """The module names of Gemma3ForConditionalGeneration (some re-saved hub copies store these)."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return f"model.{key}" if key.startswith(("vision_tower.", "multi_modal_projector.")) else key


def _relayout(src: Path, dst: Path, layout: str) -> Path:
    if layout == "save_pretrained":
        return src
    if layout == "hub":  # google/gemma-3-*: language_model.model.X, vision_tower.vision_model.X
        return to_legacy_hub_layout(src, dst)
    shutil.copytree(src, dst)
    tensors = {_in_memory_name(key): tensor for key, tensor in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", ["save_pretrained", "hub", "in_memory"])
def test_every_stored_tensor_belongs_to_exactly_one_half(harness: Harness, tmp_path: Path, layout: str) -> None:
    path = _relayout(harness.path, tmp_path / layout, layout)
    keys = _stored_keys(path)
    if layout == "hub":
        assert any(key.startswith("vision_tower.vision_model.") for key in keys)
    if layout == "in_memory":
        assert any(key.startswith("model.language_model.") for key in keys)
    assert not any("lm_head" in key for key in keys)  # tied to the embeddings, as in the hub checkpoints
    family = family_for_config(AutoConfig.from_pretrained(path))
    halves = {key: family.classify(key) for key in keys}
    assert [key for key, half in halves.items() if half is None] == []
    num_vision = sum(1 for half in halves.values() if half is not None and half[0] == "vision")
    assert 0 < num_vision < len(keys)

    # Each half reads every tensor of its own half, equal to what HF loads from the same files (so the renamed
    # copy really is a layout Hugging Face reads).
    vision, text = load_vision_half(path), load_text_half(path)
    assert len(vision.report.tensors_read) == num_vision and vision.report.tensors_skipped == 0
    assert len(text.report.tensors_read) == len(keys) - num_vision and text.report.tensors_skipped == 0
    reference = Gemma3ForConditionalGeneration.from_pretrained(path).eval()
    saved = reference.model.state_dict()
    for name, tensor in vision.module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    for name, tensor in text.model.model.state_dict().items():
        assert torch.equal(tensor, saved[f"language_model.{name}"]), name
    head = text.model.get_parameter("lm_head.weight")
    assert head is text.model.get_input_embeddings().weight
    assert torch.equal(head, reference.lm_head.weight)


# --- token counts and features -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
def test_num_image_tokens_is_what_the_processor_expands_to(
    harness: Harness, pas_harness: Harness, pan_and_scan: bool
) -> None:
    h = pas_harness if pan_and_scan else harness
    counts = set()
    for height, width in SIZES:
        inputs = h.hf_inputs(f"a {PLACEHOLDER} b", [_image(height, width)])
        expanded = int((inputs["input_ids"] == h.family.image_token_id).sum())
        assert h.family.num_image_tokens(h.processor, (height, width)) == expanded, (height, width)
        counts.add(expanded)
    if pan_and_scan:
        assert h.family.tokens_per_image(h.processor) is None
        assert counts == {IMAGE_TOKENS * views for views in (1, 3, 4, 5)}  # 0 or 2..4 crops
    else:
        assert counts == {IMAGE_TOKENS}


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
def test_features_equal_hf_get_image_features_bit_for_bit(
    harness: Harness, pas_harness: Harness, pan_and_scan: bool
) -> None:
    h = pas_harness if pan_and_scan else harness
    half = load_vision_half(h.path)
    for height, width in [(48, 48), (60, 40), (48, 150), (30, 200), (700, 1000)]:
        image = _image(height, width)
        inputs = h.hf_inputs(PLACEHOLDER, [image])
        with torch.inference_mode():
            reference = h.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            ours = h.family.image_features(half.module, collate([h.family.prepare_image(h.processor, image, None)]))
        assert len(ours) == 1
        assert ours[0].shape[0] == int((inputs["input_ids"] == h.family.image_token_id).sum())
        assert torch.equal(ours[0], reference.flatten(0, 1)), (height, width)


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
def test_vision_encoder_equals_hf(harness: Harness, pas_harness: Harness, pan_and_scan: bool) -> None:
    h = pas_harness if pan_and_scan else harness
    encoder = VisionEncoder(ModelConfig(model=str(h.path)))
    assert encoder.image_placeholder == PLACEHOLDER
    assert encoder.tokens_per_image == (None if pan_and_scan else IMAGE_TOKENS)
    embeddings = encoder.encode(h.images)
    for index, (image, embedding) in enumerate(zip(h.images, embeddings, strict=True)):
        assert embedding.shape == h.features(index).shape
        assert embedding.shape[0] == encoder.num_image_tokens(image)
        # Batched with images of the same view count: equal within float32 noise (bit for bit alone).
        torch.testing.assert_close(embedding, h.features(index), rtol=0, atol=1e-5)
    assert torch.equal(encoder.encode(h.images[:1])[0], h.features(0))
    if pan_and_scan:
        assert len({embedding.shape[0] for embedding in embeddings}) > 1  # the strip really was cropped


# --- prompts, attention blocks and masks ---------------------------------------------------------------------------


# Newlines next to the placeholder: the processor's "\n\n" around each image merges with them into other tokens.
PROMPTS = {
    0: "Look:\n\nno image here\n\n",
    1: f"Look:\n\n{PLACEHOLDER} what?",
    2: f"Look:\n\n{PLACEHOLDER} and {PLACEHOLDER}\n\nwhat?",
}


@pytest.mark.parametrize(
    "pan_and_scan, images",
    [(False, []), (False, [0]), (False, [1, 3]), (True, [3]), (True, [2, 3])],
    ids=["text-only", "one-image", "two-images", "pan-and-scan", "pan-and-scan-two-images"],
)
def test_prompt_ids_and_blocks_equal_the_processor(
    harness: Harness, pas_harness: Harness, pan_and_scan: bool, images: list[int]
) -> None:
    h = pas_harness if pan_and_scan else harness
    prompt = PROMPTS[len(images)]
    keys = [f"image-{i}" for i in images]
    tokenized = h.inputs.tokenize(prompt, keys, [len(h.features(i)) for i in images])
    inputs = h.hf_inputs(prompt, [h.images[i] for i in images] or None)
    assert tokenized.token_ids == inputs["input_ids"][0].tolist()
    # HF's blocks: each maximal run of soft tokens (token_type_ids == 1); <start_of_image>/<end_of_image> are not in.
    # (That the mask HF builds from them is what the paged attention builds is the next test.)
    assert list(tokenized.attention_blocks) == _runs([flag == 1 for flag in inputs["token_type_ids"][0].tolist()])
    assert list(tokenized.attention_blocks) == _runs([t == h.family.image_token_id for t in tokenized.token_ids])
    for start, end in tokenized.attention_blocks:
        assert end - start == IMAGE_TOKENS
        assert tokenized.token_ids[start - 1] == h.processor.tokenizer.boi_token_id
        assert tokenized.token_ids[end] == h.processor.tokenizer.eoi_token_id
    if pan_and_scan:
        assert len(tokenized.attention_blocks) > len(images)  # crops: several runs per image


def test_prefill_masks_equal_gemma3_model_for_every_chunk_the_scheduler_may_cut(harness: Harness) -> None:
    """The paged attention's prefill mask (from the request's attention blocks) equals the masks `Gemma3Model`
    builds (full: causal OR block; sliding: window AND (causal OR block)) for every chunk [s, e) that does not end
    strictly inside a block; chunks that would are exactly those whose rows HF lets see keys at or past e."""
    case = Case(_prompt("Compare them.", 2), [1, 3])
    request = harness.request("m", case)
    inputs = harness.hf_inputs(case.prompt, [harness.images[i] for i in case.images])
    num_tokens = inputs["input_ids"].shape[1]
    # The cache argument was renamed in 5.x (past_key_values -> cache); no cache either way.
    parameters = inspect.signature(harness.model.create_masks_for_generate).parameters
    no_cache = {"cache": None} if "cache" in parameters else {"past_key_values": None}
    hf = harness.model.create_masks_for_generate(  # what generate() gives the prefill
        config=harness.model.config,  # sdpa: boolean masks
        inputs_embeds=torch.zeros(1, num_tokens, 8),
        attention_mask=inputs["attention_mask"],
        position_ids=torch.arange(num_tokens)[None],
        token_type_ids=inputs["token_type_ids"],
        **no_cache,
    )
    expected = {None: hf["full_attention"][0, 0], WINDOW: hf["sliding_attention"][0, 0]}  # [T, T] each
    engine_request = Request("m", request.prompt_token_ids, request.sampling, attention_blocks=request.attention_blocks)
    legal = 0
    for start in range(num_tokens):
        for end in range(start + 1, num_tokens + 1):
            inside = any(s < end < e for s, e in request.attention_blocks)
            context = torch.arange(end)
            chunk = PrefillChunk(
                token_start=0,
                num_tokens=end - start,
                context_slots=context,
                query_positions=context[start:],
                block_ids=ModelRunner._block_ids(engine_request, end),
            )
            sees_past_end = bool(expected[None][start:end, end:].any())
            assert sees_past_end == inside, (start, end)
            if inside:
                continue
            legal += 1
            for window, mask in expected.items():
                assert torch.equal(chunk.mask(window), mask[start:end, :end]), (start, end, window)
    assert legal > num_tokens


def test_chat_template_writes_the_placeholder_the_prompts_use(harness: Harness) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    rendered = harness.inputs.render_chat(messages)
    assert rendered == harness.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert harness.inputs.image_token == PLACEHOLDER
    assert rendered == "<bos>" + _prompt("What is in the picture?", 1)


def test_chat_prompt_ids_equal_hf_apply_chat_template(harness: Harness) -> None:
    image = harness.images[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, messages[0]["content"][1]]}]
    expected = harness.processor.apply_chat_template(
        with_image, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    expected = expected[0] if isinstance(expected[0], list) else expected
    tokenized = harness.inputs.tokenize(harness.inputs.render_chat(messages), ["image-0"], [IMAGE_TOKENS])
    assert tokenized.token_ids == list(expected)


# --- the engine against generate -----------------------------------------------------------------------------------


def _arrivals(harness: Harness, cases: list[Case]) -> dict[int, list[EngineRequest]]:
    """Two at once, then one every other step."""
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(cases):
        arrivals.setdefault(max(0, 2 * i - 1), []).append(harness.request(f"r{i}", case))
    return arrivals


def _images_whole(arrivals: dict[int, list[EngineRequest]]) -> Callable[[int, LLMEngine], None]:
    """An on-step check: no request's computed tokens ever end strictly inside one of its attention blocks."""
    request_ids = [request.request_id for requests in arrivals.values() for request in requests]

    def check(step: int, engine: LLMEngine) -> None:
        for request_id in request_ids:
            request = engine.scheduler.get_request(request_id)
            if request is not None:
                computed = request.num_computed_tokens
                assert not any(s < computed < e for s, e in request.attention_blocks), (request_id, computed)

    return check


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"num_kv_blocks": 30, "max_num_batched_tokens": 16}, id="preemption"),
        pytest.param({"enable_prefix_caching": False, "max_num_seqs": 3}, id="no-prefix-cache-max-seqs-3"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, cases: list[Case], settings: dict) -> None:
    engine = harness.engine(**settings)
    arrivals = _arrivals(harness, cases)
    outputs = drive(engine, arrivals, _images_whole(arrivals))
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption


@pytest.mark.parametrize("budget", [9, 10, 11, 12, 13, 16])
def test_chunked_prefill_keeps_images_whole_and_matches_hf(harness: Harness, cases: list[Case], budget: int) -> None:
    """Budgets from one image (9) up: chunks cut at every offset around the images of staggered requests."""
    engine = harness.engine(max_num_batched_tokens=budget)
    arrivals = _arrivals(harness, cases)
    outputs = drive(engine, arrivals, _images_whole(arrivals))
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (images {case.images})"


def test_one_request_alone_at_every_chunk_boundary(harness: Harness, cases: list[Case]) -> None:
    """The three-image prompt alone, one budget per chunk length: its first chunk wants to end at every token
    from 9 to just past the last image, so it is cut back before each image's soft tokens, and later chunks
    start at <start_of_image>, inside the text, right after an image."""
    case = cases[6]
    request = harness.request("x", case)
    cut = 0
    last_image_end = request.attention_blocks[-1][1]
    for budget in range(IMAGE_TOKENS, last_image_end + 2):
        cut += any(s < budget < e for s, e in request.attention_blocks)
        arrivals = {0: [request]}
        outputs = drive(harness.engine(max_num_batched_tokens=budget), arrivals, _images_whole(arrivals))
        assert tokens(outputs["x"]) == case.reference, budget
    assert cut >= 2 * IMAGE_TOKENS  # many budgets really wanted to end inside an image


def test_image_longer_than_the_budget_is_rejected(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_batched_tokens=IMAGE_TOKENS - 1)
    with pytest.raises(RequestRejected, match="max-num-batched-tokens"):
        engine.add_request(harness.request("x", cases[0]))
    engine.add_request(harness.request("t", cases[1]))  # text-only prompts are not affected
    assert tokens(drive(engine, {})["t"]) == cases[1].reference


def test_prefix_cache_hits_same_image_and_separates_different_images(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine()
    first = cases[0]
    second = Case(first.prompt, [2])  # same text, another image
    second.reference = harness.reference(second)
    assert second.reference != first.reference  # the image really decides the output
    out = drive(engine, {0: [harness.request("a", first)]})
    again = drive(engine, {0: [harness.request("b", first)]})
    other = drive(engine, {0: [harness.request("c", second)]})
    assert tokens(out["a"]) == tokens(again["b"]) == first.reference
    assert tokens(other["c"]) == second.reference
    usage_a, usage_b, usage_c = (o[-1].usage for o in (out["a"], again["b"], other["c"]))
    assert usage_a is not None and usage_b is not None and usage_c is not None
    assert usage_a.cached_prompt_tokens == 0
    assert usage_b.cached_prompt_tokens == (usage_b.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    image_start = harness.request("x", second).image_spans[0].offset
    assert usage_c.cached_prompt_tokens <= image_start // BLOCK_SIZE * BLOCK_SIZE


def test_prefix_hit_that_ends_inside_an_image(harness: Harness) -> None:
    """Two prompts that share an image and diverge right after it: with 8-token KV blocks the hit can end inside
    the image (KV of its first tokens, computed with the whole image in view), and the image's rest is one chunk.
    (With 4-token blocks it cannot: the 3 tokens after every image, <end_of_image> and the processor's "\\n\\n",
    are common to both prompts, so the hit reaches the block holding the image's end.)"""
    block_size = 8
    for lead in ("", "Hi ", "Hi there ", "Hi there, ", "Hi there, you ", "a b c "):
        first = Case(_prompt("tell me", 1).replace("user\n", f"user\n{lead}", 1), [0])
        second = Case(first.prompt.replace("tell me", "what now"), [0])
        request_a, request_b = harness.request("a", first), harness.request("b", second)
        pairs = zip(request_a.prompt_token_ids, request_b.prompt_token_ids, strict=False)
        common = next(i for i, (a, b) in enumerate(pairs) if a != b)
        hit = common // block_size * block_size
        if any(s < hit < e for s, e in request_b.attention_blocks):
            break
    else:
        pytest.fail("no prompt pair found whose prefix hit ends inside the image")
    first.reference, second.reference = harness.reference(first), harness.reference(second)
    engine = harness.engine(block_size=block_size)
    assert tokens(drive(engine, {0: [request_a]})["a"]) == first.reference
    arrivals = {0: [request_b]}
    out = drive(engine, arrivals, _images_whole(arrivals))
    assert tokens(out["b"]) == second.reference
    usage = out["b"][-1].usage
    assert usage is not None and usage.cached_prompt_tokens == hit


def test_abort_mid_way_leaves_others_unchanged(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_batched_tokens=11)
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases[:6])]}
    phases = {"r1": "prefill", "r4": "decode"}  # a text prompt mid-prefill, an image prompt while decoding
    references = [case.reference for case in cases[:6]]
    abort_in_phases(engine, arrivals, phases, references, inside_image=None, on_step=_images_whole(arrivals))


def _wider_blocks(request: EngineRequest) -> EngineRequest:
    """Blocks that also hold <start_of_image> and <end_of_image> (HF keeps those causal)."""
    return replace(request, attention_blocks=tuple((s - 1, e + 1) for s, e in request.attention_blocks))


def _no_window(engine: LLMEngine) -> None:
    for layer in engine.runner.model.model.layers:
        layer.self_attn.sliding_window = None  # what the attention function is told: no window on any layer


@pytest.mark.parametrize(
    "perturb_request, perturb_engine",
    [
        pytest.param(lambda r: replace(r, attention_blocks=()), None, id="causal-only"),
        pytest.param(_wider_blocks, None, id="blocks-with-boi-eoi"),
        pytest.param(None, _no_window, id="window-ignored"),
    ],
)
def test_negative_controls_change_the_tokens(
    harness: Harness,
    cases: list[Case],
    perturb_request: Callable[[EngineRequest], EngineRequest] | None,
    perturb_engine: Callable[[LLMEngine], None] | None,
) -> None:
    """What the exact matches above rest on: each of these mistakes gives tokens other than HF's."""
    engine = harness.engine(own_model=perturb_engine is not None)
    if perturb_engine is not None:
        perturb_engine(engine)
    arrivals = _arrivals(harness, cases)
    if perturb_request is not None:
        arrivals = {step: [perturb_request(r) for r in requests] for step, requests in arrivals.items()}
    outputs = drive(engine, arrivals)
    wrong = [i for i, case in enumerate(cases) if tokens(outputs[f"r{i}"]) != case.reference]
    image_cases = [i for i, case in enumerate(cases) if case.images]
    assert wrong and set(wrong) <= (set(range(len(cases))) if perturb_engine else set(image_cases))
    assert len(wrong) >= len(image_cases) // 2


def test_pan_and_scan_crops_through_the_engine_match_hf(pas_harness: Harness) -> None:
    """An image with crops is several runs (one block each) of one embedding; chunked prefill keeps each whole."""
    built = [
        Case(_prompt("What is in the strip?", 1), [3]),
        Case(_prompt("Compare.", 2), [3, 0]),
        Case(_prompt("hello there, tell me about cats.", 0), []),
        Case(_prompt("And this one?", 1), [4]),
    ]
    for case in built:
        case.reference = pas_harness.reference(case)
    assert len(pas_harness.request("x", built[0]).attention_blocks) > 1
    for budget in (IMAGE_TOKENS, 12, 512):
        arrivals = _arrivals(pas_harness, built)
        outputs = drive(pas_harness.engine(max_num_batched_tokens=budget), arrivals, _images_whole(arrivals))
        for i, case in enumerate(built):
            assert tokens(outputs[f"r{i}"]) == case.reference, (budget, i)
