"""BlockManager: exact block ids, ref counts, prefix hits and LRU eviction with 10 blocks of 4 tokens."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from generator_service.engine.block_manager import BlockManager
from generator_service.engine.request import ImageSpan, Request
from generator_service.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, tokens: Sequence[int], spans: Sequence[ImageSpan] = ()) -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=16), image_spans=tuple(spans))


def admit(bm: BlockManager, request: Request) -> list[int] | None:
    """First admission of a whole prompt: prefix hit, allocation, then the hit counts as computed."""
    hit_blocks, num_hit = bm.get_computed_blocks(request)
    new_blocks = bm.allocate_slots(request, request.num_tokens - num_hit, hit_blocks)
    if new_blocks is not None:
        request.num_computed_tokens = num_hit
    bm.check_invariants()
    return new_blocks


def compute_all(bm: BlockManager, request: Request) -> None:
    """What update() does after the runner computed every scheduled token."""
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request, request.num_computed_tokens)
    bm.check_invariants()


def free(bm: BlockManager, request: Request) -> None:
    bm.free(request)
    bm.check_invariants()


@pytest.fixture
def bm() -> BlockManager:
    return BlockManager(num_blocks=10, block_size=BLOCK_SIZE)


def test_allocation_order_and_growth(bm: BlockManager) -> None:
    a = make_request("a", range(1, 11))  # 10 tokens -> 3 blocks
    b = make_request("b", range(20, 25))  # 5 tokens -> 2 blocks
    assert admit(bm, a) == [0, 1, 2]
    assert admit(bm, b) == [3, 4]
    assert bm.block_table("a") == [0, 1, 2] and bm.block_table("b") == [3, 4]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (5, 5, 0.5)
    assert bm.free_block_ids() == [5, 6, 7, 8, 9]
    compute_all(bm, a)
    for expected in ([], [], [5]):  # tokens 11 and 12 fit block 2; token 13 needs a new block
        a.append_output_token(99)
        assert bm.allocate_slots(a, 1) == expected
        compute_all(bm, a)
    assert bm.block_table("a") == [0, 1, 2, 5]
    free(bm, a)
    free(bm, b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 10


def test_shared_prefix_ref_counts_and_free_order(bm: BlockManager) -> None:
    a = make_request("a", range(1, 11))  # blocks 0, 1 full; block 2 holds 2 tokens
    b = make_request("b", [*range(1, 9), 50, 51, 52])  # same first 8 tokens
    assert admit(bm, a) == [0, 1, 2]
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2 and bm.block_hash_of(2) is None
    assert bm.get_computed_blocks(b) == ([0, 1], 8)
    assert admit(bm, b) == [3]
    assert b.num_computed_tokens == 8
    assert bm.block_table("b") == [0, 1, 3]
    assert [bm.ref_count(i) for i in range(5)] == [2, 2, 1, 1, 0]
    assert bm.num_used_blocks == 4
    free(bm, a)
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert bm.free_block_ids() == [2, 4, 5, 6, 7, 8, 9]  # a's unhashed tail is reused first
    free(bm, b)
    # b frees tail first: 3 (unhashed) to the front, then 1, 0 (hashed) to the end, tail before head.
    assert bm.free_block_ids() == [3, 2, 4, 5, 6, 7, 8, 9, 1, 0]
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2


def test_lru_eviction_of_cached_free_blocks(bm: BlockManager) -> None:
    a = make_request("a", range(1, 13))  # 3 full blocks
    b = make_request("b", range(30, 38))  # 2 full blocks
    assert admit(bm, a) == [0, 1, 2]
    assert admit(bm, b) == [3, 4]
    compute_all(bm, a)
    compute_all(bm, b)
    free(bm, a)
    free(bm, b)
    assert bm.free_block_ids() == [5, 6, 7, 8, 9, 2, 1, 0, 4, 3]
    assert bm.num_cached_blocks == 5
    c = make_request("c", range(100, 128))  # 7 blocks: the 5 never-used ones, then a's tail 2, then 1
    assert admit(bm, c) == [5, 6, 7, 8, 9, 2, 1]
    assert bm.num_cached_blocks == 3
    assert bm.block_hash_of(2) is None and bm.block_hash_of(1) is None and bm.block_hash_of(0) is not None
    assert bm.get_computed_blocks(make_request("a2", range(1, 14))) == ([0], 4)  # block 1 was evicted
    assert bm.get_computed_blocks(make_request("b2", range(30, 39))) == ([3, 4], 8)
    free(bm, c)
    assert bm.num_used_blocks == 0


def test_prefix_hit_is_whole_blocks_and_never_the_whole_request(bm: BlockManager) -> None:
    a = make_request("a", range(1, 9))  # exactly 2 full blocks
    assert admit(bm, a) == [0, 1]
    compute_all(bm, a)
    assert bm.get_computed_blocks(make_request("x", range(1, 9))) == ([0], 4)  # capped at 7 tokens -> 1 block
    assert bm.get_computed_blocks(make_request("x", range(1, 8))) == ([0], 4)
    assert bm.get_computed_blocks(make_request("x", range(1, 10))) == ([0, 1], 8)
    assert bm.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5, 6, 7, 0, 9])) == ([0], 4)  # diverges mid-block
    assert bm.get_computed_blocks(make_request("x", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == ([], 0)
    assert bm.get_computed_blocks(make_request("x", [1, 2, 3])) == ([], 0)
    # An identical prompt recomputes its last block into a new block; the hash keeps pointing at block 1.
    dup = make_request("dup", range(1, 9))
    assert admit(bm, dup) == [2]
    assert bm.block_table("dup") == [0, 2] and dup.num_computed_tokens == 4
    compute_all(bm, dup)
    assert bm.block_hash_of(2) is None and bm.num_cached_blocks == 2
    free(bm, dup)
    free(bm, a)
    assert bm.num_used_blocks == 0


def test_output_tokens_extend_the_hash_chain(bm: BlockManager) -> None:
    a = make_request("a", range(1, 7))
    assert admit(bm, a) == [0, 1]
    compute_all(bm, a)
    assert bm.num_cached_blocks == 1
    a.append_output_token(7)
    a.append_output_token(8)  # sampled but not yet computed: block 1 holds only 3 computed tokens
    assert bm.allocate_slots(a, 1) == []
    a.num_computed_tokens += 1
    bm.cache_full_blocks(a, a.num_computed_tokens)
    assert bm.num_cached_blocks == 1
    assert bm.allocate_slots(a, 1) == []
    compute_all(bm, a)  # 8 computed tokens: block 1 is full
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == ([0, 1], 8)
    free(bm, a)


def test_image_keys_separate_identical_placeholder_tokens(bm: BlockManager) -> None:
    tokens = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4, 5]  # image tokens 2..7 cross blocks 0 and 1

    def with_image(request_id: str, key: str) -> Request:
        return make_request(request_id, tokens, [ImageSpan(key, offset=2, length=6)])

    a = with_image("a", "cat")
    assert admit(bm, a) == [0, 1, 2]
    compute_all(bm, a)
    other = with_image("other", "dog")
    assert bm.get_computed_blocks(other) == ([], 0)
    assert admit(bm, other) == [3, 4, 5]
    assert not set(bm.block_table("a")) & set(bm.block_table("other"))
    same = with_image("same", "cat")
    assert bm.get_computed_blocks(same) == ([0, 1], 8)
    assert admit(bm, same) == [6]
    assert bm.block_table("same") == [0, 1, 6]
    assert (bm.ref_count(0), bm.ref_count(1)) == (2, 2)
    no_image = make_request("plain", tokens)
    assert bm.get_computed_blocks(no_image) == ([], 0)
    for request in (a, other, same):
        free(bm, request)
    assert bm.num_used_blocks == 0


def test_image_offset_is_part_of_the_hash(bm: BlockManager) -> None:
    tokens = [9] * 9
    a = make_request("a", tokens, [ImageSpan("cat", offset=0, length=9)])
    assert admit(bm, a) == [0, 1, 2]
    compute_all(bm, a)
    shifted = make_request("b", tokens, [ImageSpan("cat", offset=1, length=8)])
    assert bm.get_computed_blocks(shifted) == ([], 0)
    free(bm, a)


def test_allocate_returns_none_and_allocates_nothing_when_short(bm: BlockManager) -> None:
    big = make_request("big", range(100, 132))  # 8 blocks
    assert admit(bm, big) == list(range(8))
    short = make_request("short", range(1, 13))  # 3 blocks, 2 free
    assert admit(bm, short) is None
    assert bm.block_table("short") == [] and bm.free_block_ids() == [8, 9] and bm.num_used_blocks == 8
    free(bm, big)
    assert bm.num_used_blocks == 0


def test_free_cached_hit_blocks_are_not_counted_twice(bm: BlockManager) -> None:
    a = make_request("a", range(1, 10))  # blocks 0, 1 full and hashed; 2 partial
    assert admit(bm, a) == [0, 1, 2]
    compute_all(bm, a)
    free(bm, a)
    assert bm.free_block_ids() == [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]
    filler = make_request("filler", range(200, 228))  # 7 blocks
    assert admit(bm, filler) == [2, 3, 4, 5, 6, 7, 8]
    assert bm.free_block_ids() == [9, 1, 0]
    # 16 tokens: hit on blocks 0, 1 (both free) + 2 new blocks, but only block 9 is left besides the hit.
    too_big = make_request("too_big", [*range(1, 9), *range(60, 68)])
    assert admit(bm, too_big) is None
    assert bm.free_block_ids() == [9, 1, 0] and bm.ref_count(0) == 0 and bm.block_table("too_big") == []
    fits = make_request("fits", [*range(1, 9), *range(60, 64)])  # hit + 1 new block
    assert admit(bm, fits) == [9]
    assert bm.block_table("fits") == [0, 1, 9] and bm.num_free_blocks == 0
    free(bm, fits)
    free(bm, filler)
    assert bm.num_used_blocks == 0


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", range(1, 10))
    assert admit(bm, a) == [0, 1, 2]
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_request("b", range(1, 10))) == ([], 0)
    free(bm, a)
    assert bm.free_block_ids()[:3] == [0, 1, 2]  # nothing cached: freed blocks are reused first


def test_reset_prefix_cache(bm: BlockManager) -> None:
    a = make_request("a", range(1, 10))
    admit(bm, a)
    compute_all(bm, a)
    assert bm.reset_prefix_cache() is False  # blocks in use
    free(bm, a)
    assert bm.reset_prefix_cache() is True
    assert bm.num_cached_blocks == 0
    bm.check_invariants()


def test_check_invariants_catches_corruption(bm: BlockManager) -> None:
    a = make_request("a", range(1, 10))
    admit(bm, a)
    compute_all(bm, a)
    bm._ref_counts[0] += 1  # a ref nobody holds
    with pytest.raises(RuntimeError, match="block 0"):
        bm.check_invariants()
    bm._ref_counts[0] -= 1
    bm._ref_counts[5] = 1  # "used" but still in the free queue
    with pytest.raises(RuntimeError, match="block 5"):
        bm.check_invariants()
    bm._ref_counts[5] = 0
    bm._block_hashes[2] = b"x" * 32  # a hash the map does not know
    with pytest.raises(RuntimeError, match="block 2"):
        bm.check_invariants()


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="--num-kv-blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="--block-size"):
        BlockManager(num_blocks=4, block_size=0)
