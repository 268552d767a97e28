"""Reconciliation of refunds: an unknown refund is settled by asking the provider, as a charge is.

The same rules as ``reconcile`` for charges, on the ``reversals`` table:
in-flight refunds whose lease ran out become unknown; unknown refunds due a
lookup are asked after by their idempotency key (``lookup_refund``) through the
provider's limiter and the halt. Found: its outcome is recorded. Not found: sent
again under the same key only where the provider honours keys (and remembers
them that long, and stores them whatever the answer) and ``resend_after_s`` has
passed, so it cannot refund twice; without idempotency keys it becomes failed
(``not_received``) after ``not_found_grace_s``. Anything else stays unknown and
is asked again after its backoff, visible to operators in ``payd attempts show``.
An adapter that raises leaves the refund unknown, never settled, and *parks* it
for an operator as a charge is parked (``refund.parked``, metric
``payd_reconciled_total{result="refund_parked"}``, ``payd attempts list``): no
automatic lookup until ``payd attempts unpark KEY`` or ``payd attempts settle KEY``.
So does a lookup answer the adapter marks ``needs_operator``. A provider with no
refund lookup (``Capabilities.refund_lookup`` false: Adyen, iyzico) is never
asked: an unknown refund is re-sent under its key where keys make that safe, by
the same rules; otherwise (iyzico) an unknown refund is parked for an operator
(it may have refunded, and nothing will ever tell), never failed. A pending one
waits for the provider's notification or an operator.

A queued refund (released unsent by a halt, an open breaker or a drain, its message
back in the queue) that no instance claimed for ``pipeline.queued_orphan_after_s``
has lost its message (dead-lettered at the delivery limit): it fails as
``never_sent`` with its ``refund.failed`` event, releasing its reserved amount
(``refund.orphans_failed``, ``payd_reconciled_total{result="refund_never_sent"}``).

A pending refund (the provider accepted it and decides later) is only ever looked
up, never sent again nor failed for want of a record: it ends by the lookup, the
provider's notification (``daemon.webhooks``) or an operator. Pending refunds older
than ``pipeline.pending_reversal_alert_s`` are counted in
``payd_refunds_pending_stale`` and logged (``refund.pending_stale``), at most
every ``_STALE_CHECK_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import aiomysql
import structlog

from daemon.config import PipelineSettings
from daemon.logs import redact_text
from daemon.metrics import Metrics
from daemon.models import CHARGED_NOTHING, ChargeResult, Outcome, ReversalState
from daemon.pipeline.execute import Lane, bounded_call
from daemon.providers.base import RefundingProvider, refunding
from daemon.storage.reversals import (
    DueReversal,
    expire_reversal_leases,
    fail_orphaned_reversals,
    park_reversal,
    record_reversal,
    stale_pending,
    take_due_reversals,
)

log = structlog.get_logger("payd.reconcile.refunds")

_STALE_CHECK_S: Final = 30.0

NEITHER_ASKED_NOR_RESENT: Final = (
    "the provider can neither be asked about this refund nor sent it again safely (no refund "
    "lookup, no idempotency keys): check its dashboard, then payd attempts settle KEY"
)

NOT_RECEIVED = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="not_received",
    reason="the provider has no record of this refund: nothing was refunded",
)


class ReversalReconciler:
    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        lanes: dict[str, Lane],
        settings: PipelineSettings,
        metrics: Metrics,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._lanes = lanes
        self._settings = settings
        self._metrics = metrics
        self._on_recorded = on_recorded
        self._stale_checked = float("-inf")
        # As for queued attempts (OrphanSweep): only once this instance has run that long, so
        # after a fleet-wide outage the backlog in the queue has its chance first.
        self._first_orphan_sweep_at = time.monotonic() + settings.queued_orphan_after_s

    async def check_stale_pending(self) -> int:
        """Count (gauge) and log pending refunds older than the alert age; how many there are."""
        self._stale_checked = time.monotonic()
        count, oldest = await stale_pending(self._pool, older_than_s=self._settings.pending_reversal_alert_s)
        self._metrics.refunds_pending_stale.set(count)
        if count:
            log.warning(
                "refund.pending_stale",
                count=count,
                older_than_s=self._settings.pending_reversal_alert_s,
                oldest=[f"{p.provider}/{p.idempotency_key} ({p.age_s:.0f} s)" for p in oldest],
                advice="no outcome came: check the provider's dashboard and its notifications, "
                "then settle each by hand",
            )
        return count

    async def reconcile_once(self) -> int:
        """One pass; how many unknown or pending refunds were settled."""
        if time.monotonic() - self._stale_checked >= _STALE_CHECK_S:
            await self.check_stale_pending()
        await self.sweep_orphans()
        expired = await expire_reversal_leases(self._pool, limit=self._settings.reconcile_batch_size)
        if expired:
            log.warning("reconcile.refund_leases_expired", count=expired)
            self._on_recorded()
        due = await take_due_reversals(
            self._pool,
            limit=self._settings.reconcile_batch_size,
            backoff_s=self._settings.reconcile_backoff_s,
        )
        verdicts = await asyncio.gather(*(self._contained(item) for item in due))
        settled = 0
        for item, verdict in zip(due, verdicts, strict=True):
            if verdict is None:
                continue
            if await record_reversal(self._pool, item.reversal, verdict, tries=0, unknown_recheck_s=0):
                settled += 1
                log.info(
                    "refund.reconciled",
                    idempotency_key=item.reversal.idempotency_key,
                    original_idempotency_key=item.reversal.original_idempotency_key,
                    provider=item.reversal.provider,
                    outcome=verdict.outcome.value,
                    accepted=verdict.accepted,
                    was=item.state.value,
                )
        if settled:
            self._on_recorded()
        return settled

    async def sweep_orphans(self) -> int:
        """Fail queued refunds whose message is gone (never sent); how many. Loud: an error log
        line naming them and ``payd_reconciled_total{result="refund_never_sent"}``."""
        if time.monotonic() < self._first_orphan_sweep_at:
            return 0
        failed = await fail_orphaned_reversals(
            self._pool,
            queued_for_s=self._settings.queued_orphan_after_s,
            limit=self._settings.reconcile_batch_size,
        )
        if failed:
            self._metrics.reconciled.labels("refund_never_sent").inc(len(failed))
            log.error(
                "refund.orphans_failed",
                count=len(failed),
                idempotency_keys=[r.idempotency_key for r in failed[:20]],
                queued_for_s=self._settings.queued_orphan_after_s,
                effect="never sent, nothing refunded; their reserved amounts are released",
            )
            self._on_recorded()
        return len(failed)

    async def _contained(self, item: DueReversal) -> ChargeResult | None:
        try:
            return await self._look_up(item)
        except Exception as error:  # an adapter bug: the refund stays unknown, parked for an operator
            log.error(
                "reconcile.refund_lookup_raised",
                idempotency_key=item.reversal.idempotency_key,
                provider=item.reversal.provider,
                error=repr(error),
            )
            await self._park(item, redact_text(f"lookup raised {type(error).__name__}: {error}"))
            return None

    async def _park(self, item: DueReversal, reason: str) -> None:
        """Out of automatic reconciliation until an operator acts (see the module)."""
        if not await park_reversal(self._pool, item.reversal.reversal_id, reason):
            return
        self._metrics.reconciled.labels("refund_parked").inc()
        log.error(
            "refund.parked",
            idempotency_key=item.reversal.idempotency_key,
            original_idempotency_key=item.reversal.original_idempotency_key,
            reversal_id=item.reversal.reversal_id,
            provider=item.reversal.provider,
            reason=reason,
        )

    async def _look_up(self, item: DueReversal) -> ChargeResult | None:
        """A definitive result for ``item``, or None to ask again after its backoff."""
        lane = self._lanes.get(item.reversal.provider)
        refunder = refunding(lane.provider) if lane is not None else None
        if lane is None or refunder is None:
            return None  # stays unknown, visible to operators
        if not refunder.capabilities.refund_lookup:
            # Nothing to ask: a pending one waits for the notification; an unknown one is re-sent
            # under its key where that cannot refund twice (as a charge is), else waits likewise.
            if item.state is ReversalState.PENDING:
                return None
            if not refunder.capabilities.honours_idempotency_key:
                # An unknown made outside the adapter (lease expiry, drain cut-off, a call cut off
                # or raising): nothing will ever settle it by itself. Parked, loud, for an operator.
                await self._park(item, NEITHER_ASKED_NOR_RESENT)
                return None
            return await self._resend(lane, refunder, item)
        found = await bounded_call(lane, self._metrics, lambda: refunder.lookup_refund(item.reversal))
        if found is None or found.anomaly is not None:
            return None
        pending = item.state is ReversalState.PENDING
        if found.found:
            result = found.result
            if result is not None and result.needs_operator:
                await self._park(item, result.reason or "the provider's answer needs an operator")
                return None
            if result is None or (result.outcome is Outcome.UNKNOWN and (pending or not result.accepted)):
                return None
            return result
        if pending:
            # The provider took it: a lookup that cannot find it yet never means "not received".
            return None
        return await self._not_found(lane, refunder, item)

    async def _not_found(
        self, lane: Lane, refunder: RefundingProvider, item: DueReversal
    ) -> ChargeResult | None:
        if refunder.capabilities.honours_idempotency_key:
            return await self._resend(lane, refunder, item)
        return NOT_RECEIVED if item.seconds_since_claim >= self._settings.not_found_grace_s else None

    async def _resend(
        self, lane: Lane, refunder: RefundingProvider, item: DueReversal
    ) -> ChargeResult | None:
        """The same refund under the same key, only while the provider's key guarantees it cannot
        refund twice; a definitive answer, or None to try again after the backoff."""
        capabilities = refunder.capabilities
        age = item.seconds_since_claim
        ttl = capabilities.idempotency_key_ttl_s
        may_resend = (
            not capabilities.resend_only_after_2xx
            and age >= self._settings.resend_after_s
            and (ttl is None or age < ttl * 0.9)
        )
        if not may_resend:
            return None
        result = await bounded_call(
            lane, self._metrics, lambda: refunder.refund(item.reversal), may_charge=True
        )
        if result is None or result.outcome in CHARGED_NOTHING:
            return None
        if result.outcome is Outcome.UNKNOWN and not result.accepted:
            return None
        return result  # an accepted answer to the resend makes it pending
