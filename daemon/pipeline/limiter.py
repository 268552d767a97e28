"""A bounded, adjustable, closable limit on in-flight calls to one provider (invariant 4).

``asyncio.Semaphore`` cannot change its size or turn waiters away, and payd
needs both: limits change on reload, and a drain must tell waiting attempts
to go back to the queue instead of calling the provider.

The limit is what the provider sees, not what payd is waiting on. A call payd
gave up on (timeout, connection lost) may still be running at the provider,
and payd cannot observe when it ends: closing our socket does not stop the
provider's work. So such a call ``hold``s its slot for a while before it is
released; the hold always ends, so a provider that never answers cannot wedge
the lane for good.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class ProviderLimiter:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._in_flight = 0
        self._held = 0
        self._peak = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held(self) -> int:
        """Slots of calls payd gave up on, counted in ``in_flight`` until their hold ends."""
        return self._held

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def closed(self) -> bool:
        return self._closed

    async def acquire(self) -> bool:
        """Take a slot; False means the limiter closed and no call may start."""
        if self._closed:
            return False
        if self._in_flight < self._limit and not self._waiters:
            self._take()
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # granted just as we were cancelled: hand it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def hold(self, seconds: float, on_release: Callable[[], None] = lambda: None) -> None:
        """Release the caller's slot after ``seconds`` instead of now (``seconds <= 0``: now)."""
        if seconds <= 0:
            self.release()
            on_release()
            return
        self._held += 1

        def end_hold() -> None:
            self._held -= 1
            self.release()
            on_release()

        asyncio.get_running_loop().call_later(seconds, end_hold)

    def set_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._wake()

    def close(self) -> None:
        """Turn every current and future waiter away; calls in flight finish normally."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)

    def _take(self) -> None:
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(True)
