"""Reconciliation: unknown outcomes settled by asking the provider, never by sending again.

Two periodic duties, safe to run on every instance at once (rows are taken
with SKIP LOCKED and pushed back by their next backoff before any lookup):
- in_flight attempts whose lease ran out (their instance died) become unknown;
- unknown attempts due a lookup are looked up, with the same idempotency key or
  reference, through the provider's limiter; a definitive answer is recorded.
  When the provider has no record of it (or offers no lookup) and honours
  idempotency keys, it is sent again under the same key after
  ``resend_after_s`` (the provider cannot charge it twice); without idempotency
  keys it becomes failed (``not_received``) after ``not_found_grace_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiomysql
import structlog

from daemon.config import PipelineSettings
from daemon.metrics import Metrics
from daemon.models import CHARGED_NOTHING, AttemptRequest, ChargeResult, Outcome
from daemon.pipeline.execute import Lane
from daemon.pipeline.waker import Waker
from daemon.storage.attempts import (
    DueUnknown,
    Record,
    expire_leases,
    record_outcomes,
    take_due_unknown,
)
from daemon.storage.db import DB_ERRORS

log = structlog.get_logger("payd.reconcile")
T = TypeVar("T")

NOT_RECEIVED = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="not_received",
    reason="the provider has no record of this attempt: nothing was charged",
)


class Reconciler:
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
        self._waker = Waker(settings.reconcile_interval_s)

    async def run(self) -> None:
        while True:
            await self._waker.next_round()
            try:
                await self.reconcile_once()
            except DB_ERRORS as error:
                log.error("reconcile.database_error", error=repr(error))

    async def reconcile_once(self) -> int:
        """One pass: expire dead leases, look up what is due; return how many were settled."""
        expired = await expire_leases(self._pool, limit=self._settings.reconcile_batch_size)
        if expired:
            self._metrics.leases_expired.inc(len(expired))
            log.warning("reconcile.leases_expired", count=len(expired))
            self._on_recorded()
        due = await take_due_unknown(
            self._pool,
            limit=self._settings.reconcile_batch_size,
            backoff_s=self._settings.reconcile_backoff_s,
        )
        if not due:
            return 0
        verdicts = await asyncio.gather(*(self._look_up(item) for item in due))
        records = [
            Record(
                attempt_id=item.attempt_id,
                request=item.request,
                result=verdict,
                provider=item.routed_provider,
            )
            for item, verdict in zip(due, verdicts, strict=True)
            if verdict is not None
        ]
        if records:
            outcome = await record_outcomes(self._pool, records, unknown_recheck_s=0)
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

    async def _look_up(self, item: DueUnknown) -> ChargeResult | None:
        """A definitive result for ``item``, or None to ask again after its backoff."""
        lane = self._lanes.get(item.provider)
        if lane is None:
            self._metrics.reconciled.labels("provider_not_configured").inc()
            return None
        capabilities = lane.provider.capabilities
        if not (capabilities.lookup_by_key or capabilities.lookup_by_reference):
            # No way to ask; under an idempotency key the provider's stored answer is the lookup.
            if self._may_resend(lane, item):
                return await self._resend(lane, item)
            self._metrics.reconciled.labels("no_lookup").inc()
            return None  # stays unknown, visible to operators
        found = await self._call(lane, lane.provider.lookup, item.request)
        if found is None:
            self._metrics.reconciled.labels("lookup_failed").inc()
            return None
        if found.found:
            if found.result is None or found.result.outcome is Outcome.UNKNOWN:
                self._metrics.reconciled.labels("still_unknown").inc()
                return None
            self._metrics.reconciled.labels(found.result.outcome.value).inc()
            return found.result
        if self._may_resend(lane, item):
            return await self._resend(lane, item)
        too_early = item.seconds_since_claim < self._settings.not_found_grace_s
        if capabilities.honours_idempotency_key or too_early:  # ask again after the backoff
            self._metrics.reconciled.labels("not_found_yet").inc()
            return None
        self._metrics.reconciled.labels("not_received").inc()
        return NOT_RECEIVED

    def _may_resend(self, lane: Lane, item: DueUnknown) -> bool:
        """Sending again is safe only under the same key, while the provider still remembers it,
        and once ``resend_after_s`` has passed (a provider's search may lag behind its charges)."""
        capabilities = lane.provider.capabilities
        if not capabilities.honours_idempotency_key:
            return False
        if item.seconds_since_claim < self._settings.resend_after_s:
            return False
        ttl = capabilities.idempotency_key_ttl_s
        return ttl is None or item.seconds_since_claim < ttl * 0.9

    async def _resend(self, lane: Lane, item: DueUnknown) -> ChargeResult | None:
        """The provider has no record: send it again with the same idempotency key.

        If the first request is still on its way, the provider answers both
        with one charge (or a conflict, which keeps the attempt unknown).
        """
        result = await self._call(lane, lane.provider.charge, item.request)
        if result is None or result.outcome is Outcome.UNKNOWN or result.outcome in CHARGED_NOTHING:
            self._metrics.reconciled.labels("resent_unsettled").inc()
            return None
        self._metrics.reconciled.labels("resent").inc()
        return result

    @staticmethod
    async def _call(
        lane: Lane, call: Callable[[AttemptRequest], Awaitable[T]], request: AttemptRequest
    ) -> T | None:
        """One provider call within the provider's in-flight limit; None if it may not be made now."""
        if not lane.may_call() or not await lane.limiter.acquire():
            return None
        try:
            return await call(request)
        finally:
            lane.limiter.release()
