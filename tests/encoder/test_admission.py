"""Overload admission: --max-pending-images caps the images of Encode calls in flight; the rest get an
immediate RESOURCE_EXHAUSTED before any decode or cache call, and every way a call ends frees its slots.

The vision tower is held by a `threading.Event` the test controls (a stuck forward pass is a fault the real
model cannot produce on demand); everything else is the real server on loopback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from common.config import ConfigError, ModelConfig, encoder_config_from_args
from common.images.embedding import ImageEmbedding
from common.models.base import PreparedImage
from protos import encoder_pb2
from tests.encoder.conftest import StartServer
from tests.encoder.support import RunningServer, SlowVisionEncoder, encoder_config, png_bytes

LIMIT = 2
OVERLOADED = f"encoder overloaded: 2 images in flight, limit {LIMIT} (--max-pending-images); retry later"


class GatedVisionEncoder(SlowVisionEncoder):
    """Every forward pass waits until `gate` is set; `entered` is set when one has started."""

    def __init__(self, model_config: ModelConfig) -> None:
        self.gate = threading.Event()
        self.gate.set()  # open for the warm-up batch
        self.entered = threading.Event()
        super().__init__(model_config)

    def encode_prepared(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        return super().encode_prepared(images)


Gated = tuple[RunningServer, GatedVisionEncoder]


@pytest.fixture
def gated(tiny_checkpoint: Path, start_server: StartServer) -> Iterator[Gated]:
    encoders: list[GatedVisionEncoder] = []

    def factory() -> GatedVisionEncoder:
        encoders.append(GatedVisionEncoder(ModelConfig(model=str(tiny_checkpoint))))
        return encoders[-1]

    config = encoder_config(tiny_checkpoint, max_pending_images=LIMIT, max_batch_wait_ms=1.0)
    server = start_server(config, encoder_factory=factory)
    encoders[0].entered.clear()  # set by the warm-up batch
    yield server, encoders[0]
    encoders[0].gate.set()  # never leave a forward pass stuck for the server's shutdown


def request(*images: bytes | str) -> encoder_pb2.EncodeRequest:
    items = [
        encoder_pb2.ImageInput(embedding_key=i) if isinstance(i, str) else encoder_pb2.ImageInput(data=i)
        for i in images
    ]
    return encoder_pb2.EncodeRequest(images=items, return_embeddings=False)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def refused(server: RunningServer, *images: bytes | str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Encode(request(*images), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(error.value.details())


def test_a_concurrent_burst_admits_exactly_the_limit(gated: Gated) -> None:
    server, encoder = gated
    preprocessed_before = encoder.preprocessed_images
    encoder.gate.clear()
    calls = [server.stub.Encode.future(request(png_bytes()), timeout=60) for _ in range(6)]
    wait_until(lambda: sum(call.done() for call in calls) == 6 - LIMIT)  # the refusals come back at once
    encoder.entered.wait(timeout=30)
    done = [call for call in calls if call.done()]
    admitted = [call for call in calls if not call.done()]
    assert len(admitted) == LIMIT
    for call in done:
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call.details() == OVERLOADED
    # While the tower is held, even a cache-free key lookup and a 2-image call are refused up front.
    assert refused(server, "0" * 64) == OVERLOADED
    assert refused(server, png_bytes(), png_bytes()) == OVERLOADED
    encoder.gate.set()
    for call in admitted:
        assert call.result(timeout=60).images[0].num_tokens == 16
    # Refused calls were never decoded nor looked up: only the two admitted images reached the model and cache.
    assert encoder.preprocessed_images - preprocessed_before == LIMIT
    assert server.metric("mmserve_encoder_cache_misses_total") == LIMIT
    assert server.metric("mmserve_encoder_cache_hits_total") == 0
    assert server.metric("mmserve_encoder_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == 6 - LIMIT + 2
    assert server.metric("mmserve_encoder_requests_total", {"code": "OK"}) == LIMIT
    # The slots are free again: a call of the full limit is admitted.
    assert len(server.encode(png_bytes(), png_bytes(), return_embeddings=False).images) == LIMIT


def test_the_last_slot_goes_to_exactly_one_call(gated: Gated) -> None:
    server, encoder = gated
    encoder.gate.clear()
    first = server.stub.Encode.future(request(png_bytes()), timeout=60)
    encoder.entered.wait(timeout=30)  # one image in flight: one slot left
    calls = [server.stub.Encode.future(request(png_bytes()), timeout=60) for _ in range(8)]
    wait_until(lambda: sum(call.done() for call in calls) == len(calls) - 1)
    assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in calls if call.done())
    (second,) = [call for call in calls if not call.done()]
    encoder.gate.set()
    assert first.result(timeout=60).images[0].num_tokens == 16
    assert second.result(timeout=60).images[0].num_tokens == 16


def test_slots_are_released_after_errors_and_cancellation(gated: Gated) -> None:
    server, encoder = gated
    cached = png_bytes()
    key = server.encode(cached, return_embeddings=False).images[0].embedding_key
    # A failed call (bad image bytes, found after admission) frees its slots.
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Encode(request(b"not an image", b"nor this"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.encode(cached, key, return_embeddings=False).images[1].cache_hit
    # A cancelled call frees its slots at once, although its forward pass is still held.
    encoder.entered.clear()
    encoder.gate.clear()
    stuck = server.stub.Encode.future(request(png_bytes(), png_bytes()), timeout=60)
    encoder.entered.wait(timeout=30)
    assert refused(server, key) == OVERLOADED  # cache hits count while in flight
    stuck.cancel()
    deadline = time.monotonic() + 30
    while True:  # the server learns of the cancel asynchronously
        try:
            hit = server.stub.Encode(request(cached, key), timeout=10)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.02)
    assert [image.cache_hit for image in hit.images] == [True, True]
    assert not encoder.gate.is_set()  # the cancelled call's encode never finished: its slots were released
    encoder.gate.set()


def test_a_call_larger_than_the_limit_is_admitted_when_idle(gated: Gated) -> None:
    server, _ = gated
    images = [png_bytes() for _ in range(LIMIT + 1)]
    assert len(server.encode(*images, return_embeddings=False).images) == LIMIT + 1


def test_max_pending_images_flag_and_environment() -> None:
    assert encoder_config_from_args(["--model", "m"], environ={}).max_pending_images == 256
    env = {"MMSERVE_MAX_PENDING_IMAGES": "4"}
    assert encoder_config_from_args(["--model", "m"], environ=env).max_pending_images == 4
    assert encoder_config_from_args(["--model", "m", "--max-pending-images", "8"], environ=env).max_pending_images == 8
    with pytest.raises(ConfigError, match=r"MMSERVE_MAX_PENDING_IMAGES='lots' is not a valid value for "):
        encoder_config_from_args(["--model", "m"], environ={"MMSERVE_MAX_PENDING_IMAGES": "lots"})
    with pytest.raises(ConfigError, match=r"--max-pending-images 0: use >= 1"):
        encoder_config_from_args(["--model", "m"], environ={"MMSERVE_MAX_PENDING_IMAGES": "0"})
