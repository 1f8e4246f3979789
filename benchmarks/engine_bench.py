"""Engine benchmark (issue 4): mmserve's offline engine vs Hugging Face baselines, in one run.

    python -m benchmarks.engine_bench --model .cache/models/bench      (make bench-engine)

Workload: N requests (default 64), each one distinct image and a short question, output lengths drawn from
[16, 256] with a fixed seed, all submitted at once; every request generates exactly its length (EOS ignored).

    (a) HF generate, one request at a time   (on the first --sequential-requests requests: a rate, not a total)
    (b) HF generate, static padded batches of 16 and of 64 (each batch runs to its longest request)
    (c) mmserve LLM.generate, everything at once (continuous batching; image encoding included)
    text-only, same questions and lengths:
    (d) transformers' continuous batching (generate_batch)   (e) mmserve
(c) and (e) run as a CPU user gets them (eager: the default on CPU), and again with the language model compiled
(enforce_eager=False) unless --no-compiled: their ratio is torch.compile's gain here.

Also: share of engine step time outside the model forward with 64 requests decoding, KV memory used by
tokens vs allocated, and time to first token of a repeated image + prompt prefix vs the first time.

Floors (benchmarks/floor.py), measured in the same run: every row's "% of compute floor" is the time the FLOPs that
configuration must do (HF's forward counted by FlopCounterMode: each prompt's prefill incl. image tokens, one decode
forward per further token, the vision tower + projector per image except in the "vision excluded" rows; padding
not included) would take at this machine's fp32 matmul peak, over the measured time. One line compares batch-1
decode (HF generate and mmserve, one request, image embeddings precomputed; the median time between consecutive
tokens) with the memory floor: LM weights + the KV read at the mean context, per token, over the measured copy
bandwidth. `--quick` runs a small workload.

Every row runs on malloc tuned for tensors (common/host_memory.py), applied before the first row, as mmserve's
services and `LLM` apply it; MMSERVE_MALLOC_TUNING=0 runs every row on glibc's defaults (the tuning's own gain).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from benchmarks.floor import (
    DEFAULT_MATMUL_SIZES,
    LanguageModelFlops,
    VisionFlops,
    compute_floor_seconds,
    decode_weight_bytes,
    floor_share,
    kv_bytes_per_token,
    measure_copy_bandwidth,
    measure_matmul_peak,
    memory_floor_seconds,
)
from common.checkpoint import load_text_half
from common.config import ModelConfig
from common.host_memory import tune_malloc_for_tensors
from common.images.vision_encoder import VisionEncoder
from generator_service import LLM, SamplingParams
from generator_service.llm import PromptLike

QUESTIONS = ["What is in the picture?", "Describe the image.", "What colors do you see?", "Is it day or night?"]


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    images: list[Image.Image]
    lengths: list[int]


def make_workload(num_requests: int, seed: int, min_len: int, max_len: int) -> Workload:
    rng = random.Random(seed)
    images = []
    for i in range(num_requests):
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(pixels).resize((240 + i % 7 * 10, 230)))
    prompts = [f"USER: <image>\n{rng.choice(QUESTIONS)} ASSISTANT:" for _ in range(num_requests)]
    return Workload(prompts, images, [rng.randint(min_len, max_len) for _ in range(num_requests)])


def image_requests(work: Workload) -> list[PromptLike]:
    return [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(work.prompts, work.images, strict=True)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def hf_static(model: Any, processor: Any, work: Workload, indices: list[int]) -> float:
    """One padded HF generate call over `indices`; returns seconds. Useful tokens = their lengths."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=[work.prompts[i] for i in indices], images=[work.images[i] for i in indices], padding=True,
        return_tensors="pt",
    )  # fmt: skip
    longest = max(work.lengths[i] for i in indices)
    config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=0)
    seconds, _ = timed(lambda: model.generate(**inputs, generation_config=config))
    return seconds


@dataclass(frozen=True)
class Row:
    """One configuration's run: output tokens, wall time, and the FLOPs its work must take (see benchmarks.floor)."""

    tokens: int
    seconds: float
    flops: int

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class WorkFlops:
    """FLOPs each request of the workload must do, counted on HF's forward: language model (prefill incl. image
    tokens + one decode forward per further token) and vision (tower + projector); text: the (d)/(e) requests."""

    prompt_lens: list[int]
    lm: list[int]
    vision: list[int]
    text_lm: list[int]

    def with_vision(self, indices: list[int]) -> int:
        return sum(self.lm[i] + self.vision[i] for i in indices)

    def lm_only(self, indices: list[int]) -> int:
        return sum(self.lm[i] for i in indices)


def count_work(
    processor: Any, lm_flops: LanguageModelFlops, vision: VisionFlops, work: Workload, text_ids: list[list[int]],
    text_len: int,
) -> WorkFlops:  # fmt: skip
    prompt_lens = [processor(text=[p], images=[im], return_tensors="pt")["input_ids"].shape[1]  # image tokens incl.
                   for p, im in zip(work.prompts, work.images, strict=True)]  # fmt: skip
    return WorkFlops(
        prompt_lens=prompt_lens,
        lm=[lm_flops.request(p, n) for p, n in zip(prompt_lens, work.lengths, strict=True)],
        vision=[vision.image(image) for image in work.images],
        text_lm=[lm_flops.request(len(ids), text_len) for ids in text_ids],
    )


@dataclass(frozen=True)
class Machine:
    peak_gflops: float  # best square fp32 torch.mm, this run
    bandwidth_gbs: float  # large tensor copy, read + write counted
    threads: int


@dataclass(frozen=True)
class MemoryFloor:
    """Batch-1 decode: bytes read per token (weights + KV at the mean context) vs measured seconds per token."""

    weight_bytes: int
    kv_bytes: int
    context: float
    bandwidth_gbs: float
    hf_seconds: float
    mmserve_seconds: float

    @property
    def seconds(self) -> float:
        return memory_floor_seconds(self.weight_bytes + self.kv_bytes, self.bandwidth_gbs)


@dataclass(frozen=True)
class StepStats:
    min_running: int
    step_seconds: list[float]
    forward_seconds: list[float]
    kv_ratio: list[float]


def run(args: argparse.Namespace) -> None:
    # Process-wide, so first: HF's rows and ours then run on the same allocator (LLM would tune it on construction,
    # after HF's first rows). MMSERVE_MALLOC_TUNING=0 runs every row on glibc's defaults instead.
    tuned = tune_malloc_for_tensors()
    torch.manual_seed(0)
    machine = Machine(measure_matmul_peak(torch.float32, "cpu", args.peak_seconds), measure_copy_bandwidth("cpu"),
                      torch.get_num_threads())  # fmt: skip
    work = make_workload(args.num_requests, args.seed, args.min_len, args.max_len)
    total_tokens = sum(work.lengths)
    print(f"workload: {args.num_requests} requests, one image each, {total_tokens} output tokens "
          f"(lengths {min(work.lengths)}..{max(work.lengths)}), torch threads {torch.get_num_threads()}, "
          f"malloc tuned for tensors (every row): {'yes' if tuned else 'no'}")  # fmt: skip
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    text_model: Any = load_text_half(args.model).model  # generate_batch comes from GenerationMixin
    text_prompts = [p.replace("<image>\n", "") for p in work.prompts]
    text_ids = [processor.tokenizer(p).input_ids for p in text_prompts]
    vision = VisionFlops(VisionEncoder(ModelConfig(model=args.model)))
    flops = count_work(processor, LanguageModelFlops(text_model), vision, work, text_ids, args.text_len)
    del vision  # its own copy of the vision weights, only needed for counting
    everything = list(range(args.num_requests))
    results: dict[str, Row] = {}

    with torch.inference_mode():
        seq = list(range(min(args.sequential_requests, args.num_requests)))
        seconds = sum(hf_static(model, processor, work, [i]) for i in seq)
        results["(a) HF generate, one at a time"] = Row(sum(work.lengths[i] for i in seq), seconds,
                                                        flops.with_vision(seq))  # fmt: skip
        for size in args.static_batches:
            batches = [list(range(s, min(s + size, args.num_requests))) for s in range(0, args.num_requests, size)]
            seconds = sum(hf_static(model, processor, work, batch) for batch in batches)
            results[f"(b) HF generate, static batches of {size}"] = Row(total_tokens, seconds,
                                                                        flops.with_vision(everything))  # fmt: skip

    requests = image_requests(work)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.lengths]
    if args.compiled_too:
        started = time.perf_counter()
        with LLM(args.model, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens,
                 enforce_eager=False) as compiled:  # fmt: skip
            print(f"mmserve LLM(enforce_eager=False), torch.compile included: {time.perf_counter() - started:.1f} s")
            seconds, _ = timed(lambda: compiled.generate(requests, params))
        results["(c) mmserve LLM.generate, torch.compile"] = Row(total_tokens, seconds, flops.with_vision(everything))
    llm = LLM(args.model, block_size=16, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens)
    probe = StepProbe(llm, min_running=min(64, args.num_requests))
    seconds, _ = timed(lambda: llm.generate(requests, params))
    results["(c) mmserve LLM.generate"] = Row(total_tokens, seconds, flops.with_vision(everything))
    probe.remove()

    hf_decode_s, mmserve_decode_s = vision_excluded(args, work, model, processor, results, seq, flops)

    fixed = args.text_len
    cb_config = GenerationConfig(max_new_tokens=fixed, min_new_tokens=fixed, do_sample=False, eos_token_id=None)
    seconds, _ = timed(lambda: text_model.generate_batch(inputs=text_ids, generation_config=cb_config))
    results["(d) transformers generate_batch, text only"] = Row(len(text_ids) * fixed, seconds, sum(flops.text_lm))
    text_params = SamplingParams(max_tokens=fixed, temperature=0, ignore_eos=True)
    text_requests: list[PromptLike] = [{"prompt_token_ids": ids} for ids in text_ids]
    seconds, _ = timed(lambda: llm.generate(text_requests, text_params))
    results["(e) mmserve LLM.generate, text only"] = Row(len(text_ids) * fixed, seconds, sum(flops.text_lm))
    if args.compiled_too:
        with LLM(args.model, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens,
                 enforce_eager=False) as compiled:  # fmt: skip
            seconds, _ = timed(lambda: compiled.generate(text_requests, text_params))
        results["(e) mmserve LLM.generate, text only, torch.compile"] = Row(len(text_ids) * fixed, seconds,
                                                                          sum(flops.text_lm))  # fmt: skip

    ttft_first, ttft_second = time_to_first_token(llm, work)
    llm.close()
    # Peak and bandwidth again at the end, the better of each: load from elsewhere only ever lowers a measurement.
    peak = max(machine.peak_gflops, measure_matmul_peak(torch.float32, "cpu", args.peak_seconds))
    machine = Machine(peak, max(machine.bandwidth_gbs, measure_copy_bandwidth("cpu")), machine.threads)
    element_size = next(text_model.parameters()).element_size()
    context = flops.prompt_lens[0] + (args.decode_tokens + 1) / 2  # decodes attend to P + 1 .. P + tokens keys
    memory = MemoryFloor(
        weight_bytes=decode_weight_bytes(text_model),
        kv_bytes=round(kv_bytes_per_token(text_model.config, element_size) * context),
        context=context,
        bandwidth_gbs=machine.bandwidth_gbs,
        hf_seconds=hf_decode_s,
        mmserve_seconds=mmserve_decode_s,
    )
    report(results, machine, memory, probe.stats(), ttft_first, ttft_second)


def vision_excluded(
    args: argparse.Namespace,
    work: Workload,
    model: Any,
    processor: Any,
    results: dict[str, Row],
    seq: list[int],
    flops: WorkFlops,
) -> tuple[float, float]:
    """(a*) and (c*): the same runs with image embeddings computed beforehand, so only the LM side is timed; then
    seconds per token of batch-1 decode of the first request in both (HF, mmserve), for the memory floor.

    The vision tower does the same work in every configuration; on a 2-core CPU it dominates the totals above.
    (c*) runs with prefix caching off so the warm-up that fills the embedding cache cannot skip any prefill.
    """

    def hf_generate(index: int, length: int, stamps: TokenStamps | None = None) -> float:
        """Seconds of HF generate for one request, its image embeddings computed beforehand (untimed)."""
        with torch.inference_mode():
            inputs = processor(text=[work.prompts[index]], images=[work.images[index]], return_tensors="pt")
            pixels = inputs.pop("pixel_values")
            features = model.get_image_features(pixel_values=pixels).pooler_output
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            config = GenerationConfig(max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=0)
            processors = LogitsProcessorList([stamps] if stamps else [])
            return timed(functools.partial(model.generate, **inputs, mm_encoder_outputs=encoded,
                                           generation_config=config, logits_processor=processors))[0]  # fmt: skip

    seconds = sum(hf_generate(i, work.lengths[i]) for i in seq)
    results["(a*) HF generate, one at a time, vision excluded"] = Row(sum(work.lengths[i] for i in seq), seconds,
                                                                      flops.lm_only(seq))  # fmt: skip
    llm = LLM(args.model, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens,
              enable_prefix_caching=False)  # fmt: skip
    requests = image_requests(work)
    llm.generate(requests, SamplingParams(max_tokens=1, temperature=0))  # fills the embedding cache, untimed
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.lengths]
    seconds, _ = timed(lambda: llm.generate(requests, params))
    everything = list(range(len(requests)))
    results["(c*) mmserve LLM.generate, vision excluded"] = Row(sum(work.lengths), seconds, flops.lm_only(everything))

    # Batch-1 decode, HF and mmserve alternated `--decode-trials` times: the median of each side's per-trial medians
    # (one trial each was too noisy on a shared 2-core machine: mmserve/HF read 0.96 in one run, 1.46 in the next).
    hf_gaps, mmserve_gaps = [], []
    for _ in range(args.decode_trials):
        hf_stamps = TokenStamps()
        hf_generate(0, 1 + args.decode_tokens, hf_stamps)
        hf_gaps.append(median_gap(hf_stamps.stamps))
        mmserve_gaps.append(median_gap(mmserve_step_stamps(llm, requests[0], args.decode_tokens)))
    llm.close()
    print(f"batch-1 decode ms/token per trial: HF {[round(g * 1000, 2) for g in hf_gaps]}, mmserve "
          f"{[round(g * 1000, 2) for g in mmserve_gaps]}")  # fmt: skip
    return statistics.median(hf_gaps), statistics.median(mmserve_gaps)


class TokenStamps(LogitsProcessor):
    """Records when HF generate has each output token's logits: once per forward, prefill then each decode."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


def mmserve_step_stamps(llm: LLM, request: PromptLike, tokens: int) -> list[float]:
    """When each engine step of one request alone (prefill, then `tokens` decodes) ends."""
    engine, stamps = llm.engine, []
    original = engine.step

    def step() -> list:
        outputs = original()
        stamps.append(time.perf_counter())
        return outputs

    engine.step = step  # type: ignore[method-assign]
    try:
        llm.generate(request, SamplingParams(max_tokens=1 + tokens, temperature=0, ignore_eos=True))
    finally:
        engine.step = original  # type: ignore[method-assign]
    return stamps


def median_gap(stamps: list[float]) -> float:
    """Batch-1 seconds per decoded token: the median time between consecutive tokens (everything a token costs,
    sampling and the loop around the forward included), robust to other load on the machine; the prefill before
    the first stamp is not in any gap."""
    return statistics.median(later - earlier for earlier, later in itertools.pairwise(stamps))


class StepProbe:
    """Times the model forward inside engine steps that run only decodes for >= `min_running` requests, and KV use."""

    def __init__(self, llm: LLM, min_running: int = 64) -> None:
        self.engine = llm.engine
        self.min_running = min_running
        self.forward_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.kv_ratio: list[float] = []
        self._forward_start = 0.0
        self._forward_elapsed = 0.0
        decoder = self.engine.runner.model.model
        self._hooks = [
            decoder.register_forward_pre_hook(lambda *_: self._start()),
            decoder.register_forward_hook(lambda *_: self._stop()),
        ]
        self._original_step = self.engine.step
        self.engine.step = self._step  # type: ignore[method-assign]

    def _start(self) -> None:
        self._forward_start = time.perf_counter()

    def _stop(self) -> None:
        self._forward_elapsed = time.perf_counter() - self._forward_start

    def _step(self) -> list:
        running = self.engine.scheduler.num_running
        self._forward_elapsed = 0.0
        start = time.perf_counter()
        outputs = self._original_step()
        elapsed = time.perf_counter() - start
        if running >= self.min_running and len(outputs) >= self.min_running:
            self.step_seconds.append(elapsed)
            self.forward_seconds.append(self._forward_elapsed)
        used = self.engine.block_manager.num_used_blocks
        if used:
            stored = sum(r.num_computed_tokens for r in self.engine.scheduler._running)
            self.kv_ratio.append(stored / (used * self.engine.config.block_size))
        return outputs

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.engine.step = self._original_step  # type: ignore[method-assign]

    def stats(self) -> StepStats:
        return StepStats(self.min_running, self.step_seconds, self.forward_seconds, self.kv_ratio)


def time_to_first_token(llm: LLM, work: Workload) -> tuple[float, float]:
    image = work.images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # an image the engine has not seen
    prompt = {"prompt": work.prompts[0], "multi_modal_data": {"image": image}}
    one = SamplingParams(max_tokens=1, temperature=0)
    first, _ = timed(lambda: llm.generate(prompt, one))
    seconds = [timed(lambda: llm.generate(prompt, one))[0] for _ in range(5)]
    return first, statistics.median(seconds)


def format_machine(machine: Machine) -> str:
    return (f"machine: fp32 matmul peak {machine.peak_gflops:.1f} GFLOP/s (best square torch.mm, n = "
            f"{'/'.join(map(str, DEFAULT_MATMUL_SIZES))}, {machine.threads} threads); copy bandwidth "
            f"{machine.bandwidth_gbs:.1f} GB/s (read + write counted)")  # fmt: skip


def format_rows(results: dict[str, Row], peak_gflops: float) -> list[str]:
    """The tok/s table, each row with the FLOPs its work must take and the share of the compute floor it reaches."""
    lines = [f"{'configuration':48} {'out tok/s':>10} {'ms/token':>9} {'GFLOP':>9} {'% of compute floor':>19}"]
    for name, row in results.items():
        share = floor_share(compute_floor_seconds(row.flops, peak_gflops), row.seconds)
        lines.append(f"{name:48} {row.rate:10.1f} {1000 / row.rate:9.2f} {row.flops / 1e9:9.1f} {share:18.1%}")
    return lines


def format_memory_floor(memory: MemoryFloor) -> str:
    floor_ms = memory.seconds * 1000
    return (f"batch-1 decode vs memory floor: floor {floor_ms:.2f} ms/token ({memory.weight_bytes / 1e6:.1f} MB LM "
            f"weights + {memory.kv_bytes / 1e6:.2f} MB KV at mean context {memory.context:.0f}, per token, at "
            f"{memory.bandwidth_gbs:.1f} GB/s); HF generate {memory.hf_seconds * 1000:.2f} ms/token "
            f"({memory.hf_seconds / memory.seconds:.2f}x the floor), mmserve {memory.mmserve_seconds * 1000:.2f} "
            f"ms/token ({memory.mmserve_seconds / memory.seconds:.2f}x)")  # fmt: skip


def report(
    results: dict[str, Row],
    machine: Machine,
    memory: MemoryFloor,
    steps: StepStats,
    ttft_first: float,
    ttft_second: float,
) -> None:
    print()
    print(format_machine(machine))
    print()
    print("\n".join(format_rows(results, machine.peak_gflops)))
    print(format_memory_floor(memory))
    rates = {name: row.rate for name, row in results.items()}
    c = rates["(c) mmserve LLM.generate"]
    best_static = max(rate for name, rate in rates.items() if name.startswith("(b)"))
    print("\nratios:")
    print(f"  (c) / (a)             {c / rates['(a) HF generate, one at a time']:6.2f}x   (must >= 5, target 10)")
    print(f"  (c) / best (b)        {c / best_static:6.2f}x   (must >= 1.5, target 3)")
    a_star, c_star = (
        rates["(a*) HF generate, one at a time, vision excluded"],
        rates["(c*) mmserve LLM.generate, vision excluded"],
    )
    print(f"  (c*) / (a*)           {c_star / a_star:6.2f}x   (the LM side alone: image embeddings precomputed)")
    e, d = rates["(e) mmserve LLM.generate, text only"], rates["(d) transformers generate_batch, text only"]
    print(f"  (e) / (d)             {e / d:6.2f}x   (must >= 1.0, target 2)")
    for name in ("(c) mmserve LLM.generate", "(e) mmserve LLM.generate, text only"):
        if f"{name}, torch.compile" in rates:
            gain = rates[f"{name}, torch.compile"] / rates[name]
            print(f"  {name[:3]} compiled / eager {gain:6.2f}x   (torch.compile's gain on this CPU)")
    if steps.step_seconds:
        outside = 1 - sum(steps.forward_seconds) / sum(steps.step_seconds)
        print(f"  step time outside the model forward at {steps.min_running} decoding: {outside:.1%} over "
              f"{len(steps.step_seconds)} steps (median step {statistics.median(steps.step_seconds) * 1000:.1f} ms; "
              "target < 10%)")  # fmt: skip
    if steps.kv_ratio:
        print(f"  KV memory used by tokens / allocated blocks: {statistics.mean(steps.kv_ratio):.1%} mean, "
              f"{min(steps.kv_ratio):.1%} min (target > 96%)")  # fmt: skip
    print(f"  TTFT first {ttft_first * 1000:.1f} ms, repeated image + prefix {ttft_second * 1000:.1f} ms: "
          f"{ttft_first / ttft_second:.1f}x lower (target >= 5x)")  # fmt: skip


QUICK = {"num_requests": 8, "sequential_requests": 2, "min_len": 8, "max_len": 24, "text_len": 16,
         "static_batches": [4, 8], "decode_tokens": 8, "decode_trials": 1, "peak_seconds": 0.5}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint (the bench preset: common.demo_model --size bench)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests run one at a time for (a)")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=128, help="output length of the text-only runs (d), (e)")
    parser.add_argument("--batched-tokens", type=int, default=4096, help="mmserve max_num_batched_tokens")
    parser.add_argument("--static-batches", type=int, nargs="+", default=[16, 64], help="batch sizes of (b)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for batch-1 decode")
    parser.add_argument("--decode-trials", type=int, default=5, help="alternated HF / mmserve batch-1 decode runs")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compiled", dest="compiled_too", action="store_false",
                        help="skip the compiled (enforce_eager=False) runs of (c) and (e) that show torch.compile's "
                        "gain")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help=f"a small workload (proves it runs): {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
