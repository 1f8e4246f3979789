"""Paged attention behind Hugging Face's `AttentionInterface`: HF's model code, our KV cache.

The generator calls the HF text model with one flattened ragged batch (`inputs_embeds [1, T, hidden]`,
explicit `position_ids`, `use_cache=False`) inside `forward_context(<AttentionMetadata>)`. HF builds no mask for an
unregistered implementation name (`attention_mask is None`) and applies RoPE before calling our attention function,
which hands the layer's tensors to the custom op `mmserve::paged_attention`. The op is opaque to torch.compile (the
compiled decoder stack does not break on it and T stays symbolic: compilation.py) and reads the step's Python-side
metadata (block tables, groups, chunks) from the forward context, as vLLM's attention does. So per layer we only:

1. write the step's new keys/values into the cache slots `slot_mapping` (token index -> block * bs + offset);
2. attend, reading each sequence's context back through its block table:
   - decode-like rows (one query per sequence) in groups (`DecodeGroup`): each group gathers its sequences' cache
     BLOCKS (one index per block, not per token) into a padded `[n, kv_heads, blocks * block_size, head_dim]` and
     runs one batched SDPA with a key-padding mask. On CPU the groups are small (sequences sorted by context length,
     a bounded gather each), because one padded gather of the whole batch is hundreds of MB per layer, freshly
     allocated and page-faulted every time: at 64 sequences x 1-2k context, grouping made decode attention ~3x
     faster (benchmarks/decode_attention_bench.py);
   - each multi-token prefill chunk in its own SDPA with a bottom-right causal mask
     (a chunk at positions [start, start + n) sees keys [0, start + i] for its row i); a chunk that starts its
     sequence with nothing but causal attention uses SDPA's `is_causal` instead, as HF's own SDPA path does.

Sliding-window layers (Mistral) pass `sliding_window`; a key is then visible only if q_pos - k_pos < window.
See shared/notes/hf-seam.md for the verified recipe and its pitfalls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "mmserve_paged"


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the flattened batch
    num_tokens: int
    context_slots: torch.Tensor  # [start + num_tokens] cache slots of every position the chunk can see
    query_positions: torch.Tensor  # [num_tokens] absolute positions (start .. start + n - 1)
    # [ctx] attention block of each context position (-1: none) when the request has bidirectional blocks
    block_ids: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def plain_causal(self, window: int | None) -> bool:
        """The chunk starts the sequence (it sees only its own keys), attends causally and the window cuts nothing:
        SDPA's `is_causal` (top-left aligned, which is bottom-right here) says it without a mask, and its CPU kernel
        then skips the blocks above the diagonal instead of computing and masking them."""
        num_keys = self.context_slots.numel()
        return num_keys == self.num_tokens and self.block_ids is None and (window is None or num_keys <= window)

    def mask(self, window: int | None) -> torch.Tensor:
        """[n, ctx] bool: key visible to query. Built once per step and window, shared by every layer.

        Causal, or in the same attention block as the query (an image's tokens see each other both ways); a
        sliding window then cuts what is too far back (HF: sliding = window AND (causal OR block)).
        """
        if window not in self._masks:
            key_positions = torch.arange(self.context_slots.numel(), device=self.context_slots.device)  # [ctx]
            distance = self.query_positions[:, None] - key_positions[None, :]  # [n, ctx]
            visible = distance >= 0  # bottom-right causal: row i sees keys 0 .. start + i
            if self.block_ids is not None:
                block_ids = self.block_ids.to(self.context_slots.device)
                query_blocks = block_ids[self.query_positions]  # [n]
                visible = visible | ((query_blocks[:, None] == block_ids[None, :]) & (query_blocks[:, None] >= 0))
            self._masks[window] = visible if window is None else visible & (distance < window)
        return self._masks[window]


@dataclass
class DecodeGroup:
    """Decode rows (one query each) attended together: their contexts padded to the longest, `num_keys`."""

    rows: torch.Tensor  # [n] rows of the flattened batch
    block_tables: torch.Tensor  # [n, B] cache blocks of each row's context, padded with block 0 (masked out)
    positions: torch.Tensor  # [n] absolute position of each row's query (its context is 0 .. position)
    num_keys: int  # the longest context of the group (<= B * block_size): keys beyond it are not read
    padded: bool  # some row's context is shorter than num_keys (its padding keys must be masked)
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[n, 1, 1, num_keys] bool: key visible to the row's query; None when every key is (no padding, no window
        cutting), which lets SDPA take its unmasked path (every batch-1 decode). Built once per step and window."""
        if window not in self._masks:
            if not self.padded and (window is None or self.num_keys <= window):
                self._masks[window] = None
            else:
                key_positions = torch.arange(self.num_keys, device=self.positions.device)
                distance = self.positions[:, None] - key_positions[None, :]  # [n, num_keys]
                visible = distance >= 0
                if window is not None:
                    visible = visible & (distance < window)
                self._masks[window] = visible[:, None, None, :]
        return self._masks[window]


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by all layers; built once per step by the model runner."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [num_slots, kv_heads, head_dim]
    block_size: int
    slot_mapping: torch.Tensor  # [T] where each new token's K/V go
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    num_tokens: int


class _ForwardContext(threading.local):
    metadata: AttentionMetadata | None = None


# The step's metadata, set by the runner around the forward (vLLM's forward context): the compiled graph sees only
# tensors and ints, and the custom op reads the Python objects (block tables, groups) from here. Per thread, since
# one process may run several engines (each steps on its own thread).
_context = _ForwardContext()


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    previous, _context.metadata = _context.metadata, meta
    try:
        yield
    finally:
        _context.metadata = previous


# needs_exact_strides: inductor hands the op its inputs with eager's strides, so SDPA takes the same kernel path and
# the compiled output stays bit-identical to eager.
@torch.library.custom_op("mmserve::paged_attention", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def paged_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float, window: int
) -> torch.Tensor:
    """Opaque to torch.compile (the graph does not break on it, shapes stay symbolic). Writes the layer's K/V cache
    (a tensor the graph never sees: not declared as mutated, as in vLLM, which is safe because the op's own output
    reads what it wrote, so the write is never dropped or reordered) and returns [1, T, heads, head_dim].
    `window` <= 0: no sliding window."""
    meta = _context.metadata
    if meta is None:
        raise RuntimeError("mmserve paged attention called outside forward_context(): the model runner sets it")
    return _paged_attention(meta, layer, query, key, value, scaling, window if window > 0 else None)


@paged_attention_op.register_fake
def _fake_paged_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float, window: int
) -> torch.Tensor:
    """Shapes only, for tracing: [1, T, heads, head_dim] with T symbolic."""
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim], RoPE applied
    key: torch.Tensor,  # [1, kv_heads, T, head_dim], RoPE applied, the step's new tokens only
    value: torch.Tensor,  # [1, kv_heads, T, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    window = kwargs.get("sliding_window")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.mmserve.paged_attention(query, key, value, module.layer_idx, scale, window or 0)
    return out, None


def _paged_attention(
    meta: AttentionMetadata,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    k_cache, v_cache = meta.kv_caches[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))  # [T, kv_heads, head_dim]
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))

    num_heads, head_dim, kv_heads = query.shape[1], query.shape[3], k_cache.shape[1]
    gqa = num_heads != kv_heads
    out = query.new_empty(meta.num_tokens, num_heads, head_dim)  # [T, heads, head_dim]

    block_size = meta.block_size
    # [num_blocks, block_size * kv_heads * head_dim] views: index_select copies 2-D rows with one memcpy each, while
    # on a 4-D view it takes a generic element-wise path several times slower.
    k_blocks = k_cache.view(-1, block_size * kv_heads * head_dim)
    v_blocks = v_cache.view(-1, block_size * kv_heads * head_dim)
    for group in meta.decode_groups:
        num_rows, num_blocks = group.block_tables.shape
        # One query per row, so the query heads that share a KV head are folded into that head's query rows:
        # [n, kv_heads, heads / kv_heads, head_dim] (HF's repeat_kv maps query head h to KV head h // group size).
        # SDPA then runs kv_heads small GEMMs per sequence instead of heads one-row ones, and needs no GQA expansion.
        q = query[0].index_select(1, group.rows).transpose(0, 1).reshape(num_rows, kv_heads, -1, head_dim)
        flat = group.block_tables.reshape(-1)
        shape = (num_rows, num_blocks * block_size, -1, head_dim)
        keys = slice(0, group.num_keys)
        k = k_blocks.index_select(0, flat).view(shape)[:, keys].transpose(1, 2)  # [n, kv_heads, num_keys, head_dim]
        v = v_blocks.index_select(0, flat).view(shape)[:, keys].transpose(1, 2)
        mask = group.mask(window)  # [n, 1, 1, num_keys]: the same keys for every folded query row
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out.index_copy_(0, group.rows, attended.reshape(num_rows, num_heads, head_dim))

    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        q = query[:, :, rows]  # [1, heads, n, head_dim]
        k = k_cache.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)  # [1, kvh, ctx, head_dim]
        v = v_cache.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
        causal = chunk.plain_causal(window)
        mask = None if causal else chunk.mask(window)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa
        )
        out[rows] = attended[0].transpose(0, 1)  # [n, heads, head_dim]

    return out.unsqueeze(0)  # [1, T, heads, head_dim], as HF's attention functions return


def register() -> str:
    """Register the attention function with transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
