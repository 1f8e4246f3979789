"""Iteration-level scheduler (vLLM v1 policy): token budgets, chunked prefill, prefix hits, preemption.

Each step grants tokens under `max_num_batched_tokens`, no prefill/decode phases:

  1. RUNNING requests in order get min(num_tokens - num_computed_tokens, budget) tokens (a decode is 1 token,
     an unfinished chunked prefill continues). When blocks run out, the NEWEST running request is preempted
     (recompute: its blocks are freed, hashed ones stay in the prefix cache) and put at the front of WAITING.
  2. If nobody was preempted, WAITING requests are admitted FCFS while budget and max_num_seqs allow, each
     starting after its prefix-cache hit. The first one that does not fit stops admission (no skipping).

A chunk never ends strictly inside one of a request's attention blocks (an image whose tokens attend to each
other both ways, Gemma 3): it stops before the block, or takes the block's rest whole; a block longer than
`max_num_batched_tokens` is rejected at admission, and one that does not fit this step's budget waits.

The loop reads `out = scheduler.schedule(); result = runner.execute(out.chunks, ...);
finished = scheduler.update(out, result.sampled_token_ids, stop_strings)`: `update` is the one place that decides a
request is finished (stop token, stop string, length); `out.finished` reports the requests aborted since the last
step and `out.preempted` the ones sent back to WAITING. Pure Python: no torch, grpc or redis.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from generator_service.engine.block_manager import BlockManager
from generator_service.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine's limits (EngineConfig holds their defaults; the model decides max_model_len)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        for name, flag in (("max_num_seqs", "--max-num-seqs"), ("max_num_batched_tokens", "--max-num-batched-tokens"),
                           ("max_model_len", "--max-model-len")):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}: set {flag} to 1 or more")


class RequestRejected(ValueError):
    """The request can never be scheduled (too long, too big for the KV cache, empty...)."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of one request, writing KV into `block_table`."""

    request_id: str
    start: int  # num_computed_tokens before this step
    num_tokens: int
    block_table: tuple[int, ...]
    samples: bool  # the chunk reaches num_tokens: sample the next token from its last row


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]
    finished: tuple[str, ...]  # aborted since the last step (their blocks are already freed)
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner to compute (preempted/finished may still carry news)."""
        return not self.chunks


class _TokenBudget:
    def __init__(self, num_tokens: int) -> None:
        self.remaining = num_tokens

    def grant(self, wanted: int) -> int:
        return min(wanted, self.remaining)

    def spend(self, num_tokens: int) -> None:
        self.remaining -= num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the last one is the newest
        self._aborted: list[str] = []
        self.num_preemptions_total = 0
        self.prefix_cache_hit_tokens_total = 0  # hit tokens over every admission, resumes included

    # ---- queries -------------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- intake and cancellation ---------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises RequestRejected if it could never be scheduled."""
        self._check_admissible(request)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a request in any state; its blocks are freed now and its id is reported in the next
        schedule()'s `finished`. Returns None for an unknown or already finished request."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        else:
            self._running.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(request_id)
        return request

    # ---- one step ------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        finished = tuple(self._aborted)
        self._aborted.clear()
        budget = _TokenBudget(self.config.max_num_batched_tokens)
        chunks, preempted = self._schedule_running(budget)
        if not preempted:  # blocks are short: admitting more would only cause more preemption
            chunks += self._schedule_waiting(budget)
        return SchedulerOutput(
            chunks=tuple(chunks),
            preempted=tuple(preempted),
            finished=finished,
            num_batched_tokens=self.config.max_num_batched_tokens - budget.remaining,
        )

    def update(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Mapping[str, int],
        stop_strings: Mapping[str, str] | None = None,
    ) -> list[Request]:
        """Apply a finished step: advance progress, cache full blocks, append sampled tokens, check stops.

        `sampled_token_ids` holds one token per chunk with `samples`; `stop_strings` the stop string the new
        text of a request matched (the engine's detokenizer finds them). Chunks of requests aborted since
        schedule() are skipped. Returns the requests that finished here (their blocks are freed).
        """
        finished: list[Request] = []
        for chunk in output.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING or \
                    request.num_computed_tokens != chunk.start:
                continue  # aborted/finished after schedule(): nothing to apply
            request.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_blocks(request, request.num_computed_tokens)
            if not chunk.samples:
                continue
            if chunk.request_id not in sampled_token_ids:
                raise KeyError(f"runner returned no sampled token for request {chunk.request_id!r}")
            request.append_output_token(sampled_token_ids[chunk.request_id])
            status = self._stop_status(request, (stop_strings or {}).get(chunk.request_id))
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        if finished:
            self._running = [r for r in self._running if not r.is_finished]
        return finished

    # ---- helpers -------------------------------------------------------------------------------------

    def _schedule_running(self, budget: _TokenBudget) -> tuple[list[ScheduledChunk], list[str]]:
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        index = 0
        while index < len(self._running) and budget.remaining > 0:
            request = self._running[index]
            num_new = self._fit(request, request.num_computed_tokens, budget)
            if num_new == 0:  # the rest of an attention block does not fit this step's budget: next step
                index += 1
                continue
            while self.block_manager.allocate_slots(request, num_new) is None:
                victim = self._running.pop()  # the newest; never one already scheduled (index < len)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    return chunks, preempted
            chunks.append(self._chunk(request, num_new))
            budget.spend(num_new)
            index += 1
        return chunks, preempted

    def _schedule_waiting(self, budget: _TokenBudget) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        while self._waiting and budget.remaining > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            hit_blocks, num_hit_tokens = self.block_manager.get_computed_blocks(request)
            num_new = self._fit(request, num_hit_tokens, budget)
            if num_new == 0 or self.block_manager.allocate_slots(request, num_new, hit_blocks) is None:
                break  # strict FCFS: nobody overtakes the head of the queue
            self._waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_preemptions == 0:  # first admission: this is the prompt's cache hit
                request.num_cached_tokens = num_hit_tokens
            self.prefix_cache_hit_tokens_total += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            chunks.append(self._chunk(request, num_new))
            budget.spend(num_new)
        return chunks

    @staticmethod
    def _fit(request: Request, start: int, budget: _TokenBudget) -> int:
        """Tokens to compute from `start` this step: what the budget grants, never ending strictly inside an
        attention block (0 when the block's rest does not fit the budget left)."""
        wanted = budget.grant(request.num_tokens - start)
        end = request.chunk_end(start, start + wanted)
        return end - start if end - start <= budget.remaining else 0

    def _chunk(self, request: Request, num_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            start=start,
            num_tokens=num_tokens,
            block_table=tuple(self.block_manager.block_table(request.request_id)),
            samples=start + num_tokens == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        # Recompute preemption: hashed blocks stay in the prefix cache, so the resume likely hits them.
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.block_manager.free(request)
        del self._requests[request.request_id]

    def _stop_status(self, request: Request, stop_string: str | None) -> RequestStatus | None:
        """Stop token, then stop string, then length (as vLLM checks them)."""
        token = request.output_token_ids[-1]
        sampling = request.sampling
        if (token in request.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if stop_string is not None:
            request.stop_reason = stop_string
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= sampling.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _check_admissible(self, request: Request) -> None:
        rid, prompt_len, max_tokens = request.request_id, request.num_prompt_tokens, request.sampling.max_tokens
        if rid in self._requests:
            raise RequestRejected(f"request id {rid!r} is already in use: pick a unique request_id")
        if prompt_len == 0:
            raise RequestRejected(f"request {rid!r} has an empty prompt: send at least one token")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.output_token_ids:
            raise RequestRejected(f"request {rid!r} is not fresh: create a new Request to submit it")
        total = prompt_len + max_tokens
        if total > self.config.max_model_len:
            raise RequestRejected(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                                  f"({self.config.max_model_len}): shorten the prompt or raise --max-model-len")
        longest = max((end - start for start, end in request.attention_blocks), default=0)
        if longest > self.config.max_num_batched_tokens:
            raise RequestRejected(
                f"request {rid!r} has an image of {longest} tokens that attend to each other both ways, so it is "
                f"prefilled in one step, but --max-num-batched-tokens is {self.config.max_num_batched_tokens}: "
                f"raise it to at least {longest} (plus room for the running decodes)")
        num_blocks = self.block_manager.num_blocks_for(total)
        if num_blocks > self.block_manager.num_blocks:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {num_blocks} KV blocks of "
                f"{self.block_manager.block_size} tokens but the cache has {self.block_manager.num_blocks}: "
                "shorten the prompt, lower max_tokens or raise --num-kv-blocks")
