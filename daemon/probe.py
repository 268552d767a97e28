"""A periodic look at the things /readyz and the backlog metrics report on.

Every couple of seconds: one database round trip that also measures the
unknown-attempt backlog and how much of it is parked (served by the
``(state, recheck_at)`` index) and the age of the oldest unpublished outbox
row (by its primary key), and the depth of the attempts and dead-letter
queues. A failure marks the database not ready; so does a database that does
not answer within the pool's ``probe_s`` (frozen, or every connection stuck):
a hung server is as unready as a refused one. While it is not ready, intake
takes no new deliveries. A broker that cannot answer leaves the last depths in
place.
"""

from __future__ import annotations

import asyncio

import aiomysql
import msgspec
import structlog

from daemon.broker import BROKER_ERRORS, Broker, BrokerUnavailable
from daemon.metrics import Metrics
from daemon.storage.db import DB_ERRORS, fetch_one, timeouts_of, transaction
from daemon.storage.outbox import read_outbox_lag

log = structlog.get_logger("payd.probe")


class _Backlog(msgspec.Struct, array_like=True, frozen=True):
    unknown: int
    oldest_us: int | None
    parked: int


class _Count(msgspec.Struct, array_like=True, frozen=True):
    count: int


class HealthProbe:
    def __init__(self, pool: aiomysql.Pool, broker: Broker, metrics: Metrics) -> None:
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self.database_ok = True
        self.parked_attempts = 0
        """Fleet-wide: unknown attempts parked for an operator (their lookup raised)."""
        metrics.database_ok.set(1)

    async def run(self, interval_s: float = 2.0) -> None:
        while True:
            await self.look()
            await asyncio.sleep(interval_s)

    async def look(self) -> None:
        was_ok = self.database_ok
        try:
            async with asyncio.timeout(timeouts_of(self._pool).probe_s):
                await self._look_at_database()
        except DB_ERRORS as error:  # TimeoutError included
            self._set_database_ok(False, error)
        else:
            self._set_database_ok(True)
        if self.database_ok != was_ok:
            await self._gate_intake()
        try:
            for queue, depth in (await self._broker.queue_depths()).items():
                self._metrics.queue_messages.labels(queue).set(depth)
        except (BrokerUnavailable, *BROKER_ERRORS):
            pass  # reconnection is the supervisor's business; /readyz already says so

    async def _look_at_database(self) -> None:
        async with transaction(self._pool) as cursor:
            await cursor.execute(
                "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(updated_at), NOW(6)), "
                # SUM is DECIMAL in both servers: counted as an integer instead.
                "COUNT(parked_at) FROM attempts WHERE state = 'unknown'"
            )
            backlog = await fetch_one(cursor, _Backlog)
            # A parked refund is unknown with no next lookup (ix_reversals_recheck covers it).
            await cursor.execute(
                "SELECT COUNT(*) FROM reversals WHERE state = 'unknown' AND recheck_at IS NULL"
            )
            refunds_parked = (await fetch_one(cursor, _Count)).count
            # The relay updates this gauge after each batch; a relay that cannot publish (the
            # broker is away) runs no batch, so the probe keeps it true meanwhile.
            outbox_lag = await read_outbox_lag(cursor)
        self._metrics.unknown_attempts.set(backlog.unknown)
        self._metrics.parked.set(backlog.parked)
        self._metrics.refunds_parked.set(refunds_parked)
        self.parked_attempts = backlog.parked
        self._metrics.unknown_oldest.set((backlog.oldest_us or 0) / 1_000_000)
        self._metrics.outbox_lag.set(outbox_lag)

    async def _gate_intake(self) -> None:
        """Intake pauses while the database does not answer: a delivery taken now could only
        wait in memory for a claim that fails, then go back to the queue. Left there, it goes to
        an instance whose database answers (or waits for ours); calls already made finish."""
        try:
            if self.database_ok:
                await self._broker.resume_consuming()
            else:
                await self._broker.pause_consuming()
        except (BrokerUnavailable, *BROKER_ERRORS) as error:
            # On the next connection the broker consumes (or not) as the pause says.
            log.warning("intake.gate_failed", error=repr(error))
        self._metrics.intake_paused.set(0 if self.database_ok else 1)
        if self.database_ok:
            log.warning("intake.resumed", cause="the database answers again")
        else:
            log.error("intake.paused", cause="the database does not answer")

    def _set_database_ok(self, ok: bool, error: BaseException | None = None) -> None:
        if ok != self.database_ok:
            if ok:
                log.warning("database.answering_again")
            else:
                log.error(
                    "database.not_answering", error=repr(error), timeout_s=timeouts_of(self._pool).probe_s
                )
        self.database_ok = ok
        self._metrics.database_ok.set(1 if ok else 0)
