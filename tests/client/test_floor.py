"""benchmarks.floor: FLOP counting (matmul, Linear, attention on CPU), the affine decode model against direct counts
of HF's generate on a tiny checkpoint, the bytes a decode step reads, the floor arithmetic, and engine_bench's
report columns. No timing assertions: speed is measured in benchmarks, never in timed unit tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

from benchmarks.engine_bench import Machine, MemoryFloor, Row, StepStats, median_gap, report
from benchmarks.floor import (
    LanguageModelFlops,
    VisionFlops,
    compute_floor_seconds,
    count_flops,
    decode_weight_bytes,
    floor_share,
    kv_bytes_per_token,
    measure_copy_bandwidth,
    measure_matmul_peak,
    memory_floor_seconds,
)
from common.checkpoint import load_text_half
from common.config import ModelConfig
from common.images.vision_encoder import VisionEncoder


def test_a_matmul_and_a_linear_count_two_flops_per_multiply_add() -> None:
    m, k, n = 3, 5, 7
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert count_flops(lambda: a @ b) == 2 * m * n * k
    linear = torch.nn.Linear(k, n)  # addmm: the bias add is not a multiply-add
    with torch.inference_mode():
        assert count_flops(lambda: linear(a)) == 2 * m * n * k


def test_attention_on_cpu_is_counted_with_grouped_kv_heads() -> None:
    """FlopCounterMode alone counts CPU scaled_dot_product_attention as 0; q.K^T and p.V are 2*s_q*s_k*d each."""
    batch, q_heads, kv_heads, s_q, s_k, d = 2, 4, 2, 3, 11, 8
    q = torch.randn(batch, q_heads, s_q, d)
    k, v = torch.randn(batch, kv_heads, s_k, d), torch.randn(batch, kv_heads, s_k, d)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert flops == 2 * (2 * batch * q_heads * s_q * s_k * d)


@pytest.fixture(scope="module")
def tiny_lm(checkpoint_factory: Callable[..., Path]) -> Any:
    return load_text_half(checkpoint_factory()).model  # Llama: 2 layers, 4 query heads, 2 KV heads


@pytest.fixture(scope="module")
def lm_flops(tiny_lm: Any) -> LanguageModelFlops:
    return LanguageModelFlops(tiny_lm)


def generate_flops(lm: Any, prompt_len: int, output_len: int) -> int:
    """A direct count of HF's generate: `output_len` greedy tokens after a `prompt_len`-token prompt."""
    ids = torch.zeros(1, prompt_len, dtype=torch.long)
    config = GenerationConfig(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        return count_flops(
            lambda: lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        )


@pytest.mark.parametrize("context", [2, 9, 33, 150])
def test_affine_decode_model_equals_a_direct_count_of_one_generate_step(
    tiny_lm: Any, lm_flops: LanguageModelFlops, context: int
) -> None:
    """decode(L): generating a second token after an (L - 1)-token prompt attends to L keys; the contexts lie
    below, between and far above the lengths the model was fitted at (16, 80)."""
    one_step = generate_flops(tiny_lm, context - 1, 2) - generate_flops(tiny_lm, context - 1, 1)
    assert lm_flops.decode.at(context) == one_step
    assert lm_flops.decode.per_key > 0  # attention is in the count: a model without it would be constant


@pytest.mark.parametrize(("prompt_len", "output_len"), [(1, 1), (7, 4), (30, 17)])
def test_a_request_counts_what_hf_generate_does(
    tiny_lm: Any, lm_flops: LanguageModelFlops, prompt_len: int, output_len: int
) -> None:
    assert lm_flops.request(prompt_len, output_len) == generate_flops(tiny_lm, prompt_len, output_len)


class QuadraticStep(torch.nn.Module):
    """A stand-in model whose one-token step costs context^2 FLOPs: not affine, as a sliding window would not be."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, past_key_values: int = 0, **_: object) -> SimpleNamespace:
        context = past_key_values + input_ids.shape[1]
        torch.ones(1, context) @ torch.ones(context, context)
        return SimpleNamespace(past_key_values=context)


def test_a_model_whose_decode_is_not_affine_is_refused() -> None:
    with pytest.raises(ValueError, match="not affine"):
        LanguageModelFlops(QuadraticStep())


def hf_image_flops(checkpoint: Path, image: Image.Image) -> int:
    """A direct count of HF's LLaVA `get_image_features` (tower + projector) on one image."""
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    pixels = AutoProcessor.from_pretrained(checkpoint).image_processor(images=[image], return_tensors="pt")
    with torch.inference_mode():
        return count_flops(lambda: model.get_image_features(pixel_values=pixels["pixel_values"]))


def test_vision_flops_are_hf_image_features_without_the_layers_never_read(
    checkpoint_factory: Callable[..., Path],
) -> None:
    """Features from the last layer: the encoder runs HF's whole tower + projector, FLOPs equal. From the one before
    (LLaVA's default): it drops the last layer, so an image must take less than HF's forward does."""
    image, other_size = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (90, 50), "blue")
    last_layer = checkpoint_factory(vision_feature_layer=-1)
    counted = VisionFlops(VisionEncoder(ModelConfig(model=str(last_layer))))
    assert counted.image(image) == hf_image_flops(last_layer, image) > 0
    assert counted.image(other_size) == hf_image_flops(last_layer, other_size)  # LLaVA resizes: the same work
    default = checkpoint_factory()
    assert 0 < VisionFlops(VisionEncoder(ModelConfig(model=str(default)))).image(image) < hf_image_flops(default, image)


def test_decode_reads_every_weight_once_but_one_embedding_row(tiny_lm: Any) -> None:
    parameters = dict(tiny_lm.named_parameters())
    embedding = parameters.pop("model.embed_tokens.weight")
    assert "lm_head.weight" in parameters  # untied: the head is read whole, the table one row per token
    expected = sum(p.numel() * 4 for p in parameters.values()) + embedding.shape[1] * 4
    assert decode_weight_bytes(tiny_lm) == expected


def test_kv_bytes_per_token_match_the_cache_hf_fills(tiny_lm: Any) -> None:
    prompt_len = 13
    with torch.inference_mode():
        output = tiny_lm(input_ids=torch.zeros(1, prompt_len, dtype=torch.long), use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_bytes_per_token(tiny_lm.config, element_size=4) * prompt_len == stored


def test_floor_arithmetic() -> None:
    assert compute_floor_seconds(flops=50e9, peak_gflops=100.0) == pytest.approx(0.5)
    assert memory_floor_seconds(bytes_read=100e6, bandwidth_gbs=20.0) == pytest.approx(0.005)
    assert floor_share(floor_seconds=0.5, measured_seconds=2.0) == pytest.approx(0.25)
    assert median_gap([10.0, 11.0, 13.0, 14.0, 30.0]) == pytest.approx(1.5)  # gaps 1, 2, 1, 16: a stall is ignored


def test_measurements_return_a_rate() -> None:
    """Only that they run and give a finite positive rate; their values are the benchmark's business."""
    peak = measure_matmul_peak(torch.float32, "cpu", seconds=0.01, sizes=(32, 64))
    bandwidth = measure_copy_bandwidth("cpu", num_bytes=1 << 20, repeats=2)
    assert 0 < peak < math.inf and 0 < bandwidth < math.inf


def test_engine_bench_report_shows_floor_columns_and_lines(capsys: pytest.CaptureFixture[str]) -> None:
    rows = {
        "(a) HF generate, one at a time": Row(tokens=100, seconds=2.0, flops=50 * 10**9),  # floor 0.5 s: 25%
        "(b) HF generate, static batches of 16": Row(tokens=400, seconds=4.0, flops=100 * 10**9),
        "(c) mmserve LLM.generate": Row(tokens=400, seconds=1.0, flops=80 * 10**9),  # 0.8 s of 1 s: 80%
        "(a*) HF generate, one at a time, vision excluded": Row(tokens=100, seconds=1.0, flops=10 * 10**9),
        "(c*) mmserve LLM.generate, vision excluded": Row(tokens=400, seconds=0.5, flops=20 * 10**9),
        "(d) transformers generate_batch, text only": Row(tokens=200, seconds=1.0, flops=5 * 10**9),
        "(e) mmserve LLM.generate, text only": Row(tokens=200, seconds=0.25, flops=5 * 10**9),
    }
    memory = MemoryFloor(weight_bytes=90_000_000, kv_bytes=10_000_000, context=250.5, bandwidth_gbs=20.0,
                         hf_seconds=0.010, mmserve_seconds=0.0075)  # fmt: skip
    steps = StepStats(min_running=64, step_seconds=[0.04, 0.05], forward_seconds=[0.036, 0.045], kv_ratio=[0.97])
    report(rows, Machine(peak_gflops=100.0, bandwidth_gbs=20.0, threads=2), memory, steps, 0.3, 0.01)
    lines = capsys.readouterr().out.splitlines()

    assert any("peak 100.0 GFLOP/s" in line and "2 threads" in line and "20.0 GB/s" in line for line in lines)
    header = next(line for line in lines if line.startswith("configuration"))
    assert header.split()[-4:] == ["%", "of", "compute", "floor"]
    a_row = next(line for line in lines if line.startswith("(a) HF generate, one at a time"))
    assert a_row.split()[-4:] == ["50.0", "20.00", "50.0", "25.0%"]  # tok/s, ms/token, GFLOP, share
    c_row = next(line for line in lines if line.startswith("(c) mmserve LLM.generate "))
    assert c_row.split()[-1] == "80.0%"
    memory_line = next(line for line in lines if line.startswith("batch-1 decode vs memory floor"))
    assert "floor 5.00 ms/token" in memory_line  # 100 MB at 20 GB/s
    assert "HF generate 10.00 ms/token (2.00x the floor)" in memory_line
    assert "mmserve 7.50 ms/token (1.50x)" in memory_line
    assert any("(c) / (a)" in line and "8.00x" in line for line in lines)  # the existing ratios are still there
    assert any("(c) / best (b)" in line and "4.00x" in line for line in lines)
