"""Decode attention at 64 sequences x 1-2k context (issue 11, "less copying"): the engine's paged attention vs the
previous one-padded-gather-per-layer, side by side in one run, on the bench model's attention shapes.

    python -m benchmarks.decode_attention_bench [--sequences 64] [--min-context 1024] [--max-context 2048]

(a) before: one token-level gather of every sequence's whole context into `[D, kv_heads, max_context, head_dim]`
    per layer, then one SDPA (what the engine did until issue 11);
(b) now: `paged_attention` itself (block-level gathers in length-sorted groups of bounded size), timed through the
    real function with the metadata the model runner builds;
(c) the attention alone on already-contiguous K/V: what no gather at all would cost (a floor for (a) and (b)).

Per layer, medians of --repeats runs; the ratio is (a) / (b). The outputs of (a) and (b) are compared (equal up to
float reassociation: the SDPA sees different padding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from generator_service.engine.model_runner import DECODE_GROUP_BYTES_CPU, build_decode_groups
from generator_service.engine.paged_attention import AttentionMetadata, forward_context, paged_attention


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    d, bs, kv_heads, heads, head_dim = args.sequences, args.block_size, args.kv_heads, args.heads, args.head_dim
    contexts = torch.randint(args.min_context, args.max_context + 1, (d,))
    blocks_per_seq = (contexts + bs - 1) // bs
    num_blocks = int(blocks_per_seq.sum()) + 1
    shuffled = (torch.randperm(num_blocks - 1) + 1).split(blocks_per_seq.tolist())  # scattered, as in a live cache
    tables = torch.zeros(d, int(blocks_per_seq.max()), dtype=torch.long)
    for i, blocks in enumerate(shuffled):
        tables[i, : blocks.numel()] = blocks
    k_cache = torch.randn(num_blocks * bs, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks * bs, kv_heads, head_dim)
    query = torch.randn(1, heads, d, head_dim)
    new_kv = torch.randn(1, kv_heads, d, head_dim)
    max_len = int(contexts.max())

    mask = (torch.arange(max_len)[None, :] < contexts[:, None])[:, None, None, :]

    def before() -> torch.Tensor:
        k, v = gather_whole_contexts(k_cache, v_cache, tables, max_len, bs)
        q = query[0].transpose(0, 1).unsqueeze(2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[:, :, 0, :]

    bytes_per_block = 2 * bs * kv_heads * head_dim * k_cache.element_size()
    scratch = num_blocks * bs - 1  # the new token's K/V go to a slot no context reads
    module = SimpleNamespace(layer_idx=0)

    def now() -> torch.Tensor:
        meta = AttentionMetadata(
            kv_caches=[(k_cache, v_cache)],
            block_size=bs,
            slot_mapping=torch.full((d,), scratch),
            decode_groups=build_decode_groups(
                contexts - 1,
                torch.arange(d),
                tables,
                block_size=bs,
                gather_bytes_per_block=bytes_per_block,
                budget=args.group_bytes,
            ),
            prefills=[],
            num_tokens=d,
        )
        with forward_context(meta):
            out, _ = paged_attention(module, query, new_kv, new_kv, None)  # type: ignore[arg-type]
        return out[0]

    k_dense, v_dense = (t.contiguous() for t in gather_whole_contexts(k_cache, v_cache, tables, max_len, bs))
    q_dense = query[0].transpose(0, 1).unsqueeze(2).contiguous()

    def attention_only() -> torch.Tensor:
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=mask, enable_gqa=True)

    torch.testing.assert_close(now(), before(), rtol=1e-4, atol=1e-5)
    gathered_mb = 2 * d * max_len * kv_heads * head_dim * k_cache.element_size() / 1e6
    print(f"decode attention, one layer: {d} sequences, context {args.min_context}..{args.max_context} "
          f"(max {max_len}), {heads} heads / {kv_heads} KV heads x {head_dim}, block size {bs}, "
          f"torch threads {torch.get_num_threads()}; (a) gathers {gathered_mb:.0f} MB per layer")  # fmt: skip
    for trial in range(args.trials):
        a, b, c = (median_ms(fn, args.repeats) for fn in (before, now, attention_only))
        print(f"trial {trial}: (a) before {a:7.1f} ms | (b) now {b:7.1f} ms | (c) attention alone {c:6.1f} ms | "
              f"(a)/(b) {a / b:4.2f}x")  # fmt: skip


def gather_whole_contexts(
    k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, max_len: int, bs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous decode gather: every context, token by token, padded to the longest: [D, kv_heads, L, dim]."""
    d, kv_heads, head_dim = tables.shape[0], k_cache.shape[1], k_cache.shape[2]
    positions = torch.arange(max_len)
    slots = (tables[:, positions // bs] * bs + positions % bs).reshape(-1)
    k = k_cache.index_select(0, slots).view(d, max_len, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, slots).view(d, max_len, kv_heads, head_dim).transpose(1, 2)
    return k, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--min-context", type=int, default=1024)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8, help="query heads (the bench model: 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads (the bench model: 2)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size (the bench model: 64)")
    parser.add_argument(
        "--group-bytes", type=int, default=DECODE_GROUP_BYTES_CPU, help="bound of one decode group's gather (b)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--trials", type=int, default=3, help="independent repetitions of the comparison")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
