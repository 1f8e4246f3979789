"""Bad requests get the contract's status codes with clear messages, and the service keeps serving."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from protos import encoder_pb2, generator_pb2, generator_pb2_grpc
from tests.generator_service.conftest import Stack
from tests.generator_service.support import (
    PROMPT,
    Reference,
    StreamResult,
    collect,
    generate,
    png_bytes,
    request,
    run_client,
    until,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES: dict[str, tuple[generator_pb2.GenerateRequest, grpc.StatusCode, str]] = {
    "too long, text": (request("USER: hi ASSISTANT:", max_tokens=2045), INVALID, "max_model_len"),
    "too long, image (checked before encoding)": (
        request(PROMPT, [png_bytes(900)], max_tokens=2040),
        INVALID,
        "max_model_len",
    ),
    "temperature < 0": (request("hi", temperature=-1.0), INVALID, "temperature"),
    "top_p = 0": (request("hi", top_p=0.0), INVALID, "top_p"),
    "max_tokens = 0": (request("hi", max_tokens=0), INVALID, "max_tokens must be >= 1"),
    "logprobs too many": (request("hi", logprobs=50), INVALID, "logprobs"),
    "empty stop string": (request("hi", stop=[""]), INVALID, "stop strings"),
    "missing embedding key": (request(PROMPT, ["ab" * 32]), grpc.StatusCode.FAILED_PRECONDITION, "send the image"),
    "malformed embedding key": (request(PROMPT, ["not-a-key"]), INVALID, "64 lowercase hex"),
    "image neither data nor key": (
        generator_pb2.GenerateRequest(prompt=PROMPT, images=[encoder_pb2.ImageInput()]),
        INVALID,
        "neither data nor embedding_key",
    ),
    "corrupt image bytes": (request(PROMPT, [b"\x89PNG\r\n\x1a\n" + b"\0" * 40]), INVALID, "PNG"),
    "text-only format": (request(PROMPT, [b"GIF89a but not really"]), INVALID, "image"),
    "placeholder without image": (request(PROMPT), INVALID, "1 image placeholder(s)"),
    "image without placeholder": (request("USER: hi ASSISTANT:", [png_bytes(901)]), INVALID, "0 image placeholder"),
    "empty request": (generator_pb2.GenerateRequest(), INVALID, "neither a prompt nor messages"),
    "prompt and messages": (
        generator_pb2.GenerateRequest(
            prompt="hi",
            messages=[generator_pb2.ChatMessage(role="user", content=[generator_pb2.ContentPart(text="x")])],
        ),
        INVALID,
        "not both",
    ),
    "message without role": (
        generator_pb2.GenerateRequest(
            messages=[generator_pb2.ChatMessage(content=[generator_pb2.ContentPart(text="x")])]
        ),
        INVALID,
        "role is empty",
    ),
    "request id too long": (request("hi", request_id="x" * 300), INVALID, "request_id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_status(stack: Stack, case: str) -> None:
    message, code, fragment = CASES[case]
    encodes_before = stack.encoder.metric("mmserve_encoder_images_encoded_total")
    result = generate(stack.generator.address, message)
    assert result.code == code, result.details
    assert fragment in result.details
    assert result.messages == 0  # refused before the first message
    assert not re.search(r"0x[0-9a-f]{6,}|Traceback|File \"", result.details)  # no address, no stack trace
    if "before encoding" in case:
        assert stack.encoder.metric("mmserve_encoder_images_encoded_total") == encodes_before
    stack.generator.wait_idle()


def test_duplicate_request_id_in_flight(stack: Stack, reference: Reference) -> None:
    async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[StreamResult, StreamResult]:
        first = stub.Generate(request("USER: story ASSISTANT:", request_id="dup-1", max_tokens=900, ignore_eos=True))
        await first.read()  # in flight now
        second = await collect(stub, request("USER: hi ASSISTANT:", request_id="dup-1", max_tokens=2))
        first.cancel()
        return second, await collect(stub, request("USER: hi ASSISTANT:", request_id="dup-2", max_tokens=2))

    duplicate, other = run_client(stack.generator.address, run)
    assert duplicate.code == grpc.StatusCode.ALREADY_EXISTS and "dup-1" in duplicate.details
    assert other.code == grpc.StatusCode.OK
    stack.generator.wait_idle()
    # Once the first has ended, its id is free again.
    again = generate(stack.generator.address, request("USER: hi ASSISTANT:", request_id="dup-1", max_tokens=3))
    assert again.code == grpc.StatusCode.OK
    assert again.token_ids == reference.generate("USER: hi ASSISTANT:", [], 3)


def test_request_id_is_echoed_or_generated(stack: Stack) -> None:
    async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[set[str], set[str]]:
        named = {r.request_id async for r in stub.Generate(request("hi", request_id="mine-7", max_tokens=3))}
        unnamed = {r.request_id async for r in stub.Generate(request("hi", max_tokens=3))}
        return named, unnamed

    named, unnamed = run_client(stack.generator.address, run)
    assert named == {"mine-7"}
    assert len(unnamed) == 1 and next(iter(unnamed)).startswith("gen-")


def test_many_failures_then_normal_service(stack: Stack, reference: Reference) -> None:
    """A mixed burst of bad and good requests: the bad ones fail alone, the good ones are exact."""

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> list[StreamResult]:
        jobs = []
        for index in range(12):
            if index % 3 == 0:
                jobs.append(collect(stub, request(PROMPT, [b"garbage"])))
            elif index % 3 == 1:
                jobs.append(collect(stub, request("hi", temperature=-5.0)))
            else:
                jobs.append(collect(stub, request(PROMPT, [png_bytes(index)], max_tokens=5)))
        return await asyncio.gather(*jobs)

    results = run_client(stack.generator.address, run)
    for index, result in enumerate(results):
        if index % 3 == 2:
            assert result.code == grpc.StatusCode.OK, result.details
            assert result.token_ids == reference.generate(PROMPT, [png_bytes(index)], 5)
        else:
            assert result.code == INVALID
    stack.generator.wait_idle()


def test_cancel_while_encoding_frees_everything(stack: Stack) -> None:
    """A call cancelled while its image is at the encoder never reaches the engine's KV cache."""

    async def run(stub: generator_pb2_grpc.GeneratorStub) -> None:
        call = stub.Generate(request(PROMPT, [png_bytes(950, (600, 600))], max_tokens=4))
        await until(lambda: stack.generator.server.num_in_flight == 1, what="the call to be admitted")
        call.cancel()

    run_client(stack.generator.address, run)
    stack.generator.wait_idle()
