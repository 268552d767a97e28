"""A circuit breaker per provider: stop calling a provider that keeps failing.

Closed: calls flow; failures are counted over a rolling window. When at least
``min_calls`` calls in the window failed at ``failure_ratio`` or more, the
breaker opens. Open: no call starts for ``open_s``; attempts wait (or go back
to the queue when their claim would run out), they are never failed or
declined for it. Half-open: ``probes`` calls may go; that many successes close
it, one failure opens it again for twice as long (up to ``max_open_s``).

A failure is a provider error or an unknown outcome (timeouts, lost
connections, 5xx). Declines are the provider working; rate limiting is
handled by the pause, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Callable

from daemon.models import Outcome

FAILURES = frozenset({Outcome.PROVIDER_ERROR, Outcome.UNKNOWN})


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_ratio: float,
        min_calls: int,
        window_s: float,
        open_s: float,
        max_open_s: float,
        probes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = failure_ratio
        self._min_calls = min_calls
        self._window_s = window_s
        self._base_open_s = open_s
        self._max_open_s = max_open_s
        self._probes = probes
        self._clock = clock
        self._calls: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._open_s = open_s
        self._open_until = 0.0
        self._probing = 0
        self._probe_successes = 0
        self._changed = asyncio.Event()
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._state = BreakerState.HALF_OPEN
            self._probing = self._probe_successes = 0
        return self._state

    @property
    def retry_in_s(self) -> float:
        """How long until an open breaker lets probes through (0 unless open)."""
        return max(0.0, self._open_until - self._clock()) if self.state is BreakerState.OPEN else 0.0

    def try_enter(self) -> bool:
        """May a call start now? A True in half-open takes one of the probe slots."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probing < self._probes:
            self._probing += 1
            return True
        return False

    async def wait(self, at_most_s: float) -> None:
        """Sleep until the breaker may let calls through, or ``at_most_s`` passes.

        Open: until it half-opens. Half-open with every probe slot taken: until a
        probe's verdict (or an abandoned slot) changes something. Thousands of
        attempts may wait here at once, so nobody polls: they sleep on an event.
        """
        changed = self._changed
        wait = min(at_most_s, self.retry_in_s) if self.state is BreakerState.OPEN else at_most_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max(wait, 0.001))

    def _notify(self) -> None:
        """Wake every waiter; later waiters sleep on a fresh event (no clear() races)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def record_abandoned(self) -> None:
        """A slot from ``try_enter`` that was not used for a call (drain, claim running short)."""
        if self._state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._notify()

    def record(self, outcome: Outcome) -> None:
        failed = outcome in FAILURES
        now = self._clock()
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            if failed:
                self._open(now, self._open_s * 2)
            else:
                self._probe_successes += 1
                if self._probe_successes >= self._probes:
                    self._close()
                else:
                    self._notify()  # a probe slot is free again
            return
        if state is BreakerState.OPEN:
            return  # a call that started before the trip; its verdict is already counted
        self._calls.append((now, failed))
        self._failures += failed
        while self._calls and self._calls[0][0] < now - self._window_s:
            _, old_failed = self._calls.popleft()
            self._failures -= old_failed
        calls = len(self._calls)
        if calls >= self._min_calls and self._failures >= self._ratio * calls:
            self._open(now, self._base_open_s)

    def _open(self, now: float, open_s: float) -> None:
        self._open_s = min(open_s, self._max_open_s)
        self._open_until = now + self._open_s
        self._state = BreakerState.OPEN
        self._calls.clear()
        self._failures = 0
        self.trips += 1
        self._notify()

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._open_s = self._base_open_s
        self._probing = self._probe_successes = 0
        self._notify()
