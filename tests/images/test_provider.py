"""EmbeddingProvider: cache layers in order, one flight per key across requests, errors named by request index.

The encoder here is a scripted `ImageEncoder` (the real LocalEncoder and RemoteEncoder run in the service
tests): it lets a test hold a call open, fail one image of a call, or answer with the wrong shape on demand.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence

import pytest
import torch

from common.hashing import image_key
from common.images.cache import LocalEmbeddingCache
from common.images.embedding import ImageEmbedding
from common.images.errors import (
    CacheUnavailableError,
    EmbeddingNotFoundError,
    ImageDeadlineError,
    ImageError,
    ImageUnavailableError,
    InvalidImageError,
)
from common.images.provider import CacheLayer, EmbeddingProvider, EncodeItem, ImageSource

HIDDEN = 4
FINGERPRINT = "f" * 64


def embedding_of(data: bytes, condition: str | None = None) -> torch.Tensor:
    """A deterministic [3, HIDDEN] 'embedding' of image bytes (and condition)."""
    seed = sum(data) + (len(condition) if condition else 0)
    return torch.arange(3 * HIDDEN, dtype=torch.float32).reshape(3, HIDDEN) + seed


class ScriptedEncoder:
    """Encodes `data` to `embedding_of(data)`; bytes starting with b"bad" fail the whole call at their index."""

    def __init__(self, *, holds_keys: bool = False, rows: int = 3) -> None:
        self.fingerprint = FINGERPRINT
        self.holds_keys = holds_keys
        self.rows = rows
        self.calls: list[list[bytes]] = []
        self.fetches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.stored: dict[str, ImageEmbedding] = {}

    async def ready(self, deadline: float | None) -> str:
        return self.fingerprint

    async def encode(self, items: Sequence[EncodeItem], deadline: float | None) -> list[ImageEmbedding | ImageError]:
        self.calls.append([item.data or b"" for item in items])
        await self.gate.wait()
        if deadline is not None and time.monotonic() > deadline:
            raise ImageDeadlineError("the deadline passed while the images were being encoded")
        for position, item in enumerate(items):
            if (item.data or b"").startswith(b"bad"):
                raise InvalidImageError("not an image", index=position)
        # The layout stands for a family's per-image metadata (e.g. a patch grid): here the byte count.
        return [
            ImageEmbedding(embedding_of(item.data or b"", item.condition)[: self.rows], layout=(len(item.data or b""),))
            for item in items
        ]

    async def fetch(self, keys: Sequence[str], deadline: float | None) -> list[ImageEmbedding]:
        self.fetches.append(list(keys))
        if any(key not in self.stored for key in keys):
            raise EmbeddingNotFoundError("not here either")
        return [self.stored[key] for key in keys]


class DownCache(LocalEmbeddingCache):
    """A shared cache that cannot answer (Redis down)."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.fingerprints: list[str] = []

    async def get(self, key: str) -> ImageEmbedding | None:
        raise CacheUnavailableError("down")

    def use_fingerprint(self, fingerprint: str) -> None:
        self.fingerprints.append(fingerprint)


def provider(encoder: ScriptedEncoder, *layers: CacheLayer, **kwargs: object) -> EmbeddingProvider:
    settings: dict = {"hidden_size": HIDDEN, "tokens_per_image": 3}
    settings.update(kwargs)
    return EmbeddingProvider(encoder, list(layers), **settings)


def test_layers_in_order_earlier_layers_filled_and_sources_reported() -> None:
    local, shared = LocalEmbeddingCache(1 << 20), LocalEmbeddingCache(1 << 20)
    encoder = ScriptedEncoder()
    lookups: list[str] = []
    images = provider(
        encoder,
        CacheLayer("local", local),
        CacheLayer("redis", shared, fill=False, shared=True),
        on_lookup=lookups.append,
    )
    in_redis, new = b"in-redis", b"new"
    shared.put_sync(image_key(FINGERPRINT, in_redis), ImageEmbedding(embedding_of(in_redis)))

    async def scenario() -> None:
        first = await images.resolve([ImageSource(data=in_redis), ImageSource(data=new), ImageSource(data=new)])
        assert [image.source for image in first] == ["redis", "encoder", "encoder"]
        assert torch.equal(first[1].embedding, embedding_of(new)) and first[1].layout == (3,)
        again = await images.resolve([ImageSource(data=in_redis), ImageSource(data=new)])
        assert [image.source for image in again] == ["local", "local"]
        assert again[1].layout == (3,)  # the layout travels with the embedding through the caches

    asyncio.run(scenario())
    assert encoder.calls == [[b"new"]]  # one call, the repeated image once
    assert lookups == ["redis", "encoder", "local", "local"]
    assert len(local) == 2 and len(shared) == 1  # "fill=False": the remote encoder fills the shared cache itself


def test_concurrent_requests_for_one_new_image_share_one_flight() -> None:
    encoder = ScriptedEncoder()
    encoder.gate.clear()
    coalesced: list[int] = []
    images = provider(
        encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)), on_coalesced=lambda: coalesced.append(1)
    )

    async def scenario() -> None:
        leader = asyncio.ensure_future(images.resolve([ImageSource(data=b"cat")]))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(images.resolve([ImageSource(data=b"cat"), ImageSource(data=b"dog")]))
        await asyncio.sleep(0.01)
        leader.cancel()  # the leader's client goes away: the flight goes on for the follower
        encoder.gate.set()
        (cat, dog) = await follower
        assert torch.equal(cat.embedding, embedding_of(b"cat")) and torch.equal(dog.embedding, embedding_of(b"dog"))
        with pytest.raises(asyncio.CancelledError):
            await leader

    asyncio.run(scenario())
    assert encoder.calls == [[b"cat"], [b"dog"]]
    assert coalesced == [1]


def test_a_bad_image_names_its_request_index_and_spares_the_images_of_other_requests() -> None:
    encoder = ScriptedEncoder()
    encoder.gate.clear()
    images = provider(encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)))

    async def scenario() -> None:
        bad_request = asyncio.ensure_future(
            images.resolve([ImageSource(data=b"ok-1"), ImageSource(data=b"shared"), ImageSource(data=b"bad")])
        )
        await asyncio.sleep(0)
        other = asyncio.ensure_future(images.resolve([ImageSource(data=b"shared")]))  # joins the doomed call
        await asyncio.sleep(0.01)
        encoder.gate.set()
        with pytest.raises(InvalidImageError) as error:
            await bad_request
        assert str(error.value) == "images[2]: not an image"
        (shared,) = await other  # its image was fine: it is encoded in a call of its own
        assert torch.equal(shared.embedding, embedding_of(b"shared"))

    asyncio.run(scenario())
    assert encoder.calls == [[b"ok-1", b"shared", b"bad"], [b"shared"]]


def test_a_request_that_joined_a_flight_is_not_bound_by_the_leaders_deadline() -> None:
    encoder = ScriptedEncoder()
    encoder.gate.clear()
    images = provider(encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)))

    async def scenario() -> None:
        hurried = asyncio.ensure_future(images.resolve([ImageSource(data=b"cat")], time.monotonic() + 0.01))
        await asyncio.sleep(0)
        patient = asyncio.ensure_future(images.resolve([ImageSource(data=b"cat")], time.monotonic() + 60))
        await asyncio.sleep(0.05)
        encoder.gate.set()
        with pytest.raises(ImageDeadlineError):
            await hurried
        (cat,) = await patient  # its own deadline is far: the image is encoded again for it
        assert torch.equal(cat.embedding, embedding_of(b"cat"))

    asyncio.run(scenario())
    assert encoder.calls == [[b"cat"], [b"cat"]]


def test_bad_input_is_refused_before_any_lookup() -> None:
    encoder = ScriptedEncoder()
    images = provider(encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)))
    for sources, message in [
        ([ImageSource(data=b"x"), ImageSource()], "images[1]: has neither data nor embedding_key"),
        ([ImageSource(data=b"")], "images[0]: is empty (0 bytes)"),
        ([ImageSource(embedding_key="nope")], "images[0]: embedding_key must be 64 lowercase hex"),
    ]:
        with pytest.raises(InvalidImageError, match=re.escape(message)):
            asyncio.run(images.resolve(sources))
    assert encoder.calls == []


@pytest.mark.parametrize(
    ("shared_down", "holds_keys", "error", "asks_encoder"),
    [
        (False, True, EmbeddingNotFoundError, False),  # the shared cache answered: nobody has it
        (True, True, EmbeddingNotFoundError, True),  # shared cache down: the encoder's own cache is asked
        (True, False, CacheUnavailableError, False),  # down, and nobody else could know: retry later
    ],
)
def test_an_unknown_embedding_key(
    shared_down: bool, holds_keys: bool, error: type[ImageError], asks_encoder: bool
) -> None:
    encoder = ScriptedEncoder(holds_keys=holds_keys)
    shared = DownCache() if shared_down else LocalEmbeddingCache(1 << 20)
    images = provider(
        encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)), CacheLayer("redis", shared, shared=True)
    )
    with pytest.raises(error, match=r"^images\[0\]: "):
        asyncio.run(images.resolve([ImageSource(embedding_key="ab" * 32)]))
    assert bool(encoder.fetches) == asks_encoder


def test_a_key_only_the_remote_encoder_holds_is_fetched_and_kept_locally() -> None:
    encoder = ScriptedEncoder(holds_keys=True)
    key = "cd" * 32
    encoder.stored[key] = ImageEmbedding(embedding_of(b"elsewhere"), layout=(9,))
    local = LocalEmbeddingCache(1 << 20)
    images = provider(encoder, CacheLayer("local", local))  # no shared cache: only the encoder may know it
    (found,) = asyncio.run(images.resolve([ImageSource(embedding_key=key)]))
    assert torch.equal(found.embedding, embedding_of(b"elsewhere")) and found.source == "encoder"
    assert found.layout == (9,)
    assert encoder.fetches == [[key]]


def test_an_embedding_of_the_wrong_shape_is_refused_and_not_cached() -> None:
    encoder = ScriptedEncoder(rows=2)  # the model needs 3 rows per image
    local = LocalEmbeddingCache(1 << 20)
    images = provider(encoder, CacheLayer("local", local))
    with pytest.raises(
        ImageUnavailableError, match=r"images\[0\]: the encoder returned an embedding of shape \[2, 4\]"
    ):
        asyncio.run(images.resolve([ImageSource(data=b"cat")]))
    assert len(local) == 0
    varying = provider(ScriptedEncoder(rows=2), CacheLayer("local", local), tokens_per_image=None)
    (image,) = asyncio.run(varying.resolve([ImageSource(data=b"cat")]))  # rows vary by family: only columns checked
    assert image.embedding.shape == (2, HIDDEN)


def test_conditions_are_part_of_the_key_and_reach_the_encoder() -> None:
    encoder = ScriptedEncoder()
    images = provider(encoder, CacheLayer("local", LocalEmbeddingCache(1 << 20)))
    first, second, again = asyncio.run(
        images.resolve(
            [
                ImageSource(data=b"cat", condition="what?"),
                ImageSource(data=b"cat", condition="why not?"),
                ImageSource(data=b"cat", condition="what?"),
            ]
        )
    )
    assert first.key == again.key != second.key
    assert torch.equal(first.embedding, embedding_of(b"cat", "what?"))
    assert torch.equal(second.embedding, embedding_of(b"cat", "why not?"))
    assert first.key == image_key(FINGERPRINT, b"cat", "what?") != image_key(FINGERPRINT, b"cat")


def test_a_new_encoder_fingerprint_is_adopted_by_the_caches() -> None:
    encoder = ScriptedEncoder()
    shared = DownCache()
    images = provider(encoder, CacheLayer("redis", shared, shared=True))
    encoder.fingerprint = "e" * 64  # e.g. a remote encoder that computes in bfloat16
    (image,) = asyncio.run(images.resolve([ImageSource(data=b"cat")]))
    assert shared.fingerprints == ["e" * 64]
    assert image.key == image_key("e" * 64, b"cat")
