"""Dependencies failing and coming back: the encoder (down, restarted, wrong model) and Redis (killed mid-run);
and the single-process deployment (no encoder address: images encoded in-process, still through the caches)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from common.hashing import image_key
from tests.conftest import CheckpointFactory
from tests.generator_service.conftest import Stack, StartEncoder, StartGenerator
from tests.generator_service.support import (
    PROMPT,
    Reference,
    generate,
    png_bytes,
    request,
    wait_until,
)
from tests.grpc_support import RedisProcess, free_port

TEXT = "USER: hello there ASSISTANT:"


def test_encoder_down_then_back(
    start_generator: StartGenerator, start_encoder: StartEncoder, reference: Reference
) -> None:
    port = free_port()
    generator = start_generator(encoder_address=f"127.0.0.1:{port}")  # nothing listens there yet

    down = generate(generator.address, request(PROMPT, [png_bytes(1)], max_tokens=4))
    assert down.code == grpc.StatusCode.UNAVAILABLE
    assert f"encoder service at 127.0.0.1:{port} is unavailable" in down.details
    assert "text-only requests still work" in down.details
    # An embedding key nobody can confirm is missing: the encoder (its cache) cannot be asked, so UNAVAILABLE.
    by_key = generate(generator.address, request(PROMPT, ["ab" * 32], max_tokens=4))
    assert by_key.code == grpc.StatusCode.UNAVAILABLE
    text = generate(generator.address, request(TEXT, max_tokens=4))
    assert text.code == grpc.StatusCode.OK and text.token_ids == reference.generate(TEXT, [], 4)

    start_encoder(port=port, max_batch_size=1)  # the encoder comes (back) up on the same address

    def image_request_works() -> bool:
        return generate(generator.address, request(PROMPT, [png_bytes(1)], max_tokens=4)).code == grpc.StatusCode.OK

    wait_until(image_request_works, timeout=15, what="image requests to work once the encoder is up")
    result = generate(generator.address, request(PROMPT, [png_bytes(1)], max_tokens=4))
    assert result.token_ids == reference.generate(PROMPT, [png_bytes(1)], 4)
    generator.wait_idle()


def test_redis_killed_mid_run(
    redis_process: RedisProcess, start_generator: StartGenerator, start_encoder: StartEncoder, reference: Reference
) -> None:
    encoder = start_encoder(redis_url=redis_process.url, max_batch_size=1)
    generator = start_generator(encoder_address=encoder.address, redis_url=redis_process.url)
    before = [generate(generator.address, request(PROMPT, [png_bytes(10 + i)], max_tokens=5)) for i in range(2)]
    assert all(result.code == grpc.StatusCode.OK for result in before)
    assert len(redis_process.client.keys("mmserve:emb:*")) == 2

    redis_process.kill()
    started = time.monotonic()
    repeated = generate(generator.address, request(PROMPT, [png_bytes(10)], max_tokens=5))  # local LRU
    fresh = [generate(generator.address, request(PROMPT, [png_bytes(20 + i)], max_tokens=5)) for i in range(3)]
    text = generate(generator.address, request(TEXT, max_tokens=5))
    elapsed = time.monotonic() - started

    assert repeated.code == grpc.StatusCode.OK and repeated.token_ids == before[0].token_ids
    for index, result in enumerate(fresh):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == reference.generate(PROMPT, [png_bytes(20 + index)], 5)
    assert text.code == grpc.StatusCode.OK
    # Redis was really in the path: its failures were counted, each call was time-boxed (200 ms) and the
    # breaker then skipped it, so five requests took nowhere near a socket timeout each.
    assert generator.metric("mmserve_generator_cache_errors_total", {"op": "get"}) >= 1
    assert elapsed < 10
    generator.wait_idle()


def test_encoder_serving_another_model_is_refused(
    checkpoint_factory: CheckpointFactory,
    start_generator: StartGenerator,
    start_encoder: StartEncoder,
    reference: Reference,
) -> None:
    other = checkpoint_factory(seed=1)  # same shapes, different weights: embeddings would be garbage here
    encoder = start_encoder(other)
    generator = start_generator(encoder_address=encoder.address)
    result = generate(generator.address, request(PROMPT, [png_bytes(30)], max_tokens=4))
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "serves a different model" in result.details
    assert encoder.metric("mmserve_encoder_images_encoded_total") == 1  # only its own warm-up: none for us
    text = generate(generator.address, request(TEXT, max_tokens=4))
    assert text.code == grpc.StatusCode.OK and text.token_ids == reference.generate(TEXT, [], 4)


def test_in_process_encoding_uses_the_caches(
    tiny_checkpoint: Path, redis_process: RedisProcess, start_generator: StartGenerator, reference: Reference
) -> None:
    generator = start_generator(redis_url=redis_process.url)  # no encoder address: single-process deployment
    image = png_bytes(40)
    first = generate(generator.address, request(PROMPT, [image], max_tokens=6))
    assert first.code == grpc.StatusCode.OK, first.details
    assert first.token_ids == reference.generate(PROMPT, [image], 6)
    assert generator.server.images is not None
    key = image_key(generator.server.images.encoder.fingerprint, image)
    assert redis_process.client.exists(f"mmserve:emb:{key}")  # shared with the other replicas

    by_key = generate(generator.address, request(PROMPT, [key], max_tokens=6))
    assert by_key.token_ids == first.token_ids
    assert generator.metric("mmserve_image_lookups_total", {"source": "local"}) == 1

    # A second replica finds the embedding in Redis and never encodes it.
    replica = start_generator(redis_url=redis_process.url)
    again = generate(replica.address, request(PROMPT, [image], max_tokens=6))
    assert again.token_ids == first.token_ids
    assert replica.metric("mmserve_image_lookups_total", {"source": "redis"}) == 1
    assert replica.metric("mmserve_image_lookups_total", {"source": "encoder"}) == 0

    bad = generate(generator.address, request(PROMPT, [b"BM not a bitmap"], max_tokens=6))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.details.startswith("images[0]:")
    missing = generate(generator.address, request(PROMPT, ["cd" * 32], max_tokens=6))
    assert missing.code == grpc.StatusCode.FAILED_PRECONDITION


def test_encoder_errors_name_the_request_image(stack: Stack) -> None:
    """The second image of a request is bad: the message names images[1], not the encoder's own index."""
    result = generate(
        stack.generator.address,
        request("USER: <image>\n<image>\nCompare. ASSISTANT:", [png_bytes(50), b"GIF89a-broken"], max_tokens=2),
    )
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert result.details.startswith("images[1]:"), result.details
