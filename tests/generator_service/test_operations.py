"""Operations: health per service name, reflection, GetModelInfo, Prometheus metrics, keepalive, and the
protobuf <-> dataclass conversions and encoder-address parsing the servicer relies on."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from generator_service.encoder_client import encoder_targets
from generator_service.engine.llm_engine import EngineStats, RequestOutput, Usage
from generator_service.engine.sampler import TokenLogprobs
from generator_service.engine.sampling_params import SamplingParams
from generator_service.metrics import GeneratorMetrics
from generator_service.servicer import response_from_output, sampling_from_proto
from protos import encoder_pb2, generator_pb2, generator_pb2_grpc
from tests.generator_service.conftest import Stack, StartEncoder, StartGenerator
from tests.generator_service.support import PROMPT, Reference, collect, generate, png_bytes, request, run_client

CONTRACT_METRICS = (
    "mmserve_kv_blocks_total",
    "mmserve_kv_blocks_used",
    "mmserve_requests_running",
    "mmserve_requests_waiting",
    "mmserve_prefix_cache_hit_tokens_total",
    "mmserve_preemptions_total",
    "mmserve_time_to_first_token_seconds_bucket",
    "mmserve_inter_token_latency_seconds_bucket",
    'mmserve_requests_total{status="OK"}',
)


def test_health_reflection_and_model_info(stack: Stack) -> None:
    with grpc.insecure_channel(stack.generator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mmserve.generator.v1.Generator"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name for service in answer.list_services_response.service}
        assert names >= {
            "mmserve.generator.v1.Generator",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }

        info = generator_pb2_grpc.GeneratorStub(channel).GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
    assert info.max_context == 2048 and info.hidden_size == 64 and info.image_placeholder == "<image>"
    assert info.dtype == "float32" and info.device == "cpu" and info.image_size == 32
    assert stack.encoder.server.local_encoder is not None
    assert info.fingerprint == stack.encoder.server.local_encoder.fingerprint  # image keys agree across services


def test_metrics_endpoint_serves_the_contract_names(stack: Stack) -> None:
    assert generate(stack.generator.address, request(PROMPT, [png_bytes(70)], max_tokens=4)).code == grpc.StatusCode.OK
    stack.generator.wait_idle()
    port = stack.generator.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in CONTRACT_METRICS:
        assert name in text, name
    assert "mmserve_kv_blocks_used 0.0" in text
    assert stack.generator.metric("mmserve_kv_blocks_total") == 256


def test_metrics_registries_are_per_server() -> None:
    stats = EngineStats(10, 3, 1, 2, 5, 0)
    first, second = GeneratorMetrics(lambda: stats), GeneratorMetrics(lambda: EngineStats(7, 0, 0, 0, 0, 0))
    first.requests_total.labels(status="OK").inc()
    assert first.value("mmserve_requests_total", {"status": "OK"}) == 1
    assert second.value("mmserve_requests_total", {"status": "OK"}) == 0
    assert (first.value("mmserve_kv_blocks_used"), second.value("mmserve_kv_blocks_total")) == (3, 7)
    assert first.value("mmserve_prefix_cache_hit_tokens_total") == 5


def test_kv_pressure_preempts_and_stays_exact(
    start_generator: StartGenerator, stack: Stack, reference: Reference
) -> None:
    """A KV pool too small for all streams at once: preemption (recompute), same tokens, every block back."""
    generator = start_generator(encoder_address=stack.encoder.address, num_kv_blocks=24)  # 96 tokens
    prompts = [(PROMPT, [png_bytes(80 + i)]) for i in range(4)]
    results = run_client(
        generator.address,
        lambda stub: asyncio.gather(*(collect(stub, request(p, imgs, max_tokens=12)) for p, imgs in prompts)),
    )
    for (prompt, images), result in zip(prompts, results, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == reference.generate(prompt, images, 12)
    assert generator.metric("mmserve_preemptions_total") > 0
    generator.wait_idle()


def test_keepalive_pings_keep_the_connection(stack: Stack) -> None:
    """A client pinging as often as gRPC lets it (about once a second), between and during streams, keeps its
    connection: a server with gRPC's defaults answers the third ping without data with GOAWAY (too_many_pings)
    and the channel drops to IDLE and reconnects, which interrupts streams on that connection."""
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    states: list[str] = []
    with grpc.insecure_channel(stack.generator.address, options=options) as channel:
        channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
        stub = generator_pb2_grpc.GeneratorStub(channel)
        assert list(stub.Generate(request("USER: hi ASSISTANT:", max_tokens=2), timeout=30))
        idle_until = time.monotonic() + 3.5  # long enough for three pings without data
        while time.monotonic() < idle_until:
            time.sleep(0.1)
        assert list(stub.Generate(request("USER: hi ASSISTANT:", max_tokens=2), timeout=30))
    assert states.count("READY") == 1 and "TRANSIENT_FAILURE" not in states, states
    assert states[-1] == "READY", states


@pytest.mark.parametrize(
    ("address", "targets"),
    [
        ("encoder:50051", ["encoder:50051"]),
        ("dns:///encoder.svc:50051", ["dns:///encoder.svc:50051"]),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ["ipv4:127.0.0.1:1,127.0.0.1:2"]),
        ("127.0.0.1:1, 127.0.0.1:2", ["ipv4:127.0.0.1:1,127.0.0.1:2"]),
        ("[::1]:1,[::1]:2", ["ipv6:[::1]:1,[::1]:2"]),
        ("enc-a:1,enc-b:2", ["enc-a:1", "enc-b:2"]),
    ],
)
def test_encoder_targets(address: str, targets: list[str]) -> None:
    assert encoder_targets(address) == targets


def test_encoder_replicas_round_robin(
    stack: Stack, start_encoder: StartEncoder, start_generator: StartGenerator, reference: Reference
) -> None:
    other = start_encoder(max_batch_size=1)
    generator = start_generator(encoder_address=f"{stack.encoder.address},{other.address}")
    before = [encoder.metric("mmserve_encoder_requests_total", {"code": "OK"}) for encoder in (stack.encoder, other)]
    for index in range(4):
        result = generate(generator.address, request(PROMPT, [png_bytes(300 + index)], max_tokens=3))
        assert result.token_ids == reference.generate(PROMPT, [png_bytes(300 + index)], 3)
    after = [encoder.metric("mmserve_encoder_requests_total", {"code": "OK"}) for encoder in (stack.encoder, other)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 4 and min(served) >= 1  # both replicas took Encode calls


def test_sampling_defaults_and_conversion() -> None:
    assert sampling_from_proto(generator_pb2.SamplingParams()) == SamplingParams()
    assert SamplingParams().max_tokens == 16 and SamplingParams().temperature == 1.0
    explicit = sampling_from_proto(
        generator_pb2.SamplingParams(max_tokens=3, temperature=0.0, top_k=0, seed=0, stop=["x"], stop_token_ids=[2])
    )
    assert (explicit.max_tokens, explicit.temperature, explicit.seed) == (3, 0.0, 0)  # 0 is not "unset"
    assert explicit.stop == ("x",) and explicit.stop_token_ids == (2,)
    with pytest.raises(ValueError, match="top_p"):
        sampling_from_proto(generator_pb2.SamplingParams(top_p=1.5))


def test_response_conversion() -> None:
    middle = response_from_output(
        RequestOutput("r", [5], "a", logprobs=[TokenLogprobs(5, -0.5, ((5, -0.5), (6, -1.0)))])
    )
    assert middle.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED and not middle.HasField("usage")
    assert [(t.token_id, t.logprob) for t in middle.logprobs[0].top] == [(5, -0.5), (6, -1.0)]
    last = response_from_output(
        RequestOutput("r", [2], "", finished=True, finish_reason="stop", stop_reason=2, usage=Usage(7, 3, 4, 16))
    )
    assert last.finish_reason == generator_pb2.FINISH_REASON_STOP and last.stop_reason == "2"
    assert (last.usage.prompt_tokens, last.usage.cached_prompt_tokens, last.usage.image_tokens) == (7, 4, 16)
    aborted = response_from_output(RequestOutput("r", [], "", finished=True, finish_reason="abort"))
    assert aborted.finish_reason == generator_pb2.FINISH_REASON_ABORT
    assert not math.isnan(middle.logprobs[0].logprob)
