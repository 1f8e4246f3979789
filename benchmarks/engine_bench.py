"""Engine benchmark (issue 4): mmserve's offline engine vs Hugging Face baselines, in one run.

    python -m benchmarks.engine_bench --model .cache/models/bench      (make bench-engine)

Workload: N requests (default 64), each one distinct image and a short question, output lengths drawn from
[16, 256] with a fixed seed, all submitted at once; every request generates exactly its length (EOS ignored).

    (a) HF generate, one request at a time   (on the first --sequential-requests requests: a rate, not a total)
    (b) HF generate, static padded batches of 16 and of 64 (each batch runs to its longest request)
    (c) mmserve LLM.generate, everything at once (continuous batching; image encoding included)
    text-only, same questions and lengths:
    (d) transformers' continuous batching (generate_batch)   (e) mmserve

Also: share of engine step time outside the model forward with 64 requests decoding, KV memory used by
tokens vs allocated, and time to first token of a repeated image + prompt prefix vs the first time.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from common.checkpoint import load_text_half
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


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    work = make_workload(args.num_requests, args.seed, args.min_len, args.max_len)
    total_tokens = sum(work.lengths)
    print(f"workload: {args.num_requests} requests, one image each, {total_tokens} output tokens "
          f"(lengths {min(work.lengths)}..{max(work.lengths)}), torch threads {torch.get_num_threads()}")  # fmt: skip
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    results: dict[str, float] = {}

    with torch.inference_mode():
        seq = list(range(min(args.sequential_requests, args.num_requests)))
        seconds = sum(hf_static(model, processor, work, [i]) for i in seq)
        results["(a) HF generate, one at a time"] = sum(work.lengths[i] for i in seq) / seconds
        for size in (16, 64):
            batches = [list(range(s, min(s + size, args.num_requests))) for s in range(0, args.num_requests, size)]
            seconds = sum(hf_static(model, processor, work, batch) for batch in batches)
            results[f"(b) HF generate, static batches of {size}"] = total_tokens / seconds

    llm = LLM(args.model, block_size=16, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens)
    probe = StepProbe(llm)
    requests = image_requests(work)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.lengths]
    seconds, _ = timed(lambda: llm.generate(requests, params))
    results["(c) mmserve LLM.generate"] = total_tokens / seconds
    probe.remove()

    vision_excluded(args, work, model, processor, results, seq)

    text_prompts = [p.replace("<image>\n", "") for p in work.prompts]
    text_ids = [processor.tokenizer(p).input_ids for p in text_prompts]
    fixed = args.text_len
    text_model: Any = load_text_half(args.model).model  # generate_batch comes from GenerationMixin
    cb_config = GenerationConfig(max_new_tokens=fixed, min_new_tokens=fixed, do_sample=False, eos_token_id=None)
    seconds, _ = timed(lambda: text_model.generate_batch(inputs=text_ids, generation_config=cb_config))
    results["(d) transformers generate_batch, text only"] = len(text_ids) * fixed / seconds
    text_params = SamplingParams(max_tokens=fixed, temperature=0, ignore_eos=True)
    seconds, _ = timed(lambda: llm.generate([{"prompt_token_ids": ids} for ids in text_ids], text_params))
    results["(e) mmserve LLM.generate, text only"] = len(text_ids) * fixed / seconds

    ttft_first, ttft_second = time_to_first_token(llm, work)
    report(results, probe, ttft_first, ttft_second)


def vision_excluded(
    args: argparse.Namespace, work: Workload, model: Any, processor: Any, results: dict[str, float], seq: list[int]
) -> None:
    """(a*) and (c*): the same runs with image embeddings computed beforehand, so only the LM side is timed.

    The vision tower does the same work in every configuration; on a 2-core CPU it dominates the totals above.
    (c*) runs with prefix caching off so the warm-up that fills the embedding cache cannot skip any prefill.
    """
    with torch.inference_mode():
        seconds = 0.0
        for i in seq:
            inputs = processor(text=[work.prompts[i]], images=[work.images[i]], return_tensors="pt")
            pixels = inputs.pop("pixel_values")
            features = model.get_image_features(pixel_values=pixels).pooler_output
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            length = work.lengths[i]
            config = GenerationConfig(max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=0)
            generate = functools.partial(model.generate, **inputs, mm_encoder_outputs=encoded, generation_config=config)
            seconds += timed(generate)[0]
        results["(a*) HF generate, one at a time, vision excluded"] = sum(work.lengths[i] for i in seq) / seconds
    llm = LLM(args.model, max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens,
              enable_prefix_caching=False)  # fmt: skip
    requests = image_requests(work)
    llm.generate(requests, SamplingParams(max_tokens=1, temperature=0))  # fills the embedding cache, untimed
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.lengths]
    seconds, _ = timed(lambda: llm.generate(requests, params))
    results["(c*) mmserve LLM.generate, vision excluded"] = sum(work.lengths) / seconds


class StepProbe:
    """Times the model forward inside engine steps that run only decodes for >= 64 requests, and KV use."""

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
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
        if running >= 64 and len(outputs) >= 64:
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


def time_to_first_token(llm: LLM, work: Workload) -> tuple[float, float]:
    image = work.images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # an image the engine has not seen
    prompt = {"prompt": work.prompts[0], "multi_modal_data": {"image": image}}
    one = SamplingParams(max_tokens=1, temperature=0)
    first, _ = timed(lambda: llm.generate(prompt, one))
    seconds = [timed(lambda: llm.generate(prompt, one))[0] for _ in range(5)]
    return first, statistics.median(seconds)


def report(results: dict[str, float], probe: StepProbe, ttft_first: float, ttft_second: float) -> None:
    print(f"\n{'configuration':48} {'out tok/s':>10} {'ms/token':>9}")
    for name, rate in results.items():
        print(f"{name:48} {rate:10.1f} {1000 / rate:9.2f}")
    c = results["(c) mmserve LLM.generate"]
    best_static = max(
        results["(b) HF generate, static batches of 16"], results["(b) HF generate, static batches of 64"]
    )
    print("\nratios:")
    print(f"  (c) / (a)             {c / results['(a) HF generate, one at a time']:6.2f}x   (must >= 5, target 10)")
    print(f"  (c) / best (b)        {c / best_static:6.2f}x   (must >= 1.5, target 3)")
    a_star, c_star = results["(a*) HF generate, one at a time, vision excluded"], results[
        "(c*) mmserve LLM.generate, vision excluded"
    ]
    print(f"  (c*) / (a*)           {c_star / a_star:6.2f}x   (the LM side alone: image embeddings precomputed)")
    e, d = results["(e) mmserve LLM.generate, text only"], results["(d) transformers generate_batch, text only"]
    print(f"  (e) / (d)             {e / d:6.2f}x   (must >= 1.0, target 2)")
    if probe.step_seconds:
        outside = 1 - sum(probe.forward_seconds) / sum(probe.step_seconds)
        print(f"  step time outside the model forward at 64 decoding: {outside:.1%} over {len(probe.step_seconds)} "
              f"steps (median step {statistics.median(probe.step_seconds) * 1000:.1f} ms; target < 10%)")  # fmt: skip
    if probe.kv_ratio:
        print(f"  KV memory used by tokens / allocated blocks: {statistics.mean(probe.kv_ratio):.1%} mean, "
              f"{min(probe.kv_ratio):.1%} min (target > 96%)")  # fmt: skip
    print(f"  TTFT first {ttft_first * 1000:.1f} ms, repeated image + prefix {ttft_second * 1000:.1f} ms: "
          f"{ttft_first / ttft_second:.1f}x lower (target >= 5x)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint (the bench preset: common.demo_model --size bench)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests run one at a time for (a)")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=128, help="output length of the text-only runs (d), (e)")
    parser.add_argument("--batched-tokens", type=int, default=4096, help="mmserve max_num_batched_tokens")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
