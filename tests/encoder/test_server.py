"""The gRPC server: health, reflection, model info, cache hits, keys, single flight, metrics, draining."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from common.config import ModelConfig
from common.hashing import image_key
from common.images.vision_encoder import VisionEncoder
from common.tensor_codec import tensor_from_proto
from encoder_service.server import SERVICE_NAME
from protos import encoder_pb2
from tests.conftest import CheckpointFactory
from tests.encoder.conftest import StartServer
from tests.encoder.support import SlowVisionEncoder, encoder_config, png_bytes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_health_is_not_serving_until_the_model_is_loaded(tiny_checkpoint: Path, start_server: StartServer) -> None:
    release = threading.Event()

    def slow_factory() -> VisionEncoder:
        release.wait(timeout=60)
        return VisionEncoder(ModelConfig(model=str(tiny_checkpoint)))

    server = start_server(encoder_config(tiny_checkpoint), listen_only=True, encoder_factory=slow_factory)
    loading = asyncio.run_coroutine_threadsafe(server.server.load(), server.loop)  # health is probed meanwhile
    assert health_status(server.channel, "") == NOT_SERVING
    assert health_status(server.channel, SERVICE_NAME) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        server.encode(png_bytes(1))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    release.set()
    loading.result(timeout=60)
    assert health_status(server.channel, "") == SERVING
    assert health_status(server.channel, SERVICE_NAME) == SERVING
    assert server.encode(png_bytes(1)).images[0].num_tokens == 16


def test_reflection_and_model_info(tiny_checkpoint: Path, start_server: StartServer) -> None:
    server = start_server(encoder_config(tiny_checkpoint))
    services = set(ProtoReflectionDescriptorDatabase(server.channel).get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    info = server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
    assert info.model_id == str(tiny_checkpoint)
    assert (info.dtype, info.device, info.image_placeholder) == ("float32", "cpu", "<image>")
    assert (info.hidden_size, info.image_size, info.max_context) == (64, 32, 0)
    assert info.image_token_id == json.loads((tiny_checkpoint / "config.json").read_text())["image_token_index"]
    assert len(info.fingerprint) == 64 and info.version


def test_second_encode_is_a_cache_hit_with_identical_tensors(tiny_checkpoint: Path, start_server: StartServer) -> None:
    encoders: list[SlowVisionEncoder] = []

    def factory() -> SlowVisionEncoder:
        encoders.append(SlowVisionEncoder(ModelConfig(model=str(tiny_checkpoint))))
        return encoders[-1]

    server = start_server(encoder_config(tiny_checkpoint, metrics_port=0), encoder_factory=factory)
    preprocessed_before = encoders[0].preprocessed_images
    data = png_bytes()
    (first,) = server.encode(data).images
    (second,) = server.encode(data).images
    (by_key,) = server.encode(first.embedding_key).images
    assert (first.cache_hit, second.cache_hit, by_key.cache_hit) == (False, True, True)
    assert first.embedding_key == second.embedding_key == by_key.embedding_key
    assert first.embedding == second.embedding == by_key.embedding  # same dtype, shape and bytes
    assert not server.encode(data, return_embeddings=False).images[0].HasField("embedding")
    assert encoders[0].preprocessed_images - preprocessed_before == 1  # hits never decode the image
    # The Prometheus endpoint of this server (its own registry) shows the same story.
    assert server.server.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert "mmserve_encoder_cache_hits_total 3.0" in text  # second, by_key, return_embeddings=False
    assert "mmserve_encoder_cache_misses_total 1.0" in text
    assert "mmserve_encoder_images_encoded_total 2.0" in text  # warm-up + the one miss
    assert "mmserve_encoder_encode_seconds_bucket" in text and "mmserve_encoder_batch_size_bucket" in text
    assert 'mmserve_encoder_requests_total{code="OK"} 4.0' in text


def test_unknown_and_malformed_embedding_keys(tiny_checkpoint: Path, start_server: StartServer) -> None:
    server = start_server(encoder_config(tiny_checkpoint))
    for key, code in [("0" * 64, grpc.StatusCode.FAILED_PRECONDITION), ("not-a-key", grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as error:
            server.encode(png_bytes(3), key)
        assert error.value.code() == code
        assert "images[1]" in str(error.value.details())
    assert server.encode(png_bytes(3)).images[0].num_tokens == 16  # and the next good request succeeds


def test_keys_differ_across_checkpoints_and_processor_configs(
    checkpoint_factory: CheckpointFactory, tmp_path: Path, start_server: StartServer
) -> None:
    base = checkpoint_factory(vision="clip", seed=0)
    other_weights = checkpoint_factory(vision="clip", seed=1)
    other_processor = tmp_path / "other-processor"
    shutil.copytree(base, other_processor)
    config_file = other_processor / "processor_config.json"
    processor = json.loads(config_file.read_text())
    processor["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    config_file.write_text(json.dumps(processor))

    data = png_bytes(11)
    keys = {}
    for name, path in [("base", base), ("weights", other_weights), ("processor", other_processor)]:
        server = start_server(encoder_config(path))
        (result,) = server.encode(data).images
        info = server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
        assert result.embedding_key == image_key(info.fingerprint, data)
        keys[name] = result.embedding_key
    assert len(set(keys.values())) == 3


def test_sixteen_concurrent_requests_for_one_new_image_encode_it_once(
    tiny_checkpoint: Path, start_server: StartServer
) -> None:
    encoders: list[SlowVisionEncoder] = []

    def factory() -> SlowVisionEncoder:
        encoders.append(SlowVisionEncoder(ModelConfig(model=str(tiny_checkpoint))))
        encoders[-1].delay_s = 0.3  # every request arrives while the one encode is still running
        return encoders[-1]

    server = start_server(encoder_config(tiny_checkpoint), encoder_factory=factory)
    passes_before = encoders[0].forward_passes
    data = png_bytes()
    request = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=data)], return_embeddings=True)
    futures = [server.stub.Encode.future(request, timeout=60) for _ in range(16)]
    results = [future.result().images[0] for future in futures]
    assert encoders[0].forward_passes - passes_before == 1
    assert server.metric("mmserve_encoder_cache_misses_total") == 1
    joined = server.metric("mmserve_encoder_cache_coalesced_total") + server.metric("mmserve_encoder_cache_hits_total")
    assert joined == 15
    assert len({r.embedding_key for r in results}) == 1
    reference = tensor_from_proto(results[0].embedding)
    assert all(torch.equal(tensor_from_proto(r.embedding), reference) for r in results)


def test_drain_finishes_in_flight_calls_and_refuses_new_ones(tiny_checkpoint: Path, start_server: StartServer) -> None:
    encoders: list[SlowVisionEncoder] = []

    def factory() -> SlowVisionEncoder:
        encoders.append(SlowVisionEncoder(ModelConfig(model=str(tiny_checkpoint))))
        return encoders[-1]

    server = start_server(encoder_config(tiny_checkpoint), encoder_factory=factory)
    encoders[0].delay_s = 0.5
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
    )
    assert next(watch).status == SERVING
    in_flight = server.stub.Encode.future(
        encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=png_bytes())]), timeout=30
    )
    deadline = time.monotonic() + 10
    while server.metric("mmserve_encoder_cache_misses_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the call is inside the encoder
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=10), server.loop)
    assert next(watch).status == NOT_SERVING  # streamed to watchers before the server stops
    watch.cancel()
    with pytest.raises(grpc.RpcError) as error:
        server.encode("0" * 64)  # a lookup: no forward pass needed, so only draining can refuse it
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert in_flight.result().images[0].num_tokens == 16  # the in-flight call completed normally
    stopping.result(timeout=30)


def test_response_over_the_message_limit_is_resource_exhausted(
    tiny_checkpoint: Path, start_server: StartServer
) -> None:
    """1100 copies of one image (encoded once): 1100 x 4 KiB of float32 is over the 4 MiB message limit."""
    config = encoder_config(tiny_checkpoint, max_message_bytes=4 * 1024 * 1024, max_images_per_request=2000)
    server = start_server(config)
    data = png_bytes(size=(8, 8))
    with pytest.raises(grpc.RpcError) as error:
        server.encode(*[data] * 1100)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "return_embeddings=false" in str(error.value.details())
    by_key = server.encode(*[data] * 1100, return_embeddings=False).images  # keys only: fits
    assert len(by_key) == 1100 and len({r.embedding_key for r in by_key}) == 1
