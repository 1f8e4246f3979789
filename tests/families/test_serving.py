"""Every family through everything a user runs: the offline `LLM` and both gRPC services with Redis, vs HF.

For each family: a batch of prompts with images of different sizes and aspect ratios (several per prompt where
the family allows it) and a text-only prompt, run with a small token budget so that chunked prefill splits
images; greedy tokens must equal the checkpoint's own Hugging Face class's `generate(do_sample=False)`. Over gRPC
the same prompts run concurrently through encoder + generator sharing a private Redis, then again by
`embedding_key`; `GetModelInfo` says the family and whether the token count varies; KV blocks go back to 0.
The engine-level compositions (preemption, aborts, prefix hits across images) are each family's own tests.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from common.config import ModelConfig
from common.images.intake import decode_image
from common.images.vision_encoder import VisionEncoder
from common.models.idefics3 import processor_loads_without_torchvision
from common.tensor_codec import tensor_from_proto
from generator_service import LLM, SamplingParams
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2_grpc
from tests.conftest import CheckpointFactory
from tests.engine_mode import ENFORCE_EAGER
from tests.generator_service.support import (
    EventLoopThread,
    Reference,
    RunningEncoder,
    RunningGenerator,
    collect,
    encoder_config,
    generator_config,
    png_bytes,
    request,
)
from tests.grpc_support import RedisProcess

MAX_TOKENS = 10
# Sizes chosen so that tiling families (LLaVA-NeXT) give each image a different number of tokens.
IMAGES = [png_bytes(seed, size) for seed, size in enumerate([(40, 30), (17, 90), (96, 64), (64, 64), (150, 40)])]


@dataclass(frozen=True)
class Spec:
    family: str
    prompt: Callable[[str, int], str]  # (question, number of images) -> the prompt text a user sends
    max_images: int  # per prompt
    fixed_tokens: bool  # every image becomes the same number of tokens


def _llava_prompt(question: str, num_images: int) -> str:
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


def _qwen_prompt(question: str, num_images: int) -> str:
    return "<|vision_start|><|image_pad|><|vision_end|>" * num_images + question


def _idefics3_prompt(question: str, num_images: int) -> str:
    return "User:" + "<image>" * num_images + question + "<end_of_utterance>\nAssistant:"


SPECS = {
    "llava": Spec("llava", _llava_prompt, max_images=2, fixed_tokens=True),
    "llava_next": Spec("llava_next", _llava_prompt, max_images=2, fixed_tokens=False),
    "blip2": Spec("blip2", lambda question, _: f"Question: {question} Answer:", max_images=1, fixed_tokens=True),
    "instructblip": Spec("instructblip", lambda question, _: question, max_images=1, fixed_tokens=True),
    "gemma3": Spec("gemma3", lambda question, n: "<start_of_image>" * n + question, max_images=2, fixed_tokens=True),
    "qwen2_vl": Spec("qwen2_vl", _qwen_prompt, max_images=2, fixed_tokens=False),
    "qwen2_5_vl": Spec("qwen2_5_vl", _qwen_prompt, max_images=2, fixed_tokens=False),
    "idefics3": Spec("idefics3", _idefics3_prompt, max_images=2, fixed_tokens=False),
    "smolvlm": Spec("smolvlm", _idefics3_prompt, max_images=2, fixed_tokens=False),
}
QUESTIONS = ["What is in the picture?", "Describe it in one word.", "Which colours?", "hello, who are you?"]


def cases(spec: Spec) -> list[tuple[str, list[bytes]]]:
    """(prompt, image bytes) pairs: one image each of three sizes, text only, and several images if allowed."""
    built = [(spec.prompt(QUESTIONS[i], 1), [IMAGES[i]]) for i in range(3)]
    built.append((spec.prompt(QUESTIONS[3], 0), []))
    if spec.max_images >= 2:
        built.append((spec.prompt("Compare them.", 2), [IMAGES[3], IMAGES[4]]))
    return built


@pytest.fixture(scope="module", params=list(SPECS))
def spec(request: pytest.FixtureRequest) -> Spec:
    if request.param in ("idefics3", "smolvlm") and not processor_loads_without_torchvision():
        pytest.skip("this transformers release loads Idefics3/SmolVLM processors only with torchvision")
    return SPECS[request.param]


@pytest.fixture(scope="module")
def checkpoint(spec: Spec, checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory(family=spec.family)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    return Reference(checkpoint)


@pytest.fixture(scope="module")
def expected(spec: Spec, reference: Reference) -> list[list[int]]:
    return [reference.generate(prompt, images, MAX_TOKENS) for prompt, images in cases(spec)]


def test_offline_llm_matches_hf(spec: Spec, checkpoint: Path, expected: list[list[int]]) -> None:
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    prompts = [{"prompt": prompt, "multi_modal_data": {"image": images}} for prompt, images in cases(spec)]
    with LLM(
        str(checkpoint), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=256, max_num_batched_tokens=24
    ) as llm:
        first = llm.generate(prompts, greedy)
        assert [output.token_ids for output in first] == expected
        image_tokens = [output.usage.image_tokens for output in first[:3]]  # one image each, of three sizes
        assert (len(set(image_tokens)) == 1) == spec.fixed_tokens, image_tokens  # tiling: counts differ by size
        again = llm.generate(prompts[0], greedy)[0]  # the same image: its KV blocks are reused
        assert again.token_ids == expected[0]
        assert again.usage.cached_prompt_tokens >= 4
        assert llm.engine.block_manager.num_used_blocks == 0


def test_offline_chat_uses_the_checkpoints_template(spec: Spec, checkpoint: Path, reference: Reference) -> None:
    if reference.processor.chat_template is None:
        pytest.skip(f"{spec.family}'s checkpoints have no chat template (raw prompts only)")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    expected = reference.generate(reference.chat_prompt(messages), [IMAGES[2]], MAX_TOKENS, chat=True)
    with LLM(str(checkpoint), enforce_eager=ENFORCE_EAGER, block_size=4, num_kv_blocks=128) as llm:
        chatted = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), images=[IMAGES[2]])
    assert chatted.token_ids == expected


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[tuple[RunningEncoder, RunningGenerator]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    loop, redis = EventLoopThread(), RedisProcess()
    # One image per vision forward pass: a batch of one is bit-identical to Hugging Face's.
    encoder = RunningEncoder(loop, encoder_config(checkpoint, redis_url=redis.url, max_batch_size=1))
    generator = RunningGenerator(
        loop,
        generator_config(checkpoint, encoder_address=encoder.address, redis_url=redis.url, max_num_batched_tokens=24),
    )
    yield encoder, generator
    generator.stop()
    encoder.stop()
    loop.close()
    redis.kill()


def test_grpc_services_match_hf(
    spec: Spec, checkpoint: Path, served: tuple[RunningEncoder, RunningGenerator], expected: list[list[int]]
) -> None:
    encoder, generator = served
    messages = [request(prompt, images, max_tokens=MAX_TOKENS) for prompt, images in cases(spec)]

    async def run_all() -> list[list[int]]:
        async with grpc.aio.insecure_channel(generator.address) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            results = await asyncio.gather(*(collect(stub, message) for message in messages))
        assert all(result.code == grpc.StatusCode.OK for result in results), [r.details for r in results]
        return [result.token_ids for result in results]

    assert asyncio.run(run_all()) == expected
    generator.wait_idle()

    infos = [
        encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(encoder.address)).GetModelInfo(
            encoder_pb2.GetModelInfoRequest(), timeout=10
        ),
        generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(generator.address)).GetModelInfo(
            encoder_pb2.GetModelInfoRequest(), timeout=10
        ),
    ]
    for info in infos:
        assert info.family == spec.family
        assert (info.tokens_per_image > 0) == spec.fixed_tokens


def test_encode_then_generate_by_key(
    spec: Spec, checkpoint: Path, served: tuple[RunningEncoder, RunningGenerator], expected: list[list[int]]
) -> None:
    """A client encodes first (with the instruction, for families whose embeddings read it), then generates by
    key: the generator finds the very embedding the encoder stored, under the same key it computes itself."""
    encoder, generator = served
    vision = VisionEncoder(ModelConfig(model=str(checkpoint)))
    prompt, images = cases(spec)[1]
    condition = vision.family.embedding_condition(prompt)
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(encoder.address))
    encoded = stub.Encode(
        encoder_pb2.EncodeRequest(
            images=[encoder_pb2.ImageInput(data=images[0])], return_embeddings=True, instruction=prompt
        ),
        timeout=30,
    ).images[0]
    (local,) = vision.encode([decode_image(images[0])], condition)
    assert torch.equal(tensor_from_proto(encoded.embedding), local)
    assert encoded.num_tokens == vision.num_image_tokens(decode_image(images[0]))

    async def by_key() -> list[int]:
        async with grpc.aio.insecure_channel(generator.address) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            result = await collect(stub, request(prompt, [encoded.embedding_key], max_tokens=MAX_TOKENS))
        assert result.code == grpc.StatusCode.OK, result.details
        return result.token_ids

    assert asyncio.run(by_key()) == expected[1]
    generator.wait_idle()
