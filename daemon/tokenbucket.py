"""A token bucket: work at a steady rate, with at most ``capacity`` saved up for a burst.

One bucket serves both pacing needs: a provider's request rate (one token per
call, ``pipeline/ratelimit.py``) and the scheduler's dispatch rate (a batch
takes what is there, ``subscriptions/scheduler.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

_ROUNDING: Final = 1e-9


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``capacity`` (default one second's worth, at least
    one) saved up; waiters queue in arrival order. ``clock`` and ``sleep`` are for tests."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s if capacity is None else capacity)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    async def take(self, wanted: int = 1) -> int:
        """Wait for at least one token, then take up to ``wanted``; return how many were taken."""
        async with self._lock:
            self._refill()
            # Tokens arrive with time, not with an event: sleep until the next one is due (again
            # if woken early). The tolerance absorbs float rounding, which could otherwise ask
            # for a sleep too short to move the clock, forever.
            while self._tokens < 1 - _ROUNDING:
                await self._sleep((1 - self._tokens) / self.rate_per_s)
                self._refill()
            taken = max(1, min(wanted, int(self._tokens + _ROUNDING)))
            self._tokens -= taken
            return taken

    def give_back(self, unused: int) -> None:
        """Return tokens taken for work that did not happen (a batch smaller than asked)."""
        self._tokens = min(self.capacity, self._tokens + unused)
