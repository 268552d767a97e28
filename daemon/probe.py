"""A periodic look at the things /readyz and the backlog metrics report on.

Every couple of seconds: one database round trip that also measures the
unknown-attempt backlog (served by the ``(state, recheck_at)`` index), and the
depth of the attempts and dead-letter queues. A failure marks the database
not ready; a broker that cannot answer leaves the last depths in place.
"""

from __future__ import annotations

import asyncio

import aiomysql

from daemon.broker import BROKER_ERRORS, Broker, BrokerUnavailable
from daemon.metrics import Metrics
from daemon.storage.db import DB_ERRORS, transaction


class HealthProbe:
    def __init__(self, pool: aiomysql.Pool, broker: Broker, metrics: Metrics) -> None:
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self.database_ok = True

    async def run(self, interval_s: float = 2.0) -> None:
        while True:
            await self.look()
            await asyncio.sleep(interval_s)

    async def look(self) -> None:
        try:
            async with transaction(self._pool) as cursor:
                await cursor.execute(
                    "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(updated_at), NOW(6)) "
                    "FROM attempts WHERE state = 'unknown'"
                )
                count, oldest_us = await cursor.fetchone()
            self._metrics.unknown_attempts.set(count)
            self._metrics.unknown_oldest.set((oldest_us or 0) / 1_000_000)
            self.database_ok = True
        except DB_ERRORS:
            self.database_ok = False
        try:
            for queue, depth in (await self._broker.queue_depths()).items():
                self._metrics.queue_messages.labels(queue).set(depth)
        except (BrokerUnavailable, *BROKER_ERRORS):
            pass  # reconnection is the supervisor's business; /readyz already says so
