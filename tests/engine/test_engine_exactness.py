"""Greedy tokens through the engine equal `LlavaForConditionalGeneration.generate(do_sample=False)`.

Every batch composition the scheduler can produce: several models, 0/1/2 images, staggered arrivals,
chunked prefill, preemption, prefix-cache hits, aborts. Invariants are checked after every step.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from common.config import EngineConfig, ModelConfig
from common.models import family_for_config
from generator_service.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from generator_service.engine.paged_attention import DecodeGroup
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import RequestRejected
from generator_service.inputs import InputProcessor, InvalidPrompt
from tests.conftest import CheckpointFactory
from tests.engine_mode import ENFORCE_EAGER

MAX_TOKENS = 12
QUESTIONS = [
    "What is in the picture?",
    "Describe the image in one sentence.",
    "hello there, how are you doing today? Tell me about cats and dogs.",
    "Is it day or night?",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 and some more words to make this prompt longer than the others",
    "café 猫 🐱",
]


def _images() -> list[Image.Image]:
    mandelbrot = Image.effect_mandelbrot((64, 64), (-2.0, -1.5, 1.0, 1.5), 50).convert("RGB")
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    return [cat, Image.new("RGB", (40, 60), "red"), mandelbrot, Image.linear_gradient("L").convert("RGB")]


@dataclass
class Case:
    """A prompt with its images, and HF's greedy output for it (the reference)."""

    prompt: str
    images: list[int]
    reference: list[int] = field(default_factory=list)


class Harness:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path).eval()
        self.inputs = InputProcessor(self.processor, family_for_config(self.model.config))
        self.images = _images()
        self._features: dict[int, torch.Tensor] = {}

    def reference(self, case: Case, max_tokens: int = MAX_TOKENS) -> list[int]:
        images = [self.images[i] for i in case.images] or None
        inputs = self.processor(text=case.prompt, images=images, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]

    def features(self, index: int) -> torch.Tensor:
        if index not in self._features:
            pixels = self.processor.image_processor(self.images[index], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                pooled = self.model.get_image_features(pixel_values=pixels).pooler_output
            self._features[index] = pooled[0]
        return self._features[index]

    def request(self, request_id: str, case: Case, sampling: SamplingParams | None = None) -> EngineRequest:
        features = [self.features(i) for i in case.images]
        tokenized = self.inputs.tokenize(
            case.prompt, [f"image-{i}" for i in case.images], [f.shape[0] for f in features]
        )
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=tokenized.token_ids,
            sampling=sampling or SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            image_spans=tokenized.image_spans,
            image_embeddings=tuple(features),
        )

    def engine(self, *, decode_group_bytes: int | None = None, **overrides: object) -> LLMEngine:
        """`decode_group_bytes`: the runner's bound on one decode attention group's gather (small values split the
        decode rows into many groups; the runner then records how many groups each step had)."""
        settings: dict = {"block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 512}
        settings.update(overrides)
        model = ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER)
        engine = LLMEngine.from_config(EngineConfig(model=model, **settings))
        if decode_group_bytes is not None:
            runner = engine.runner
            runner.decode_group_bytes = decode_group_bytes
            original = runner._decode_groups
            self.decode_group_counts: list[int] = []

            def recording(*args: Any) -> list[DecodeGroup]:
                groups = original(*args)
                self.decode_group_counts.append(len(groups))
                return groups

            runner._decode_groups = recording  # type: ignore[method-assign,assignment]
        return engine


def drive(
    engine: LLMEngine,
    arrivals: dict[int, list[EngineRequest]],
    on_step: Callable[[int, LLMEngine], None] | None = None,
) -> dict[str, list[RequestOutput]]:
    """Step the engine to completion, adding requests at their arrival step; invariants after every step."""
    outputs: dict[str, list[RequestOutput]] = {}
    step = 0
    while engine.has_unfinished_requests() or any(s >= step for s in arrivals):
        for request in arrivals.get(step, []):
            engine.add_request(request)
        if on_step is not None:
            on_step(step, engine)
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        engine.block_manager.check_invariants()
        step += 1
        assert step < 10_000, "engine did not finish"
    assert engine.block_manager.num_used_blocks == 0, "blocks leaked"
    return outputs


def tokens(outputs: list[RequestOutput]) -> list[int]:
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return [t for o in outputs for t in o.new_token_ids]


def _cases() -> list[Case]:
    image_sets: list[list[int]] = [[0], [], [1, 2], [2], [3], [0, 3], [], [1]]
    cases = []
    for i, images in enumerate(image_sets):
        placeholders = "<image>\n" * len(images)
        cases.append(Case(f"USER: {placeholders}{QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:", images))
    return cases


@pytest.fixture(scope="module", params=[("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral")])
def harness(request: pytest.FixtureRequest, checkpoint_factory: CheckpointFactory) -> Harness:
    vision, text = request.param
    return Harness(checkpoint_factory(vision=vision, text=text))


@pytest.fixture(scope="module")
def cases(harness: Harness) -> list[Case]:
    built = _cases()
    for case in built:
        case.reference = harness.reference(case)
    return built


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-prefill"),
        pytest.param({"num_kv_blocks": 24, "max_num_batched_tokens": 16}, id="preemption"),
        pytest.param({"enable_prefix_caching": False, "max_num_seqs": 3}, id="no-prefix-cache-max-seqs-3"),
        pytest.param({"decode_group_bytes": 1}, id="decode-groups-of-one"),
        pytest.param({"decode_group_bytes": 6000}, id="decode-groups-mixed"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, cases: list[Case], settings: dict) -> None:
    engine = harness.engine(**settings)
    # 8 requests of different lengths arriving at different steps (two at once, then one every other step).
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(cases):
        arrivals.setdefault(max(0, 2 * i - 1), []).append(harness.request(f"r{i}", case))
    outputs = drive(engine, arrivals)
    for i, case in enumerate(cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} ({case.images} images)"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption
    if "decode_group_bytes" in settings:
        assert max(harness.decode_group_counts) > 1  # the decode rows really were split into groups


def test_prefix_cache_hits_same_image_and_separates_different_images(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine()
    first, second = cases[0], Case(cases[0].prompt, [2])  # same text, another image
    second.reference = harness.reference(second)
    out = drive(engine, {0: [harness.request("a", first)]})
    again = drive(engine, {0: [harness.request("b", first)]})
    other = drive(engine, {0: [harness.request("c", second)]})
    assert tokens(out["a"]) == tokens(again["b"]) == first.reference
    assert tokens(other["c"]) == second.reference
    usage_a, usage_b, usage_c = (o[-1].usage for o in (out["a"], again["b"], other["c"]))
    assert usage_a is not None and usage_b is not None and usage_c is not None
    assert usage_a.cached_prompt_tokens == 0
    prompt_len = usage_b.prompt_tokens
    assert usage_b.cached_prompt_tokens == (prompt_len - 1) // 4 * 4  # every full block but the last token's
    # Same text, different image: only the blocks before the image may be shared.
    image_start = harness.request("x", second).image_spans[0].offset
    assert usage_c.cached_prompt_tokens <= image_start // 4 * 4


def test_abort_mid_way_leaves_others_unchanged(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_batched_tokens=9)
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(cases[:6])]}
    aborts = {1: "r1", 3: "r2", 6: "r4"}  # mid-prefill, mid-prefill/decode, decode

    def abort(step: int, engine: LLMEngine) -> None:
        if step in aborts:
            engine.abort_request(aborts[step])

    outputs = drive(engine, arrivals, abort)
    for i, case in enumerate(cases[:6]):
        request_id = f"r{i}"
        if request_id in aborts.values():
            assert outputs[request_id][-1].finish_reason == "abort"
            assert tokens(outputs[request_id]) == case.reference[: len(tokens(outputs[request_id]))]
        else:
            assert tokens(outputs[request_id]) == case.reference


def test_abort_while_waiting(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_num_seqs=1)
    outputs = drive(
        engine,
        {0: [harness.request("first", cases[0]), harness.request("queued", cases[1])]},
        lambda step, e: e.abort_request("queued") if step == 1 else None,
    )
    assert outputs["queued"][-1].finish_reason == "abort" and tokens(outputs["queued"]) == []
    assert tokens(outputs["first"]) == cases[0].reference


def test_rejections_are_clear(harness: Harness, cases: list[Case]) -> None:
    engine = harness.engine(max_model_len=40)
    long_case = Case("USER: " + "word " * 60 + "ASSISTANT:", [])
    with pytest.raises(RequestRejected, match="max_model_len"):
        engine.add_request(harness.request("long", long_case))
    with pytest.raises(InvalidPrompt, match="1 image placeholder"):
        harness.inputs.tokenize("USER: <image>\nhi", [], [])
    with pytest.raises(InvalidPrompt, match="embedding rows"):
        harness.inputs.tokenize("USER: <image>\nhi", ["k"], [5])
    assert not engine.has_unfinished_requests()


def test_seeded_sampling_is_batch_independent(harness: Harness, cases: list[Case]) -> None:
    sampling = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = drive(harness.engine(), {0: [harness.request("s", cases[0], sampling)]})
    crowd = {0: [harness.request(f"o{i}", c) for i, c in enumerate(cases[1:4])]}
    crowd[2] = [harness.request("s", cases[0], sampling)]
    crowded = drive(harness.engine(max_num_batched_tokens=11), crowd)
    assert tokens(alone["s"]) == tokens(crowded["s"])
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    different = drive(harness.engine(), {0: [harness.request("s", cases[0], other_seed)]})
    assert tokens(different["s"]) != tokens(alone["s"])


def test_stop_string_spanning_tokens(harness: Harness, cases: list[Case]) -> None:
    full = drive(
        harness.engine(), {0: [harness.request("full", cases[2], SamplingParams(max_tokens=12, temperature=0))]}
    )
    text = "".join(o.new_text for o in full["full"])
    pieces = [harness.processor.tokenizer.decode([t]) for t in tokens(full["full"])]
    # A stop string made of the end of token 2 and the start of token 3: it spans a token boundary.
    boundary = len(pieces[0]) + len(pieces[1]) + len(pieces[2])
    if boundary == 0 or boundary >= len(text):
        pytest.skip("degenerate random output")
    stop = text[boundary - 1 : boundary + 1]
    stopped = drive(
        harness.engine(),
        {0: [harness.request("s", cases[2], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))]},
    )
    streamed = "".join(o.new_text for o in stopped["s"])
    assert stopped["s"][-1].finish_reason == "stop" and stopped["s"][-1].stop_reason == stop
    assert streamed == text[: text.index(stop)]
    assert stop not in streamed


def test_sliding_window_mistral(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    source = checkpoint_factory(vision="clip", text="mistral")
    path = tmp_path / "mistral-window"
    path.mkdir()
    for item in source.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = 8  # far shorter than the prompts: the window really cuts
    (path / "config.json").write_text(json.dumps(config))
    harness = Harness(path)
    selected = _cases()[:4]
    for case in selected:
        case.reference = harness.reference(case)
    for decode_group_bytes in (None, 1):  # one decode group; one per sequence (each group has its own mask)
        outputs = drive(
            harness.engine(max_num_batched_tokens=10, decode_group_bytes=decode_group_bytes),
            {i: [harness.request(f"r{i}", case)] for i, case in enumerate(selected)},
        )
        for i, case in enumerate(selected):
            assert tokens(outputs[f"r{i}"]) == case.reference


def test_random_schedule_matches_hf(harness: Harness, cases: list[Case]) -> None:
    rng = random.Random(7)
    engine = harness.engine(num_kv_blocks=40, max_num_batched_tokens=13, max_num_seqs=5)
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(cases * 2):
        arrivals.setdefault(rng.randrange(0, 30), []).append(harness.request(f"r{i}", case))
    outputs = drive(engine, arrivals)
    for i, case in enumerate(cases * 2):
        assert tokens(outputs[f"r{i}"]) == case.reference
