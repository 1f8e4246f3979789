"""Greedy tokens streamed over gRPC (generator + encoder + Redis) equal Hugging Face `generate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.generator_service.conftest import Stack
from tests.generator_service.support import (
    PROMPT,
    TWO_IMAGES,
    Reference,
    StreamResult,
    collect,
    generate,
    png_bytes,
    request,
    run_client,
)

MAX_TOKENS = 10
CAT = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"


def _check_stream(result: StreamResult, expected: list[int], num_images: int, reference: Reference) -> None:
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.token_ids == expected
    assert result.messages >= len(expected)  # streamed as produced: one message per token, not one blob
    assert result.usage is not None
    assert result.usage.completion_tokens == len(expected)
    assert result.usage.image_tokens == 16 * num_images
    stopped = expected[-1] == reference.processor.tokenizer.eos_token_id
    assert result.finish_reason == (generator_pb2.FINISH_REASON_STOP if stopped else generator_pb2.FINISH_REASON_LENGTH)


def test_concurrent_streams_equal_hf_generate(stack: Stack, reference: Reference) -> None:
    images = [png_bytes(seed, size) for seed, size in enumerate([(40, 30), (64, 64), (17, 90), (300, 200)])]
    cases: list[tuple[str, list[bytes]]] = [
        (PROMPT, [images[0]]),
        (PROMPT, [images[1]]),
        (PROMPT, [images[2]]),
        (PROMPT, [CAT.read_bytes()]),
        ("USER: <image>\nDescribe the image in one sentence. ASSISTANT:", [images[0]]),
        (TWO_IMAGES, [images[1], images[3]]),
        (TWO_IMAGES, [images[3], images[3]]),  # the same image twice in one request
        ("USER: hello there, how are you doing today? Tell me about cats and dogs. ASSISTANT:", []),
        ("USER: Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 ASSISTANT:", []),
        ("café 猫 🐱", []),
        (PROMPT, [images[0]]),  # a concurrent duplicate of the first
    ]
    results = run_client(
        stack.generator.address,
        lambda stub: asyncio.gather(*(collect(stub, request(p, imgs, max_tokens=MAX_TOKENS)) for p, imgs in cases)),
    )
    for (prompt, imgs), result in zip(cases, results, strict=True):
        expected = reference.generate(prompt, imgs, MAX_TOKENS)
        _check_stream(result, expected, len(imgs), reference)
        inputs = reference.processor(text=prompt, images=None, return_tensors="pt") if not imgs else None
        if inputs is not None:
            assert result.usage is not None and result.usage.prompt_tokens == inputs["input_ids"].shape[1]
    stack.generator.wait_idle()


def test_repeated_image_hits_both_caches_and_embedding_key(stack: Stack, reference: Reference) -> None:
    image = png_bytes(101)
    expected = reference.generate(PROMPT, [image], MAX_TOKENS)
    first = generate(stack.generator.address, request(PROMPT, [image], max_tokens=MAX_TOKENS))
    second = generate(stack.generator.address, request(PROMPT, [image], max_tokens=MAX_TOKENS))
    assert first.token_ids == second.token_ids == expected
    assert first.usage is not None and second.usage is not None
    assert second.usage.cached_prompt_tokens >= 16  # the image's KV blocks came from the prefix cache

    # The encoder wrote the embedding to Redis under the same key the generator computed.
    with grpc.insecure_channel(stack.encoder.address) as channel:
        encoded = encoder_pb2_grpc.EncoderStub(channel).Encode(
            encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=image)]), timeout=30
        )
    (item,) = encoded.images
    assert item.cache_hit
    assert stack.redis.client.exists(f"mmserve:emb:{item.embedding_key}")

    by_key = generate(stack.generator.address, request(PROMPT, [item.embedding_key], max_tokens=MAX_TOKENS))
    assert by_key.code == grpc.StatusCode.OK, by_key.details
    assert by_key.token_ids == expected


def test_embedding_key_read_from_redis(stack: Stack, reference: Reference) -> None:
    """A key the generator never saw: its local LRU misses, Redis (written by the encoder) answers."""
    image = png_bytes(102)
    with grpc.insecure_channel(stack.encoder.address) as channel:
        (item,) = (
            encoder_pb2_grpc.EncoderStub(channel)
            .Encode(encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=image)]), timeout=30)
            .images
        )
    before = stack.generator.metric("mmserve_image_lookups_total", {"source": "redis"})
    result = generate(stack.generator.address, request(PROMPT, [item.embedding_key], max_tokens=MAX_TOKENS))
    assert result.token_ids == reference.generate(PROMPT, [image], MAX_TOKENS)
    assert stack.generator.metric("mmserve_image_lookups_total", {"source": "redis"}) == before + 1


def test_chat_messages_render_with_the_chat_template(stack: Stack, reference: Reference) -> None:
    image = png_bytes(103)
    hf_messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    ]
    message = generator_pb2.GenerateRequest(
        messages=[
            generator_pb2.ChatMessage(role="system", content=[generator_pb2.ContentPart(text="You are terse.")]),
            generator_pb2.ChatMessage(
                role="user",
                content=[
                    generator_pb2.ContentPart(image=encoder_pb2.ImageInput(data=image)),
                    generator_pb2.ContentPart(text="What is in the picture?"),
                ],
            ),
        ],
        sampling=generator_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
    )
    result = generate(stack.generator.address, message)
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.token_ids == reference.generate(reference.chat_prompt(hf_messages), [image], MAX_TOKENS, chat=True)


def test_sampling_options_reach_the_engine(stack: Stack, reference: Reference) -> None:
    address = stack.generator.address
    # Seeded sampling is reproducible; logprobs come back per token with the requested number of alternatives.
    sampled = [
        generate(address, request(PROMPT, [png_bytes(0)], max_tokens=6, temperature=1.0, seed=7, logprobs=3))
        for _ in range(2)
    ]
    assert sampled[0].code == grpc.StatusCode.OK, sampled[0].details
    assert sampled[0].token_ids == sampled[1].token_ids

    async def with_logprobs(stub: generator_pb2_grpc.GeneratorStub) -> list[generator_pb2.GenerateResponse]:
        message = request("USER: hello ASSISTANT:", max_tokens=4, logprobs=3, ignore_eos=True)
        return [response async for response in stub.Generate(message, timeout=30)]

    responses = run_client(address, with_logprobs)
    entries = [entry for response in responses for entry in response.logprobs]
    assert [entry.token_id for entry in entries] == [t for response in responses for t in response.token_ids]
    assert all(len(entry.top) == 3 and entry.logprob <= 0.0 for entry in entries)

    # A stop string cuts the text before it and is reported as the stop reason.
    greedy = generate(address, request("USER: hello ASSISTANT:", max_tokens=12, ignore_eos=True))
    stop = greedy.text.strip()[2:5]
    assert len(stop) == 3, greedy.text
    stopped = generate(address, request("USER: hello ASSISTANT:", max_tokens=12, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == generator_pb2.FINISH_REASON_STOP
    assert stop not in stopped.text and greedy.text.startswith(stopped.text)
    stack.generator.wait_idle()
