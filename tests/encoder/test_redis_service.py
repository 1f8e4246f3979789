"""The server with a real Redis: shared records, poisoned records, Redis unreachable, Redis killed mid-run."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from common.config import CacheConfig
from common.embedding_record import EmbeddingRecord, decode_record, encode_record
from common.hashing import image_key
from common.tensor_codec import tensor_from_proto
from protos import encoder_pb2
from tests.conftest import RedisKeys
from tests.encoder.conftest import Reference, StartServer
from tests.encoder.support import RedisProcess, encoder_config, free_port, png_bytes, version_1_record


def test_records_are_shared_through_redis_with_ttl(
    tiny_checkpoint: Path, start_server: StartServer, redis_url: str, redis_keys: RedisKeys
) -> None:
    config = encoder_config(tiny_checkpoint, cache=CacheConfig(redis_url=redis_url, redis_timeout_ms=500, ttl_s=120))
    first_replica, second_replica = start_server(config), start_server(config)
    data = png_bytes()
    (miss,) = first_replica.encode(data).images
    (hit,) = second_replica.encode(data).images  # another replica: found in Redis, never decoded
    assert (miss.cache_hit, hit.cache_hit) == (False, True)
    assert miss.embedding == hit.embedding
    name = redis_keys.name(miss.embedding_key)
    fingerprint = second_replica.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).fingerprint
    record = decode_record(redis_keys.client.get(name), fingerprint, miss.embedding_key)  # type: ignore[arg-type]
    assert (record.dtype, record.shape, record.key) == ("float32", (16, 64), miss.embedding_key)
    assert 0 < redis_keys.client.ttl(name) <= 120
    assert second_replica.metric("mmserve_encoder_images_encoded_total") == 1  # its warm-up only


def _poison(kind: str, fingerprint: str, key: str) -> bytes:
    data = torch.ones(16 * 64).numpy().tobytes()
    if kind == "wrong_length":
        return encode_record(EmbeddingRecord("float32", (16, 64), fingerprint, key, data))[:-8]
    if kind == "wrong_fingerprint":
        return encode_record(EmbeddingRecord("float32", (16, 64), "e" * 64, key, data))
    if kind == "another_key":  # intact, this encoder, right shape: but another image's record
        return encode_record(EmbeddingRecord("float32", (16, 64), fingerprint, "d" * 64, data))
    if kind == "version_1":  # the old format, without the image key
        return version_1_record(fingerprint, "float32", (16, 64), data)
    return b"\x00garbage\xff" * 10


@pytest.mark.parametrize("kind", ["wrong_length", "wrong_fingerprint", "another_key", "version_1", "garbage"])
def test_poisoned_records_are_misses_and_are_deleted(
    kind: str,
    tiny_checkpoint: Path,
    start_server: StartServer,
    redis_url: str,
    redis_keys: RedisKeys,
    hf_reference: Reference,
) -> None:
    server = start_server(encoder_config(tiny_checkpoint, redis_url=redis_url))
    fingerprint = server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).fingerprint
    data = png_bytes()
    key = image_key(fingerprint, data)
    name = redis_keys.name(key)
    poison = _poison(kind, fingerprint, key)

    # Looked up by key alone: a miss (FAILED_PRECONDITION), and the record is gone.
    redis_keys.client.set(name, poison)
    with pytest.raises(grpc.RpcError) as error:
        server.encode(key)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert redis_keys.client.exists(name) == 0

    # With the bytes: a miss, encoded afresh (correct values), and the poison replaced by a valid record.
    redis_keys.client.set(name, poison)
    (result,) = server.encode(data).images
    assert not result.cache_hit
    assert torch.equal(tensor_from_proto(result.embedding), hf_reference(tiny_checkpoint, [data])[0])
    assert decode_record(redis_keys.client.get(name), fingerprint, key).shape == (16, 64)  # type: ignore[arg-type]
    assert server.metric("mmserve_encoder_cache_poisoned_total") == 2


def test_record_of_image_a_copied_under_image_b_is_a_miss(
    tiny_checkpoint: Path,
    start_server: StartServer,
    redis_url: str,
    redis_keys: RedisKeys,
    hf_reference: Reference,
) -> None:
    """Image A's valid record under image B's Redis key: B is encoded afresh, never served A's embedding."""
    server = start_server(encoder_config(tiny_checkpoint, redis_url=redis_url))
    fingerprint = server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).fingerprint
    image_a, image_b = png_bytes(), png_bytes()
    (result_a,) = server.encode(image_a).images
    key_b = image_key(fingerprint, image_b)
    name_a, name_b = redis_keys.name(result_a.embedding_key), redis_keys.name(key_b)
    copied = redis_keys.client.get(name_a)
    assert copied is not None

    # Looked up by B's key alone: a miss (FAILED_PRECONDITION), and the copied record is gone.
    redis_keys.client.set(name_b, copied)
    with pytest.raises(grpc.RpcError) as error:
        server.encode(key_b)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert redis_keys.client.exists(name_b) == 0

    # With B's bytes: a miss, B's own embedding (not A's), and B's own record stored in place of the copy.
    redis_keys.client.set(name_b, copied)
    (result_b,) = server.encode(image_b).images
    assert not result_b.cache_hit and result_b.embedding_key == key_b
    expected_b = hf_reference(tiny_checkpoint, [image_b])[0]
    assert torch.equal(tensor_from_proto(result_b.embedding), expected_b)
    assert not torch.equal(tensor_from_proto(result_a.embedding), expected_b)
    assert decode_record(redis_keys.client.get(name_b), fingerprint, key_b).key == key_b  # type: ignore[arg-type]
    assert redis_keys.client.get(name_a) == copied  # A's own record is untouched
    assert server.metric("mmserve_encoder_cache_poisoned_total") == 2


def test_unreachable_redis_still_serves_every_request(
    tiny_checkpoint: Path, start_server: StartServer, hf_reference: Reference
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cache = CacheConfig(redis_url=url, redis_timeout_ms=50, breaker_failures=3, breaker_cooldown_s=60)
    server = start_server(encoder_config(tiny_checkpoint, cache=cache))
    images = [png_bytes() for _ in range(4)]
    for data in images + images:  # the repeats cannot be hits: there is no cache
        (result,) = server.encode(data).images
        assert not result.cache_hit
        assert torch.equal(tensor_from_proto(result.embedding), hf_reference(tiny_checkpoint, [data])[0])
    assert server.metric("mmserve_encoder_cache_errors_total", {"op": "get"}) >= 1
    assert server.metric("mmserve_encoder_cache_errors_total", {"op": "get"}) + server.metric(
        "mmserve_encoder_cache_errors_total", {"op": "set"}
    ) == 3  # then the breaker opened and Redis was skipped
    assert server.metric("mmserve_encoder_cache_breaker_open") == 1
    with pytest.raises(grpc.RpcError) as error:
        server.encode("a" * 64)  # a key alone cannot be served without the cache: a dependency is down
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_redis_killed_mid_run(tiny_checkpoint: Path, start_server: StartServer, hf_reference: Reference) -> None:
    redis_server = RedisProcess()
    try:
        cache = CacheConfig(redis_url=redis_server.url, redis_timeout_ms=100, breaker_failures=2, breaker_cooldown_s=60)
        server = start_server(encoder_config(tiny_checkpoint, cache=cache))
        before = png_bytes()
        assert [server.encode(before).images[0].cache_hit for _ in range(2)] == [False, True]
        redis_server.kill()
        after = png_bytes()
        futures = [
            server.stub.Encode.future(
                encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=data)], return_embeddings=True),
                timeout=30,
            )
            for data in [before, after] * 4
        ]
        results = [future.result().images[0] for future in futures]  # none fails
        for data, result in zip([before, after] * 4, results, strict=True):
            assert not result.cache_hit
            difference = tensor_from_proto(result.embedding) - hf_reference(tiny_checkpoint, [data])[0]
            assert difference.abs().max().item() <= 1e-5  # concurrent calls share batches: within 1e-5
        assert server.metric("mmserve_encoder_cache_errors_total", {"op": "get"}) >= 1
        assert server.metric("mmserve_encoder_cache_breaker_open") == 1
    finally:
        redis_server.kill()
