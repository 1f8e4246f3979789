"""One generation request as the engine sees it: token ids, image spans, progress and status.

Progress is two token counts, never a phase flag:

    all_token_ids:  [ prompt ............................ | output ...... ]
                    |<-- num_computed_tokens -->|<-- still to compute -->|
                                                                   num_tokens

Prefill, chunked prefill, decode and recompute after preemption are all "compute the tokens between
`num_computed_tokens` and `num_tokens`". Pure Python: no torch, grpc or redis.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from generator_service.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length" or "abort" for a finished status (the proto's FinishReason), else None."""
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True)
class ImageSpan:
    """A run of one image's tokens inside the prompt: tokens [offset, offset + length) hold rows
    [row_offset, row_offset + length) of the image's embedding (an image may come in several runs).

    `key` is the image's content key (common.hashing.image_key); it goes into the prefix-block hashes
    so that two different images behind identical placeholder tokens never share KV blocks.
    """

    key: str
    offset: int  # index of the span's first token in the prompt
    length: int
    row_offset: int = 0  # embedding row of the span's first token

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 1 or self.row_offset < 0:
            raise ValueError(f"image span needs offset >= 0, length >= 1 and row_offset >= 0, got offset="
                             f"{self.offset} length={self.length} row_offset={self.row_offset}")

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    image_spans: tuple[ImageSpan, ...] = ()
    # Token ranges [start, end) whose tokens attend to each other both ways (an image's tokens in Gemma 3); a
    # prefill chunk never ends strictly inside one.
    attention_blocks: tuple[tuple[int, int], ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prefix-cache hit tokens at FIRST admission (usage.cached_prompt_tokens); resumes don't change it.
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # What stopped the request: the stop/eos token id, or a stop string set by the engine; None otherwise.
    stop_reason: int | str | None = None
    # Memo of the prefix-block hash chain over all_token_ids (full blocks only), filled by BlockManager.
    # Token ids never change once appended, so the chain only grows.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # prompt + output in one list that output tokens are appended to: no O(n) concatenation per step.
    _token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        self.image_spans = tuple(self.image_spans)
        self.attention_blocks = tuple(self.attention_blocks)
        self._token_ids = self.prompt_token_ids + self.output_token_ids
        for span in self.image_spans:
            if span.end > len(self.prompt_token_ids):
                raise ValueError(f"request {self.request_id!r}: image span {span.key[:12]}... ends at token "
                                 f"{span.end}, past the prompt ({len(self.prompt_token_ids)} tokens)")
        for start, end in self.attention_blocks:
            if not 0 <= start < end <= len(self.prompt_token_ids):
                raise ValueError(f"request {self.request_id!r}: attention block [{start}, {end}) is not inside the "
                                 f"prompt ({len(self.prompt_token_ids)} tokens)")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def all_token_ids(self) -> Sequence[int]:
        """prompt + output tokens, without copying. Read-only by contract: use append_output_token."""
        return self._token_ids

    @property
    def num_image_tokens(self) -> int:
        return sum(span.length for span in self.image_spans)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def chunk_end(self, start: int, wanted_end: int) -> int:
        """The end of a chunk from `start` that wants to reach `wanted_end` without ending strictly inside an
        attention block: cut back to the block's start, or, when the chunk starts inside the block, extended to
        its end (the caller checks that the budget allows it). No blocks: `wanted_end`.

            blocks:        [a ...... b)
            chunk:   start ------^ wanted_end      -> a      (start < a)
            chunk:           start ^ wanted_end    -> b      (a <= start < b)
        """
        for block_start, block_end in self.attention_blocks:
            if block_start < wanted_end < block_end:
                return block_start if start < block_start else block_end
        return wanted_end

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)
