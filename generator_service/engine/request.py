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
    """The image tokens of one image inside the prompt: tokens [offset, offset + length).

    `key` is the image's content key (common.hashing.image_key); it goes into the prefix-block hashes
    so that two different images behind identical placeholder tokens never share KV blocks.
    """

    key: str
    offset: int  # index of the span's first token in the prompt
    length: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 1:
            raise ValueError(f"image span needs offset >= 0 and length >= 1, got offset={self.offset} "
                             f"length={self.length}")

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
        self._token_ids = self.prompt_token_ids + self.output_token_ids
        for span in self.image_spans:
            if span.end > len(self.prompt_token_ids):
                raise ValueError(f"request {self.request_id!r}: image span {span.key[:12]}... ends at token "
                                 f"{span.end}, past the prompt ({len(self.prompt_token_ids)} tokens)")

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

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)
