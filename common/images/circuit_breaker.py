"""A consecutive-failure circuit breaker for an optional dependency (the Redis embedding cache).

    CLOSED --N failures in a row--> OPEN --cooldown elapsed--> HALF_OPEN --probe ok--> CLOSED
                                      ^                            |
                                      +-------probe failed---------+

While OPEN every call is skipped at once (no time spent waiting on a dead server); after the cooldown one
probe call is let through, and its outcome closes or re-opens the breaker. Single-threaded use (one asyncio
event loop); the clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold ({failure_threshold}) must be >= 1")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s ({cooldown_s}) must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def is_open(self) -> bool:
        """True while calls are being skipped (OPEN and still cooling down)."""
        return self._state is BreakerState.OPEN and self._clock() - self._opened_at < self.cooldown_s

    def allow(self) -> bool:
        """Whether a call may go ahead now. In HALF_OPEN only one probe at a time is allowed."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.cooldown_s:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._consecutive_failures += 1
        self._probe_in_flight = False
        if self._state is BreakerState.HALF_OPEN or self._consecutive_failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
