"""GPU check (issue 11): mmserve's correctness and speed on one CUDA card, with nothing downloaded.

    python -m benchmarks.gpu_check --out gpu-check.json          (make gpu-check: ~5 min on an H100/H200)
    python -m benchmarks.gpu_check --device cpu --size tiny --dtype float32 --batch-sizes 1,2 --max-tokens 4

It builds (or reuses) a random-weight LLaVA-1.5-7B-shaped checkpoint in bfloat16, then runs these phases in
order. Each is time-boxed (its own deadline checks between steps, SIGALRM behind them), printed as it ends and
written to --out; a failed phase is recorded and the next one still runs.

    environment      torch, CUDA and the card                      (exit 2 when CUDA is asked for and missing)
    checkpoint       build or reuse the checkpoint (weights drawn on the device: seconds, not minutes)
    bandwidth        device copy bandwidth: best of N copies of a large tensor, (read + write bytes) / time
    mmserve_load     LLM(...): the text half, the KV cache sized from what is free after a warm-up, the
                     torch.compile of the language model (unless --no-compile; a failed compile is recorded
                     and the engine loaded eagerly)
    kv_cache         what the engine chose: blocks, tokens, GiB
    mmserve_greedy   our greedy tokens and top-5 logprobs for the correctness prompts (also the warm-up)
    mmserve_decode   tok/s per batch size: a distinct image + a question per request, --max-tokens each, EOS ignored
    ttft             time to first token: a new image / embedding-cache hit / embedding + KV prefix hit
    hf_load, hf_greedy, hf_decode    the same on HF `LlavaForConditionalGeneration.generate` (static padded batch)
    correctness      greedy agreement on the first --compare-tokens tokens; top-5 logprob overlap at the first
    summary          a markdown table for BENCHMARKS.md

mmserve runs first so that its figures do not depend on HF (which may run out of memory at batch 256); the two
never share the card. Rates: "e2e" is output tokens / wall time of the whole run (image encoding and prefill
included, the processor's CPU work too); "decode" counts only the steps in which every request was decoding.
The HBM floor of a decode step at batch B is (LM weight bytes + B x mean context x KV bytes per token) / measured
bandwidth, so B / floor is the rate no implementation can beat; "of floor" is decode tok/s as a share of it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import transformers
from PIL import Image

from benchmarks.floor import decode_weight_bytes, measure_copy_bandwidth
from common.checkpoint import load_processor
from common.demo_checkpoints.llava import LLAVA
from common.demo_checkpoints.parts import SIZE_PRESETS
from generator_service import LLM, SamplingParams
from generator_service.engine.llm_engine import RequestOutput
from generator_service.llm import PromptLike

GiB = 1024**3
MiB = 1024**2
QUESTIONS = ["What is in the picture?", "Describe the image.", "What colors do you see?", "Is it day or night?"]
TOP_K = 5
# Seconds each phase may take at most (the run as a whole is also held to --time-budget). Expected on an H200 with
# the 7b preset: checkpoint ~60, mmserve_load ~30 + the compile (~30 on CPU for a small model), each decode sweep
# ~60, the rest seconds.
BUDGETS = {
    "checkpoint": 180.0, "bandwidth": 30.0, "mmserve_load": 120.0, "kv_cache": 10.0, "mmserve_greedy": 60.0,
    "mmserve_decode": 150.0, "ttft": 45.0, "hf_load": 90.0, "hf_greedy": 45.0, "hf_decode": 150.0,
    "correctness": 10.0, "summary": 10.0,
}  # fmt: skip
SUMMARY_RESERVE_S = 5.0  # kept back from the other phases so the summary always runs


class PhaseTimeout(Exception):
    """A phase ran past its time box."""


class Skip(Exception):
    """A phase cannot run (a phase it needs did not produce its result); the message says why."""


@dataclass
class Greedy:
    """One prompt's greedy continuation and the top-k logprobs at its first position, most likely first."""

    tokens: list[int]
    top: list[tuple[int, float]]


@dataclass
class State:
    """What the phases hand to each other."""

    args: argparse.Namespace
    checkpoint: Path | None = None
    bandwidth_bytes_s: float | None = None
    llm: LLM | None = None
    lm_weight_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    prompt_tokens: dict[int, float] = field(default_factory=dict)  # batch -> mmserve's mean prompt length
    ours: list[Greedy] | None = None
    theirs: list[Greedy] | None = None
    hf: Any = None  # the HF model while its phases run
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return str(self.args.device)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.args.dtype)
        return dtype


# ---- running phases --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise PhaseTimeout in the main thread after `seconds`: the hard stop behind a phase's own deadline checks.
    A running CUDA kernel is not interrupted, the Python loop around it is. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise PhaseTimeout(f"no result within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    """Runs phases in order under one overall deadline and writes the results after each."""

    def __init__(
        self, state: State, out: Path | None, time_budget_s: float, budgets: dict[str, float] | None = None
    ) -> None:
        self.state = state
        self.out = out
        self.end = time.perf_counter() + time_budget_s
        self.budgets = BUDGETS if budgets is None else budgets

    def run(self, name: str, phase: Callable[[State, dict[str, Any], float], None]) -> None:
        """`phase(state, figures, deadline)` fills `figures` as it goes: what it found before failing is kept."""
        figures: dict[str, Any] = {}
        self.state.results[name] = figures
        reserve = 0.0 if name == "summary" else SUMMARY_RESERVE_S
        limit = min(self.budgets.get(name, 60.0), self.end - reserve - time.perf_counter())
        start = time.perf_counter()
        if limit < 1.0:
            status, error = "timeout", "not started: the overall --time-budget is spent"
        else:
            # The phase's own checks stop it a little before the alarm, so it can end cleanly with partial figures.
            deadline = start + limit - min(10.0, 0.1 * limit)
            try:
                with time_box(limit):
                    phase(self.state, figures, deadline)
                status, error = "ok", None
            except Skip as exc:
                status, error = "skipped", str(exc)
            except PhaseTimeout as exc:
                status, error = "timeout", str(exc)
            except Exception as exc:  # a failed phase is a result: the next phase still runs
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        release_memory(self.state.device)
        seconds = time.perf_counter() - start
        self.state.results[name] = {"status": status, "seconds": round(seconds, 2), **figures}
        if error is not None:
            self.state.results[name]["error"] = error
        say(f"== {name}: {status} in {seconds:.1f} s" + (f" ({error})" if error else ""))
        self.write()

    def write(self) -> None:
        if self.out is not None:
            payload = {"args": vars(self.state.args), "phases": self.state.results}
            self.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def say(line: str) -> None:
    print(line, flush=True)


def release_memory(device: str) -> None:
    """Hand the card's cached blocks back, so the next phase (and the KV cache sizing) sees them free."""
    if device.startswith("cuda") and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---- workload --------------------------------------------------------------------------------------------------


def random_image(seed: int) -> Image.Image:
    """400 x 300 noise (the processor resizes and crops it): every seed a different image, so a different key."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(300, 400, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def prompt_text(index: int, prefix: str = "") -> str:
    return f"{prefix}USER: <image>\n{QUESTIONS[index % len(QUESTIONS)]} ASSISTANT:"


def requests_for(count: int, seed: int) -> tuple[list[str], list[Image.Image]]:
    return [prompt_text(i) for i in range(count)], [random_image(seed * 100_000 + i) for i in range(count)]


def as_prompts(texts: list[str], images: list[Image.Image]) -> list[PromptLike]:
    return [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]


# ---- phases ----------------------------------------------------------------------------------------------------


def environment(state: State, figures: dict[str, Any], deadline: float) -> None:
    figures.update(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpu_threads=torch.get_num_threads(),
    )
    if state.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(state.device)
        figures.update(card=torch.cuda.get_device_name(state.device), memory_gib=round(props.total_memory / GiB, 1),
                       capability=f"{props.major}.{props.minor}", card_count=torch.cuda.device_count())  # fmt: skip
        say(f"   card: {figures['card']}, {figures['memory_gib']} GiB, torch {torch.__version__}")
    else:
        figures["card"] = f"cpu ({platform.processor() or platform.machine()})"


def checkpoint(state: State, figures: dict[str, Any], deadline: float) -> None:
    args = state.args
    if args.checkpoint is not None:
        state.checkpoint = Path(args.checkpoint)
        figures.update(path=str(state.checkpoint), built=False)
        return
    path = Path(args.workdir or f".cache/models/gpu-check-{args.size}")
    wanted = {"family": "llava", "vision": "clip", "text": "llama", "size": args.size, "seed": args.seed}
    stamp = path / "mmserve_demo.json"
    reuse = not args.rebuild and stamp.is_file() and json.loads(stamp.read_text()) == wanted
    if not reuse:
        say(f"   building the {args.size} checkpoint in {path} (weights drawn on {state.device})")
        LLAVA.build(path, size=args.size, seed=args.seed, device=state.device)
    state.checkpoint = path
    files = list(path.glob("*.safetensors"))
    figures.update(path=str(path), built=not reuse, gib_on_disk=round(sum(f.stat().st_size for f in files) / GiB, 2))


def bandwidth(state: State, figures: dict[str, Any], deadline: float) -> None:
    """Best of N copies: each reads and writes the tensor once, the traffic of streaming the weights."""
    size = state.args.bandwidth_mib * MiB
    gb_per_s = measure_copy_bandwidth(state.device, num_bytes=size, repeats=state.args.bandwidth_repeats)
    state.bandwidth_bytes_s = gb_per_s * 1e9
    figures.update(tensor_mib=state.args.bandwidth_mib, gb_per_s=round(gb_per_s, 1))
    say(f"   device copy bandwidth: {figures['gb_per_s']} GB/s")


def mmserve_load(state: State, figures: dict[str, Any], deadline: float) -> None:
    """LLM(...) compiled (unless --no-compile): its constructor's warm-up compiles the language model. A compile
    failure is recorded and the engine loaded eagerly, so the phases after this one still run."""
    args = state.args
    if state.checkpoint is None:
        raise Skip("no checkpoint")
    settings: dict[str, Any] = {
        "device": state.device,
        "dtype": args.dtype,
        "max_num_seqs": max(args.batch_sizes),
        "max_num_batched_tokens": args.batched_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    compiled = not args.no_compile
    started = time.perf_counter()
    try:
        state.llm = LLM(str(state.checkpoint), enforce_eager=not compiled, **settings)
    except PhaseTimeout:
        raise
    except Exception as exc:
        if not compiled:
            raise
        figures["compile_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        say(f"   torch.compile failed ({figures['compile_error'][:200]}): loading eagerly")
        compiled = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        state.llm = LLM(str(state.checkpoint), enforce_eager=True, **settings)
    figures.update(compiled=compiled, load_s=round(time.perf_counter() - started, 1))
    state.lm_weight_bytes = decode_weight_bytes(state.llm.engine.runner.model)
    state.kv_bytes_per_token = state.llm.engine.runner.spec.bytes_per_block(1)
    figures.update(lm_weight_gib=round(state.lm_weight_bytes / GiB, 2), kv_bytes_per_token=state.kv_bytes_per_token)


def kv_cache(state: State, figures: dict[str, Any], deadline: float) -> None:
    if state.llm is None:
        raise Skip("no engine")
    engine = state.llm.engine
    config = engine.config
    blocks, block_size = engine.block_manager.num_blocks, config.block_size
    per_block = engine.runner.spec.bytes_per_block(block_size)
    sized_from = "free memory after a warm-up forward" if state.device.startswith("cuda") else "the CPU default, 1 GiB"
    if config.kv_cache_memory_gib is not None:
        sized_from = f"--kv-cache-memory-gib {config.kv_cache_memory_gib}"
    figures.update(
        sized_from=sized_from,
        gpu_memory_utilization=config.gpu_memory_utilization,
        num_blocks=blocks,
        block_size=block_size,
        tokens=blocks * block_size,
        gib=round(blocks * per_block / GiB, 3),
        max_model_len=engine.max_model_len,
        # The cache is also capped at what max_num_seqs full-length requests could use.
        demand_cap_blocks=config.max_num_seqs * math.ceil(engine.max_model_len / block_size),
    )
    if state.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(state.device)
        figures.update(free_gib_after=round(free / GiB, 2), total_gib=round(total / GiB, 2))
    say(f"   KV cache: {blocks} blocks x {block_size} = {blocks * block_size} tokens, {figures['gib']} GiB")


def mmserve_greedy(state: State, figures: dict[str, Any], deadline: float) -> None:
    if state.llm is None:
        raise Skip("no engine")
    texts, images = requests_for(state.args.prompts, seed=0)
    params = SamplingParams(max_tokens=state.args.compare_tokens, temperature=0, ignore_eos=True, logprobs=TOP_K)
    outputs = state.llm.generate(as_prompts(texts, images), params)
    state.ours = [Greedy(out.token_ids, list(out.logprobs[0].top)) for out in outputs]
    figures["tokens"] = [out.token_ids for out in outputs]


@dataclass(frozen=True)
class RunTiming:
    batch: int
    prompt_tokens: float  # mean per request, image tokens included
    tokens: int
    seconds: float
    decode_tokens: int
    decode_seconds: float
    complete: bool

    def figures(self, floor_tok_s: float | None) -> dict[str, Any]:
        decode = self.decode_tokens / self.decode_seconds if self.decode_seconds else None
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "e2e_tok_s": round(self.tokens / self.seconds, 1),
            "decode_tok_s": None if decode is None else round(decode, 1),
            "floor_tok_s": None if floor_tok_s is None else round(floor_tok_s, 1),
            "of_floor": None if decode is None or not floor_tok_s else round(decode / floor_tok_s, 3),
            "complete": self.complete,
        }


def drive_engine(llm: LLM, prompts: list[PromptLike], params: SamplingParams, deadline: float) -> RunTiming:
    """Run the prompts through the engine step by step, timing the steps in which every request decodes; past
    `deadline` the rest are aborted (the figures are then over what was produced)."""
    engine = llm.engine
    start = time.perf_counter()
    requests = llm._engine_requests(prompts, [params] * len(prompts))  # images encoded here: inside the timing
    for request in requests:
        engine.add_request(request)
    produced = {request.request_id: 0 for request in requests}
    unfinished = set(produced)
    prompt_tokens = statistics.mean(len(request.prompt_token_ids) for request in requests)
    decode_tokens, decode_seconds = 0, 0.0
    try:
        while unfinished and time.perf_counter() < deadline:
            all_decoding = engine.stats().requests_waiting == 0 and all(produced[r] for r in unfinished)
            step_start = time.perf_counter()
            outputs = engine.step()  # returns after the sampled ids reached the host: the step's work is done
            elapsed = time.perf_counter() - step_start
            step_tokens = count_tokens(outputs, produced, unfinished)
            if all_decoding:
                decode_tokens += step_tokens
                decode_seconds += elapsed
    finally:  # cut short or failed: nothing of this run may linger into the next one
        complete = not unfinished
        for request_id in unfinished:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    return RunTiming(len(prompts), prompt_tokens, sum(produced.values()), time.perf_counter() - start,
                     decode_tokens, decode_seconds, complete)  # fmt: skip


def count_tokens(outputs: list[RequestOutput], produced: dict[str, int], unfinished: set[str]) -> int:
    tokens = 0
    for output in outputs:
        if output.finish_reason == "error":
            raise RuntimeError(f"request {output.request_id} failed in the engine (see the log)")
        produced[output.request_id] += len(output.new_token_ids)
        tokens += len(output.new_token_ids)
        if output.finished:
            unfinished.discard(output.request_id)
    return tokens


def floor_tok_s(state: State, batch: int, prompt_tokens: float) -> float | None:
    """B / (the bytes one decode step must read / bandwidth), at the sweep's mean context."""
    if state.bandwidth_bytes_s is None or state.lm_weight_bytes is None or state.kv_bytes_per_token is None:
        return None
    mean_context = prompt_tokens + state.args.max_tokens / 2
    step_bytes = state.lm_weight_bytes + batch * mean_context * state.kv_bytes_per_token
    return batch / (step_bytes / state.bandwidth_bytes_s)


def sweep(
    state: State,
    figures: dict[str, Any],
    deadline: float,
    run_one: Callable[[int, float], RunTiming],
) -> None:
    """Each batch size gets an equal share of the time left; a fast one leaves its unused share to the next."""
    sizes = state.args.batch_sizes
    for index, batch in enumerate(sizes):
        share = (deadline - time.perf_counter()) / (len(sizes) - index)
        if share <= 0:
            figures[str(batch)] = {"error": "no time left"}
            continue
        try:
            timing = run_one(batch, time.perf_counter() + share)
        except PhaseTimeout:
            raise
        except Exception as exc:  # HF at batch 256 may run out of memory: the other batch sizes still count
            traceback.print_exc()
            message = str(exc).splitlines()[0] if str(exc) else ""
            figures[str(batch)] = {"error": f"{type(exc).__name__}: {message}"}
            say(f"   batch {batch}: {figures[str(batch)]['error']}")
            release_memory(state.device)
            continue
        figures[str(batch)] = row = timing.figures(floor_tok_s(state, batch, timing.prompt_tokens))
        say(f"   batch {batch}: {row['e2e_tok_s']} tok/s e2e, {row['decode_tok_s']} decode, floor "
            f"{row['floor_tok_s']} ({row['of_floor']}){'' if timing.complete else ', cut short'}")  # fmt: skip


def mmserve_decode(state: State, figures: dict[str, Any], deadline: float) -> None:
    llm = state.llm
    if llm is None:
        raise Skip("no engine")
    params = SamplingParams(max_tokens=state.args.max_tokens, temperature=0, ignore_eos=True)

    def run_one(batch: int, batch_deadline: float) -> RunTiming:
        texts, images = requests_for(batch, seed=batch)  # new images per batch size: no cache hits across sizes
        timing = drive_engine(llm, as_prompts(texts, images), params, batch_deadline)
        state.prompt_tokens[batch] = timing.prompt_tokens
        return timing

    sweep(state, figures, deadline, run_one)


def ttft(state: State, figures: dict[str, Any], deadline: float) -> None:
    """Per new image: first time (encode + prefill), same image after another prefix (embedding-cache hit, no KV
    prefix hit: the first block differs), same prompt again (embedding and KV prefix hits)."""
    llm = state.llm
    if llm is None:
        raise Skip("no engine")
    one = SamplingParams(max_tokens=1, temperature=0)

    def first_token_s(text: str, image: Image.Image) -> float:
        start = time.perf_counter()
        llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, one)
        return time.perf_counter() - start

    cold, embedding_hit, full_hit = [], [], []
    for k in range(state.args.ttft_repeats):
        image = random_image(9_000_000 + k)
        cold.append(first_token_s(prompt_text(0), image))
        embedding_hit.append(first_token_s(prompt_text(0, prefix=f"Request {k} of the TTFT check. "), image))
        full_hit.append(first_token_s(prompt_text(0), image))
        if time.perf_counter() > deadline:
            break
    figures.update(
        new_image_ms=round(statistics.median(cold) * 1000, 1),
        embedding_hit_ms=round(statistics.median(embedding_hit) * 1000, 1),
        embedding_and_prefix_hit_ms=round(statistics.median(full_hit) * 1000, 1),
        repeats=len(cold),
    )
    say(f"   TTFT: new image {figures['new_image_ms']} ms, embedding hit {figures['embedding_hit_ms']} ms, "
        f"+ KV prefix hit {figures['embedding_and_prefix_hit_ms']} ms")  # fmt: skip


def close_mmserve(state: State) -> None:
    if state.llm is not None:
        state.llm.close()
        state.llm = None


def hf_load(state: State, figures: dict[str, Any], deadline: float) -> None:
    from transformers import LlavaForConditionalGeneration

    close_mmserve(state)  # the two never share the card
    release_memory(state.device)
    if state.checkpoint is None:
        raise Skip("no checkpoint")
    if state.device.startswith("cuda"):  # what mmserve left behind, should HF run out of memory
        figures["allocated_gib_before"] = round(torch.cuda.memory_allocated(state.device) / GiB, 2)
    model: Any
    try:
        model = LlavaForConditionalGeneration.from_pretrained(state.checkpoint, dtype=state.dtype,
                                                              device_map=state.device)  # fmt: skip
    except (ImportError, ValueError):  # an older transformers wants accelerate for device_map
        model = LlavaForConditionalGeneration.from_pretrained(state.checkpoint, dtype=state.dtype)
        model = model.to(state.device)
    model.eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: every request makes exactly max_new_tokens
    state.hf = (model, load_processor(state.checkpoint))  # the processor the engine uses: the same pixels


class StepClock:
    """A stopping criterion that stops nothing before `deadline`: it records when each generated token exists."""

    def __init__(self, device: str, deadline: float) -> None:
        self.device = device
        self.deadline = deadline
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        expired = self.times[-1] > self.deadline
        return torch.full((input_ids.shape[0],), expired, dtype=torch.bool, device=input_ids.device)


def hf_generate(
    state: State, texts: list[str], images: list[Image.Image], max_new_tokens: int, deadline: float, logits: bool
) -> tuple[Any, int, StepClock]:
    """One padded `generate` call; returns its output, the padded prompt length and the step clock."""
    from transformers import GenerationConfig, StoppingCriteriaList

    model, processor = state.hf
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(state.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(state.dtype)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
        output_logits=logits,
        return_dict_in_generate=True,
    )
    clock = StepClock(state.device, deadline)
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([clock]))
    return output, int(inputs["input_ids"].shape[1]), clock


def hf_greedy(state: State, figures: dict[str, Any], deadline: float) -> None:
    if state.hf is None:
        raise Skip("no HF model")
    texts, images = requests_for(state.args.prompts, seed=0)
    state.theirs = []
    for text, image in zip(texts, images, strict=True):  # one at a time: no padding in the reference
        output, prompt_len, _ = hf_generate(state, [text], [image], state.args.compare_tokens, deadline, logits=True)
        logprobs = torch.log_softmax(output.logits[0][0].float(), dim=-1)  # [vocab] first generated position
        top = torch.topk(logprobs, TOP_K)
        tokens = output.sequences[0, prompt_len:].tolist()
        state.theirs.append(Greedy(tokens, list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
    figures["tokens"] = [g.tokens for g in state.theirs]


def hf_decode(state: State, figures: dict[str, Any], deadline: float) -> None:
    if state.hf is None:
        raise Skip("no HF model")

    def run_one(batch: int, batch_deadline: float) -> RunTiming:
        texts, images = requests_for(batch, seed=batch)
        start = time.perf_counter()
        output, prompt_len, clock = hf_generate(
            state, texts, images, state.args.max_tokens, batch_deadline, logits=False
        )
        seconds = time.perf_counter() - start
        steps = output.sequences.shape[1] - prompt_len
        del output
        # Step 1 is the prefill; the clock's later ticks are one decode step each.
        decode_seconds = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
        # The floor at mmserve's mean prompt length (HF's padded batch reads more KV than that).
        prompt_tokens = state.prompt_tokens.get(batch, float(prompt_len))
        return RunTiming(batch, prompt_tokens, batch * steps, seconds, batch * (steps - 1), decode_seconds,
                         steps == state.args.max_tokens)  # fmt: skip

    sweep(state, figures, deadline, run_one)


def correctness(state: State, figures: dict[str, Any], deadline: float) -> None:
    """Greedy agreement (the longest common prefix) and top-5 overlap at the first position, per prompt. In
    bfloat16 two kernels may round a near-tie differently and the texts diverge after it: reported, not failed;
    a first token that differs is flagged. In float32 both must agree on every token."""
    if state.ours is None or state.theirs is None:
        raise Skip("needs mmserve_greedy and hf_greedy")
    prefixes, overlaps, deltas, flags = [], [], [], []
    for index, (ours, theirs) in enumerate(zip(state.ours, state.theirs, strict=True)):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens, strict=False)) if a != b), len(ours.tokens)
        )
        prefixes.append(prefix)
        our_top, their_top = dict(ours.top), dict(theirs.top)
        shared = our_top.keys() & their_top.keys()
        overlaps.append(len(shared))
        deltas.append(max((abs(our_top[t] - their_top[t]) for t in shared), default=float("inf")))
        if prefix == 0:
            flags.append(f"prompt {index}: the first token differs ({ours.tokens[0]} vs HF {theirs.tokens[0]})")
    compared = state.args.compare_tokens
    figures.update(
        compared_tokens=compared,
        agreeing_prefix=prefixes,
        all_tokens_agree=all(p == compared for p in prefixes),
        first_token_agrees=f"{sum(p > 0 for p in prefixes)}/{len(prefixes)}",
        top5_overlap=overlaps,
        max_abs_logprob_delta=round(max(deltas), 5),
        flags=flags,
    )
    say(f"   agreeing prefix of {compared}: {prefixes}; top-{TOP_K} overlap {overlaps}, max |d logprob| "
        f"{figures['max_abs_logprob_delta']}" + "".join(f"\n   FLAG {flag}" for flag in flags))  # fmt: skip


def summary(state: State, figures: dict[str, Any], deadline: float) -> None:
    figures["markdown"] = markdown(state)
    say("\n" + figures["markdown"])


# ---- the table -------------------------------------------------------------------------------------------------


def markdown(state: State) -> str:
    results, args = state.results, state.args
    env = results.get("environment", {})

    def get(phase: str, key: str, default: Any = "n/a") -> Any:
        value = results.get(phase, {}).get(key)
        return default if value is None else value

    lines = [
        f"### GPU check: {env.get('card', '?')}, torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, {args.dtype}, LLaVA-1.5 `{args.size}` shapes (random weights)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| device copy bandwidth | {get('bandwidth', 'gb_per_s')} GB/s |",
        f"| mmserve load (compiled: {get('mmserve_load', 'compiled')}) | {get('mmserve_load', 'load_s')} s |",
        f"| KV cache ({get('kv_cache', 'sized_from')}) | {get('kv_cache', 'num_blocks')} blocks x "
        f"{get('kv_cache', 'block_size')} = {get('kv_cache', 'tokens')} tokens, {get('kv_cache', 'gib')} GiB |",
        f"| greedy agreement, first {args.compare_tokens} tokens | prefix {get('correctness', 'agreeing_prefix')}, "
        f"first token {get('correctness', 'first_token_agrees')} |",
        f"| top-{TOP_K} overlap at the first position | {get('correctness', 'top5_overlap')}, max abs logprob delta "
        f"{get('correctness', 'max_abs_logprob_delta')} |",
        f"| TTFT new image / embedding hit / + KV prefix hit | {get('ttft', 'new_image_ms')} / "
        f"{get('ttft', 'embedding_hit_ms')} / {get('ttft', 'embedding_and_prefix_hit_ms')} ms |",
        "",
        "| batch | mmserve e2e tok/s | mmserve decode tok/s | HF e2e tok/s | HF decode tok/s | HBM floor tok/s | "
        "mmserve of floor |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours, theirs = results.get("mmserve_decode", {}), results.get("hf_decode", {})
    for batch in args.batch_sizes:
        mine, hf = ours.get(str(batch), {}), theirs.get(str(batch), {})
        cells = [mine.get("e2e_tok_s"), mine.get("decode_tok_s"), hf.get("e2e_tok_s") or hf.get("error"),
                 hf.get("decode_tok_s"), mine.get("floor_tok_s"), mine.get("of_floor")]  # fmt: skip
        lines.append(f"| {batch} | " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    lines.append("")
    statuses = ", ".join(f"{name} {r.get('status')}" for name, r in results.items() if name != "summary")
    lines.append(f"{args.max_tokens} output tokens per request, EOS ignored; phases: {statuses}")
    return "\n".join(lines)


# ---- entry point -----------------------------------------------------------------------------------------------

PHASES: list[tuple[str, Callable[[State, dict[str, Any], float], None]]] = [
    ("checkpoint", checkpoint),
    ("bandwidth", bandwidth),
    ("mmserve_load", mmserve_load),
    ("kv_cache", kv_cache),
    ("mmserve_greedy", mmserve_greedy),
    ("mmserve_decode", mmserve_decode),
    ("ttft", ttft),
    ("hf_load", hf_load),
    ("hf_greedy", hf_greedy),
    ("hf_decode", hf_decode),
    ("correctness", correctness),
    ("summary", summary),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--size", default="7b", choices=tuple(SIZE_PRESETS), help="checkpoint size preset")
    parser.add_argument("--checkpoint", help="use this LLaVA checkpoint instead of building one")
    parser.add_argument("--workdir", help="where the checkpoint is built (default .cache/models/gpu-check-SIZE)")
    parser.add_argument("--rebuild", action="store_true", help="build the checkpoint even if one is there")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed")
    parser.add_argument("--batch-sizes", default="1,16,64,256", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request in the decode runs")
    parser.add_argument("--compare-tokens", type=int, default=32, help="greedy tokens compared with HF")
    parser.add_argument("--prompts", type=int, default=3, help="prompts (each with an image) compared with HF")
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--batched-tokens", type=int, default=8192, help="mmserve max_num_batched_tokens")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--bandwidth-mib", type=int, help="copied tensor's size (default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--bandwidth-repeats", type=int, default=10)
    parser.add_argument("--skip-hf", action="store_true", help="run mmserve's phases only")
    parser.add_argument("--no-compile", action="store_true", help="run mmserve's language model eagerly")
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole check")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (rewritten after every phase)")
    args = parser.parse_args(argv)
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 4096 if args.device.startswith("cuda") else 64
    if min(args.batch_sizes) < 1 or args.max_tokens < 1 or args.compare_tokens < 1 or args.prompts < 1:
        parser.error("--batch-sizes, --max-tokens, --compare-tokens and --prompts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """0: every phase ran (correctness flags are in the table); 1: a phase failed or timed out; 2: no CUDA."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("generator_service").setLevel(logging.INFO)  # the engine's KV cache sizing
    state = State(args)
    runner = Runner(state, args.out, args.time_budget)
    runner.run("environment", environment)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        version = torch.__version__.split("+")[0]
        say(f"gpu-check: CUDA is not available to {sys.executable} (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}). Install the CUDA build of torch=={version} into it (see README), or run on "
            "the CPU: --device cpu --size tiny --dtype float32")  # fmt: skip
        return 2
    for name, phase in PHASES:
        if args.skip_hf and name.startswith("hf_"):
            state.results[name] = {"status": "skipped", "error": "--skip-hf"}
            continue
        runner.run(name, phase)
    close_mmserve(state)
    state.hf = None
    failed = [name for name, r in state.results.items() if r["status"] in ("failed", "timeout")]
    if failed:
        say(f"gpu-check: {', '.join(failed)} did not complete (see above and {args.out or 'the log'})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
