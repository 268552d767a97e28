"""``payd refund KEY [--amount N] [--reason R] [--then cancel|pause]``: refund a succeeded charge.

The command checks what it can see (the charge succeeded, the amount fits what
remains) so an operator hears a refusal at once, then publishes the request on
``payd.attempts`` and waits for the broker's confirm. The daemon decides: its
claim enforces invariant 7 again under the charge's row lock, so two operators
refunding the same charge at once cannot over-refund. The refund's own key
defaults to ``refund:KEY:N`` (N counts the charge's reversals so far), so the same
command run twice by accident before the first is claimed is one refund, not two.
``--then cancel|pause`` asks the charge's subscription to follow a full refund
(``daemon.subscriptions.refunds``). ``POST /admin/attempts/{key}/refund`` does the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import socket
import sys
from typing import Final, TextIO

import aiomysql
import msgspec
import structlog

from daemon.broker import Broker, BrokerUnavailable
from daemon.config import Config
from daemon.models import AttemptState, RefundRequest, SubscriptionAction
from daemon.operator.commands import resolve_operator
from daemon.operator.keys import is_idempotency_key
from daemon.secrets import load_secret
from daemon.storage.db import close_pool, open_pool, transaction
from daemon.storage.reversals import ReversalLine, reserved_minor, reversals_of
from daemon.subscriptions.refunds import EFFECT_OF_ACTION

_MAX_KEY: Final = 128
log = structlog.get_logger("payd.operator")


REFUND_ACTION: Final = "refund"
"""The ``attempt_audit`` action of a refund an operator asked for (on the charge's key)."""


class RefundRefused(Exception):
    """Why the command publishes nothing (exit 1)."""


class ChargeNotFound(RefundRefused):
    """No attempt has the key the refund names."""


class RefundNotConfirmed(Exception):
    """The broker did not confirm the publish: the request may or may not be queued. Asking
    again with the same refund key is safe (the daemon's claim deduplicates by key)."""

    def __init__(self, refund_key: str, why: str) -> None:
        super().__init__(
            f"refund {refund_key} was not confirmed by the broker ({why}): it may still be queued; "
            f"ask again with the same refund key ({refund_key}), which is one refund however often it is sent"
        )
        self.refund_key = refund_key


PUBLISH_CONFIRM_S: Final = 10.0
"""How long one refund's publish waits for the broker's confirm (a broker under a resource alarm
never confirms): past it the refund is not confirmed, and the caller is told its key."""


class Published(msgspec.Struct, frozen=True, kw_only=True):
    request: RefundRequest
    currency: str
    charged_minor: int
    remaining_after_minor: int
    """What would remain of the charge once this refund succeeds."""
    charge_id: int
    recorded: bool = False
    """The daemon already holds a refund under this key (asked again with the same
    ``refund_key``): nothing is published, the answer is that refund's key."""


class _Charge(msgspec.Struct, frozen=True, array_like=True):
    id: int
    state: AttemptState
    amount_minor: int
    currency: str


def default_refund_key(original_key: str, earlier: int) -> str:
    key = f"refund:{original_key}:{earlier + 1}"
    if len(key) <= _MAX_KEY:
        return key
    # A long charge key: its digest keeps the refund key within the alphabet's 128 characters.
    return f"refund:{hashlib.sha256(original_key.encode()).hexdigest()[:40]}:{earlier + 1}"


def plan_refund(
    original_key: str,
    charge: _Charge | None,
    lines: list[ReversalLine],
    *,
    amount: int | None,
    reason: str | None,
    refund_key: str | None,
    then: SubscriptionAction | None = None,
) -> Published:
    if charge is None:
        raise ChargeNotFound(f"no charge with key {original_key}")
    if charge.state is not AttemptState.SUCCEEDED:
        raise RefundRefused(
            f"charge {original_key} is {charge.state.value}: only a succeeded charge is refunded"
        )
    remaining = charge.amount_minor - reserved_minor(lines)
    if remaining <= 0:
        raise RefundRefused(
            f"nothing remains of charge {original_key}: {charge.amount_minor} already refunded"
        )
    wanted = remaining if amount is None else amount
    if not 0 < wanted <= remaining:
        raise RefundRefused(
            f"{wanted} is not within what remains of charge {original_key}: {remaining} {charge.currency}"
        )
    request = msgspec.convert(
        {
            "operation": "refund",
            "idempotency_key": refund_key or default_refund_key(original_key, len(lines)),
            "original_idempotency_key": original_key,
            "amount_minor": wanted,
            "reason": reason,
            "subscription_action": then,
        },
        RefundRequest,
    )
    return Published(
        request=request,
        currency=charge.currency,
        charged_minor=charge.amount_minor,
        remaining_after_minor=remaining - wanted,
        charge_id=charge.id,
    )


async def prepare_refund(
    pool: aiomysql.Pool,
    original_key: str,
    *,
    amount: int | None,
    reason: str | None,
    refund_key: str | None,
    then: SubscriptionAction | None = None,
) -> Published:
    """The refund request to publish, or ``RefundRefused`` (also for a request that does not
    validate: the message names the field)."""
    if not is_idempotency_key(original_key):
        raise ChargeNotFound(f"no charge with key {original_key!r} (not an idempotency key)")
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id, state, amount_minor, currency FROM attempts WHERE idempotency_key = %s",
            (original_key,),
        )
        row = await cursor.fetchone()
        lines = await reversals_of(cursor, original_key)
        held = None
        if refund_key is not None:
            await cursor.execute(
                "SELECT original_idempotency_key, amount_minor FROM reversals WHERE idempotency_key = %s",
                (refund_key,),
            )
            held = await cursor.fetchone()
    if held is not None and row is not None:
        return _asked_again(
            original_key, refund_key or "", msgspec.convert(row, _Charge), lines, held, amount=amount
        )
    try:
        return plan_refund(
            original_key,
            msgspec.convert(row, _Charge) if row else None,
            lines,
            amount=amount,
            reason=reason,
            refund_key=refund_key,
            then=then,
        )
    except msgspec.ValidationError as invalid:
        raise RefundRefused(str(invalid)) from None


def _asked_again(
    original_key: str,
    refund_key: str,
    charge: _Charge,
    lines: list[ReversalLine],
    held: tuple[str, int],
    *,
    amount: int | None,
) -> Published:
    """A refund key the daemon already holds: the same refund asked again (a retry after an
    answer that was lost) is answered with that refund; the key reused for another charge or
    amount is refused (the daemon would refuse it too: ``mismatched``)."""
    held_for, held_minor = held
    if held_for != original_key or (amount is not None and amount != held_minor):
        raise RefundRefused(
            f"refund key {refund_key} already names a refund of {held_minor} of charge {held_for}: "
            "choose another refund key for another refund"
        )
    line = next(line for line in lines if line.idempotency_key == refund_key)
    return Published(
        request=RefundRequest(
            operation="refund",
            idempotency_key=refund_key,
            original_idempotency_key=original_key,
            amount_minor=held_minor,
            reason=line.reason,
            subscription_action=line.subscription_action,
        ),
        currency=charge.currency,
        charged_minor=charge.amount_minor,
        remaining_after_minor=max(0, charge.amount_minor - reserved_minor(lines)),
        charge_id=charge.id,
        recorded=True,
    )


async def publish_refund(config: Config, plan: Published) -> None:
    """Publish the request on ``payd.attempts`` and wait for the broker's confirm, at most
    ``PUBLISH_CONFIRM_S``; ``RefundNotConfirmed`` otherwise (the key says how to ask again)."""
    key = plan.request.idempotency_key
    broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"))
    try:
        async with asyncio.timeout(PUBLISH_CONFIRM_S):
            await broker.connect()
            await broker.publish("", broker.topology.attempts_queue, msgspec.json.encode(plan.request))
    except TimeoutError:
        raise RefundNotConfirmed(key, f"no confirm within {PUBLISH_CONFIRM_S:g}s") from None
    except BrokerUnavailable as error:
        raise RefundNotConfirmed(key, str(error)) from None
    finally:
        await broker.close()


async def audit_refund(pool: aiomysql.Pool, plan: Published, *, operator: str, via: str) -> None:
    """Who asked for the refund, from where and why, on the charge's story (``attempt_audit``)."""
    request = plan.request
    then = (
        f", then {request.subscription_action.value} its subscription" if request.subscription_action else ""
    )
    asked = f"refund {request.idempotency_key} of {request.amount_minor} {plan.currency}{then}"
    said = f"{asked}: {request.reason or '-'}"
    async with transaction(pool) as cursor:
        # The same refund asked again before the daemon claimed it is published again (the key
        # deduplicates) but recorded once.
        escaped = request.idempotency_key.replace("_", r"\_")  # LIKE's one-character wildcard
        await cursor.execute(
            "SELECT 1 FROM attempt_audit WHERE idempotency_key = %s AND action = %s AND reason LIKE %s",
            (request.original_idempotency_key, REFUND_ACTION, f"refund {escaped} of %"),
        )
        if await cursor.fetchone() is not None:
            return
        await cursor.execute(
            "INSERT INTO attempt_audit (attempt_id, idempotency_key, action, operator, via, reason) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (
                plan.charge_id,
                request.original_idempotency_key,
                REFUND_ACTION,
                operator[:128],
                via[:128],
                said[:255],
            ),
        )


async def order_refund(
    pool: aiomysql.Pool,
    config: Config,
    original_key: str,
    *,
    amount: int | None,
    reason: str | None,
    refund_key: str | None,
    then: SubscriptionAction | None,
    operator: str,
    via: str,
) -> Published:
    """Check, publish (confirmed) and audit one refund; ``RefundRefused`` when nothing is published.

    The audit row is written once the broker has confirmed: it records a refund that was asked
    for. The daemon's claim still decides (invariant 7 under the charge's row lock).
    """
    plan = await prepare_refund(
        pool, original_key, amount=amount, reason=reason, refund_key=refund_key, then=then
    )
    if plan.recorded:  # asked again: the daemon holds it, its audit was written the first time
        return plan
    return await publish_and_audit(pool, config, plan, operator=operator, via=via)


async def publish_and_audit(
    pool: aiomysql.Pool, config: Config, plan: Published, *, operator: str, via: str
) -> Published:
    """Publish (confirmed, or ``RefundNotConfirmed``), then write the audit row; a failure of
    the audit is logged (``refund.audit_failed``), never raised: the refund is published."""
    await publish_refund(config, plan)
    original_key = plan.request.original_idempotency_key
    try:
        await audit_refund(pool, plan, operator=operator, via=via)
    except Exception as error:  # whatever it is, the refund stands: said, not raised
        # Published and confirmed: reporting a failure now could make the operator ask again,
        # under the next refund key. The refund stands; the missing audit row is said loudly.
        log.error(
            "refund.audit_failed",
            idempotency_key=plan.request.idempotency_key,
            original_idempotency_key=original_key,
            operator=operator,
            via=via,
            error=repr(error),
        )
    return plan


async def refund(
    config: Config,
    original_key: str,
    *,
    amount: int | None,
    reason: str | None,
    refund_key: str | None,
    then: SubscriptionAction | None = None,
    operator: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    # The account running the command when nothing names anyone (a refund asked for before
    # ``--operator`` existed still works): the audit then records that account.
    who = resolve_operator(operator) or pwd.getpwuid(os.getuid()).pw_name
    pool = await open_pool(config.mysql, load_secret("mysql_password"))
    try:
        plan = await order_refund(
            pool,
            config,
            original_key,
            amount=amount,
            reason=reason,
            refund_key=refund_key,
            then=then,
            operator=who,
            via=f"cli@{socket.gethostname()}",
        )
    except RefundRefused as refusal:
        print(f"payd refund: refused: {refusal}", file=err)
        return 1
    except RefundNotConfirmed as unconfirmed:
        print(f"payd refund: {unconfirmed} (--refund-key {unconfirmed.refund_key})", file=err)
        return 1
    finally:
        await close_pool(pool)
    follow = (
        ""
        if then is None
        else f"; once it succeeds and nothing of the charge remains, its subscription is "
        f"{EFFECT_OF_ACTION[then]}"
    )
    if plan.recorded:
        print(
            f"refund {plan.request.idempotency_key} of {plan.request.amount_minor} {plan.currency} "
            f"for charge {original_key} is already with the daemon; nothing published again. Follow it: "
            f"payd attempts show {original_key}",
            file=out,
        )
        return 0
    print(
        f"published refund {plan.request.idempotency_key} of {plan.request.amount_minor} {plan.currency} "
        f"for charge {original_key} (confirmed by the broker); {plan.remaining_after_minor} of "
        f"{plan.charged_minor} would remain{follow}. Follow it: payd attempts show {original_key}",
        file=out,
    )
    return 0
