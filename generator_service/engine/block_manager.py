"""Paged KV-cache bookkeeping: the free queue, ref counts, prefix-block hashes and per-request block tables.

This class is the only owner of that state; the scheduler asks it for blocks and the runner only reads
block tables. Pure Python (no torch, grpc or redis), so tests assert exact block ids.

Prefix caching (vLLM v1 style): a block that is FULL of computed tokens is registered under

    hash_i = block_hash(hash_{i-1}, tokens[i*B:(i+1)*B], extra_i)
    extra_i = [(image.key, i*B - image.offset) for every image span overlapping tokens [i*B, (i+1)*B)]

A cached block whose ref count drops to 0 keeps its hash and goes to the END of the free queue;
allocation pops from the FRONT, evicting (un-hashing) the block it pops, so cached-but-free blocks are
evicted least-recently-freed first. A free block without a hash holds nothing worth keeping: it goes to
the FRONT and is reused before any cached block.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from common.hashing import block_hash
from generator_service.engine.request import ImageSpan, Request


def _image_extra(spans: Sequence[ImageSpan], start: int, end: int) -> list[tuple[str, int]]:
    # For every image span overlapping [start, end): the embedding row that the block's first token would hold
    # (negative when the span starts inside the block), so that two blocks holding different rows of one image
    # (an image in several runs) or the same rows of two images never hash alike.
    return [
        (span.key, start - span.offset + span.row_offset) for span in spans if span.offset < end and span.end > start
    ]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}: raise --num-kv-blocks")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}: use e.g. --block-size 16")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks  # hash carried by each block
        self._cached: dict[bytes, int] = {}  # hash -> block holding that content
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # O(1) queue
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # per request: blocks [0, n) already went through caching

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live requests (ref count > 0)."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks carrying a prefix hash, used or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty when it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash_of(self, block_id: int) -> bytes | None:
        return self._block_hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue in allocation (eviction) order."""
        return list(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest chain of cached full blocks matching the request's tokens, and the hit in tokens.

        Never the whole request: at least one token must be computed to get logits, so the hit is capped
        at num_tokens - 1 rounded down to whole blocks. Takes no references (allocate_slots does).
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._request_hashes(request, max_blocks)
        blocks: list[int] = []
        for i in range(max_blocks):
            block = self._cached.get(hashes[i])
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register every block of the request that is full of computed tokens under its prefix hash.

        When another block already holds the same hash, that mapping is kept and this block stays
        unhashed (it is freed like any private block).
        """
        table = self._tables.get(request.request_id)
        if not self.enable_prefix_caching or table is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_hashed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._request_hashes(request, num_full)
        for i in range(start, num_full):
            block, block_hash_i = table[i], hashes[i]
            if self._block_hashes[block] is not None or block_hash_i in self._cached:
                continue  # a prefix hit (already registered), or the same content lives elsewhere
            self._cached[block_hash_i] = block
            self._block_hashes[block] = block_hash_i
        self._num_hashed[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every prefix hash. Refused (returns False) while any block is in use."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._block_hashes = [None] * self.num_blocks
        return True

    def _request_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Extend the request's hash-chain memo to cover its first `num_blocks` full blocks."""
        hashes, tokens, size = request.block_hashes, request.all_token_ids, self.block_size
        num_blocks = min(num_blocks, len(tokens) // size)
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            extra = _image_extra(request.image_spans, start, start + size)
            hashes.append(block_hash(parent, tokens[start:start + size], extra))
        return hashes

    # ---- allocation ----------------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] | None = None
    ) -> list[int] | None:
        """Grow the request's table to cover its computed tokens plus `num_new_tokens`; return the NEW blocks.

        `computed_blocks` is a prefix hit from get_computed_blocks, only for a request holding no blocks
        and not yet counted in `request.num_computed_tokens`; refs are taken on it first:

            [ computed tokens | hit blocks (len * B tokens) | num_new_tokens ]  -> ceil(total / B) blocks

        Returns None and changes nothing when there are not enough free blocks.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        hit = list(computed_blocks or ())
        table = self._tables.get(request.request_id)
        if hit and table:
            raise RuntimeError(f"request {request.request_id!r} already holds blocks: computed_blocks are "
                               "only for its first allocation")
        num_tokens = request.num_computed_tokens + len(hit) * self.block_size + num_new_tokens
        num_held = len(table or ()) + len(hit)
        num_new_blocks = max(0, self.num_blocks_for(num_tokens) - num_held)
        # Free cached blocks of the hit leave the free queue when touched: don't count them twice.
        num_hit_free = sum(1 for block in hit if self._ref_counts[block] == 0)
        if num_new_blocks > len(self._free) - num_hit_free:
            return None
        if table is None:
            table = self._tables[request.request_id] = []
        for block in hit:
            self._touch(block)
        table.extend(hit)
        new_blocks = [self._pop_free() for _ in range(num_new_blocks)]
        table.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Drop the request's refs and forget its table. Tail blocks are freed first, so among the
        request's cached blocks the tail is evicted before the head (which other prompts likely share)."""
        table = self._tables.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        for block in reversed(table or ()):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None  # to the END: evicted last
                if self._block_hashes[block] is None:
                    self._free.move_to_end(block, last=False)  # nothing cached: reuse first

    def _touch(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        evicted = self._block_hashes[block]
        if evicted is not None:
            del self._cached[evicted]
            self._block_hashes[block] = None
        self._ref_counts[block] = 1
        return block

    # ---- invariants ----------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise RuntimeError describing the first broken invariant (tests call this after every step)."""
        refs_from_tables: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            if len(set(table)) != len(table):
                raise RuntimeError(f"request {request_id!r} holds a block twice: {table}")
            refs_from_tables.update(table)
        for block, refs in enumerate(self._ref_counts):
            is_free = block in self._free
            if refs < 0 or (refs > 0) == is_free:
                raise RuntimeError(f"block {block}: ref count {refs}, in free queue: {is_free}; must be exactly "
                                   "one of used (ref > 0) or free (ref 0)")
            if refs != refs_from_tables[block]:
                raise RuntimeError(f"block {block}: ref count {refs} but {refs_from_tables[block]} table refs")
            carried = self._block_hashes[block]
            if carried is not None and self._cached.get(carried) != block:
                raise RuntimeError(f"block {block} carries a hash that the hash map does not point to it")
        for hash_value, block in self._cached.items():
            if self._block_hashes[block] != hash_value:
                raise RuntimeError(f"hash map entry points to block {block}, which carries another hash")
        if self.num_free_blocks + sum(1 for refs in self._ref_counts if refs > 0) != self.num_blocks:
            raise RuntimeError("free + used != total blocks")
