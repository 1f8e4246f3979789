"""Embeddings over gRPC equal `LlavaForConditionalGeneration.get_image_features` for the same image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from common.config import ModelConfig
from common.images.intake import decode_image
from common.images.vision_encoder import VisionEncoder
from common.tensor_codec import tensor_from_proto
from tests.conftest import CheckpointFactory
from tests.encoder.conftest import Reference, StartServer
from tests.encoder.support import encoder_config, png_bytes

CASES = {
    "clip-default-layer-2": dict(vision="clip"),
    "siglip-full-layer-2": dict(vision="siglip"),
    "clip-default-layer-1": dict(vision="clip", vision_feature_layer=-1),
    "clip-default-layers-list": dict(vision="clip", vision_feature_layer=[-3, 0, -1]),
    "siglip-full-layers-list": dict(vision="siglip", vision_feature_layer=[1, -2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpc_embeddings_equal_hf_get_image_features(
    case: str, checkpoint_factory: CheckpointFactory, start_server: StartServer, hf_reference: Reference
) -> None:
    path = checkpoint_factory(**CASES[case])  # type: ignore[arg-type]
    server = start_server(encoder_config(path, max_batch_size=4, max_batch_wait_ms=0.0))
    images = [png_bytes(seed, size) for seed, size in enumerate([(40, 30), (64, 64), (17, 90), (300, 200)])]
    expected = hf_reference(path, images)

    # One image per call: a batch of one, bit-identical.
    for data, reference in zip(images, expected, strict=True):
        (result,) = server.encode(data).images
        embedding = tensor_from_proto(result.embedding)
        assert embedding.dtype == torch.float32
        assert (result.num_tokens, result.hidden_size) == tuple(reference.shape) == tuple(embedding.shape)
        assert torch.equal(embedding, reference)

    # The same images with fresh bytes (so the cache misses), in one call: one batch of 4, within 1e-5.
    # A long batch wait makes sure that the 4 images, decoded on different threads, share one forward pass.
    assert server.server.local_encoder is not None
    server.server.local_encoder.batcher.max_wait_s = 0.5
    batches_before = server.metric("mmserve_encoder_batch_size_count")
    fresh = [png_bytes(seed + 100, size) for seed, size in enumerate([(40, 30), (64, 64), (17, 90), (300, 200)])]
    response = server.encode(*fresh)
    assert [r.cache_hit for r in response.images] == [False] * 4
    assert server.metric("mmserve_encoder_batch_size_count") - batches_before == 1  # one forward pass of 4
    for result, reference in zip(response.images, hf_reference(path, fresh), strict=True):
        assert (tensor_from_proto(result.embedding) - reference).abs().max().item() <= 1e-5


def test_vision_encoder_in_process_api(checkpoint_factory: CheckpointFactory, hf_reference: Reference) -> None:
    """The offline API: the same numbers without any server, and metadata the generator relies on."""
    path = checkpoint_factory(vision="clip")
    encoder = VisionEncoder(ModelConfig(model=str(path)))
    data = png_bytes(7)
    (embedding,) = encoder.encode([decode_image(data)])
    (reference,) = hf_reference(path, [data])
    assert torch.equal(embedding, reference)
    assert embedding.device.type == "cpu"
    assert encoder.num_image_tokens(decode_image(data)) == encoder.tokens_per_image == 16  # (32/8)^2, CLS dropped
    assert encoder.hidden_size == 64 and encoder.image_placeholder == "<image>"
    assert encoder.encode([]) == []
    assert encoder.describe()["layers_run"] == 2  # of 3: hidden_states[-2] never needs the last layer


def test_bfloat16_output_dtype_and_distinct_fingerprint(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    path = checkpoint_factory(vision="siglip")
    image = Image.new("RGB", (50, 40), (10, 120, 230))
    full = VisionEncoder(ModelConfig(model=str(path)))
    half = VisionEncoder(ModelConfig(model=str(path), dtype="bfloat16"))
    (reference,), (embedding,) = full.encode([image]), half.encode([image])
    assert embedding.dtype == torch.bfloat16 and embedding.shape == reference.shape
    assert (embedding.float() - reference).abs().max().item() < 0.1 * reference.abs().max().item()
    assert half.fingerprint != full.fingerprint  # the dtype is part of the key: no cross-dtype cache hits
