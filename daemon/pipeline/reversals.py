"""Refunds through the charge's machinery: claim, provider call, record, ack after the commit.

    refund request -> claim (write-ahead row; invariant 7, see storage.reversals)
    -> execute (the provider's limiter, rate limit, breaker, halt; one refund call,
    retried only when nothing was done) -> record (outcome + refund.* event, one
    commit) -> ack

Refunds are rare next to charges, so each one is claimed and recorded in its own
transaction rather than batched: the claim's lock on the charged attempt's row is
held only for that one refund. A refund is never failed over: it goes to the
connection that took the money.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import aiomysql
import structlog
from aio_pika.abc import AbstractIncomingMessage

from daemon.broker import settle
from daemon.config import PipelineSettings
from daemon.metrics import Metrics
from daemon.models import (
    ChargeResult,
    Outcome,
    RefundRequest,
    ReversalOperation,
    ReversalRequest,
    ReversalState,
)
from daemon.pipeline.execute import AttemptRun, Lane, execute
from daemon.providers.base import Provider, refunding, reversal_operation
from daemon.storage.db import DB_ERRORS
from daemon.storage.reversals import (
    ReversalClaim,
    claim_reversal,
    record_reversal,
    reversal_state_of,
)

log = structlog.get_logger("payd.refunds")

MISMATCH_REASON = "refund idempotency_key reused with another charge or amount; the first request stands"
NOT_REFUNDABLE = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="refunds_unsupported",
    reason="the provider's adapter cannot refund: nothing sent",
)


class ReversalRun(AttemptRun):
    """An ``AttemptRun`` whose provider call is the refund of ``reversal``."""

    __slots__ = ("reversal",)

    def __init__(self, reversal: ReversalRequest) -> None:
        # AttemptRun's own __init__ wants the charge's request; a refund's run has none, and
        # ``execute`` reads only the fields set here (``request`` is read only by ``call``).
        self.reversal = reversal
        self.provider = reversal.provider
        self.calling = False
        self.tries = 0
        self.rate_limited = 0
        self.started = time.monotonic()

    def call(self, provider: Provider) -> Awaitable[ChargeResult]:
        refunder = refunding(provider)
        if refunder is None:  # the claim refuses these; a reload may have changed the adapter since
            return asyncio.sleep(0, NOT_REFUNDABLE)
        return refunder.refund(self.reversal)


def can_refund(lanes: Mapping[str, Lane]) -> Callable[[str], bool]:
    """Whether a connection is configured and its adapter can refund."""
    return lambda name: name in lanes and refunding(lanes[name].provider) is not None


def operation_of(lanes: Mapping[str, Lane]) -> Callable[[ReversalRequest], ReversalOperation]:
    """The adapter's choice of refund or void for a claimed reversal (asked once, at the claim)."""

    def choose(reversal: ReversalRequest) -> ReversalOperation:
        lane = lanes.get(reversal.provider)
        return ReversalOperation.REFUND if lane is None else reversal_operation(lane.provider, reversal)

    return choose


class ReversalFlow:
    """One refund request from delivery to ack. Owned by the attempt pipeline, which hands
    refund requests here and drains these tasks with its own."""

    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        lanes: dict[str, Lane],
        settings: PipelineSettings,
        metrics: Metrics,
        instance_id: str,
        stopping: asyncio.Event,
        dead_letter: Callable[[AbstractIncomingMessage, str], Awaitable[None]],
    ) -> None:
        self._pool = pool
        self._lanes = lanes
        self._settings = settings
        self._metrics = metrics
        self._instance_id = instance_id
        self._stopping = stopping
        self._dead_letter = dead_letter
        self._seq = 0

    async def handle(self, message: AbstractIncomingMessage, request: RefundRequest) -> None:
        self._seq += 1
        claimed_by = f"{self._instance_id}/r{self._seq}"
        started = time.monotonic()
        try:
            claim = await claim_reversal(
                self._pool,
                request,
                claimed_by=claimed_by,
                lease_s=self._settings.lease_s,
                refundable=can_refund(self._lanes),
                operation_of=operation_of(self._lanes),
            )
        except DB_ERRORS as error:
            log.error("refund.claim_failed", error=repr(error), idempotency_key=request.idempotency_key)
            await asyncio.sleep(1.0)  # let the database recover before the broker redelivers
            await settle(message, ack=False)
            return
        if claim.claimed is None:
            await self._not_sent(message, request, claim)
            return
        result = await self._execute(claim.claimed, started + self._settings.lease_s)
        await self._record(claim.claimed, result[0], tries=result[1])
        if not await settle(message, ack=result[0] is not None):
            self._metrics.stale_settles.inc()

    async def _not_sent(
        self, message: AbstractIncomingMessage, request: RefundRequest, claim: ReversalClaim
    ) -> None:
        if claim.mismatched:
            await self._dead_letter(message, MISMATCH_REASON)
            return
        if claim.refused is not None:
            code = claim.refused.decline_code or "refused"
            self._metrics.refunds.labels("-", f"refused:{code}").inc()
            log.warning(
                "refund.refused",
                idempotency_key=request.idempotency_key,
                original_idempotency_key=request.original_idempotency_key,
                amount_minor=request.amount_minor,
                decline_code=code,
                reason=claim.refused.reason,
            )
        else:
            self._metrics.messages.labels("duplicate").inc()
        if not await settle(message, ack=True):
            self._metrics.stale_settles.inc()

    async def _execute(
        self, reversal: ReversalRequest, lease_deadline: float
    ) -> tuple[ChargeResult | None, int]:
        run = ReversalRun(reversal)
        lane = self._lanes.get(reversal.provider)
        if lane is None:  # the claim checked it; a reload may have removed the connection since
            return NOT_REFUNDABLE, 0
        try:
            result = await execute(
                lane, run, lease_deadline=lease_deadline, stopping=self._stopping, metrics=self._metrics
            )
        except asyncio.CancelledError:
            # Only the drain deadline cancels: a call on the wire may have refunded.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # always inside a task
            result = (
                ChargeResult(outcome=Outcome.UNKNOWN, reason="drain deadline passed during the call")
                if run.calling
                else None
            )
        return result, run.tries

    async def _record(self, reversal: ReversalRequest, result: ChargeResult | None, *, tries: int) -> None:
        delay = 0.2
        while True:
            try:
                written = await record_reversal(
                    self._pool,
                    reversal,
                    result,
                    tries=tries,
                    unknown_recheck_s=self._settings.reconcile_backoff_s[0],
                )
                break
            except DB_ERRORS as error:
                # Keep the outcome and try again: acking without the commit could lose a refund's
                # record. If the process dies meanwhile, the lease expires to unknown.
                log.error("refund.record_failed", error=repr(error), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if result is None:
            log.info("refund.released", idempotency_key=reversal.idempotency_key)
            return
        state = reversal_state_of(result)
        self._metrics.refunds.labels(reversal.provider, state.value).inc()
        calm = (ReversalState.SUCCEEDED, ReversalState.PENDING)
        log_line = log.info if state in calm else log.warning
        log_line(
            "refund.finished",
            idempotency_key=reversal.idempotency_key,
            original_idempotency_key=reversal.original_idempotency_key,
            reversal_id=reversal.reversal_id,
            provider=reversal.provider,
            operation=reversal.operation.value,
            amount_minor=reversal.amount_minor,
            currency=reversal.currency,
            outcome=result.outcome.value,
            decline_code=result.decline_code,
            provider_ref=result.provider_ref,
            tries=tries,
            reason=result.reason,
            written=written,
        )
