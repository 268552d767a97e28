"""The renewal scheduler: finds due subscriptions and dispatches their tries through the outbox.

Runs in every ``payd run`` at once; the database shares the work out. One
batch is one transaction:

    lock up to N due rows (SKIP LOCKED: rows another scheduler holds are its)
    -> per row: dispatch a new try (the card networks' limits permitting),
       re-send a queued one, wait on one in flight, or defer the try to when
       the limits allow it
    -> write the queued attempt rows, the request messages and the events
       into the outbox, and push every row's ``next_attempt_at`` out
    -> commit, then wake the relay

Cancelled or killed anywhere before the commit, the batch rolls back and its
rows are still due; after it, the outbox holds the messages. A pass takes
batches with keyset pagination over ``(next_attempt_at, id)`` until a batch
comes back short, paced by a token bucket, then waits ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

import aiomysql
import msgspec
import structlog
from prometheus_client import Counter, Gauge, Histogram

from daemon.config import Config, SubscriptionSettings
from daemon.events import OutboxRow, now_iso
from daemon.metrics import LATENCY_BUCKETS, Metrics
from daemon.models import AttemptRequest, AttemptState
from daemon.storage.db import DB_ERRORS, Cursor, transaction
from daemon.subscriptions.dispatch import (
    ExistingAttempt,
    Undispatchable,
    existing_attempts,
    request_message,
    start_try,
)
from daemon.subscriptions.events import subscription_event
from daemon.subscriptions.lifecycle import defer
from daemon.subscriptions.model import CHARGEABLE, Subscription, dispatch_key
from daemon.subscriptions.netbudget import NetworkCounters
from daemon.subscriptions.pacing import TokenBucket
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.store import (
    claim_due,
    database_now,
    insert_outbox,
    insert_queued_attempts,
    mark_dispatched,
    save_subscriptions,
)

log = structlog.get_logger("payd.scheduler")

_UNDER_WAY = frozenset({AttemptState.IN_FLIGHT, AttemptState.UNKNOWN})
_COUNTS = ("dispatched", "resent", "waiting", "deferred", "inactive", "no_provider", "undispatchable")


class BatchResult(msgspec.Struct, kw_only=True):
    """What one batch did, by row."""

    claimed: int = 0
    dispatched: int = 0
    """New tries: a queued attempt row and its request message."""
    resent: int = 0
    """Tries still queued after ``dispatch_timeout_s``: their message published again."""
    waiting: int = 0
    """Tries in flight or unknown: left to the pipeline and reconciliation."""
    deferred: int = 0
    """Held back by a card network's limit: looked at again when the limit allows."""
    inactive: int = 0
    """Paused or canceled rows that were still due: unscheduled."""
    no_provider: int = 0
    """Their provider is not configured here: looked at again later."""
    undispatchable: int = 0
    """Their data cannot make a valid request: unscheduled, the reason in ``status_reason``."""
    deferred_by: dict[str, int] = msgspec.field(default_factory=dict)
    """``deferred`` by network rule."""
    last: tuple[datetime, int] | None = None
    oldest_due: datetime | None = None
    now: datetime | None = None


class SchedulerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.rows = Counter(
            "payd_scheduler_rows", "Due subscriptions handled, by what became of them", ["result"], registry=r
        )
        self.batch_seconds = Histogram(
            "payd_scheduler_batch_seconds", "One scheduler batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.due_lag = Gauge(
            "payd_scheduler_due_lag_seconds", "How overdue the oldest row of the last batch was", registry=r
        )
        self.deferrals = Counter(
            "payd_network_deferrals",
            "Due tries held back by a card network's retry limit, by rule",
            ["rule"],
            registry=r,
        )

    def observe(self, result: BatchResult, seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        for name in _COUNTS:
            count = getattr(result, name)
            if count:
                self.rows.labels(name).inc(count)
        if result.oldest_due is not None and result.now is not None:
            self.due_lag.set(max(0.0, (result.now - result.oldest_due).total_seconds()))
        for rule, count in result.deferred_by.items():
            self.deferrals.labels(rule).inc(count)


class RenewalScheduler:
    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        settings: SubscriptionSettings,
        policy: SubscriptionPolicy,
        providers: Collection[str],
        metrics: Metrics | None = None,
        on_dispatched: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._policy = policy
        self._providers = providers
        self._metrics = SchedulerMetrics(metrics) if metrics is not None else None
        self._on_dispatched = on_dispatched
        self._bucket = TokenBucket(settings.dispatch_rate_per_s)
        self.totals = BatchResult()

    async def run(self) -> None:
        """For the daemon's lifetime: a pass over what is due, a pause, again."""
        while True:
            try:
                await self.run_pass()
            except DB_ERRORS as error:
                log.error("scheduler.database_error", error=repr(error))
            except Exception:
                # A bug, not an outage; renewals must not stop silently over it.
                log.exception("scheduler.crashed")
            await asyncio.sleep(self._settings.poll_interval_s)

    async def run_pass(self) -> BatchResult:
        """Dispatch everything due now, batch after batch; return the pass's totals.

        Ends when a batch comes back short: nothing else is due, or the rest
        is held by other schedulers (they dispatch it). Rows that fall due
        meanwhile are taken by this pass if they sort after its cursor, by the
        next pass otherwise: nothing due is left behind.
        """
        totals = BatchResult()
        after: tuple[datetime, int] | None = None
        while True:
            limit = await self._bucket.take(self._settings.batch_size)
            result = await self.dispatch_batch(limit=limit, after=after)
            self._bucket.give_back(limit - result.claimed)
            _add(totals, result)
            if result.claimed < limit or result.last is None:
                return totals
            after = result.last

    async def dispatch_batch(self, *, limit: int, after: tuple[datetime, int] | None = None) -> BatchResult:
        """One transaction: claim up to ``limit`` due rows and dispatch them."""
        started = time.monotonic()
        async with transaction(self._pool) as cursor:
            now = await database_now(cursor)
            subs = await claim_due(cursor, now=now, limit=limit, after=after)
            result = BatchResult(claimed=len(subs), now=now)
            if subs:
                result.last = (subs[-1].next_attempt_at or now, subs[-1].id)
                result.oldest_due = min(s.next_attempt_at or now for s in subs)
                wrote = await self._dispatch(cursor, subs, now=now, result=result)
        if subs:
            if wrote:
                self._on_dispatched()
            if self._metrics is not None:
                self._metrics.observe(result, time.monotonic() - started)
            _add(self.totals, result)
        return result

    async def _dispatch(
        self, cursor: Cursor, subs: list[Subscription], *, now: datetime, result: BatchResult
    ) -> bool:
        pending = await existing_attempts(cursor, [s.pending_key for s in subs if s.pending_key])
        fresh = [s for s in subs if s.status in CHARGEABLE and s.provider in self._providers]
        batch = _Writes(
            counters=await NetworkCounters.load(cursor, [s.payment_method for s in fresh], now=now),
            occurred_at=now_iso(),
        )
        for sub in subs:
            self._route(sub, pending.get(sub.pending_key or ""), batch, now=now, result=result)
        await insert_queued_attempts(cursor, batch.new)
        await insert_outbox(cursor, [*batch.messages, *batch.events])
        dispatched = {request.subscription_id for request in batch.new}
        timeout = timedelta(seconds=self._policy.dispatch_timeout_s)
        await mark_dispatched(
            cursor, [s.id for s in subs if s.id in dispatched], next_attempt_at=now + timeout
        )
        await save_subscriptions(cursor, [s for s in subs if s.id not in dispatched], batch.status_changed)
        return bool(batch.messages or batch.events)

    def _route(
        self,
        sub: Subscription,
        existing: ExistingAttempt | None,
        batch: _Writes,
        *,
        now: datetime,
        result: BatchResult,
    ) -> None:
        """Decide what one due row needs, and stage its writes."""
        timeout = timedelta(seconds=self._policy.dispatch_timeout_s)
        if sub.status not in CHARGEABLE:
            sub.next_attempt_at = None
            result.inactive += 1
        elif sub.provider not in self._providers:
            sub.next_attempt_at = now + timeout
            result.no_provider += 1
            log.warning("scheduler.provider_not_configured", subscription_id=sub.id, provider=sub.provider)
        elif existing is not None and existing.state is AttemptState.QUEUED:
            # Dispatched but never claimed (a lost or dead-lettered message): send the very
            # same request again; whichever copy is claimed first wins, the other is a duplicate.
            sub.next_attempt_at = now + timeout
            batch.messages.append(request_message(existing.request))
            result.resent += 1
        elif existing is not None and existing.state in _UNDER_WAY:
            sub.next_attempt_at = now + timeout
            result.waiting += 1
        else:
            # No try under way (or only a settled, stale one): open the next, the network limits permitting.
            self._open_try(sub, batch, now=now, result=result)

    def _open_try(self, sub: Subscription, batch: _Writes, *, now: datetime, result: BatchResult) -> None:
        policy = self._policy
        deferral = batch.counters.check_subscription(sub, policy)
        if deferral is not None:
            change = defer(
                sub,
                rule=deferral.rule.name,
                retry_at=deferral.retry_at,
                key=dispatch_key(sub.id, sub.cycle, sub.next_try),
                reason=deferral.reason,
            )
            batch.events.append(subscription_event(sub, change, occurred_at=batch.occurred_at))
            result.deferred += 1
            result.deferred_by[deferral.rule.name] = result.deferred_by.get(deferral.rule.name, 0) + 1
            log.info(
                "scheduler.deferred",
                subscription_id=sub.id,
                rule=deferral.rule.name,
                counted=deferral.counted,
                retry_at=deferral.retry_at.isoformat(),
            )
            return
        try:
            request, message = start_try(sub, now=now, policy=policy, providers=self._providers)
        except Undispatchable as error:
            # Bad data would fail every batch it is in: take the row out of the schedule,
            # visibly, and let the rest of the batch go.
            sub.next_attempt_at = None
            sub.status_reason = f"cannot dispatch: {error}"[:255]
            result.undispatchable += 1
            log.error("scheduler.undispatchable", subscription_id=sub.id, reason=str(error))
            return
        batch.counters.dispatched(sub.payment_method, sub.amount_minor, sub.currency)
        batch.new.append(request)
        batch.messages.append(message)
        result.dispatched += 1


class _Writes(msgspec.Struct, kw_only=True):
    """What one batch writes, staged row by row, then sent in a few multi-row statements."""

    counters: NetworkCounters
    """The network counters of the batch's payment methods, counting this batch's own tries."""
    occurred_at: str
    new: list[AttemptRequest] = msgspec.field(default_factory=list)
    messages: list[OutboxRow] = msgspec.field(default_factory=list)
    events: list[OutboxRow] = msgspec.field(default_factory=list)
    status_changed: list[int] = msgspec.field(default_factory=list)


def _add(into: BatchResult, result: BatchResult) -> None:
    for name in ("claimed", *_COUNTS):
        setattr(into, name, getattr(into, name) + getattr(result, name))
    for rule, count in result.deferred_by.items():
        into.deferred_by[rule] = into.deferred_by.get(rule, 0) + count


def build_scheduler(
    config: Config,
    *,
    pool: aiomysql.Pool,
    policy: SubscriptionPolicy,
    providers: Collection[str],
    metrics: Metrics,
    wake: Callable[[], None],
) -> RenewalScheduler | None:
    """This daemon's renewal scheduler (a background duty), or None when ``scheduler = false``."""
    if not config.subscriptions.scheduler:
        return None
    return RenewalScheduler(
        pool=pool,
        settings=config.subscriptions,
        policy=policy,
        providers=providers,
        metrics=metrics,
        on_dispatched=wake,
    )
