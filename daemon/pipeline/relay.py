"""The outbox relay: publishes committed events to RabbitMQ with confirms, at least once."""

from __future__ import annotations

import aiomysql
import pymysql
import structlog

from daemon.broker import Broker, BrokerUnavailable
from daemon.config import OutboxSettings
from daemon.metrics import Metrics
from daemon.pipeline.waker import Waker
from daemon.storage.db import DB_ERRORS
from daemon.storage.outbox import relay_batch

log = structlog.get_logger("payd.outbox")

_CONTENTION = (1205, 1213)  # lock wait timeout, deadlock: MySQL rolled the batch back


class OutboxRelay:
    def __init__(
        self, *, pool: aiomysql.Pool, broker: Broker, settings: OutboxSettings, metrics: Metrics
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._settings = settings
        self._metrics = metrics
        self._waker = Waker(settings.poll_interval_s)
        self._stopping = False

    def wake(self) -> None:
        """Called after a commit that wrote events, so they go out without waiting for the poll."""
        self._waker.wake()

    def stop(self) -> None:
        """Make ``run`` publish what is pending once more, then return (the drain's last flush).

        Cancelling a round instead would close its connection with rows still
        locked, and a flush right after would skip them.
        """
        self._stopping = True
        self._waker.wake()

    async def run(self) -> None:
        while True:
            await self._waker.next_round()
            stopping = self._stopping  # read before the round: the last round starts after stop()
            await self.publish_pending()
            if stopping:
                return

    async def publish_pending(self) -> int:
        """Publish until the outbox is empty or publishing fails; return how many went out."""
        total = 0
        try:
            while True:
                sent = await relay_batch(
                    self._pool,
                    self._broker.publish_outbox,
                    limit=self._settings.batch_size,
                    observe_lag=self._metrics.outbox_event_lag.observe,
                    # After every batch, not only once the outbox is empty: while the relay is
                    # behind, this is when the lag matters (one index dive, read in the batch's
                    # own transaction rather than in one more).
                    report_backlog_age=self._metrics.outbox_lag.set,
                )
                total += sent
                self._metrics.outbox_published.inc(sent)
                if sent < self._settings.batch_size:
                    break
        except BrokerUnavailable as error:
            log.warning("outbox.broker_unavailable", error=str(error))
        except pymysql.err.OperationalError as error:
            if error.args[0] not in _CONTENTION:
                log.error("outbox.database_error", error=repr(error))
                return total
            # Another instance's relay holds neighbouring rows. The batch rolled back and
            # goes out again (consumers dedupe on event_id): ordinary, so no error line.
            log.info("outbox.contention", error=repr(error))
            self._waker.wake()
        except DB_ERRORS as error:
            log.error("outbox.database_error", error=repr(error))
        return total
