"""Per-request sampling parameters: the offline API's `SamplingParams` and the engine's view of them.

Field names and defaults follow the `SamplingParams` message of `protos/generator.proto` (and vLLM's
offline API), so the gRPC servicer converts one into the other field by field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    temperature 0 means greedy (argmax); the other filters are then ignored. Penalties follow vLLM's
    definitions: `repetition_penalty` divides positive logits (multiplies negative ones) of every token
    seen in the prompt or output; `presence_penalty` subtracts once per distinct output token;
    `frequency_penalty` subtracts per occurrence in the output.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top-k logprobs returned per generated token; 0 = none

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so the params stay hashable/immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the allowed range."""
        problems: list[str] = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            problems.append(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not (-2.0 <= value <= 2.0):
                problems.append(f"{name} must be in [-2, 2], got {value}")
        if self.logprobs < 0 or self.logprobs > 20:
            problems.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be >= 0")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))
