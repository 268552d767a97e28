"""The operator commands behind the control endpoint's bearer token, under ``/admin/``.

    GET  /admin/attempts?state=unknown&provider=P&older_than=2h&limit=100
    GET  /admin/attempts/{key}                       the story (as ``payd attempts show --json``)
    POST /admin/attempts/{key}/settle                {"as": "failed", "reason": "...", "operator": "..."}
    POST /admin/attempts/{key}/refund                {"amount_minor": 300, "reason": "...",
                                                      "subscription_action": "cancel", "operator": "..."}
    GET  /admin/dead?limit=1000
    POST /admin/dead/replay                          {"all": true} or {"ids": ["..."]}

Registered on the ``/admin/`` sub-application, whose middleware checks the
bearer token for every route (``daemon.control``). Orders that change something
also need the operator's name, in an ``X-Payd-Operator`` header or an
``operator`` field: the token says a holder may act, the name says who did, and
it is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import aiomysql
import msgspec
import structlog
from aiohttp import web

from daemon.config import Config
from daemon.models import AttemptState, IdempotencyKey, PositiveAmount, ShortText, SubscriptionAction
from daemon.operator.dead import DeadLetterQueueMissing, list_dead, replay_dead
from daemon.operator.listing import AttemptFilter, checked_limit, list_attempts, parse_duration
from daemon.operator.refund import (
    ChargeNotFound,
    Published,
    RefundNotConfirmed,
    RefundRefused,
    prepare_refund,
    publish_and_audit,
)
from daemon.operator.settle import (
    PROVIDER_REF_MAX,
    AttemptNotFound,
    SettleAs,
    SettleInvalid,
    SettleOrder,
    SettleRefused,
    settle_attempt,
)
from daemon.operator.story import load_story
from daemon.subscriptions.policy import SubscriptionPolicy

log = structlog.get_logger("payd.operator")

PASS_S = 3.0
"""How long one HTTP listing or replay pass reads: inside the admin routes' 5 s timeout. A
replay cut short says ``"complete": false``; asking again continues (nothing is lost between)."""

OPERATOR_HEADER = "X-Payd-Operator"
NO_OPERATOR = f"name the operator (printable ASCII): an {OPERATOR_HEADER} header or an operator field"

CHECK_S = 5.0
"""How long the refund route's checks (one read) may take; its publish is bounded by the
confirm wait (``daemon.operator.refund.PUBLISH_CONFIRM_S``), its audit by the pool's timeouts."""

REFUND_ROUTE = "admin_refund"
"""The route name of ``POST /admin/attempts/{key}/refund``: the admin guard leaves it out of its
overall timeout (``daemon.control``), which could otherwise fire after the broker confirmed."""


class OperatorTools:
    """What the operator routes need from the running daemon; owned by ``serve``."""

    def __init__(
        self, *, pool: aiomysql.Pool, config: Config, policy: SubscriptionPolicy, instance_id: str
    ) -> None:
        self.pool = pool
        self.config = config
        self.policy = policy
        """The daemon's own: a settle moves a subscription as the daemon's records do."""
        self.instance_id = instance_id
        self.refunds: set[asyncio.Task[Published]] = set()
        """Refunds being published and audited: each runs to its end even when its request
        is cancelled (the client left, the daemon stops)."""


class SettleBody(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename={"settle_as": "as"}
):
    settle_as: SettleAs
    reason: str
    operator: str | None = None
    provider_ref: Annotated[str, msgspec.Meta(max_length=PROVIDER_REF_MAX)] | None = None


class RefundBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """As ``payd refund``: every field optional (the amount defaults to what remains)."""

    amount_minor: PositiveAmount | None = None
    reason: ShortText | None = None
    refund_key: IdempotencyKey | None = None
    subscription_action: SubscriptionAction | None = None
    operator: str | None = None


class RefundAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """202: published on ``payd.attempts`` (confirmed); the daemon's claim decides from there."""

    idempotency_key: str
    original_idempotency_key: str
    amount_minor: int
    currency: str
    remaining_after_minor: int
    subscription_action: SubscriptionAction | None
    operator: str


class ReplayBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    all: bool = False
    ids: list[str] = msgspec.field(default_factory=list)
    operator: str | None = None


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


def _refund_route(tools: OperatorTools) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``POST /admin/attempts/{key}/refund``: ``payd refund`` behind the token, audited."""

    async def refund(request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=RefundBody)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            return _error(f"invalid body: {error}", 400)
        who = _operator_of(request, body.operator)
        if who is None:
            return _error(NO_OPERATOR, 400)
        key = request.match_info["key"]
        try:
            async with asyncio.timeout(CHECK_S):
                plan = await prepare_refund(
                    tools.pool,
                    key,
                    amount=body.amount_minor,
                    reason=body.reason,
                    refund_key=body.refund_key,
                    then=body.subscription_action,
                )
            if not plan.recorded:
                # Shielded: once published, the audit is written and the answer is 202, whatever
                # happens to this request; a retry with the same refund_key is the same refund.
                task = asyncio.create_task(
                    publish_and_audit(
                        tools.pool, tools.config, plan, operator=who, via=f"control:{tools.instance_id}"
                    )
                )
                tools.refunds.add(task)
                task.add_done_callback(tools.refunds.discard)
                plan = await asyncio.shield(task)
        except ChargeNotFound as missing:
            return _error(str(missing), 404)
        except RefundRefused as refusal:
            return _error(str(refusal), 409)
        except RefundNotConfirmed as unconfirmed:
            return _json({"error": str(unconfirmed), "idempotency_key": unconfirmed.refund_key}, 503)
        log.warning(
            "refund.ordered_by_operator",
            idempotency_key=plan.request.idempotency_key,
            original_idempotency_key=key,
            amount_minor=plan.request.amount_minor,
            subscription_action=body.subscription_action,
            operator=who,
        )
        return _json(
            RefundAccepted(
                idempotency_key=plan.request.idempotency_key,
                original_idempotency_key=key,
                amount_minor=plan.request.amount_minor,
                currency=plan.currency,
                remaining_after_minor=plan.remaining_after_minor,
                subscription_action=plan.request.subscription_action,
                operator=who,
            ),
            202,
        )

    return refund


def _operator_of(request: web.Request, named: str | None) -> str | None:
    """The operator's name, or None when none is given or it is not printable ASCII (a header
    of other bytes arrives as surrogates, which the audit row could not hold)."""
    who = (request.headers.get(OPERATOR_HEADER) or named or "").strip()
    return who if who and who.isascii() and who.isprintable() else None


def register_operator_routes(admin: web.Application, tools: OperatorTools) -> None:
    """Add the routes to ``admin``, the application mounted at ``/admin/`` behind the token."""

    operator_of = _operator_of

    async def show(request: web.Request) -> web.StreamResponse:
        story = await load_story(tools.pool, request.match_info["key"])
        return _json(story, 200 if story.found or story.subscription is not None else 404)

    async def list_(request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            older = query.get("older_than")
            wanted = AttemptFilter(
                state=AttemptState(query.get("state", "unknown")),
                provider=query.get("provider"),
                older_than_s=None if older is None else parse_duration(older),
                limit=checked_limit(int(query.get("limit", "100"))),
            )
        except ValueError as error:
            return _error(str(error), 400)
        return _json(await list_attempts(tools.pool, wanted))

    async def settle(request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read(), type=SettleBody)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            return _error(f"invalid body: {error}", 400)
        who = operator_of(request, body.operator)
        if who is None:
            return _error(NO_OPERATOR, 400)
        order = SettleOrder(
            idempotency_key=request.match_info["key"],
            settle_as=body.settle_as,
            reason=body.reason,
            operator=who,
            via=f"control:{tools.instance_id}",
            provider_ref=body.provider_ref,
        )
        try:
            settled = await settle_attempt(tools.pool, order, policy=tools.policy)
        except AttemptNotFound as missing:
            return _error(str(missing), 404)
        except SettleInvalid as invalid:
            return _error(str(invalid), 400)
        except SettleRefused as refusal:
            return _error(str(refusal), 409)
        log.warning(
            "attempt.settled_by_operator",
            operation=settled.operation,
            idempotency_key=settled.idempotency_key,
            # For a refund: the charge it refunds (attempt_id is that charge's row).
            original_idempotency_key=settled.original_idempotency_key,
            attempt_id=settled.attempt_id,
            state=settled.state.value,
            operator=who,
        )
        return _json(settled)

    async def dead(request: web.Request) -> web.StreamResponse:
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError as error:
            return _error(str(error), 400)
        if limit < 1:
            return _error(f"limit {limit}: at least 1", 400)
        try:
            return _json(await list_dead(tools.config, limit=limit, until=time.monotonic() + PASS_S))
        except ValueError as error:
            return _error(str(error), 400)
        except DeadLetterQueueMissing as error:
            return _error(str(error), 404)

    async def replay(request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=ReplayBody)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            return _error(f"invalid body: {error}", 400)
        who = operator_of(request, body.operator)
        if who is None:
            return _error(NO_OPERATOR, 400)
        if not body.all and not body.ids:
            return _error("name the dead letters to replay (ids) or all: true", 400)
        try:
            report = await replay_dead(
                tools.config,
                ids=None if body.all else body.ids,
                operator=f"{who} (control:{tools.instance_id})",
                progress=None,
                until=time.monotonic() + PASS_S,
            )
        except DeadLetterQueueMissing as error:
            return _error(str(error), 404)
        log.warning("dead_letters.replayed", count=len(report.replayed), operator=who)
        return _json(report)

    admin.router.add_get("/attempts", list_)
    admin.router.add_get("/attempts/{key}", show)
    admin.router.add_post("/attempts/{key}/settle", settle)
    admin.router.add_post("/attempts/{key}/refund", _refund_route(tools), name=REFUND_ROUTE)
    admin.router.add_get("/dead", dead)
    admin.router.add_post("/dead/replay", replay)
