"""The client library and CLI against fake Encoder/Generator servicers on real gRPC over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.client import AsyncMMServeClient, EmbeddingKey, Message, MMServeClient, build_request
from common.client.cli import main
from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 4096  # one fp16 embedding of 576 x 4096 is 4.5 MiB: over gRPC's default 4 MiB receive limit
IMAGE = b"\x89PNG fake image bytes"


class FakeGenerator(generator_pb2_grpc.GeneratorServicer):
    """Streams "tok0 ", "tok1 ", ... (max_tokens of them, default 3), then a LENGTH message with usage.
    Prompt "invalid" aborts with INVALID_ARGUMENT; "stall" sends one message and then waits for the client."""

    def __init__(self) -> None:
        self.requests: list[generator_pb2.GenerateRequest] = []
        self.cancelled = threading.Event()
        self.info = encoder_pb2.ModelInfo(model_id="fake-generator", image_placeholder="<image>", max_context=4096)

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[generator_pb2.GenerateResponse]:
        self.requests.append(request)
        if request.prompt == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt has 2 <image> placeholders for 1 image")
        if request.prompt == "stall":
            try:
                yield generator_pb2.GenerateResponse(token_ids=[7], text="first")
                await asyncio.Event().wait()  # until the client cancels
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        n = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 3
        for i in range(n):
            yield generator_pb2.GenerateResponse(request_id=request.request_id, token_ids=[100 + i], text=f"tok{i} ")
        usage = generator_pb2.Usage(prompt_tokens=5, completion_tokens=n, image_tokens=576 * len(request.images))
        yield generator_pb2.GenerateResponse(finish_reason=generator_pb2.FINISH_REASON_LENGTH, usage=usage)

    async def GetModelInfo(self, request: Any, context: Any) -> encoder_pb2.ModelInfo:
        return self.info


class FakeEncoder(encoder_pb2_grpc.EncoderServicer):
    """Keys are sha256 of the bytes; a key seen before is a cache hit."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.instructions: list[str] = []

    async def Encode(self, request: Any, context: Any) -> encoder_pb2.EncodeResponse:
        self.instructions.append(request.instruction)
        out = []
        for image in request.images:
            key = image.embedding_key or hashlib.sha256(image.data).hexdigest()
            encoded = encoder_pb2.EncodedImage(embedding_key=key, cache_hit=key in self.seen, num_tokens=576)
            self.seen.add(key)
            if request.return_embeddings:
                data = bytes(576 * HIDDEN * 2)
                encoded.embedding.CopyFrom(encoder_pb2.Tensor(dtype="float16", shape=[576, HIDDEN], data=data))
            out.append(encoded)
        return encoder_pb2.EncodeResponse(images=out)

    async def GetModelInfo(self, request: Any, context: Any) -> encoder_pb2.ModelInfo:
        return encoder_pb2.ModelInfo(model_id="fake-encoder", hidden_size=HIDDEN, image_size=336)


@dataclass
class Fakes:
    address: str
    generator: FakeGenerator
    encoder: FakeEncoder


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Both fakes and Health (generator SERVING, encoder NOT_SERVING) on one port, served by a loop in a thread."""
    generator, encoder = FakeGenerator(), FakeEncoder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        generator_pb2_grpc.add_GeneratorServicer_to_server(generator, server)
        encoder_pb2_grpc.add_EncoderServicer_to_server(encoder, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set("mmserve.generator.v1.Generator", serving)
        await health_servicer.set("mmserve.encoder.v1.Encoder", not_serving)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Fakes(f"127.0.0.1:{port}", generator, encoder)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_generate_streams_each_message_and_generate_text_joins_them(fakes: Fakes) -> None:
    with MMServeClient(fakes.address) as client:
        chunks = list(client.generate("hello", max_tokens=2, request_id="r1"))
        text, token_ids, finish_reason, usage = client.generate_text("hello", max_tokens=4)
    assert [c.text for c in chunks] == ["tok0 ", "tok1 ", ""]
    assert chunks[0].request_id == "r1" and chunks[-1].finish_reason == generator_pb2.FINISH_REASON_LENGTH
    assert (text, token_ids, finish_reason, usage.completion_tokens) == (
        "tok0 tok1 tok2 tok3 ",
        [100, 101, 102, 103],
        "length",
        4,
    )


def test_sampling_keywords_set_only_the_fields_given(fakes: Fakes) -> None:
    with MMServeClient(fakes.address) as client:
        client.generate_text("hi", temperature=0.0, top_p=None, stop=["\n"], ignore_eos=True, max_tokens=1)
    sampling = fakes.generator.requests[-1].sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0.0  # 0 = greedy, not "unset"
    assert not sampling.HasField("top_p") and not sampling.HasField("seed")
    assert list(sampling.stop) == ["\n"] and sampling.ignore_eos


def test_closing_the_iterator_cancels_the_rpc_on_the_server(fakes: Fakes) -> None:
    with MMServeClient(fakes.address) as client:
        stream = client.generate("stall")
        assert next(stream).text == "first"
        assert not fakes.generator.cancelled.is_set()
        stream.close()
        assert fakes.generator.cancelled.wait(5)


def test_deadline_raises_deadline_exceeded_and_cancels(fakes: Fakes) -> None:
    with MMServeClient(fakes.address, timeout_s=0.2) as client, pytest.raises(grpc.RpcError) as info:
        client.generate_text("stall")
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fakes.generator.cancelled.wait(5)


def test_images_from_bytes_paths_and_embedding_keys(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"file bytes")
    request = build_request("q", None, [IMAGE, str(path), path, EmbeddingKey("ab" * 32)], None, {})
    sources = [image.WhichOneof("source") for image in request.images]
    assert sources == ["data", "data", "data", "embedding_key"]
    assert [i.data for i in request.images[:3]] == [IMAGE, b"file bytes", b"file bytes"]
    assert request.images[3].embedding_key == "ab" * 32
    with pytest.raises(FileNotFoundError):
        build_request("q", None, [str(tmp_path / "missing.png")], None, {})


def test_chat_messages_become_content_parts_in_order() -> None:
    messages: list[Message] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
    ]
    request = build_request(None, messages, (), "id", {"max_tokens": 3})
    assert request.prompt == "" and not request.images
    system, user = request.messages
    assert (system.role, [p.text for p in system.content]) == ("system", ["Be brief."])
    assert [p.WhichOneof("part") for p in user.content] == ["image", "text"]
    assert user.content[0].image.data == IMAGE and user.content[1].text == "What is it?"
    with pytest.raises(ValueError, match="exactly one"):
        build_request("p", messages, (), None, {})
    with pytest.raises(ValueError, match="image parts"):
        build_request(None, messages, [IMAGE], None, {})
    with pytest.raises(ValueError, match=r"\['type', 'url'\]"):
        build_request(None, [{"role": "user", "content": [{"type": "image", "url": "x"}]}], (), None, {})


def test_large_embeddings_need_the_raised_message_limit(fakes: Fakes) -> None:
    with MMServeClient(encoder_address=fakes.address) as client:
        (encoded,) = client.encode([IMAGE], return_embeddings=True)
    assert len(encoded.embedding.data) == 576 * HIDDEN * 2 and list(encoded.embedding.shape) == [576, HIDDEN]
    small = MMServeClient(encoder_address=fakes.address, max_message_bytes=4 * 1024 * 1024)
    with small, pytest.raises(grpc.RpcError) as info:
        small.encode([IMAGE], return_embeddings=True)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_async_client(fakes: Fakes) -> None:
    async def scenario() -> tuple[Any, ...]:
        async with AsyncMMServeClient(fakes.address, fakes.address) as client:
            result = await client.generate_text("hi", images=[IMAGE], max_tokens=2)
            stream = client.generate("stall")
            first = await anext(stream)
            await stream.aclose()
            encoded = await client.encode([IMAGE, IMAGE])
            info = await client.model_info("encoder")
            return result, first.text, [e.cache_hit for e in encoded], info.model_id, await client.health()

    result, first, hits, model_id, status = asyncio.run(scenario())
    assert (result.text, result.usage.image_tokens, result.finish_reason) == ("tok0 tok1 ", 576, "length")
    assert (first, hits, model_id, status) == ("first", [False, True], "fake-encoder", "SERVING")
    assert fakes.generator.cancelled.wait(5)


def test_cli_generate_prepends_one_placeholder_per_image(fakes: Fakes, tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "cat.jpg").write_bytes(IMAGE)
    argv = ["generate", "--address", fakes.address, "--image", str(tmp_path / "cat.jpg"), "--image", "key:abcd"]
    assert main([*argv, "--max-tokens", "2", "Describe it."]) == 0
    request = fakes.generator.requests[-1]
    assert request.prompt == "<image>\n<image>\nDescribe it."
    assert request.images[0].data == IMAGE and request.images[1].embedding_key == "abcd"
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    out, err = capsys.readouterr()
    assert out == "tok0 tok1 \n"
    assert "finish_reason=length" in err and "completion_tokens=2" in err and "image_tokens=1152" in err


def test_cli_generate_leaves_the_prompt_alone_where_placeholders_are_not_wanted(fakes: Fakes, tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(IMAGE)
    image = ["--image", str(tmp_path / "cat.jpg")]
    assert main(["generate", "--address", fakes.address, *image, "USER: <image>\nDescribe it."]) == 0
    assert fakes.generator.requests[-1].prompt == "USER: <image>\nDescribe it."  # the caller placed it
    fakes.generator.info = encoder_pb2.ModelInfo(image_placeholder="<image>", images_before_text=True)  # BLIP-2
    assert main(["generate", "--address", fakes.address, *image, "Question: what is it? Answer:"]) == 0
    assert fakes.generator.requests[-1].prompt == "Question: what is it? Answer:"


def test_cli_generate_chat_sends_a_user_turn_images_first(fakes: Fakes, tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(IMAGE)
    assert main(["generate", "--address", fakes.address, "--chat", "--image", str(tmp_path / "cat.jpg"), "Hi?"]) == 0
    request = fakes.generator.requests[-1]
    assert request.prompt == "" and not request.images and len(request.messages) == 1
    (turn,) = request.messages
    assert turn.role == "user" and [p.WhichOneof("part") for p in turn.content] == ["image", "text"]
    assert turn.content[0].image.data == IMAGE and turn.content[1].text == "Hi?"


def test_cli_errors_print_status_and_exit_1(fakes: Fakes, tmp_path: Path, capsys: Any) -> None:
    assert main(["generate", "--address", fakes.address, "invalid"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: INVALID_ARGUMENT: prompt has 2 <image> placeholders for 1 image\n"
    missing = str(tmp_path / "missing.jpg")
    assert main(["generate", "--address", fakes.address, "--image", missing, "q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err and "Traceback" not in err


def test_cli_encode_and_info(fakes: Fakes, tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "a.png").write_bytes(IMAGE)
    image = str(tmp_path / "a.png")
    assert main(["encode", "--address", fakes.address, image, image]) == 0
    key = hashlib.sha256(IMAGE).hexdigest()
    assert capsys.readouterr().out.splitlines() == [
        f"key={key} cache_hit=false num_tokens=576 image={image}",
        f"key={key} cache_hit=true num_tokens=576 image={image}",
    ]
    assert main(["encode", "--address", fakes.address, "--instruction", "What is it?", image]) == 0
    assert fakes.encoder.instructions[-2:] == ["", "What is it?"]  # one Encode call each
    capsys.readouterr()
    assert main(["info", "--service", "encoder", "--address", fakes.address]) == 0
    assert "model_id: fake-encoder" in capsys.readouterr().out.splitlines()


def test_cli_health_exit_codes(fakes: Fakes, capsys: Any) -> None:
    assert main(["health", "--address", fakes.address]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert main(["health", "--service", "encoder", "--address", fakes.address]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_health_command_as_a_process(fakes: Fakes) -> None:
    """What a container healthcheck runs: exit 0 when SERVING, 1 with one line and no traceback when down."""
    command = [sys.executable, "-m", "common.client", "health", "--address"]
    up = subprocess.run([*command, fakes.address], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert (up.returncode, up.stdout) == (0, "SERVING\n")
    down = subprocess.run([*command, "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and down.stderr.startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in down.stderr and down.stderr.count("\n") == 1
