"""The pace of a periodic duty: every ``interval_s``, or at once when something wakes it."""

from __future__ import annotations

import asyncio
import contextlib


class Waker:
    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def next_round(self) -> None:
        """Return when the next round is due: the interval passed, or ``wake`` was called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), self._interval_s)
        self._event.clear()
