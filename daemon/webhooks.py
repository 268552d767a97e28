"""Providers' notifications of reversal outcomes: ``POST /webhooks/{provider}`` on the control endpoint.

A provider that decides refunds and voids later (Adyen answers ``received``, then
sends a REFUND or CANCELLATION notification) reports the outcome here. The route
is named by the provider *connection* (``[providers.NAME]``), so each connection's
adapter verifies its own notifications with its own key (``NotifiedProvider``):
an unverified request is refused (401) and counted, and changes nothing. A body the
adapter cannot read, or raises on (a bug), is refused 400 and counted as ``malformed``,
never a 500: the route is unauthenticated, so any input must end in a clear refusal.

Each verified notice settles its reversal through ``storage.reversals.settle_by_notice``:
idempotently (a duplicate changes nothing), never on a notice that names another
amount or operation, and a notice for a reversal payd does not know (another
system on the same merchant account) is logged and counted, not an error. The
provider's expected answer (Adyen: ``[accepted]``) is given only after every
notice is committed, so a database failure makes the provider send it again.

Not behind the bearer token (providers cannot send one): expose the route to the
provider through a proxy that passes only ``/webhooks/`` (docs/providers/adyen.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiomysql
import structlog
from aiohttp import web

from daemon.metrics import Metrics
from daemon.models import Outcome
from daemon.pipeline.execute import Lane
from daemon.providers.base import NotificationRefused, NotifiedProvider, ReversalNotice
from daemon.storage.db import DB_ERRORS
from daemon.storage.reversals import Notice, Settled, reversal_state_of, settle_by_notice

log = structlog.get_logger("payd.webhooks")

MAX_BODY_BYTES = 1 << 20


class WebhookReceiver:
    def __init__(
        self,
        *,
        pool: aiomysql.Pool,
        lanes: Mapping[str, Lane],
        metrics: Metrics,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._lanes = lanes
        self._metrics = metrics
        self._on_recorded = on_recorded
        self._tracebacks_logged: set[tuple[str, str]] = set()

    def register(self, app: web.Application) -> None:
        app.router.add_post("/webhooks/{provider}", self.receive)

    def _count(self, provider: str, result: str, amount: int = 1) -> None:
        self._metrics.webhook_notifications.labels(provider, result).inc(amount)

    async def receive(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        lane = self._lanes.get(name)
        adapter = lane.provider if lane is not None else None
        if adapter is None or not isinstance(adapter, NotifiedProvider):
            self._count("-", "no_such_receiver")
            log.warning("webhook.no_receiver", provider=name[:64], remote=request.remote)
            return web.json_response(
                {"error": f"no provider connection {name[:64]!r} that takes notifications"}, status=404
            )
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            self._count(name, "malformed")
            return web.json_response({"error": "notification too large"}, status=413)
        body = await request.read()
        try:
            verdict = adapter.read_notification(body, request.headers)
        except Exception as error:  # an adapter bug on unforeseen input: refused and counted, never a 500
            self._count(name, "malformed")
            # Never the body. The traceback once per provider and kind of error: unauthenticated
            # senders can repeat it at will, and one traceback is what a fix needs.
            seen = (name, type(error).__name__)
            fields = {"provider": name, "body_bytes": len(body), "remote": request.remote}
            if seen in self._tracebacks_logged:
                log.error("webhook.unreadable", error=type(error).__name__, **fields)
            else:
                self._tracebacks_logged.add(seen)
                log.exception("webhook.unreadable", **fields)
            return web.json_response({"error": "unreadable notification"}, status=400)
        if isinstance(verdict, NotificationRefused):
            self._count(name, verdict.kind)
            log.warning(
                "webhook.refused",
                provider=name,
                kind=verdict.kind,
                reason=verdict.reason,
                remote=request.remote,
            )
            return web.json_response({"error": verdict.reason}, status=verdict.status)
        if verdict.ignored:
            self._count(name, "ignored", verdict.ignored)
        settled = 0
        try:
            for notice in verdict.notices:
                settled += await self._settle(name, notice)
        except DB_ERRORS as error:
            # Not acknowledged: the provider sends the notification again later.
            log.error("webhook.database_error", provider=name, error=repr(error))
            return web.json_response({"error": "database unavailable, send again later"}, status=503)
        if settled:
            self._on_recorded()
        return web.Response(body=verdict.answer, content_type=verdict.content_type)

    async def _settle(self, provider: str, notice: ReversalNotice) -> int:
        outcome, reversal = await settle_by_notice(
            self._pool,
            Notice(
                provider=provider,
                provider_ref=notice.provider_ref,
                idempotency_key=notice.idempotency_key,
                key_digest=notice.key_digest,
                operation=notice.operation,
                amount_minor=notice.amount_minor,
                currency=notice.currency,
                result=notice.result,
            ),
        )
        self._count(provider, outcome.value)
        fields = {
            "provider": provider,
            "operation": notice.operation.value,
            "provider_ref": notice.provider_ref,
            "idempotency_key": reversal.idempotency_key if reversal else notice.idempotency_key,
            "outcome": notice.result.outcome.value,
            "reason": notice.result.reason,
            "result": outcome.value,
        }
        if outcome is Settled.SETTLED:
            assert reversal is not None  # settled means found
            self._metrics.refunds.labels(provider, reversal_state_of(notice.result).value).inc()
            log.info("refund.notified", original_idempotency_key=reversal.original_idempotency_key, **fields)
            return 1
        if outcome is Settled.ALREADY:
            log.info("webhook.duplicate", **fields)
        elif outcome is Settled.CONFLICT:
            # payd recorded the other final state (an operator's settle, most often). A provider
            # success after payd's "failed" released an amount the provider did refund: another
            # refund of the charge can now exceed it. Loud, for an operator to reconcile by hand.
            assert reversal is not None  # a conflict means found
            succeeded = notice.result.outcome is Outcome.APPROVED
            log.error(
                "webhook.conflict",
                original_idempotency_key=reversal.original_idempotency_key,
                recorded="failed" if succeeded else "succeeded",
                notified="succeeded" if succeeded else "failed",
                advice="the provider's outcome differs from payd's record: check the provider's "
                "dashboard; if it refunded, its amount is no longer reserved against the charge",
                **fields,
            )
        else:
            log.warning(
                "webhook.not_settled",
                notice_amount_minor=notice.amount_minor,
                notice_currency=notice.currency,
                **fields,
            )
        return 0
