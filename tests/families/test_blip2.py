"""BLIP-2 (ViT + QFormer + OPT) and InstructBLIP (ViT + instruction-reading QFormer + Llama) against Hugging Face.

Selection and refusals, the checkpoint split (5.x save layout and a hub-style copy), the image features (bit for
bit, float32, batch 1), the prompt layout (image tokens in front of the text, even before BOS), and greedy
tokens through the engine in every batch composition the scheduler produces, compared with HF's `generate`.
OPT has learned absolute positions: a negative control shows a one-position shift changes its tokens, so the
engine's exact match after chunked prefill, preemption and prefix hits means its positions are right.
"""

from __future__ import annotations

import copy
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
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    PreTrainedModel,
    T5Config,
)

from common.checkpoint import load_processor, load_text_half, load_vision_half
from common.config import EngineConfig, ModelConfig
from common.errors import CheckpointError, UnsupportedArchitectureError
from common.images.vision_encoder import VisionEncoder
from common.models import family_for_config, supported_architectures
from common.models.base import collate
from common.models.blip2 import Blip2Family, InstructBlipFamily
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor, InvalidPrompt
from tests.conftest import CheckpointFactory
from tests.engine.test_engine_exactness import drive, tokens
from tests.engine_mode import ENFORCE_EAGER

MAX_TOKENS = 12
NUM_QUERY_TOKENS = 8  # the tiny builders' default: two KV blocks of 4
FAMILY_NAMES = ("blip2", "instructblip")
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "blip2": Blip2ForConditionalGeneration,
    "instructblip": InstructBlipForConditionalGeneration,
}
FEATURE_INPUTS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")


def _images() -> list[Image.Image]:
    cat = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")
    mandelbrot = Image.effect_mandelbrot((64, 64), (-2.0, -1.5, 1.0, 1.5), 50).convert("RGB")
    return [cat, Image.new("RGB", (40, 60), "red"), mandelbrot, Image.linear_gradient("L").convert("RGB")]


@dataclass
class Case:
    """A prompt with at most one image (index into the harness's images), and HF's greedy output for it."""

    prompt: str
    image: int | None
    reference: list[int] = field(default_factory=list)


CASES = [
    Case("Question: What is in the picture? Answer:", 0),
    Case("hello there, how are you doing today? Tell me about cats and dogs.", None),
    Case("Question: Describe the image in one sentence. Answer:", 1),
    Case("Question: Is it day or night? Answer:", 2),
    Case("Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 and some more words to make this prompt longer", None),
    Case("Question: café 猫 🐱? Answer:", 3),
    Case("Question: What is in the picture? Answer:", 1),  # same text as the first, another image
    Case("A picture of", 0),
]


class Harness:
    """One checkpoint with HF's model and processor (the reference) and the engine's input processing."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = MODEL_CLASSES[name].from_pretrained(path).eval()
        self.family = family_for_config(self.model.config)
        self.inputs = InputProcessor(self.processor, self.family)
        self.images = _images()
        self._features: dict[str, torch.Tensor] = {}
        self._cases: list[Case] | None = None

    @property
    def cases(self) -> list[Case]:
        """CASES with their HF references, computed once."""
        if self._cases is None:
            self._cases = [Case(case.prompt, case.image, self.reference(case)) for case in CASES]
        return self._cases

    def hf_inputs(self, case: Case) -> dict[str, torch.Tensor]:
        images = None if case.image is None else self.images[case.image]
        return dict(self.processor(images=images, text=case.prompt, return_tensors="pt"))

    def image_key(self, case: Case) -> str:
        """Like the real image key: the image and the embedding condition (InstructBLIP: the instruction)."""
        condition = self.family.embedding_condition(case.prompt)
        return f"image-{case.image}" + ("" if condition is None else f"|{condition}")

    def features(self, case: Case) -> torch.Tensor:
        """HF's `get_image_features(...).pooler_output` for the case's image (and instruction): [Q, hidden]."""
        key = self.image_key(case)
        if key not in self._features:
            inputs = self.hf_inputs(case)
            with torch.inference_mode():
                outputs = self.model.get_image_features(**{k: v for k, v in inputs.items() if k in FEATURE_INPUTS})
            self._features[key] = outputs.pooler_output[0]
        return self._features[key]

    def reference(self, case: Case, max_tokens: int = MAX_TOKENS) -> list[int]:
        """HF greedy tokens: the multimodal `generate` with an image, the language model's own without."""
        inputs = self.hf_inputs(case)
        text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        with torch.inference_mode():
            if case.image is None:
                out = self.model.language_model.generate(**text, max_new_tokens=max_tokens, do_sample=False)
            else:
                out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        prompt_len = inputs["input_ids"].shape[1]
        # Both return the prompt ids followed by the new tokens (the multimodal one passes input_ids along).
        assert torch.equal(out[0, :prompt_len], inputs["input_ids"][0])
        return [int(t) for t in out[0, prompt_len:]]

    def request(
        self, request_id: str, case: Case, sampling: SamplingParams | None = None, key: str | None = None
    ) -> EngineRequest:
        features = [] if case.image is None else [self.features(case)]
        keys = [key or self.image_key(case) for _ in features]
        tokenized = self.inputs.tokenize(case.prompt, keys, [f.shape[0] for f in features])
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=tokenized.token_ids,
            sampling=sampling or SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            image_spans=tokenized.image_spans,
            image_embeddings=tuple(features),
        )

    def engine(self, **overrides: object) -> LLMEngine:
        settings: dict = {"block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 512}
        settings.update(overrides)
        model = ModelConfig(str(self.path), enforce_eager=ENFORCE_EAGER)
        return LLMEngine.from_config(EngineConfig(model=model, **settings))


@pytest.fixture(scope="module")
def harnesses(checkpoint_factory: CheckpointFactory) -> dict[str, Harness]:
    return {name: Harness(name, checkpoint_factory(vision="blip", family=name)) for name in FAMILY_NAMES}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def harness(request: pytest.FixtureRequest, harnesses: dict[str, Harness]) -> Harness:
    return harnesses[request.param]


# --- selection, refusal, checkpoint split ------------------------------------------------------------------


def test_config_selects_the_family(harnesses: dict[str, Harness]) -> None:
    for name, family_class in (("blip2", Blip2Family), ("instructblip", InstructBlipFamily)):
        family = family_for_config(AutoConfig.from_pretrained(harnesses[name].path))
        assert type(family) is family_class and family.name == name
        assert family.architectures[0] in supported_architectures()
        assert family.tokens_per_image(harnesses[name].processor) == NUM_QUERY_TOKENS


@pytest.mark.parametrize("config_class", [Blip2Config, InstructBlipConfig])
def test_t5_language_model_is_refused_at_load(config_class: type, tmp_path: Path) -> None:
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=100)
    config = config_class(text_config=t5.to_dict(), image_token_index=99)
    config.save_pretrained(tmp_path)
    for load in (load_vision_half, load_text_half):
        with pytest.raises(UnsupportedArchitectureError) as error:
            load(tmp_path)
        message = str(error.value)
        assert "'t5'" in message and "encoder-decoder" in message and "decoder-only" in message  # the why
        for architecture in supported_architectures():  # what is served
            assert architecture in message
    family_class = Blip2Family if config_class is Blip2Config else InstructBlipFamily
    with pytest.raises(UnsupportedArchitectureError):
        family_class(config)


def test_config_without_image_token_index_is_refused(tmp_path: Path) -> None:
    Blip2Config().save_pretrained(tmp_path)  # decoder-only OPT, but the pre-image-token config layout
    with pytest.raises(CheckpointError, match="no image_token_index"):
        load_vision_half(tmp_path)


def to_hub_layout(src: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """A hub-style copy: older saves also stored a tied OPT head, and buffers that are no longer persistent
    (InstructBLIP's QFormer `position_ids`, Llama's per-layer `rotary_emb.inv_freq`). Returns the copy and the
    stored keys that no module reads any more, with the half each belongs to."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    legacy: dict[str, tuple[str, torch.Tensor]] = {}
    if "language_model.lm_head.weight" not in tensors:  # tied (OPT): stored anyway
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.decoder.embed_tokens.weight"].clone()
    if "qformer.embeddings.word_embeddings.weight" in tensors:  # InstructBLIP
        legacy["qformer.embeddings.position_ids"] = ("vision", torch.arange(512)[None])
    if "language_model.model.layers.0.self_attn.q_proj.weight" in tensors:  # Llama
        legacy["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = ("text", torch.ones(8))
    stored = {**tensors, **{key: tensor for key, (_, tensor) in legacy.items()}}
    save_file(stored, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst, {key: half for key, (half, _) in legacy.items()}


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_every_stored_tensor_belongs_to_exactly_one_half(harness: Harness, tmp_path: Path, layout: str) -> None:
    path, legacy = (harness.path, {}) if layout == "save_pretrained" else to_hub_layout(harness.path, tmp_path / "h")
    family = family_for_config(AutoConfig.from_pretrained(path))
    vision, text = load_vision_half(path), load_text_half(path)
    names = {"vision": set(vision.module.state_dict()), "text": set(text.model.state_dict())}
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    counts = {"vision": 0, "text": 0}
    for key in keys:
        classified = family.classify(key)
        assert classified is not None, key
        half, name = classified
        counts[half] += 1
        if key in legacy:  # classified with its half, read by neither
            assert half == legacy[key] and name not in names["vision"] | names["text"], (key, name)
        else:  # a weight of its half, and no name of the other half
            assert name in names[half] and name not in names["text" if half == "vision" else "vision"], (key, name)
    assert counts["vision"] > 0 and counts["text"] > 0
    reports = (vision.report, text.report)
    assert sum(len(r.tensors_read) for r in reports) + sum(r.tensors_skipped for r in reports) == len(keys)
    assert sum(r.tensors_skipped for r in reports) == len(legacy)
    # Every half-loaded weight is the full HF model's weight.
    full = harness.model.state_dict()
    for name, tensor in vision.module.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    for name, tensor in text.model.state_dict().items():
        assert torch.equal(tensor, full["language_model." + name]), name


# --- image features ----------------------------------------------------------------------------------------


def test_features_equal_hugging_face_bit_for_bit(harness: Harness) -> None:
    half = load_vision_half(harness.path)
    family = half.family
    family.prepare_vision(half.module)
    processor = load_processor(harness.path)
    encoder = VisionEncoder(ModelConfig(model=str(harness.path)))
    for case in harness.cases:
        if case.image is None:
            continue
        image, condition = harness.images[case.image], family.embedding_condition(case.prompt)
        reference = harness.features(case)
        prepared = family.prepare_image(processor, image, condition)
        for name, tensor in prepared.tensors.items():  # the processor's own tensors
            assert torch.equal(tensor, harness.hf_inputs(case)[name]), name
        with torch.inference_mode():
            (ours,) = family.image_features(half.module, collate([prepared]))
        assert ours.shape == (NUM_QUERY_TOKENS, family.hidden_size)
        assert torch.equal(ours, reference)
        (encoded,) = encoder.encode([image], condition)
        assert torch.equal(encoded, reference)


def test_instructblip_embedding_depends_on_the_instruction(harnesses: dict[str, Harness]) -> None:
    harness = harnesses["instructblip"]
    encoder = VisionEncoder(ModelConfig(model=str(harness.path)))
    first, second = Case("What is in the picture?", 2), Case("Describe the colours of this image.", 2)
    conditions = [harness.family.embedding_condition(case.prompt) for case in (first, second)]
    assert conditions == [first.prompt, second.prompt]
    embeddings = [encoder.encode([harness.images[2]], condition)[0] for condition in conditions]
    assert not torch.equal(embeddings[0], embeddings[1])
    assert torch.equal(embeddings[0], harness.features(first))
    assert torch.equal(embeddings[1], harness.features(second))
    with pytest.raises(ValueError, match="instruction"):
        encoder.encode([harness.images[2]], None)
    with pytest.raises(InvalidPrompt, match="QFormer reads at most 512"):  # HF: a shape error in the QFormer
        encoder.encode([harness.images[2]], "word " * 600)
    blip2 = harnesses["blip2"].family
    assert blip2.embedding_condition(first.prompt) is None  # BLIP-2's QFormer reads no text


def test_float16_keeps_hf_float32_modules_and_equals_hugging_face(harness: Harness) -> None:
    """HF keeps `_keep_in_fp32_modules` in float32 when loading in float16; so must the vision half."""
    half = load_vision_half(harness.path, dtype="float16")  # CPU float16: fine for a tiny model
    hf = MODEL_CLASSES[harness.name].from_pretrained(harness.path, dtype=torch.float16).eval()
    float32 = {n for n, p in half.module.named_parameters() if p.dtype == torch.float32}
    assert float32 == {n for n, p in hf.named_parameters() if p.dtype == torch.float32}
    assert float32 and all(n.startswith(half.family.float32_modules) for n in float32)
    case = harness.cases[0]
    prepared = half.family.prepare_image(load_processor(harness.path), harness.images[0], case.prompt)
    batch = {k: v.half() if v.is_floating_point() else v for k, v in collate([prepared]).items()}
    inputs = {k: v for k, v in batch.items() if harness.name == "instructblip" or k == "pixel_values"}
    with torch.inference_mode():
        (ours,) = half.family.image_features(half.module, inputs)
        reference = hf.get_image_features(**inputs).pooler_output[0]
    assert ours.dtype == torch.float16 and torch.equal(ours, reference)


def test_bfloat16_equals_hugging_face_and_runs(harness: Harness) -> None:
    """HF applies `_keep_in_fp32_modules` to float16 only: in bfloat16 everything, QFormer included, is bfloat16."""
    case = harness.cases[0]
    condition = harness.family.embedding_condition(case.prompt)
    encoder = VisionEncoder(ModelConfig(model=str(harness.path), dtype="bfloat16"))
    (embedding,) = encoder.encode([harness.images[0]], condition)
    hf = MODEL_CLASSES[harness.name].from_pretrained(harness.path, dtype=torch.bfloat16).eval()
    prepared = harness.family.prepare_image(load_processor(harness.path), harness.images[0], condition)
    batch = {k: v.bfloat16() if v.is_floating_point() else v for k, v in collate([prepared]).items()}
    inputs = {k: v for k, v in batch.items() if harness.name == "instructblip" or k == "pixel_values"}
    with torch.inference_mode():
        reference = hf.get_image_features(**inputs).pooler_output[0]
    assert embedding.dtype == torch.bfloat16 and torch.equal(embedding, reference)
    model = ModelConfig(str(harness.path), dtype="bfloat16", enforce_eager=ENFORCE_EAGER)
    config = EngineConfig(model=model, block_size=4, num_kv_blocks=64)
    request = replace(harness.request("bf16", case), image_embeddings=(embedding,))
    generated = tokens(drive(LLMEngine.from_config(config), {0: [request]})["bf16"])
    assert 0 < len(generated) <= MAX_TOKENS


# --- prompt layout ------------------------------------------------------------------------------------------


def test_prompt_layout_equals_the_processor(harness: Harness) -> None:
    for case in harness.cases:
        request = harness.request("r", case)
        assert request.prompt_token_ids == harness.hf_inputs(case)["input_ids"][0].tolist(), case.prompt
        if case.image is not None:
            (span,) = request.image_spans
            assert (span.offset, span.length) == (0, NUM_QUERY_TOKENS)  # in front, even before BOS
            assert request.prompt_token_ids[NUM_QUERY_TOKENS] == harness.processor.tokenizer.bos_token_id
    for size in [(32, 32), (17, 200), (300, 40)]:
        assert harness.family.num_image_tokens(harness.processor, size) == NUM_QUERY_TOKENS


def test_prompts_that_do_not_fit_are_refused(harness: Harness) -> None:
    tokenize = harness.inputs.tokenize
    with pytest.raises(InvalidPrompt, match="placeholder '<image>'"):
        tokenize("<image>\nWhat is this?", ["k"], [NUM_QUERY_TOKENS])
    with pytest.raises(InvalidPrompt, match="placeholder '<image>'"):
        tokenize("What is <image>?", [], [])
    with pytest.raises(InvalidPrompt, match="at most one image"):
        tokenize("Compare them.", ["a", "b"], [NUM_QUERY_TOKENS, NUM_QUERY_TOKENS])
    with pytest.raises(InvalidPrompt, match="embedding rows"):
        tokenize("What is this?", ["k"], [NUM_QUERY_TOKENS + 1])
    processor = copy.copy(harness.processor)
    processor.num_query_tokens = None  # HF's processor would then put no image tokens in front at all
    with pytest.raises(CheckpointError, match="num_query_tokens"):
        harness.family.tokens_per_image(processor)


# --- engine exactness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param({"max_num_batched_tokens": 5}, id="chunked-prefill-splits-image"),  # 5 < 8 image tokens
        pytest.param({"num_kv_blocks": 20, "max_num_batched_tokens": 16}, id="preemption"),
        pytest.param({"enable_prefix_caching": False, "max_num_seqs": 3}, id="no-prefix-cache-max-seqs-3"),
    ],
)
def test_staggered_batch_matches_hf(harness: Harness, settings: dict) -> None:
    engine = harness.engine(**settings)
    # 8 requests (6 with different images, 2 text-only) arriving two at once, then one every other step.
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, case in enumerate(harness.cases):
        arrivals.setdefault(max(0, 2 * i - 1), []).append(harness.request(f"r{i}", case))
    outputs = drive(engine, arrivals)
    for i, case in enumerate(harness.cases):
        assert tokens(outputs[f"r{i}"]) == case.reference, f"request r{i} (image {case.image})"
    if "num_kv_blocks" in settings:
        assert engine.stats().preemptions_total > 0  # the small cache really forced preemption


def test_prefix_cache_hits_only_the_same_image(harness: Harness) -> None:
    engine = harness.engine()
    first, other_image = harness.cases[0], harness.cases[6]  # same text, another image
    out = drive(engine, {0: [harness.request("a", first)]})
    again = drive(engine, {0: [harness.request("b", first)]})
    other = drive(engine, {0: [harness.request("c", other_image)]})
    assert tokens(out["a"]) == tokens(again["b"]) == first.reference
    assert tokens(other["c"]) == other_image.reference
    usage_a, usage_b, usage_c = (o[-1].usage for o in (out["a"], again["b"], other["c"]))
    assert usage_a is not None and usage_b is not None and usage_c is not None
    assert usage_a.cached_prompt_tokens == 0
    assert usage_b.cached_prompt_tokens == (usage_b.prompt_tokens - 1) // 4 * 4  # every full block but the last
    assert usage_c.cached_prompt_tokens == 0  # the image comes first: nothing before it to share


def test_instructblip_other_instruction_does_not_reuse_the_image_kv(harnesses: dict[str, Harness]) -> None:
    harness = harnesses["instructblip"]
    first = Case("Question: What is in the picture? Answer:", 0)
    second = Case("Question: What is in the photo? Answer:", 0)  # same image, same first text block
    for case in (first, second):
        case.reference = harness.reference(case)
    engine = harness.engine()
    out = drive(engine, {0: [harness.request("a", first)]})
    other = drive(engine, {0: [harness.request("b", second)]})
    assert tokens(out["a"]) == first.reference and tokens(other["b"]) == second.reference
    usage = other["b"][-1].usage
    assert usage is not None and usage.cached_prompt_tokens == 0
    # Control: a key that ignored the instruction would reuse the first request's image KV, and be wrong.
    stale_key = harness.image_key(first)
    stale = drive(engine, {0: [harness.request("c", second, key=stale_key)]})
    stale_usage = stale["c"][-1].usage
    assert stale_usage is not None and stale_usage.cached_prompt_tokens >= NUM_QUERY_TOKENS
    assert tokens(stale["c"]) != second.reference


def test_abort_mid_way_leaves_others_unchanged(harness: Harness) -> None:
    engine = harness.engine(max_num_batched_tokens=9)
    arrivals = {0: [harness.request(f"r{i}", case) for i, case in enumerate(harness.cases[:6])]}
    aborts = {1: "r1", 3: "r2", 6: "r4"}  # mid-prefill, mid-prefill/decode, decode

    def abort(step: int, engine: LLMEngine) -> None:
        if step in aborts:
            engine.abort_request(aborts[step])

    outputs = drive(engine, arrivals, abort)
    for i, case in enumerate(harness.cases[:6]):
        request_id = f"r{i}"
        generated = tokens(outputs[request_id])
        if request_id in aborts.values():
            assert outputs[request_id][-1].finish_reason == "abort"
            assert generated == case.reference[: len(generated)]
        else:
            assert generated == case.reference


def _greedy_with_position_offset(harness: Harness, case: Case, offset: int) -> list[int]:
    """HF's OPT, no cache, full recompute each step, with positions token index + `offset`."""
    model = harness.model.language_model
    embed = model.get_input_embeddings()
    request = harness.request("control", case)
    with torch.inference_mode():
        embeddings = embed(torch.tensor(request.prompt_token_ids))  # [T, hidden]
        for span in request.image_spans:
            embeddings[span.offset : span.end] = harness.features(case)
        generated: list[int] = []
        for _ in range(MAX_TOKENS):
            positions = torch.arange(embeddings.shape[0])[None] + offset  # [1, T]
            logits = model(inputs_embeds=embeddings[None], position_ids=positions, use_cache=False).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token == harness.processor.tokenizer.eos_token_id:
                break
            embeddings = torch.cat([embeddings, embed(torch.tensor([token]))])
    return generated


def test_opt_learned_positions_a_one_position_shift_changes_tokens(harnesses: dict[str, Harness]) -> None:
    """Negative control for the engine runs above: OPT's positions are learned (no shift invariance as with
    RoPE), so positions off by one after a chunk, a preemption or a prefix hit would change the tokens."""
    harness = harnesses["blip2"]
    for case in harness.cases:
        assert _greedy_with_position_offset(harness, case, 0) == case.reference  # the control loop is HF's
        assert _greedy_with_position_offset(harness, case, 1) != case.reference, case.prompt
