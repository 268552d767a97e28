"""Reconciliation: unknown outcomes settled by asking the provider, never by sending again.

Two periodic duties, safe to run on every instance at once (rows are taken
with SKIP LOCKED and pushed back by their next backoff before any lookup):
- in_flight attempts whose lease ran out (their instance died) become unknown;
- unknown attempts due a lookup are looked up, with the same idempotency key or
  reference, through the provider's limiter; a definitive answer is recorded.
  When the provider has no record of it (or offers no lookup) and honours
  idempotency keys, it is sent again under the same key after
  ``resend_after_s`` (the provider cannot charge it twice), unless the provider
  stores a key only after a 2xx (``resend_only_after_2xx``); without idempotency
  keys it becomes failed (``not_received``) after ``not_found_grace_s``. A lookup
  that finds another attempt's payment (``anomaly``) settles nothing.

No unknown without an exit: an attempt that nothing the provider can say will
settle is *parked* for an operator, with its reason (``attempt.parked``, metric
``payd_reconciled_total{result="needs_operator"}``, ``payd attempts list``):
an answer the adapter marks ``needs_operator`` (a state that never ends by
itself, a replayed answer), a provider without lookup once a resend is no longer
safe, and a provider with idempotency keys that has no record of the attempt
after ``not_found_grace_s`` when a resend is not (or no longer) safe.

Every provider call here is contained as a charge is in ``execute``: bounded by
a timeout, and an exception from the adapter (a bug: adapters answer, they do
not raise) cannot stop the pass. The attempt it concerned is *parked*: it stays
unknown, with the reason, out of automatic passes until an operator acts, so
one poisoned row cannot re-kill reconciliation on every instance.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiomysql
import msgspec
import structlog

from daemon.config import PipelineSettings
from daemon.logs import redact_text
from daemon.metrics import Metrics
from daemon.models import CHARGED_NOTHING, AttemptRequest, ChargeResult, Outcome, RecordedAttempt
from daemon.pipeline.attempts import OrphanSweep
from daemon.pipeline.execute import Lane, bounded_call
from daemon.pipeline.reconcile_reversals import ReversalReconciler
from daemon.pipeline.waker import Waker
from daemon.storage.attempts import (
    DueUnknown,
    ParkedAttempt,
    Record,
    expire_leases,
    park_attempts,
    record_outcomes,
    take_due_unknown,
)
from daemon.storage.db import DB_ERRORS
from daemon.subscriptions.policy import SubscriptionPolicy

log = structlog.get_logger("payd.reconcile")
T = TypeVar("T")

NOT_RECEIVED = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="not_received",
    reason="the provider has no record of this attempt: nothing was charged",
)


class Poisoned(msgspec.Struct, frozen=True):
    """Park this attempt: the adapter raised while asked about it, or nothing the provider
    can say will settle it."""

    reason: str


class Reconciler:
    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        lanes: dict[str, Lane],
        settings: PipelineSettings,
        metrics: Metrics,
        policy: SubscriptionPolicy,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._lanes = lanes
        self._settings = settings
        self._metrics = metrics
        self._policy = policy
        self._on_recorded = on_recorded
        self._waker = Waker(settings.reconcile_interval_s)
        self._orphans = OrphanSweep(pool, settings, metrics)
        self.parked: deque[ParkedAttempt] = deque(maxlen=20)
        """The latest attempts this instance parked, for /status."""
        self.reversals = ReversalReconciler(
            pool=pool, lanes=lanes, settings=settings, metrics=metrics, on_recorded=on_recorded
        )

    async def run(self) -> None:
        while True:
            await self._waker.next_round()
            try:
                await self.reconcile_once()
                await self.reversals.reconcile_once()  # refunds: the same rules, their own table
            except DB_ERRORS as error:
                log.error("reconcile.database_error", error=repr(error))

    async def reconcile_once(self) -> int:
        """One pass: expire dead leases, look up what is due; return how many were settled."""
        expired = await expire_leases(self._pool, limit=self._settings.reconcile_batch_size)
        if expired:
            self._metrics.leases_expired.inc(len(expired))
            log.warning("reconcile.leases_expired", count=len(expired))
            self._on_recorded()
        if await self._orphans.sweep():
            self._on_recorded()
        due, unreadable = await take_due_unknown(
            self._pool,
            limit=self._settings.reconcile_batch_size,
            backoff_s=self._settings.reconcile_backoff_s,
        )
        self._note_parked(unreadable)
        if not due:
            return 0
        verdicts = await asyncio.gather(*(self._contained(item) for item in due))
        paired = list(zip(due, verdicts, strict=True))
        await self._park([(item, verdict) for item, verdict in paired if isinstance(verdict, Poisoned)])
        records = [
            Record(
                attempt_id=item.attempt_id,
                request=item.request,
                result=verdict,
                provider=item.routed_provider,
            )
            for item, verdict in paired
            if isinstance(verdict, ChargeResult)
        ]
        if records:
            outcome = await record_outcomes(self._pool, records, unknown_recheck_s=0, policy=self._policy)
            for record in outcome.applied:
                assert record.result is not None
                log.info(
                    "attempt.reconciled",
                    idempotency_key=record.request.idempotency_key,
                    attempt_id=record.attempt_id,
                    provider=record.request.provider,
                    outcome=record.result.outcome.value,
                    decline_code=record.result.decline_code,
                )
            self._on_recorded()
        return len(records)

    async def _contained(self, item: DueUnknown) -> ChargeResult | Poisoned | None:
        """``_look_up``, with whatever the adapter raises turned into a reason to park the attempt."""
        try:
            return await self._look_up(item)
        except Exception as error:  # an adapter bug: contained here, as a charge's is in execute
            reason = redact_text(f"{type(error).__name__}: {error}")[:255]
            log.error(
                "reconcile.lookup_raised",
                idempotency_key=item.request.idempotency_key,
                attempt_id=item.attempt_id,
                provider=item.provider,
                reason=reason,
                exc_info=error,
            )
            return Poisoned(reason)

    async def _park(self, poisoned: list[tuple[DueUnknown, Poisoned]]) -> None:
        parked = [
            ParkedAttempt(
                attempt_id=item.attempt_id,
                idempotency_key=item.request.idempotency_key,
                provider=item.provider,
                reason=p.reason,
            )
            for item, p in poisoned
        ]
        await park_attempts(self._pool, [(p.attempt_id, p.reason) for p in parked])
        self._note_parked(parked)

    def _note_parked(self, parked: list[ParkedAttempt]) -> None:
        for attempt in parked:
            self._metrics.reconciled.labels("parked").inc()
            self.parked.append(attempt)
            log.error(
                "attempt.parked",
                idempotency_key=attempt.idempotency_key,
                attempt_id=attempt.attempt_id,
                provider=attempt.provider,
                reason=attempt.reason,
            )

    def _for_operator(self, reason: str) -> Poisoned:
        self._metrics.reconciled.labels("needs_operator").inc()
        return Poisoned(reason[:255])

    async def _look_up(self, item: DueUnknown) -> ChargeResult | Poisoned | None:
        """A definitive result for ``item``, None to ask again after its backoff, or Poisoned
        when only an operator can settle it."""
        lane = self._lanes.get(item.provider)
        if lane is None:
            self._metrics.reconciled.labels("provider_not_configured").inc()
            return None
        capabilities = lane.provider.capabilities
        if not (capabilities.lookup_by_key or capabilities.lookup_by_reference):
            # No way to ask; under an idempotency key the provider's stored answer is the lookup.
            if self._may_resend(lane, item):
                return await self._resend(lane, item)
            if not self._may_resend_later(lane, item):
                return self._for_operator("no lookup at the provider, and a resend is unsafe: settle by hand")
            self._metrics.reconciled.labels("no_lookup").inc()
            return None
        request = RecordedAttempt(**msgspec.structs.asdict(item.request), provider_ref=item.provider_ref)
        found = await self._call(lane, lane.provider.lookup, request)
        if found is None:
            self._metrics.reconciled.labels("lookup_failed").inc()
            return None
        if found.anomaly is not None:
            self._metrics.reconciled.labels("identity_mismatch").inc()
            log.error(
                "reconcile.identity_mismatch",
                idempotency_key=item.request.idempotency_key,
                provider=item.provider,
                anomaly=found.anomaly,
            )
            return None  # stays unknown: what was found is someone else's payment
        if found.found:
            if found.result is not None and found.result.needs_operator:
                return self._for_operator(found.result.reason or "the provider's answer cannot settle it")
            if found.result is None or found.result.outcome is Outcome.UNKNOWN:
                self._metrics.reconciled.labels("still_unknown").inc()
                return None
            self._metrics.reconciled.labels(found.result.outcome.value).inc()
            return found.result
        if self._may_resend(lane, item):
            return await self._resend(lane, item)
        too_early = item.seconds_since_claim < self._settings.not_found_grace_s
        if too_early or self._may_resend_later(lane, item):  # ask again after the backoff
            self._metrics.reconciled.labels("not_found_yet").inc()
            return None
        if capabilities.honours_idempotency_key:
            # "Not found" under a key the provider may still process, or may have forgotten:
            # neither failed nor safe to resend (Checkout.com after a 5xx, a key past its TTL).
            return self._for_operator(
                "the provider has no record of it and a resend under its key is not safe: settle by hand"
            )
        self._metrics.reconciled.labels("not_received").inc()
        return NOT_RECEIVED

    @staticmethod
    def _may_resend_later(lane: Lane, item: DueUnknown) -> bool:
        """Whether a resend is still to come: it is only too early for one (``_may_resend``)."""
        capabilities = lane.provider.capabilities
        if not capabilities.honours_idempotency_key or capabilities.resend_only_after_2xx:
            return False
        ttl = capabilities.idempotency_key_ttl_s
        return ttl is None or item.seconds_since_claim < ttl * 0.9

    def _may_resend(self, lane: Lane, item: DueUnknown) -> bool:
        """Sending again is safe only under the same key, while the provider still remembers it,
        and once ``resend_after_s`` has passed (a provider's search may lag behind its charges)."""
        capabilities = lane.provider.capabilities
        if not capabilities.honours_idempotency_key or capabilities.resend_only_after_2xx:
            return False  # an unknown attempt has no 2xx answer, so the key may not be stored
        if item.seconds_since_claim < self._settings.resend_after_s:
            return False
        ttl = capabilities.idempotency_key_ttl_s
        return ttl is None or item.seconds_since_claim < ttl * 0.9

    async def _resend(self, lane: Lane, item: DueUnknown) -> ChargeResult | Poisoned | None:
        """The provider has no record: send it again with the same idempotency key.

        If the first request is still on its way, the provider answers both
        with one charge (or a conflict, which keeps the attempt unknown).
        """
        result = await self._call(lane, lane.provider.charge, item.request, may_charge=True)
        if result is not None and result.outcome is Outcome.UNKNOWN and result.needs_operator:
            return self._for_operator(result.reason or "the provider's answer cannot settle it")
        if result is None or result.outcome is Outcome.UNKNOWN or result.outcome in CHARGED_NOTHING:
            self._metrics.reconciled.labels("resent_unsettled").inc()
            return None
        self._metrics.reconciled.labels("resent").inc()
        return result

    async def _call(
        self,
        lane: Lane,
        call: Callable[[AttemptRequest], Awaitable[T]],
        request: AttemptRequest,
        *,
        may_charge: bool = False,
    ) -> T | None:
        """``call(request)`` through ``bounded_call``: the limit, the halt, and the slot hold."""
        return await bounded_call(lane, self._metrics, lambda: call(request), may_charge=may_charge)
