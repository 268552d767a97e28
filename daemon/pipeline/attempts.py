"""The attempt pipeline: deliveries in, claims, provider calls, recorded outcomes, acks out.

    on_message -> intake -> claim batch (one commit) -> one task per attempt
    (limiter + provider call) -> record batch (one commit) -> ack after commit

A delivery is settled only after the commit that makes its outcome durable;
until then the broker keeps it, and a redelivery is stopped by the claim.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import aiomysql
import msgspec
import structlog
from aio_pika.abc import AbstractIncomingMessage

from daemon.broker import Broker, BrokerUnavailable, delivery_channel_open, settle, settle_batch
from daemon.config import PipelineSettings
from daemon.metrics import Metrics
from daemon.models import Attempt, AttemptRequest, ChargeResult, Outcome, RefundRequest
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.execute import BREAKER_OPEN, AttemptRun, Lane, execute
from daemon.pipeline.intake import Invalid, decode_request
from daemon.pipeline.reversals import ReversalFlow
from daemon.storage.attempts import (
    Record,
    claim_attempts,
    fail_orphaned_queued,
    record_outcomes,
    route_attempt,
)
from daemon.storage.db import DB_ERRORS
from daemon.subscriptions.policy import SubscriptionPolicy

log = structlog.get_logger("payd.pipeline")

DECLINES: Final = frozenset({Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE})
MISMATCH_REASON: Final = "idempotency_key reused with different parameters; the first request stands"
ALTERED_REASON: Final = (
    "invalid request: the database cannot store it as sent (a value was altered); nothing charged"
)


class Delivery(msgspec.Struct, frozen=True):
    message: AbstractIncomingMessage
    request: AttemptRequest


class Finished(msgspec.Struct, frozen=True):
    """An attempt done with the provider; ``result=None`` means return it to the queue."""

    attempt: Attempt
    message: AbstractIncomingMessage
    result: ChargeResult | None
    run: AttemptRun


class PipelineCounters(msgspec.Struct, kw_only=True):
    """Cheap counters for /status and the shutdown log line."""

    received: int = 0
    claimed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    finished: int = 0
    released: int = 0


class AttemptPipeline:
    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        broker: Broker,
        lanes: dict[str, Lane],
        settings: PipelineSettings,
        metrics: Metrics,
        instance_id: str,
        policy: SubscriptionPolicy,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._policy = policy
        self.lanes = lanes
        self._settings = settings
        self._metrics = metrics
        self._instance_id = instance_id
        self._on_recorded = on_recorded
        self._claim_seq = 0
        self.counters = PipelineCounters()
        self.stopping = asyncio.Event()
        self.running: dict[asyncio.Task[None], AttemptRun] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        delay = settings.batch_delay_ms / 1000
        self._claims: Batcher[Delivery] = Batcher(
            "claim",
            self._claim,
            max_size=settings.claim_batch_size,
            max_delay_s=delay,
            concurrency=3,
        )
        self._records: Batcher[Finished] = Batcher(
            "record",
            self._record,
            max_size=settings.record_batch_size,
            max_delay_s=delay,
            concurrency=3,
        )
        self._first_unknown_recheck_s = settings.reconcile_backoff_s[0]
        # Refunds: one task each (drained with the side tasks), through the same lanes.
        self.reversals = ReversalFlow(
            pool=pool,
            lanes=lanes,
            settings=settings,
            metrics=metrics,
            instance_id=instance_id,
            stopping=self.stopping,
            dead_letter=self._dead_letter,
        )

    def start(self) -> None:
        self._claims.start()
        self._records.start()

    @property
    def in_flight(self) -> int:
        return len(self.running)

    # -- intake ---------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.counters.received += 1
        if self.stopping.is_set():
            self._spawn(self._requeue([message]))
            return
        decoded = decode_request(message.body, self.lanes)
        if isinstance(decoded, Invalid):
            self._spawn(self._dead_letter(message, decoded.reason))
            return
        if isinstance(decoded, RefundRequest):
            self._spawn(self.reversals.handle(message, decoded))
            return
        self._claims.add(Delivery(message, decoded))

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        while True:
            try:
                await self._broker.dead_letter(message, reason, self._instance_id)
                break
            except BrokerUnavailable:
                if not delivery_channel_open(message):
                    return  # redelivered on the next connection, and judged again
                await asyncio.sleep(0.5)
            except Exception as error:  # the delivery cannot be published again as it came
                # The queue's own dead-letter route still takes it (without the header), rather
                # than it coming back on every restart; the reason is in this log line.
                log.error("attempt.dead_letter_rejected", reason=reason, error=repr(error))
                await settle(message, ack=False, requeue=False)
                break
        self.counters.dead_lettered += 1
        self._metrics.dead_lettered.inc()
        self._metrics.messages.labels("dead_lettered").inc()
        log.warning("attempt.dead_lettered", reason=reason, message_id=message.message_id)

    async def _requeue(self, messages: list[AbstractIncomingMessage]) -> None:
        for message in messages:
            if not await settle(message, ack=False):
                self._metrics.stale_settles.inc()
        self._metrics.messages.labels("requeued").inc(len(messages))

    # -- claim ----------------------------------------------------------------

    async def _claim(self, deliveries: list[Delivery]) -> None:
        first: dict[str, Delivery] = {}
        repeats: list[Delivery] = []
        for delivery in deliveries:
            if delivery.request.idempotency_key in first:
                repeats.append(delivery)
            else:
                first[delivery.request.idempotency_key] = delivery
        self._claim_seq += 1
        claimed_by = f"{self._instance_id}/{self._claim_seq}"
        started = time.monotonic()
        try:
            outcome = await claim_attempts(
                self._pool,
                [d.request for d in first.values()],
                claimed_by=claimed_by,
                lease_s=self._settings.lease_s,
            )
        except DB_ERRORS as error:
            self._metrics.batch_errors.labels("claim").inc()
            log.error("claim.failed", error=repr(error), size=len(deliveries))
            await asyncio.sleep(1.0)  # let the database recover before the broker redelivers
            await self._requeue([d.message for d in deliveries])
            return
        self._metrics.batch_size.labels("claim").observe(len(first))
        self._metrics.batch_seconds.labels("claim").observe(time.monotonic() - started)

        lease_deadline = started + self._settings.lease_s
        for key, attempt_id in outcome.claimed.items():
            delivery = first[key]
            attempt = Attempt(attempt_id=attempt_id, request=delivery.request, claimed_by=claimed_by)
            self._start(attempt, delivery.message, lease_deadline)
        self.counters.claimed += len(outcome.claimed)

        settled_now = [
            first[key].message
            for key in (*outcome.already, *outcome.cycle_taken, *outcome.subscription_canceled)
        ]
        settled_now += [d.message for d in repeats]
        self.counters.duplicates += len(outcome.already) + len(repeats)
        self._metrics.messages.labels("duplicate").inc(len(outcome.already) + len(repeats))
        for message in settled_now:
            if not await settle(message, ack=True):
                self._metrics.stale_settles.inc()
        for key in outcome.mismatched:
            self._spawn(self._dead_letter(first[key].message, MISMATCH_REASON))
        for key in outcome.altered:
            self._spawn(self._dead_letter(first[key].message, ALTERED_REASON))

    # -- execute --------------------------------------------------------------

    def _start(self, attempt: Attempt, message: AbstractIncomingMessage, lease_deadline: float) -> None:
        run = AttemptRun(attempt.request)
        task = asyncio.create_task(self._run(attempt, message, run, lease_deadline))
        self.running[task] = run
        task.add_done_callback(self.running.pop)

    async def _run(
        self,
        attempt: Attempt,
        message: AbstractIncomingMessage,
        run: AttemptRun,
        lease_deadline: float,
    ) -> None:
        # No per-attempt contextvars binding: it cost 3% of the daemon's CPU at 10,000 in
        # flight, and the canonical attempt.finished line carries these fields itself.
        lane = self.lanes[attempt.request.provider]
        try:
            result = await self._execute_with_failover(attempt, lane, run, lease_deadline)
        except asyncio.CancelledError:
            # Only the drain deadline cancels an attempt. Its outcome must still be
            # written: a call that was on the wire may have charged.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            result = (
                ChargeResult(outcome=Outcome.UNKNOWN, reason="drain deadline passed during the call")
                if run.calling
                else None
            )
        self._records.add(Finished(attempt, message, result, run))

    async def _execute_with_failover(
        self, attempt: Attempt, lane: Lane, run: AttemptRun, lease_deadline: float
    ) -> ChargeResult | None:
        """Call the provider; where it was never reached and a failover is configured, the other.

        The routing is written before the second connection is called, so if
        this process dies mid-call, reconciliation asks the one that may have
        charged, never the one that was not reached.
        """
        secondary = self.lanes.get(lane.config.failover_to or "")
        result = await execute(
            lane,
            run,
            lease_deadline=lease_deadline,
            stopping=self.stopping,
            metrics=self._metrics,
            leave_if_open=secondary is not None,
        )
        if secondary is None or result is None or result.reached_provider:
            return result
        try:
            await route_attempt(self._pool, attempt.attempt_id, secondary.name)
        except DB_ERRORS as error:
            log.error("failover.routing_not_written", error=repr(error), to=secondary.name)
            return None if result is BREAKER_OPEN else result  # waits in the queue rather than risk it
        self._metrics.failovers.labels(lane.name, secondary.name).inc()
        run.provider = secondary.name
        return await execute(
            secondary, run, lease_deadline=lease_deadline, stopping=self.stopping, metrics=self._metrics
        )

    # -- record ---------------------------------------------------------------

    async def _record(self, batch: list[Finished]) -> None:
        records = [
            Record(
                attempt_id=f.attempt.attempt_id,
                request=f.attempt.request,
                result=f.result,
                tries=f.run.tries,
                provider=f.run.provider if f.run.provider != f.attempt.request.provider else None,
            )
            for f in batch
        ]
        started = time.monotonic()
        delay = 0.2
        while True:
            try:
                outcome = await record_outcomes(
                    self._pool, records, unknown_recheck_s=self._first_unknown_recheck_s, policy=self._policy
                )
                break
            except DB_ERRORS as error:
                # Keep the outcomes and try again: acking without the commit could lose a
                # charge's record. If the process dies meanwhile, leases expire to unknown.
                self._metrics.batch_errors.labels("record").inc()
                log.error("record.failed", error=repr(error), size=len(batch), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        now = time.monotonic()
        self._metrics.batch_size.labels("record").observe(len(batch))
        self._metrics.batch_seconds.labels("record").observe(now - started)
        applied = {id(record) for record in outcome.applied}
        for finished, record in zip(batch, records, strict=True):
            self._account(finished, written=id(record) in applied, now=now)
        # Acked together (a contiguous run in one frame) only now, after the commit.
        settled = await settle_batch([(f.message, f.result is not None) for f in batch])
        if settled.stale:
            self._metrics.stale_settles.inc(settled.stale)
        self._on_recorded()

    def _account(self, finished: Finished, *, written: bool, now: float) -> None:
        request = finished.attempt.request
        if finished.result is None:
            self.counters.released += 1
            self._metrics.message("released").inc()
            return
        self.counters.finished += 1
        result = finished.result
        provider = finished.run.provider
        bound = self._metrics.provider(provider)
        bound.attempts(result.outcome.value).inc()
        bound.attempt_seconds.observe(now - finished.run.started)
        self._metrics.message("processed").inc()
        if result.outcome in DECLINES:
            # Decline codes come from the adapters' tables, so the label set stays bounded.
            self._metrics.declines.labels(provider, result.decline_code or "unspecified").inc()
        # The one canonical line per attempt.
        log.info(
            "attempt.finished",
            idempotency_key=request.idempotency_key,
            attempt_id=finished.attempt.attempt_id,
            provider=provider,
            requested_provider=request.provider if provider != request.provider else None,
            subscription_id=request.subscription_id,
            cycle=request.cycle,
            amount_minor=request.amount_minor,
            currency=request.currency,
            outcome=result.outcome.value,
            decline_code=result.decline_code,
            provider_ref=result.provider_ref,
            tries=finished.run.tries,
            reason=result.reason,
            written=written,
            ms=round((now - finished.run.started) * 1000, 1),
        )

    # -- lifecycle ------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def stop_intake(self) -> None:
        """The drain's first step: no new delivery is taken (those still arriving are requeued)."""
        self.stopping.set()
        await self._broker.stop_consuming()

    async def drain(self, deadline: float, force: asyncio.Event) -> None:
        """Stop intake, let calls on the wire finish until ``deadline``, record, settle.

        Attempts not yet sent go back to the queue at once. Calls still running
        at the deadline (or at ``force``) are cancelled and recorded unknown, so
        reconciliation settles them.
        """
        if not self.stopping.is_set():
            await self.stop_intake()
        await self._claims.close(flush_remaining=False)
        pending = self._claims.take_pending()
        if pending:
            await self._requeue([d.message for d in pending])
        for lane in self.lanes.values():
            lane.limiter.close()
        log.info("drain.started", in_flight=len(self.running), requeued=len(pending))

        force_wait = asyncio.ensure_future(force.wait())
        while self.running and not force.is_set() and time.monotonic() < deadline:
            await asyncio.wait(
                [*self.running, force_wait],
                timeout=deadline - time.monotonic(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        force_wait.cancel()
        if self.running:
            log.warning("drain.cancelling", in_flight=len(self.running), forced=force.is_set())
            for task in list(self.running):
                task.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)
        if force.is_set():
            # Exit at once: what is not committed stays in_flight in the database and
            # unacked in the broker; leases and redelivery settle it (invariants 1-2 hold).
            await self._records.close(flush_remaining=False)
        else:
            await self._records.close(flush_remaining=True)
        if self._side_tasks:
            await asyncio.wait(self._side_tasks, timeout=max(0.1, deadline - time.monotonic()))
        log.info("drain.finished", **msgspec.structs.asdict(self.counters))


class OrphanSweep:
    """Fails queued attempts whose message is gone: never sent, so nothing can be hidden.

    It starts only once this instance has been running for ``queued_orphan_after_s``:
    after a fleet-wide outage longer than that, released attempts are old while their
    messages still wait in the queue, and the backlog must have its chance first.
    """

    def __init__(self, pool: aiomysql.Pool, settings: PipelineSettings, metrics: Metrics) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._first_sweep_at = time.monotonic() + settings.queued_orphan_after_s

    async def sweep(self) -> bool:
        """One pass; True when some were failed, so their events go out. Loud: a warning
        and ``payd_orphans_failed``."""
        if time.monotonic() < self._first_sweep_at:
            return False
        failed, unreadable = await fail_orphaned_queued(
            self._pool,
            queued_for_s=self._settings.queued_orphan_after_s,
            limit=self._settings.reconcile_batch_size,
        )
        for row in unreadable:
            log.error("attempts.orphan_unreadable", attempt_id=row.attempt_id, reason=row.reason)
        if failed:
            self._metrics.orphans_failed.inc(len(failed))
            log.warning("attempts.orphans_failed", count=len(failed), attempt_ids=failed[:20])
        return bool(failed)
