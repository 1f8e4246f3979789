"""Odd requests over real gRPC: random and mutated EncodeRequest / GenerateRequest messages, and raw bytes that may
not be a message at all, sent to an in-process encoder server and generator server (tiny LLaVA, in-process image
path). Every call ends with a status a client can act on (never UNKNOWN, INTERNAL, UNAVAILABLE or a deadline), and
afterwards the server is SERVING with nothing left behind: no Encode admission slot and no generator request or KV
block.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given
from hypothesis import strategies as st

from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.encoder.support import MiB, RunningServer
from tests.encoder.support import encoder_config as encoder_service_config
from tests.fuzz.support import UNSAFE_TEXT, fuzz_settings, mutated_images, seed_corpus
from tests.generator_service.support import EventLoopThread, RunningGenerator, generator_config

pytestmark = pytest.mark.fuzz

Code = grpc.StatusCode
# What a well-formed refusal looks like; UNKNOWN / INTERNAL (a bug), UNAVAILABLE (a healthy server said it is not)
# and DEADLINE_EXCEEDED (a call that did not end in 60 s) are failures.
ALLOWED = {
    Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE,
}  # fmt: skip
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 4 * MiB  # the smallest the config allows
MAX_MODEL_LEN = 96  # bounds every generation: each example ends in well under a second
CALL_TIMEOUT_S = 60.0
KNOWN_KEY = "<the key of a cached image>"  # replaced by a real embedding key when the request is built
TOO_LONG = "x" * (5 * MiB)  # over the encoder's receive limit


# ---------------------------------------------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    config = encoder_service_config(
        tiny_checkpoint,
        max_images_per_request=MAX_IMAGES,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=250_000,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    running = RunningServer(config)
    yield running
    running.close()


@pytest.fixture(scope="module")
def known_key(encoder: RunningServer) -> str:
    key: str = encoder.encode(seed_corpus()["rgb.png"]).images[0].embedding_key
    return key


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> Iterator[RunningGenerator]:
    loop = EventLoopThread()
    config = generator_config(tiny_checkpoint, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_queue_len=8)
    running = RunningGenerator(loop, config)  # encodes images in-process
    yield running
    running.stop()
    loop.close()


def channel_to(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 * MiB)])


@pytest.fixture(scope="module")
def encoder_channel(encoder: RunningServer) -> Iterator[grpc.Channel]:
    channel = channel_to(encoder.server.port)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def generator_channel(generator: RunningGenerator) -> Iterator[grpc.Channel]:
    channel = channel_to(generator.server.port)
    yield channel
    channel.close()


def assert_serving(channel: grpc.Channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def assert_encoder_clean(encoder: RunningServer, channel: grpc.Channel) -> None:
    assert encoder.server._servicer.pending_images == 0  # every admission slot given back
    assert_serving(channel)


def assert_generator_clean(generator: RunningGenerator, channel: grpc.Channel) -> None:
    generator.wait_idle(timeout=10.0)  # no call in flight and mmserve_kv_blocks_used == 0
    assert_serving(channel)


def assert_allowed(error: grpc.RpcError) -> None:
    code, details = error.code(), error.details() or ""
    event(code.name)
    assert code in ALLOWED, f"{code}: {details}"
    assert details and not UNSAFE_TEXT.search(details), details


# ---------------------------------------------------------------------------------------------------------------
# Strategies: messages with odd field values

_hex = "0123456789abcdef"
embedding_keys = st.one_of(
    st.just(KNOWN_KEY),
    st.text(alphabet=_hex, min_size=64, max_size=64),  # well-formed, never cached
    st.text(alphabet=_hex + "ABCDEFxyz", min_size=0, max_size=70),  # wrong case, length or letters
    st.text(max_size=40),  # anything, control characters and astral planes included
)
valid_images = st.sampled_from([data for name, data in sorted(seed_corpus().items()) if not name.endswith(".tiff")])
image_data = st.one_of(
    valid_images,
    valid_images,  # twice: a request whose every image is valid must be common enough to reach the encoder
    mutated_images(),
    st.binary(max_size=256),
    st.just(b""),
    st.just(b"\0" * (MAX_IMAGE_BYTES + 1)),
)
image_inputs = st.one_of(
    st.builds(lambda data: ("data", data), image_data),
    st.builds(lambda key: ("key", key), embedding_keys),
    st.just(("unset", None)),
)


def to_image_input(spec: tuple[str, Any], known_key: str) -> encoder_pb2.ImageInput:
    kind, value = spec
    if kind == "data":
        return encoder_pb2.ImageInput(data=value)
    if kind == "key":
        return encoder_pb2.ImageInput(embedding_key=known_key if value == KNOWN_KEY else value)
    return encoder_pb2.ImageInput()


texts = st.one_of(st.text(max_size=60), st.sampled_from(["", "<image>", "USER: <image>\nWhat is it? ASSISTANT:"]))
floats = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 2.0, 100.0]),
)
uint32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 40))
sampling_params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.sampled_from([0, 1, 2, 8, 40, MAX_MODEL_LEN, 2**32 - 1]),
        "temperature": floats,
        "top_p": floats,
        "top_k": uint32,
        "min_p": floats,
        "repetition_penalty": floats,
        "presence_penalty": floats,
        "frequency_penalty": floats,
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=4), max_size=3),
        "stop_token_ids": st.lists(uint32, max_size=3),
        "ignore_eos": st.booleans(),
        "logprobs": uint32,
    },
)
# In range most of the time (so the request reaches the engine and samples), sometimes not.
plausible_sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(0, 24),
        "temperature": st.one_of(st.floats(0.0, 2.0, width=32), floats),
        "top_p": st.one_of(st.floats(0.0, 1.0, width=32), floats),
        "top_k": st.one_of(st.integers(0, 700), uint32),  # past the vocabulary (600) too
        "min_p": st.one_of(st.floats(0.0, 1.0, width=32), floats),
        "repetition_penalty": st.one_of(st.floats(0.5, 2.0, width=32), floats),
        "presence_penalty": st.one_of(st.floats(-2.0, 2.0, width=32), floats),
        "frequency_penalty": st.one_of(st.floats(-2.0, 2.0, width=32), floats),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.one_of(st.text(max_size=3), st.sampled_from(["", " ", "e", "\n"])), max_size=3),
        "stop_token_ids": st.lists(st.one_of(st.integers(0, 700), uint32), max_size=3),
        "ignore_eos": st.booleans(),
        "logprobs": st.one_of(st.integers(0, 30), uint32),
    },
)
prompt_pieces = st.sampled_from(
    ["USER: ", "<image>", "\n", " ASSISTANT:", "<", "image>", "<im", "</s>", "<s>", "<unk>", "What is it?"]
)
prompts = st.one_of(
    st.lists(st.one_of(prompt_pieces, st.text(max_size=12)), max_size=12).map("".join),
    st.just("word " * 400),  # past max_model_len
)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "", "tool"]), st.text(max_size=8))
content_parts = st.one_of(
    st.builds(lambda text: ("text", text), texts),
    st.builds(lambda spec: ("image", spec), image_inputs),
    st.just(("empty", None)),
)
chat_messages = st.lists(st.tuples(roles, st.lists(content_parts, max_size=3)), max_size=4)
request_ids = st.one_of(st.just(""), st.text(max_size=20), st.just("r" * 300))


# ---------------------------------------------------------------------------------------------------------------
# Encode


@given(
    images=st.lists(image_inputs, max_size=MAX_IMAGES + 2),
    return_embeddings=st.booleans(),
    instruction=st.one_of(texts, st.text(max_size=300), st.sampled_from(["", "Describe it."]), st.just(TOO_LONG)),
)
@fuzz_settings(deadline_s=30)
def test_encode_requests(
    encoder: RunningServer,
    encoder_channel: grpc.Channel,
    known_key: str,
    images: list[tuple[str, Any]],
    return_embeddings: bool,
    instruction: str,
) -> None:
    request = encoder_pb2.EncodeRequest(
        images=[to_image_input(spec, known_key) for spec in images],
        return_embeddings=return_embeddings,
        instruction=instruction,
    )
    try:
        response = encoder_pb2_grpc.EncoderStub(encoder_channel).Encode(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert_allowed(error)
    else:
        event("OK")
        assert len(response.images) == len(request.images)
        for result in response.images:
            assert result.num_tokens == 16 and result.hidden_size == 64 and len(result.embedding_key) == 64
            assert result.HasField("embedding") == return_embeddings
    assert_encoder_clean(encoder, encoder_channel)


# ---------------------------------------------------------------------------------------------------------------
# Generate


def _generate_request(
    request_id: str,
    prompt: str | None,
    messages: list[tuple[str, list[tuple[str, Any]]]],
    images: list[tuple[str, Any]],
    sampling: dict[str, Any] | None,
    known_key: str,
) -> generator_pb2.GenerateRequest:
    chat = [
        generator_pb2.ChatMessage(
            role=role,
            content=[
                generator_pb2.ContentPart(text=value)
                if kind == "text"
                else generator_pb2.ContentPart(image=to_image_input(value, known_key))
                if kind == "image"
                else generator_pb2.ContentPart()
                for kind, value in parts
            ],
        )
        for role, parts in messages
    ]
    return generator_pb2.GenerateRequest(
        request_id=request_id,
        prompt=prompt or "",
        messages=chat,
        images=[to_image_input(spec, known_key) for spec in images],
        sampling=None if sampling is None else generator_pb2.SamplingParams(**sampling),
    )


@given(
    request_id=request_ids,
    prompt=st.one_of(st.none(), prompts),
    messages=st.one_of(st.just([]), chat_messages),
    images=st.lists(image_inputs, max_size=MAX_IMAGES),
    sampling=st.one_of(st.none(), sampling_params),
)
@fuzz_settings(deadline_s=45)
def test_generate_requests(
    generator: RunningGenerator,
    generator_channel: grpc.Channel,
    known_key: str,
    request_id: str,
    prompt: str | None,
    messages: list[tuple[str, list[tuple[str, Any]]]],
    images: list[tuple[str, Any]],
    sampling: dict[str, Any] | None,
) -> None:
    """`known_key` is the encoder's key of an image; the generator has its own cache, where it is not found."""
    request = _generate_request(request_id, prompt, messages, images, sampling, known_key)
    stream = generator_pb2_grpc.GeneratorStub(generator_channel).Generate(request, timeout=CALL_TIMEOUT_S)
    finish_reasons = []
    try:
        finish_reasons = [response.finish_reason for response in stream]
    except grpc.RpcError as error:
        assert_allowed(error)
    else:
        event("OK")
        assert finish_reasons and finish_reasons[-1] != generator_pb2.FINISH_REASON_UNSPECIFIED
    assert_generator_clean(generator, generator_channel)


@given(
    question=st.text(max_size=40),
    images=st.lists(valid_images, max_size=3),
    sampling=plausible_sampling,
)
@fuzz_settings(deadline_s=45)
def test_generate_requests_that_reach_the_engine(
    generator: RunningGenerator,
    generator_channel: grpc.Channel,
    question: str,
    images: list[bytes],
    sampling: dict[str, Any],
) -> None:
    """A prompt with one placeholder per image: only the sampling parameters (and the text) are odd."""
    prompt = "USER: " + "<image>\n" * len(images) + question + " ASSISTANT:"
    request = _generate_request("", prompt, [], [("data", data) for data in images], sampling, known_key="")
    stream = generator_pb2_grpc.GeneratorStub(generator_channel).Generate(request, timeout=CALL_TIMEOUT_S)
    try:
        responses = list(stream)
    except grpc.RpcError as error:
        assert_allowed(error)
    else:
        event("OK")
        generated = [token for response in responses for token in response.token_ids]
        assert responses[-1].finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
        assert len(generated) <= sampling.get("max_tokens", 16)
    assert_generator_clean(generator, generator_channel)


# ---------------------------------------------------------------------------------------------------------------
# Raw bytes to every method: not every byte string is a message


METHODS: dict[str, tuple[type[Message], str]] = {
    "/mmserve.encoder.v1.Encoder/Encode": (encoder_pb2.EncodeRequest, "encoder"),
    "/mmserve.encoder.v1.Encoder/GetModelInfo": (encoder_pb2.GetModelInfoRequest, "encoder"),
    "/mmserve.generator.v1.Generator/Generate": (generator_pb2.GenerateRequest, "generator"),
    "/mmserve.generator.v1.Generator/GetModelInfo": (encoder_pb2.GetModelInfoRequest, "generator"),
}
# Valid requests' bytes, to mutate into nearly valid ones (bad lengths, wire types, UTF-8 inside strings).
VALID_BYTES = [
    encoder_pb2.EncodeRequest(
        images=[encoder_pb2.ImageInput(data=b"\x89PNG...")], instruction="describe", return_embeddings=True
    ).SerializeToString(),
    encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(embedding_key="ab" * 32)]).SerializeToString(),
    generator_pb2.GenerateRequest(
        request_id="r1", prompt="USER: hi ASSISTANT:", sampling=generator_pb2.SamplingParams(max_tokens=2)
    ).SerializeToString(),
    generator_pb2.GenerateRequest(
        messages=[generator_pb2.ChatMessage(role="user", content=[generator_pb2.ContentPart(text="hé")])],
        sampling=generator_pb2.SamplingParams(max_tokens=1, stop=["ü"]),
    ).SerializeToString(),
]


@st.composite
def near_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["set", "truncate", "insert"]))
        if operation == "set" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif operation == "truncate":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def decodes(message_class: type[Message], data: bytes) -> bool:
    """Whether the server's deserializer (the same generated class, same protobuf runtime) accepts `data`."""
    try:
        message_class.FromString(data)
    except DecodeError:
        return False
    return True


@given(
    method=st.sampled_from(sorted(METHODS)),
    data=st.one_of(st.binary(max_size=512), near_messages(), st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f"])),
)
@fuzz_settings(deadline_s=45)
def test_raw_bytes(
    encoder: RunningServer,
    encoder_channel: grpc.Channel,
    generator: RunningGenerator,
    generator_channel: grpc.Channel,
    method: str,
    data: bytes,
) -> None:
    message_class, service = METHODS[method]
    channel = encoder_channel if service == "encoder" else generator_channel
    try:
        if method.endswith("/Generate"):  # server streaming
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            for _ in call(data, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                data, timeout=CALL_TIMEOUT_S
            )
    except grpc.RpcError as error:
        assert_allowed(error)
        if not decodes(message_class, data):
            assert error.code() == Code.INVALID_ARGUMENT
            assert error.details() == f"request is not a valid {message_class.DESCRIPTOR.full_name}"
    else:
        event("OK")
        assert decodes(message_class, data), "undecodable bytes were answered OK"
    if service == "encoder":
        assert_encoder_clean(encoder, channel)
    else:
        assert_generator_clean(generator, channel)
