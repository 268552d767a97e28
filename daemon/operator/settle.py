"""``payd attempts settle``: an operator closes a stuck unknown attempt, audited.

Only an ``unknown`` attempt can be settled: the operator has looked it up on
the provider's dashboard and says what happened. The settle is the same
transition the reconciler would have recorded, in one commit: the attempt
row, the subscription moved as a real outcome would move it, the ordinary
``payment.*`` and ``subscription.*`` events, and an ``attempt_audit`` row
naming who, when and why. The UPDATE is conditional on ``state = 'unknown'``
and its row count checked, so a reconciler settling the same row at the same
moment makes exactly one of the two win and the other change nothing.

A key that names an unknown or pending refund (and no unknown charge) settles
the refund the same way (a pending one: its provider's answer never came): the
operator has found it on the provider's dashboard, refunded
(``succeeded``) or not (``failed``: its amount no longer counts against the
charge). One commit writes the refund's row, its ``refund.*`` event, its
subscription's follow-up (``subscription_action``) and the audit row, which is
filed under the charge's key so the charge's story shows it. Settling, not
refusing: a refund parked or stuck unknown has no other exit than an operator's
word, and the charge's invariant 7 is kept by the same conditional update.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

import aiomysql
import msgspec

from daemon.events import now_iso, payment_event
from daemon.models import AttemptState, ChargeResult, Outcome, ReversalState
from daemon.operator.keys import is_idempotency_key
from daemon.storage.attempts import REQUEST_COLUMNS, request_from_row
from daemon.storage.db import Cursor, transaction
from daemon.storage.outbox import insert_outbox
from daemon.storage.reversals import UnknownReversal, lock_reversal, settle_unknown_reversal
from daemon.subscriptions.effects import apply_subscription_effects
from daemon.subscriptions.policy import SubscriptionPolicy

SETTLE_ACTION: Final = "settle"
OPERATOR_SETTLED: Final = "operator_settled"
"""The decline code a settled-as-failed attempt carries: nothing charged, by an operator's word."""


class SettleAs(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class SettleOrder(msgspec.Struct, frozen=True, kw_only=True):
    """What the operator says happened, and who says it."""

    idempotency_key: str
    settle_as: SettleAs
    reason: str
    operator: str
    via: str
    """Where the order came from: ``cli@HOST`` or ``control:INSTANCE``."""
    provider_ref: str | None = None
    """The provider's reference for the charge, when the dashboard shows one."""


SETTLE_REFUND_ACTION: Final = "settle_refund"
_SETTLEABLE_REFUND_STATES: Final = frozenset((ReversalState.UNKNOWN, ReversalState.PENDING))
"""A refund waiting on an answer only an operator may give now: unknown (parked or not), or
pending (accepted by its provider, whose notification never came)."""


class Settled(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: int
    """The charge's (for a refund, the charge it refunds)."""
    idempotency_key: str
    state: AttemptState
    subscription_id: int | None
    cycle: int | None
    operation: Literal["charge", "refund"] = "charge"
    original_idempotency_key: str | None = None
    """For a refund: the charge it refunds."""
    subscription_effect: str | None = None
    """For a refund that asked its subscription to follow: what came of it."""


class SettleRefused(Exception):
    """Nothing was changed; the message says why."""


class AttemptNotFound(SettleRefused):
    """No attempt has this key."""


class SettleInvalid(SettleRefused):
    """The order itself is incomplete or malformed (no reason, a reference too long)."""


PROVIDER_REF_MAX: Final = 128
"""The ``provider_ref`` columns' width."""


def _result(order: SettleOrder) -> ChargeResult:
    said = f"settled by {order.operator} ({order.via}): {order.reason}"[:255]
    if order.settle_as is SettleAs.SUCCEEDED:
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=order.provider_ref, reason=said)
    # Nothing was charged: for the subscription, like any failure that charged nothing
    # (a new try after ``failed_retry_s``), not a decline or a dunning step.
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        retryable=True,
        decline_code=OPERATOR_SETTLED,
        provider_ref=order.provider_ref,
        reason=said,
    )


class _SettleHead(msgspec.Struct, array_like=True, frozen=True):
    """The columns the settle reads before the request's."""

    id: int
    state: AttemptState
    routed_provider: str | None


async def settle_attempt(pool: aiomysql.Pool, order: SettleOrder, *, policy: SubscriptionPolicy) -> Settled:
    """Settle one unknown attempt as ``order`` says, or raise ``SettleRefused``; the subscription
    moves under ``policy``, as the record path would move it."""
    if not order.reason.strip():
        raise SettleInvalid("a reason is required: say what the provider's dashboard showed")
    if not order.operator.strip():
        raise SettleInvalid("the operator is unknown: name yourself (--operator NAME)")
    if order.provider_ref is not None and len(order.provider_ref) > PROVIDER_REF_MAX:
        raise SettleInvalid(
            f"provider_ref is {len(order.provider_ref)} characters: at most {PROVIDER_REF_MAX}"
        )
    if not is_idempotency_key(order.idempotency_key):
        raise AttemptNotFound(f"no attempt with key {order.idempotency_key!r} (not an idempotency key)")
    async with transaction(pool) as cursor:
        await cursor.execute(
            f"SELECT id, state, routed_provider, {REQUEST_COLUMNS} FROM attempts "  # noqa: S608
            "WHERE idempotency_key = %s FOR UPDATE",
            (order.idempotency_key,),
        )
        row = await cursor.fetchone()
        if row is None or msgspec.convert(row[:3], _SettleHead).state is not AttemptState.UNKNOWN:
            refund = await lock_reversal(cursor, order.idempotency_key)
            if refund is not None and (row is None or refund[0] in _SETTLEABLE_REFUND_STATES):
                return await _settle_refund(cursor, order, refund[0], refund[1])
        if row is None:
            raise AttemptNotFound(f"no attempt with key {order.idempotency_key} (nor a refund)")
        head = msgspec.convert(row[:3], _SettleHead)
        attempt_id, state, routed_provider = head.id, head.state, head.routed_provider
        if state is not AttemptState.UNKNOWN:
            raise SettleRefused(
                f"attempt {order.idempotency_key} is {state.value}; only an unknown attempt can be settled"
            )
        request = request_from_row(row[3:])
        new_state = AttemptState(order.settle_as.value)
        result = _result(order)
        if not await _conditional_update(cursor, attempt_id, new_state, result):
            raise SettleRefused(f"attempt {order.idempotency_key} was settled by someone else meanwhile")
        occurred_at = now_iso()
        await apply_subscription_effects(
            cursor, [(request, new_state, result)], occurred_at=occurred_at, policy=policy
        )
        await insert_outbox(
            cursor,
            [
                payment_event(
                    attempt_id=attempt_id,
                    request=request,
                    state=new_state,
                    result=result,
                    occurred_at=occurred_at,
                    provider=routed_provider,
                )
            ],
        )
        await cursor.execute(
            "INSERT INTO attempt_audit (attempt_id, idempotency_key, action, state_before, state_after, "
            "operator, via, reason, provider_ref) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                attempt_id,
                order.idempotency_key,
                SETTLE_ACTION,
                state.value,
                new_state.value,
                order.operator[:128],
                order.via[:128],
                order.reason[:255],
                order.provider_ref,
            ),
        )
    return Settled(
        attempt_id=attempt_id,
        idempotency_key=order.idempotency_key,
        state=new_state,
        subscription_id=request.subscription_id,
        cycle=request.cycle,
    )


async def _conditional_update(
    cursor: Cursor, attempt_id: int, state: AttemptState, result: ChargeResult
) -> bool:
    """The transition itself, only from unknown: False if the row is no longer unknown."""
    await cursor.execute(
        "UPDATE attempts SET state = %s, outcome = %s, decline_code = %s, "
        "provider_ref = COALESCE(%s, provider_ref), reason = %s, recheck_at = NULL, "
        "finished_at = NOW(6) WHERE id = %s AND state = 'unknown'",
        (
            state.value,
            result.outcome.value,
            result.decline_code,
            result.provider_ref,
            result.reason,
            attempt_id,
        ),
    )
    return bool(cursor.rowcount == 1)


async def _settle_refund(
    cursor: Cursor, order: SettleOrder, state: ReversalState, unknown: UnknownReversal | None
) -> Settled:
    key = order.idempotency_key
    if unknown is None or state not in _SETTLEABLE_REFUND_STATES:
        why = "; it named no charge and was refused at once, never sent" if unknown is None else ""
        raise SettleRefused(
            f"refund {key} is {state.value}{why}; only an unknown or pending refund can be settled"
        )
    reversal = unknown.reversal
    new_state = ReversalState(order.settle_as.value)
    result = _result(order)
    done, effect = await settle_unknown_reversal(cursor, reversal, new_state, result)
    if not done:
        raise SettleRefused(f"refund {key} was settled by someone else meanwhile")
    await cursor.execute(
        "INSERT INTO attempt_audit (attempt_id, idempotency_key, action, state_before, state_after, "
        "operator, via, reason, provider_ref) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            unknown.original_attempt_id,
            reversal.original_idempotency_key,
            SETTLE_REFUND_ACTION,
            state.value,
            new_state.value,
            order.operator[:128],
            order.via[:128],
            f"refund {key}: {order.reason}"[:255],
            order.provider_ref,
        ),
    )
    return Settled(
        attempt_id=unknown.original_attempt_id,
        idempotency_key=key,
        state=AttemptState(new_state.value),
        subscription_id=reversal.subscription_id,
        cycle=reversal.cycle,
        operation="refund",
        original_idempotency_key=reversal.original_idempotency_key,
        subscription_effect=effect,
    )
