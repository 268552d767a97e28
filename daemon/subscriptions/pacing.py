"""A token bucket: dispatch at a steady rate, with at most one second's worth in a burst."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        rate_per_s: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate_per_s
        self.capacity = capacity if capacity is not None else max(rate_per_s, 1.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def take(self, wanted: int) -> int:
        """Wait for at least one token, then take up to ``wanted``; return how many were taken."""
        self._refill()
        if self._tokens < 1:
            await self._sleep((1 - self._tokens) / self.rate)
            self._refill()
        taken = max(1, min(wanted, int(self._tokens)))
        self._tokens -= taken
        return taken

    def give_back(self, unused: int) -> None:
        """Return tokens taken for work that did not happen (a batch smaller than asked)."""
        self._tokens = min(self.capacity, self._tokens + unused)
