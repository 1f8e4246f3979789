"""The synchronous engine: scheduler + model runner + detokenizers, one `step()` at a time.

    out = scheduler.schedule()                 # which requests, how many tokens each; aborts since last step
    result = runner.execute(out.chunks, ...)   # one forward pass, one sampled token per finished chunk
    deltas = detokenizers.step(result)          # new text; a matched stop string
    finished = scheduler.update(out, result.sampled_token_ids, stop strings)  # THE finish decision; blocks freed
    -> RequestOutput per request that produced text or finished (aborted ones included)

A failure while computing a step (the runner, the detokenizers, or the `step_hook` test seam) is the failure of
the requests scheduled in that step and of nobody else: they are aborted through the scheduler's normal abort path
(blocks freed) and end with finish_reason "error"; the step's other outputs (earlier aborts) still come out, and
the next step runs as usual. Nothing of the failed step reached the bookkeeping: `scheduler.update` (which advances
progress and caches full blocks) runs only after the computation succeeded. A failure in the bookkeeping itself
(`schedule`, `update`, or the abort after a failure) propagates: the engine's state can no longer be trusted.

Transport-free and single-threaded: `AsyncEngine` runs it in its own thread for the gRPC service; the
offline `LLM` calls `step()` directly.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.checkpoint import (
    TextHalf,
    generation_eos_token_ids,
    load_processor,
    load_text_half,
    resolve_checkpoint,
)
from common.config import EngineConfig
from common.models.base import PositionPlan
from generator_service.engine.block_manager import BlockManager
from generator_service.engine.detokenizer import IncrementalDetokenizer
from generator_service.engine.model_runner import KVCacheSpec, ModelRunner
from generator_service.engine.request import ImageSpan, Request, RequestStatus
from generator_service.engine.sampler import TokenLogprobs
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)
GiB = 1024**3
# Called with the ids of the requests a step is about to compute; what it raises fails that step (a test seam).
StepHook = Callable[[Sequence[str]], None]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    image_spans: tuple[ImageSpan, ...] = ()
    image_embeddings: tuple[torch.Tensor, ...] = ()  # per span, its image's [rows, hidden] embedding
    positions: PositionPlan | None = None  # rotary positions when they are not the token indices (M-RoPE)
    attention_blocks: tuple[tuple[int, int], ...] = ()  # bidirectional token ranges (an image's tokens, Gemma 3)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    image_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: new tokens and text, and on the last one the outcome."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", or "error" (its step failed; see the log)
    stop_reason: int | str | None = None  # the stop string or stop/eos token that ended the request
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_total: int
    kv_blocks_used: int
    requests_running: int
    requests_waiting: int
    prefix_cache_hit_tokens_total: int
    preemptions_total: int


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        text_half: TextHalf,
        processor: Any,
        eos_token_ids: frozenset[int] | None = None,
        *,
        step_hook: StepHook | None = None,
    ) -> None:
        self.config = config
        # Fault injection for tests: called on the engine thread at the start of each step that computes
        # something. A test may also set it on a running engine (read once per step).
        self.step_hook = step_hook
        self.num_consecutive_failed_steps = 0  # reset by every step whose computation succeeds
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = text_half.family  # the generator asks it only about inputs (token counts), never branches on it
        text_config = text_half.family.text_config
        self.max_model_len = config.max_model_len or int(text_config.max_position_embeddings)
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(text_half, config, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            self.block_manager,
        )
        self.runner = ModelRunner(
            text_half.model,
            block_size=config.block_size,
            num_blocks=num_blocks,
            position_dims=text_half.family.position_dims,
            compile=config.model.compile_language_model,
        )
        # What ends a request (unless ignore_eos): the checkpoint's generation config's ids, as HF generate uses
        # (gemma-3-it: <eos> and <end_of_turn>), else the tokenizer's EOS.
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = eos_token_ids or (frozenset() if eos is None else frozenset({int(eos)}))
        self._tracked: dict[str, _Tracked] = {}
        logger.info(
            "engine ready: %d KV blocks of %d tokens (%.1f MiB), max_model_len %d, max_num_seqs %d, "
            "max_num_batched_tokens %d, prefix caching %s, %s",
            num_blocks, config.block_size, num_blocks * self.runner.spec.bytes_per_block(config.block_size) / 2**20,
            self.max_model_len, config.max_num_seqs, config.max_num_batched_tokens,
            "on" if config.enable_prefix_caching else "off",
            "compiled at warm-up" if self.runner.compiled_layers else "eager",
        )  # fmt: skip

    @classmethod
    def from_config(cls, config: EngineConfig, *, step_hook: StepHook | None = None) -> LLMEngine:
        """Load the text half of the checkpoint and its processor (tokenizer, chat template, placeholder)."""
        model = config.model
        path = resolve_checkpoint(model.model, model.revision)
        text_half = load_text_half(path, dtype=model.dtype, device=model.device)
        return cls(config, text_half, load_processor(path), generation_eos_token_ids(path), step_hook=step_hook)

    @staticmethod
    def _blocks_for_memory(text_half: TextHalf, config: EngineConfig, max_model_len: int) -> int:
        """KV blocks that fit the memory budget, capped at what max_num_seqs full-length requests could use."""
        per_block = KVCacheSpec.of(text_half.model).bytes_per_block(config.block_size)
        budget = config.kv_cache_memory_gib
        if budget is None:
            budget_bytes = _free_cuda_memory_after_warmup(text_half, config) if config.model.device != "cpu" else GiB
        else:
            budget_bytes = int(budget * GiB)
        by_demand = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
        return max(1, min(budget_bytes // per_block, by_demand))

    def warm_up(self) -> float:
        """Run one short generation (a prefill step, then a decode step) before serving: it compiles the language
        model when it is compiled (two graphs serve every step) and touches kernels and the allocator. Call it
        before any request, from the thread that will step the engine. When the compiled warm-up fails, the layers
        go back to eager (logged) and the warm-up runs again; RuntimeError when the eager one fails too. Returns the
        seconds it took (also logged)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() runs before any request is added")
        started = time.perf_counter()
        try:
            self._warm_up_generation()
        except RuntimeError:
            if not self.runner.compiled_layers:
                raise
            logger.error("the compiled warm-up failed (the step's error is logged above): running the language "
                         "model eagerly")  # fmt: skip
            self.runner.run_eagerly()
            self._warm_up_generation()
        seconds = time.perf_counter() - started
        what = "torch.compile of the language model included" if self.runner.compiled_layers else "eager"
        logger.info("engine warm-up took %.1f s (%s)", seconds, what)
        return seconds

    def _warm_up_generation(self) -> None:
        # Twice over, so the prefill has >= 2 tokens (the graph for longer steps), within max_model_len.
        prompt = (self.tokenizer.encode("Hello, warm-up", add_special_tokens=False) or [0]) * 2
        prompt = prompt[: max(1, self.max_model_len - 2)]
        request_id = f"warmup-{uuid.uuid4().hex}"
        sampling = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        self.add_request(EngineRequest(request_id, prompt, sampling))
        reasons = [out.finish_reason for out in self._run_to_completion() if out.finished]
        if reasons != ["length"]:
            raise RuntimeError(f"warm-up generation ended {reasons}: see the log above")

    def _run_to_completion(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while self.has_unfinished_requests():
            outputs.extend(self.step())
        return outputs

    # ---- requests ------------------------------------------------------------------------------------------

    def add_request(self, engine_request: EngineRequest) -> None:
        """Admit a request; raises `RequestRejected` (a ValueError) when it can never fit."""
        request = Request(
            request_id=engine_request.request_id,
            prompt_token_ids=engine_request.prompt_token_ids,
            sampling=engine_request.sampling,
            eos_token_ids=self.eos_token_ids,
            image_spans=engine_request.image_spans,
            attention_blocks=engine_request.attention_blocks,
        )
        self.scheduler.add_request(request)
        try:
            self.runner.add_request(request, engine_request.image_embeddings, engine_request.positions)
        except Exception:
            self.scheduler.abort_request(request.request_id)
            raise
        detokenizer = IncrementalDetokenizer(self.tokenizer, stop=engine_request.sampling.stop)
        self._tracked[request.request_id] = _Tracked(request, detokenizer)

    def abort_request(self, request_id: str) -> None:
        """Abort at any point; blocks are freed now and the ABORT output comes with the next step."""
        self.scheduler.abort_request(request_id)  # reported by the next schedule(), which ends its stream

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_used=self.block_manager.num_used_blocks,
            requests_running=self.scheduler.num_running,
            requests_waiting=self.scheduler.num_waiting,
            prefix_cache_hit_tokens_total=self.scheduler.prefix_cache_hit_tokens_total,
            preemptions_total=self.scheduler.num_preemptions_total,
        )

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        # Aborted since the last step. Not tracked: rolled back by a failed add_request, or already ended by a failed
        # step; a new request may since have taken that id (and been aborted too: the id is listed twice), so the
        # tracked request must be an aborted one, ended once.
        aborted = [
            tracked.request
            for tracked in (self._tracked.get(rid) for rid in dict.fromkeys(scheduled.finished))
            if tracked is not None and tracked.request.status is RequestStatus.FINISHED_ABORTED
        ]
        outputs = [self._final_output(request, [], "", []) for request in aborted]
        if scheduled.preempted:
            logger.debug("preempted (recomputed later): %s", ", ".join(scheduled.preempted))
        if scheduled.is_empty:
            return outputs
        requests = {chunk.request_id: self._tracked[chunk.request_id].request for chunk in scheduled.chunks}
        try:
            if self.step_hook is not None:
                self.step_hook(tuple(requests))
            result = self.runner.execute(scheduled.chunks, requests)
            deltas = {
                rid: self._tracked[rid].detokenizer.step([token]) for rid, token in result.sampled_token_ids.items()
            }
        except Exception:  # only this step's requests fail; a BaseException (fatal) ends the engine's caller
            logger.exception("engine step failed: failing its %d request(s): %s", len(requests), ", ".join(requests))
            self.num_consecutive_failed_steps += 1
            return outputs + [self._fail(request) for request in requests.values()]
        self.num_consecutive_failed_steps = 0
        stop_strings = {rid: delta.stop_string for rid, delta in deltas.items() if delta.stop_string is not None}
        finished = {r.request_id for r in self.scheduler.update(scheduled, result.sampled_token_ids, stop_strings)}
        for request_id, token_id in result.sampled_token_ids.items():
            logprobs = [result.logprobs[request_id]] if request_id in result.logprobs else []
            text = deltas[request_id].text
            if request_id in finished:
                outputs.append(self._final_output(self._tracked[request_id].request, [token_id], text, logprobs))
            else:
                outputs.append(RequestOutput(request_id, [token_id], text, logprobs=logprobs))
        return outputs

    def _fail(self, request: Request) -> RequestOutput:
        """End a request whose step failed: aborted like a cancel (blocks freed now), finish_reason "error".
        Its id comes back in the next schedule()'s `finished`, where it is no longer tracked, so it ends once."""
        self.scheduler.abort_request(request.request_id)
        return self._final_output(request, [], "", [], finish_reason="error")

    def _final_output(
        self,
        request: Request,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprobs],
        finish_reason: str | None = None,
    ) -> RequestOutput:
        tracked = self._tracked.pop(request.request_id)
        self.runner.remove_request(request.request_id)
        if request.status is not RequestStatus.FINISHED_ABORTED:
            text += tracked.detokenizer.flush()
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=True,
            finish_reason=finish_reason or request.finish_reason or "abort",
            stop_reason=request.stop_reason,
            usage=Usage(
                prompt_tokens=request.num_prompt_tokens,
                completion_tokens=request.num_output_tokens,
                cached_prompt_tokens=request.num_cached_tokens,
                image_tokens=request.num_image_tokens,
            ),
            logprobs=logprobs,
        )


def _free_cuda_memory_after_warmup(text_half: TextHalf, config: EngineConfig) -> int:
    """Bytes left for the KV cache on CUDA: the device's share minus weights and a full-budget forward's peak.

    The warm-up forward runs `max_num_batched_tokens` tokens through the model with HF's SDPA attention (the
    paged attention needs the cache that is being sized); its activation peak is what one engine step needs.
    """
    device = torch.device(config.model.device)
    model = text_half.model
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = config.max_num_batched_tokens
    hidden = model.config.hidden_size
    with torch.inference_mode():
        embeds = torch.zeros(1, num_tokens, hidden, dtype=next(model.parameters()).dtype, device=device)
        positions = torch.arange(num_tokens, device=device)[None]
        model.model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.gpu_memory_utilization) - peak
    available = min(budget, free)
    if available <= 0:
        raise RuntimeError(
            f"no GPU memory left for the KV cache (peak {peak / GiB:.1f} GiB of {total / GiB:.1f} GiB): raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens, or set --num-kv-blocks"
        )
    logger.info("KV cache budget on %s: %.2f GiB (warm-up peak %.2f GiB)", device, available / GiB, peak / GiB)
    return available
