"""Group items into batches by size or age, and flush them with bounded concurrency.

Claims and records go to MySQL in batches: one round trip and one commit carry
up to ``max_size`` attempts. A batch waits at most ``max_delay_s`` for company,
so a lone attempt is not held back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

T = TypeVar("T")
log = structlog.get_logger("payd.batcher")


class Batcher(Generic[T]):
    def __init__(
        self,
        name: str,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        max_size: int,
        max_delay_s: float,
        concurrency: int = 2,
    ) -> None:
        self.name = name
        self._flush = flush
        self._max_size = max_size
        self._max_delay_s = max_delay_s
        self._items: list[T] = []
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._flushing: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"batcher:{self.name}")

    def add(self, item: T) -> None:
        self._items.append(item)
        self._has_items.set()
        if len(self._items) >= self._max_size:
            self._full.set()

    def take_pending(self) -> list[T]:
        """Remove and return what has not been handed to a flush yet."""
        items, self._items = self._items, []
        self._has_items.clear()
        self._full.clear()
        return items

    async def _run(self) -> None:
        while True:
            await self._has_items.wait()
            if len(self._items) < self._max_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_delay_s)
            await self._slots.acquire()
            batch = self._items[: self._max_size]
            del self._items[: self._max_size]
            if len(self._items) < self._max_size:
                self._full.clear()
            if not self._items:
                self._has_items.clear()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._flush_one(batch))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _flush_one(self, batch: list[T]) -> None:
        try:
            await self._flush(batch)
        except Exception:
            # The flush function owns its errors; reaching here is a bug worth a loud line.
            log.exception("batcher.flush_crashed", batcher=self.name, size=len(batch))
        finally:
            self._slots.release()

    async def close(self, *, flush_remaining: bool) -> None:
        """Stop batching: flush (or leave to the caller) what is pending, wait for flushes in progress."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if flush_remaining:
            while self._items:
                batch = self._items[: self._max_size]
                del self._items[: self._max_size]
                await self._slots.acquire()
                await self._flush_one(batch)
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
