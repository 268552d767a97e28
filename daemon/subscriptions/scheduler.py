"""The renewal scheduler: finds due subscriptions and dispatches their tries through the outbox.

Runs in every ``payd run`` at once; the database shares the work out. One
batch is one transaction:

    lock up to N due rows (SKIP LOCKED: rows another scheduler holds are its)
    -> per row: dispatch a new try (budget permitting), re-send a queued one,
       wait on one in flight, or stop dunning when the budget is spent
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
from collections import Counter as Tally
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
from daemon.subscriptions.lifecycle import stop
from daemon.subscriptions.model import CHARGEABLE, Subscription, dispatch_key
from daemon.subscriptions.pacing import TokenBucket
from daemon.subscriptions.policy import SubscriptionPolicy, use_policy
from daemon.subscriptions.store import (
    budget_used,
    claim_due,
    database_now,
    insert_outbox,
    insert_queued_attempts,
    mark_dispatched,
    save_subscriptions,
)

log = structlog.get_logger("payd.scheduler")

_UNDER_WAY = frozenset({AttemptState.IN_FLIGHT, AttemptState.UNKNOWN})
_COUNTS = ("dispatched", "resent", "waiting", "budget_spent", "inactive", "no_provider", "undispatchable")


class BatchResult(msgspec.Struct, kw_only=True):
    """What one batch did, by row."""

    claimed: int = 0
    dispatched: int = 0
    """New tries: a queued attempt row and its request message."""
    resent: int = 0
    """Tries still queued after ``dispatch_timeout_s``: their message published again."""
    waiting: int = 0
    """Tries in flight or unknown: left to the pipeline and reconciliation."""
    budget_spent: int = 0
    """Stopped: the payment method's retry budget was spent."""
    inactive: int = 0
    """Paused or canceled rows that were still due: unscheduled."""
    no_provider: int = 0
    """Their provider is not configured here: looked at again later."""
    undispatchable: int = 0
    """Their data cannot make a valid request: unscheduled, the reason in ``status_reason``."""
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

    def observe(self, result: BatchResult, seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        for name in _COUNTS:
            count = getattr(result, name)
            if count:
                self.rows.labels(name).inc(count)
        if result.oldest_due is not None and result.now is not None:
            self.due_lag.set(max(0.0, (result.now - result.oldest_due).total_seconds()))


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
            used=Tally(await budget_used(cursor, [s.payment_method for s in fresh], now=now)),
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
            # No try under way (or only a settled, stale one): open the next, budget permitting.
            self._open_try(sub, batch, now=now, result=result)

    def _open_try(self, sub: Subscription, batch: _Writes, *, now: datetime, result: BatchResult) -> None:
        policy = self._policy
        used, limit = batch.used[sub.payment_method], policy.budget_for(sub.card_brand)
        if used >= limit:
            before = sub.status
            change = stop(
                sub,
                policy.dunning_for(sub.plan, sub.provider).on_exhausted,
                key=dispatch_key(sub.id, sub.cycle, sub.next_try),
                reason=f"retry budget spent: {used} of {limit} attempts in 30 days",
            )
            batch.events.append(subscription_event(sub, change, occurred_at=batch.occurred_at))
            if sub.status != before:
                batch.status_changed.append(sub.id)
            result.budget_spent += 1
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
        batch.used[sub.payment_method] += 1
        batch.new.append(request)
        batch.messages.append(message)
        result.dispatched += 1


class _Writes(msgspec.Struct, kw_only=True):
    """What one batch writes, staged row by row, then sent in a few multi-row statements."""

    used: Tally[str]
    """Attempts per payment method in the budget window, counting this batch's own."""
    occurred_at: str
    new: list[AttemptRequest] = msgspec.field(default_factory=list)
    messages: list[OutboxRow] = msgspec.field(default_factory=list)
    events: list[OutboxRow] = msgspec.field(default_factory=list)
    status_changed: list[int] = msgspec.field(default_factory=list)


def _add(into: BatchResult, result: BatchResult) -> None:
    for name in ("claimed", *_COUNTS):
        setattr(into, name, getattr(into, name) + getattr(result, name))


def start_subscriptions(
    config: Config,
    *,
    pool: aiomysql.Pool,
    providers: Collection[str],
    metrics: Metrics,
    wake: Callable[[], None],
) -> list[asyncio.Task[None]]:
    """Install ``[subscriptions]`` for the outcomes this daemon records, start its scheduler.

    The policy lives in a context variable, so this must run in ``serve`` before
    the tasks that record outcomes are created (they inherit it). Returns the
    scheduler task (none when ``scheduler = false``), a background duty.
    """
    policy = use_policy(config.subscriptions)
    if not config.subscriptions.scheduler:
        return []
    scheduler = RenewalScheduler(
        pool=pool,
        settings=config.subscriptions,
        policy=policy,
        providers=providers,
        metrics=metrics,
        on_dispatched=wake,
    )
    return [asyncio.create_task(scheduler.run(), name="renewal-scheduler")]
