"""The model runner: owns the language model, the paged KV cache tensors and the per-request tensors.

One `execute()` per engine step: the scheduler's chunks become one flattened ragged batch

    chunk i:        request r_i, positions [start_i, start_i + n_i)
    flattened rows: [ chunk 0 rows | chunk 1 rows | ... ]          T = sum(n_i) rows
    row t:          seq_idx[t] = i,  position[t] = start_i + (t - row_start_i)
    cache slot:     block_table_i[position // block_size] * block_size + position % block_size

which runs through HF's text model once (paged attention in `paged_attention.py`); the head runs only on the
last row of each chunk that samples. All index arithmetic is tensor ops; the only Python loops are over
chunks and images, never over tokens.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from common.compilation import compile_layers, tracing_settings, uncompile_layers
from common.models.base import PositionPlan
from generator_service.engine import paged_attention
from generator_service.engine.paged_attention import AttentionMetadata, DecodeGroup, PrefillChunk
from generator_service.engine.request import ImageSpan, Request
from generator_service.engine.sampler import Sampler, SamplingRow, TokenLogprobs
from generator_service.engine.scheduler import ScheduledChunk

# The padded K+V one decode group gathers per layer, on CPU: small enough to stay in the allocator's reused memory
# (a fresh multi-hundred-MB buffer per layer is page-faulted on every step), large enough to batch several rows.
DECODE_GROUP_BYTES_CPU = 4 * 1024 * 1024


def build_decode_groups(
    positions: torch.Tensor,
    rows: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    block_size: int,
    gather_bytes_per_block: int,
    budget: int | None,
) -> list[DecodeGroup]:
    """Decode rows in attention groups: sorted by context length, each group's padded K+V gather (per layer) within
    `budget` bytes (None: one group). Row i queries at `positions[i]` (its context: 0 .. positions[i]), is row
    `rows[i]` of the flattened batch and reads the blocks `block_tables[i]`."""
    contexts = (positions + 1).tolist()
    groups: list[list[int]] = [[]]
    for i in sorted(range(len(contexts)), key=contexts.__getitem__):
        # ascending: row i's context is the longest of its group so far
        padded_bytes = (len(groups[-1]) + 1) * -(-contexts[i] // block_size) * gather_bytes_per_block
        if groups[-1] and budget is not None and padded_bytes > budget:
            groups.append([])
        groups[-1].append(i)
    decode_groups = []
    for members in groups:
        index = torch.tensor(members, device=positions.device)
        longest = contexts[members[-1]]
        decode_groups.append(
            DecodeGroup(
                rows=rows.index_select(0, index),
                block_tables=block_tables.index_select(0, index)[:, : -(-longest // block_size)],
                positions=positions.index_select(0, index),
                num_keys=longest,
                padded=contexts[members[0]] < longest,
            )
        )
    return decode_groups


@dataclass(frozen=True)
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # request id -> next token, for every chunk that samples
    logprobs: dict[str, TokenLogprobs]  # only for requests that asked for logprobs


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element  # K and V

    @classmethod
    def of(cls, model: PreTrainedModel) -> KVCacheSpec:
        config = model.config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            dtype=next(model.parameters()).dtype,
        )


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, *, block_size: int, num_blocks: int, position_dims: int = 1, compile: bool = False
    ) -> None:
        self.model = model  # a *ForCausalLM: `.model` is the decoder stack, `.lm_head` the head
        # The decoder layers compiled in place (traced in LLMEngine.warm_up), or eager. Paged attention is an opaque
        # custom op and T (tokens in the step) is symbolic, so the graphs of a one-token step and of a longer one
        # serve every layer of every step.
        self.compiled_layers = compile_layers(model) if compile else []
        self._tracing_settings: Callable[[], AbstractContextManager[None]] = (
            tracing_settings if compile else contextlib.nullcontext
        )
        self.position_dims = position_dims  # rotary position axes the model takes: 1, or 3 for M-RoPE
        self.model.set_attn_implementation(paged_attention.register())
        self.device = next(model.parameters()).device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.spec = KVCacheSpec.of(model)
        with torch.inference_mode():
            shape = (num_blocks * block_size, self.spec.num_kv_heads, self.spec.head_dim)
            self.kv_caches = [
                (
                    torch.zeros(shape, dtype=self.spec.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.spec.dtype, device=self.device),
                )
                for _ in range(self.spec.num_layers)
            ]
        # Decode attention gathers each group's K and V blocks per layer; on CPU a bounded gather is several times
        # faster than one for the whole batch (see paged_attention.py). None = no bound (one group).
        self.decode_group_bytes: int | None = DECODE_GROUP_BYTES_CPU if self.device.type == "cpu" else None
        self._gather_bytes_per_block = self.spec.bytes_per_block(block_size) // self.spec.num_layers
        self.embed_tokens = model.get_input_embeddings()
        self.sampler = Sampler()
        self._images: dict[str, list[tuple[ImageSpan, torch.Tensor]]] = {}
        self._positions: dict[str, tuple[torch.Tensor, int]] = {}  # request -> (prompt positions [D, P], delta)
        self._generators: dict[str, torch.Generator | None] = {}

    def run_eagerly(self) -> None:
        """Undo the compilation: the layers' own forwards from the next step on."""
        uncompile_layers(self.model)
        self.compiled_layers = []
        self._tracing_settings = contextlib.nullcontext

    # ---- per-request tensors -----------------------------------------------------------------------------

    def add_request(
        self, request: Request, image_embeddings: Sequence[torch.Tensor], positions: PositionPlan | None = None
    ) -> None:
        """Keep the request's image embeddings (per image span, its image's whole [rows, hidden] embedding; spans
        of one image share it), its rotary positions when they are not the token indices, and its RNG."""
        if len(image_embeddings) != len(request.image_spans):
            raise ValueError(f"{len(request.image_spans)} image spans but {len(image_embeddings)} embeddings")
        moved: dict[int, torch.Tensor] = {}  # one copy per image, however many spans it has
        images = []
        for span, embedding in zip(request.image_spans, image_embeddings, strict=True):
            if span.row_offset + span.length > embedding.shape[0]:
                raise ValueError(f"image span needs rows up to {span.row_offset + span.length}, the embedding has "
                                 f"{embedding.shape[0]}")
            if id(embedding) not in moved:
                moved[id(embedding)] = embedding.to(device=self.device, dtype=self.spec.dtype)
            images.append((span, moved[id(embedding)]))
        if positions is not None:
            table = torch.tensor(positions.positions, dtype=torch.long, device=self.device)  # [D, P]
            if table.shape != (self.position_dims, request.num_prompt_tokens):
                raise ValueError(f"positions of shape {list(table.shape)} for a {request.num_prompt_tokens}-token "
                                 f"prompt and {self.position_dims} position axes")
            self._positions[request.request_id] = (table, positions.delta)
        self._images[request.request_id] = images
        self._generators[request.request_id] = Sampler.make_generator(request.sampling.seed, self.device)

    def remove_request(self, request_id: str) -> None:
        self._images.pop(request_id, None)
        self._positions.pop(request_id, None)
        self._generators.pop(request_id, None)

    # ---- one step ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk], requests: Mapping[str, Request]) -> RunnerOutput:
        if not chunks:
            return RunnerOutput({}, {})
        batch = self._prepare(chunks, requests)
        with paged_attention.forward_context(batch.attention), self._tracing_settings():
            hidden = self.model.model(
                inputs_embeds=batch.inputs_embeds.unsqueeze(0),  # [1, T, hidden]
                position_ids=batch.rope_positions,  # [1, T], or [3, 1, T] for M-RoPE
                use_cache=False,
            ).last_hidden_state[0]  # [T, hidden]
        sampling_chunks = [chunk for chunk in chunks if chunk.samples]
        if not sampling_chunks:
            return RunnerOutput({}, {})
        logits = self.model.lm_head(hidden.index_select(0, batch.logits_rows)).float()  # [S, vocab]
        rows = [self._sampling_row(requests[chunk.request_id]) for chunk in sampling_chunks]
        result = self.sampler(logits, rows)
        ids = [chunk.request_id for chunk in sampling_chunks]
        logprobs = {rid: lp for rid, lp in zip(ids, result.logprobs, strict=True) if lp is not None}
        return RunnerOutput(dict(zip(ids, result.token_ids, strict=True)), logprobs)

    def _sampling_row(self, request: Request) -> SamplingRow:
        return SamplingRow(
            params=request.sampling,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=self._generators.get(request.request_id),
        )

    def _prepare(self, chunks: Sequence[ScheduledChunk], requests: Mapping[str, Request]) -> _Batch:
        device, block_size = self.device, self.block_size
        token_ids = list(
            itertools.chain.from_iterable(
                requests[c.request_id].all_token_ids[c.start : c.start + c.num_tokens] for c in chunks
            )
        )
        starts = torch.tensor([c.start for c in chunks], device=device)  # [S]
        lengths = torch.tensor([c.num_tokens for c in chunks], device=device)  # [S]
        row_starts = torch.cumsum(lengths, 0) - lengths  # [S] first flattened row of each chunk
        num_tokens = len(token_ids)
        seq_idx = torch.repeat_interleave(torch.arange(len(chunks), device=device), lengths)  # [T]
        positions = starts[seq_idx] + torch.arange(num_tokens, device=device) - row_starts[seq_idx]  # [T]
        max_blocks = max(len(c.block_table) for c in chunks)
        block_tables = torch.tensor(  # [S, max_blocks], padded with block 0 (never read: masked out)
            [list(c.block_table) + [0] * (max_blocks - len(c.block_table)) for c in chunks], device=device
        )
        slot_mapping = block_tables[seq_idx, positions // block_size] * block_size + positions % block_size  # [T]

        decode_groups = self._decode_groups(
            [i for i, chunk in enumerate(chunks) if chunk.num_tokens == 1], block_tables, starts, row_starts
        )

        prefills = []
        for i, chunk in enumerate(chunks):
            if chunk.num_tokens == 1:
                continue
            context = torch.arange(chunk.start + chunk.num_tokens, device=device)  # [ctx]
            prefills.append(
                PrefillChunk(
                    token_start=int(row_starts[i]),
                    num_tokens=chunk.num_tokens,
                    context_slots=block_tables[i, context // block_size] * block_size + context % block_size,
                    query_positions=context[chunk.start :],
                    block_ids=self._block_ids(requests[chunk.request_id], context.numel()),
                )
            )
        attention = AttentionMetadata(
            kv_caches=self.kv_caches,
            block_size=block_size,
            slot_mapping=slot_mapping,
            decode_groups=decode_groups,
            prefills=prefills,
            num_tokens=num_tokens,
        )
        inputs_embeds = self.embed_tokens(torch.tensor(token_ids, device=device))  # [T, hidden]
        self._scatter_images(inputs_embeds, chunks, row_starts.tolist())
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        logits_rows = (row_starts + lengths - 1)[torch.tensor(sampling, device=device, dtype=torch.long)]
        rope_positions = self._rope_positions(chunks, positions, row_starts.tolist())
        return _Batch(inputs_embeds, rope_positions, attention, logits_rows)

    def _decode_groups(
        self, decode_chunks: list[int], block_tables: torch.Tensor, starts: torch.Tensor, row_starts: torch.Tensor
    ) -> list[DecodeGroup]:
        """The single-token chunks `decode_chunks` in attention groups (one group on CUDA, where one big batched
        kernel is what is fast)."""
        if not decode_chunks:
            return []
        index = torch.tensor(decode_chunks, device=self.device)
        return build_decode_groups(
            starts.index_select(0, index),
            row_starts.index_select(0, index),
            block_tables.index_select(0, index),
            block_size=self.block_size,
            gather_bytes_per_block=self._gather_bytes_per_block,
            budget=self.decode_group_bytes,
        )

    def _rope_positions(
        self, chunks: Sequence[ScheduledChunk], positions: torch.Tensor, rows: list[int]
    ) -> torch.Tensor:
        """The model's `position_ids`: the token indices `positions` [T] as [1, T] (the fast path), or [D, 1, T]
        with each planned request's own positions (M-RoPE): its prompt's table, then index + delta.

            token index t:  0 ........ P-1 | P ......
            position:       table[:, t]     | t + delta   (on every axis)
        """
        if self.position_dims == 1 and not self._positions:
            return positions.unsqueeze(0)  # [1, T]
        rope = positions.unsqueeze(0).repeat(self.position_dims, 1)  # [D, T]
        for chunk, row in zip(chunks, rows, strict=True):
            plan = self._positions.get(chunk.request_id)
            if plan is None:
                continue
            table, delta = plan  # [D, P]
            index = positions[row : row + chunk.num_tokens]  # [n] token indices of this chunk
            in_prompt = index < table.shape[1]
            from_table = table[:, index.clamp(max=table.shape[1] - 1)]  # [D, n]
            rope[:, row : row + chunk.num_tokens] = torch.where(in_prompt, from_table, index + delta)
        return rope.unsqueeze(1) if self.position_dims > 1 else rope  # [D, 1, T] or [1, T]

    @staticmethod
    def _block_ids(request: Request, context_length: int) -> torch.Tensor | None:
        """[ctx] the attention block of each context position (-1: none), or None when the request has none."""
        if not request.attention_blocks:
            return None
        block_ids = torch.full((context_length,), -1, dtype=torch.long)
        for number, (start, end) in enumerate(request.attention_blocks):
            block_ids[start : min(end, context_length)] = number
        return block_ids

    def _scatter_images(self, inputs_embeds: torch.Tensor, chunks: Sequence[ScheduledChunk], rows: list[int]) -> None:
        """Overwrite the placeholder rows of each chunk with the matching rows of its image embeddings.

        A chunk may start or end inside an image (chunked prefill, prefix-cache hits): only the overlap
        [max(start, span.offset), min(end, span.end)) is copied, from embedding row (position - span.offset).
        """
        for chunk, row_start in zip(chunks, rows, strict=True):
            end = chunk.start + chunk.num_tokens
            for span, embedding in self._images.get(chunk.request_id, ()):
                low, high = max(chunk.start, span.offset), min(end, span.end)
                if low < high:
                    target = slice(row_start + low - chunk.start, row_start + high - chunk.start)
                    first = span.row_offset + low - span.offset  # the embedding row of token `low`
                    inputs_embeds[target] = embedding[first : first + high - low]


@dataclass
class _Batch:
    inputs_embeds: torch.Tensor  # [T, hidden]
    rope_positions: torch.Tensor  # the model's position_ids: [1, T], or [D, 1, T] for M-RoPE
    attention: AttentionMetadata
    logits_rows: torch.Tensor  # [num_sampling_chunks] last row of each sampling chunk
