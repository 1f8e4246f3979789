"""How close a benchmark comes to what the machine could do at best, measured in the same run as the benchmark.

    compute floor = FLOPs the workload must do / the machine's matmul peak          -> "% of compute floor"
    memory floor  = bytes one batch-1 decode step must read / the machine's copy bandwidth -> "x the memory floor"

The peak and the bandwidth are measured here, on this machine, with torch's current thread count, rather than
taken from a data sheet: a share of a practical peak says how much a configuration leaves on the table, which a
tok/s figure from a noisy shared machine cannot.

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts on Hugging Face's forward: matmuls, convolutions
and attention (2 FLOPs per multiply-add); element-wise work is not counted. Attention is counted over the full
query x key rectangle, as FlopCounterMode does (no discount for the causal mask in a prefill).

The work a request must do, whatever system serves it (padding and recomputation are not work it must do):

    prompt of P tokens (image tokens included), N output tokens:
    prefill(P)                  one forward over the P prompt tokens, logits for the last one only -> token 1
    decode(P + 1) ... decode(P + N - 1)   one forward per further token; decode(L) attends to L keys

Counting every decode step of a whole workload under FlopCounterMode would mean running HF's forward for every
token of it again. Instead `LanguageModelFlops` counts decode(L) at two context lengths and uses that it is affine
in L: the linears and the head do the same work at any L, and attention's two matmuls (q.K^T, p.V) grow by the
same amount per key. A third length is counted and checked against the model, so an architecture for which it
does not hold (a sliding window, say) fails loudly instead of reporting a wrong floor; the unit tests compare the
model with a direct count of HF's `generate`.

`VisionFlops` counts an image's vision tower + projector the same way, on mmserve's `VisionEncoder`: HF's own
`get_image_features`, without the tower layers whose output is never read.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from common.images.vision_encoder import VisionEncoder

DEFAULT_MATMUL_SIZES = (512, 1024, 2048)


def _cpu_sdpa_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any, **kwargs: Any
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


# FlopCounterMode (torch 2.13) knows the CUDA attention kernels but not the CPU one that `scaled_dot_product_attention`
# dispatches to on CPU, which would count attention as 0 FLOPs there. Same formula as the CUDA kernels.
_EXTRA_FORMULAS: dict[Any, Any] = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running `fn()` once, as FlopCounterMode counts them (attention on CPU included). `fn` runs for real;
    wrap it in `torch.inference_mode()` yourself if it is a forward pass."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seconds: float = 2.0,
    sizes: Sequence[int] = DEFAULT_MATMUL_SIZES,
) -> float:
    """The machine's practical matmul peak in GFLOP/s (1e9 FLOP/s): the best rate of square `torch.mm` calls
    (2 n^3 FLOPs each) over `sizes`, with torch's current thread count. Each size gets an equal share of `seconds`
    and at least 3 timed calls after one warm-up. The best call, not the mean: other load on the machine only ever
    makes a call slower, and the question is what this machine can do."""
    device = torch.device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        out = torch.empty(n, n, dtype=dtype, device=device)
        torch.mm(a, b, out=out)  # warm-up: kernel choice, workspace, pages of `out`
        _synchronize(device)
        deadline = time.perf_counter() + seconds / len(sizes)
        calls = 0
        while calls < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            _synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
            calls += 1
    return best


def measure_copy_bandwidth(device: str | torch.device = "cpu", num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """GB/s (1e9 bytes/s) of `dst.copy_(src)` over `num_bytes`, counting read + write: 2 * num_bytes per copy, best of
    `repeats` after a warm-up. `num_bytes` should be well above the last-level cache. On CPU a write usually also
    reads the destination line first (write-allocate); that traffic is not counted, so this is what a copy
    achieves, somewhat under the DRAM peak, and the memory floor computed from it is on the safe (higher) side."""
    device = torch.device(device)
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: faults in the pages of `dst`
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


@dataclass(frozen=True)
class DecodeFlops:
    """FLOPs of one decode forward at batch 1: one new token attending to `context` keys (the cache + itself)."""

    fixed: int  # the linears, the head on one token: independent of the context
    per_key: int  # attention's q.K^T and p.V, per key attended

    def at(self, context: int) -> int:
        return self.fixed + self.per_key * context

    def steps(self, prompt_len: int, output_len: int) -> int:
        """Sum of decode(P + j) for j = 1 .. N - 1: the decode forwards after the prefill of a P-token prompt."""
        steps = max(output_len - 1, 0)
        keys = steps * prompt_len + steps * (steps + 1) // 2  # sum of (P + j)
        return self.fixed * steps + self.per_key * keys


class LanguageModelFlops:
    """FLOPs HF's forward of a causal LM (`*ForCausalLM`, batch 1) does for requests; see the module docstring.

    Runs the model for real (on whatever device and dtype it is on) a few times: once per distinct prompt length
    for `prefill`, three times for the decode model. The values of the token ids do not change the FLOPs."""

    def __init__(self, lm: torch.nn.Module, probe_contexts: tuple[int, int, int] = (16, 80, 49)) -> None:
        self._lm = lm
        self._prefill: dict[int, int] = {}
        # transformers renamed the cache argument and output field in 5.x (past_key_values -> cache).
        self._cache_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        first, second, check = probe_contexts
        low, high = self.count_decode(first), self.count_decode(second)
        per_key, remainder = divmod(high - low, second - first)
        self.decode = DecodeFlops(fixed=low - per_key * first, per_key=per_key)
        counted = self.count_decode(check)
        if remainder or counted != self.decode.at(check):
            raise ValueError(
                f"decode FLOPs are not affine in the context length for this model (counted {counted} at {check} "
                f"keys, the model from {first} and {second} says {self.decode.at(check)}): count every step instead"
            )

    def _ids(self, length: int) -> torch.Tensor:
        device = next(self._lm.parameters()).device
        return torch.zeros(1, length, dtype=torch.long, device=device)  # [1, length]

    def count_decode(self, context: int) -> int:
        """A direct count of decode(context): prefill context - 1 tokens (not counted), then count one more."""
        ids = self._ids(context)
        name = self._cache_name
        with torch.inference_mode():
            cache = getattr(self._lm(input_ids=ids[:, :-1], use_cache=True), name)
            return count_flops(
                lambda: self._lm(input_ids=ids[:, -1:], use_cache=True, logits_to_keep=1, **{name: cache})
            )

    def prefill(self, prompt_len: int) -> int:
        """FLOPs of the prefill of a `prompt_len`-token prompt, logits for its last position only (as generate)."""
        if prompt_len not in self._prefill:  # a workload has few distinct prompt lengths
            ids = self._ids(prompt_len)
            with torch.inference_mode():
                self._prefill[prompt_len] = count_flops(
                    lambda: self._lm(input_ids=ids, use_cache=True, logits_to_keep=1)
                )
        return self._prefill[prompt_len]

    def request(self, prompt_len: int, output_len: int) -> int:
        """FLOPs a request must do: prefill(P) + decode(P + 1) + ... + decode(P + N - 1)."""
        return self.prefill(prompt_len) + self.decode.steps(prompt_len, output_len)


class VisionFlops:
    """FLOPs of encoding one image with mmserve's `VisionEncoder`: the checkpoint's vision tower + projector, through
    HF's own `get_image_features`, minus tower layers whose output is never read (LLaVA's last one): the work an
    image must take. HF's `generate` runs those layers too; that shows as a lower share, not a higher floor.
    Counted once per batch signature (prepared tensor shapes): every image of one signature costs the same."""

    def __init__(self, encoder: VisionEncoder) -> None:
        self._encoder = encoder
        self._by_signature: dict[tuple[Any, ...], int] = {}

    def image(self, image: Image.Image) -> int:
        prepared = self._encoder.prepare(image)
        signature = prepared.batch_signature
        if signature not in self._by_signature:
            self._by_signature[signature] = count_flops(lambda: self._encoder.encode_prepared([prepared]))
        return self._by_signature[signature]


def decode_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones once), except the input embedding
    table, of which a step reads one row, unless the head shares it (then the head reads it whole)."""
    total = sum(p.numel() * p.element_size() for p in lm.parameters())  # parameters() yields a tied one once
    embedding = lm.get_input_embeddings().weight  # type: ignore[operator]
    head = lm.get_output_embeddings()  # type: ignore[operator]
    if head is None or head.weight.data_ptr() != embedding.data_ptr():
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    return int(total)


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes of K and V one token keeps in the cache, all layers: 2 * layers * kv heads * head dim * element size."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def compute_floor_seconds(flops: float, peak_gflops: float) -> float:
    """The least time `flops` can take at the measured peak."""
    return flops / (peak_gflops * 1e9)


def memory_floor_seconds(bytes_read: float, bandwidth_gbs: float) -> float:
    """The least time reading `bytes_read` can take at the measured bandwidth."""
    return bytes_read / (bandwidth_gbs * 1e9)


def floor_share(floor_seconds: float, measured_seconds: float) -> float:
    """The fraction of the floor a measurement reaches: 1.0 means it ran at the floor, 0.25 four times slower."""
    return floor_seconds / measured_seconds
