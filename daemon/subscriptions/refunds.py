"""What a refund does to the subscription of the charge it refunds, inside the refund's commit.

A refund request may carry ``subscription_action`` (``"cancel"`` or ``"pause"``;
``payd refund KEY --then cancel``). When that refund succeeds and, with the
charge's other succeeded refunds, leaves nothing of the charge unrefunded, and
the charge is a renewal of a subscription payd holds, the subscription is
canceled or paused through the lifecycle (``lifecycle.refunded``) and its
``subscription.canceled`` / ``subscription.paused`` event, whose reason names the
refund, goes into the outbox in the same commit as the refund's outcome. In
every other case (a partial refund, a failed or unknown refund, a one-off
charge, a subscription already canceled) the subscription is left as it is,
and the refund's event says why in ``subscription_effect``.

The refunded total is read with a locking read of the charge's reversals: a
concurrent refund of the same charge that is being recorded is waited for, so
two refunds completing the charge at once cannot both see it partial.
"""

from __future__ import annotations

from typing import Final

import msgspec

from daemon.models import ReversalRequest, ReversalState, SubscriptionAction
from daemon.storage.db import Cursor, fetch_all, fetch_one
from daemon.storage.outbox import insert_outbox
from daemon.subscriptions.events import subscription_event
from daemon.subscriptions.lifecycle import refunded
from daemon.subscriptions.store import lock_subscriptions, save_subscriptions

EFFECT_OF_ACTION: Final = {SubscriptionAction.CANCEL: "canceled", SubscriptionAction.PAUSE: "paused"}


class _Asked(msgspec.Struct, array_like=True, frozen=True):
    subscription_action: SubscriptionAction | None
    original_attempt_id: int | None
    charged_minor: int | None


class _Amount(msgspec.Struct, array_like=True, frozen=True):
    amount_minor: int
    state: ReversalState


class SubscriptionFollow(msgspec.Struct, frozen=True, kw_only=True):
    """What a refund asked of its subscription and what came of it (for the refund's event)."""

    action: SubscriptionAction
    effect: str
    """``canceled`` / ``paused`` (done, ``subscription.*`` event written), ``waiting: ...`` (the
    refund is unknown) or ``none: WHY``."""


async def follow_refund(
    cursor: Cursor, reversal: ReversalRequest, state: ReversalState, *, occurred_at: str
) -> SubscriptionFollow | None:
    """Apply the refund's ``subscription_action`` now that it is ``state`` (see the module).

    None when the refund asked nothing of its subscription. Runs in the transaction that
    records the refund's outcome, after its row was updated.
    """
    await cursor.execute(
        "SELECT r.subscription_action, r.original_attempt_id, a.amount_minor FROM reversals r "
        "LEFT JOIN attempts a ON a.id = r.original_attempt_id WHERE r.id = %s",
        (reversal.reversal_id,),
    )
    asked = await fetch_one(cursor, _Asked)
    action = asked.subscription_action
    if action is None:
        return None

    def nothing(why: str) -> SubscriptionFollow:
        return SubscriptionFollow(action=action, effect=f"none: {why}")

    if state.value in ("unknown", "pending"):  # an outcome still to come
        return SubscriptionFollow(
            action=action,
            effect=f"waiting: the refund is {state.value}; the subscription follows if it succeeds",
        )
    if state is not ReversalState.SUCCEEDED:
        return nothing(f"the refund is {state.value}; the subscription is left as it is")
    if reversal.subscription_id is None or asked.original_attempt_id is None:
        return nothing("the charge is not a subscription's renewal")
    await cursor.execute(
        "SELECT amount_minor, state FROM reversals WHERE original_attempt_id = %s LOCK IN SHARE MODE",
        (asked.original_attempt_id,),
    )
    total = sum(
        r.amount_minor for r in await fetch_all(cursor, _Amount) if r.state is ReversalState.SUCCEEDED
    )
    charged = asked.charged_minor or 0
    if total < charged:
        return nothing(
            f"a partial refund ({total} of {charged} {reversal.currency} refunded); "
            f"subscription {reversal.subscription_id} is left as it is"
        )
    sub = (await lock_subscriptions(cursor, [reversal.subscription_id])).get(reversal.subscription_id)
    if sub is None:
        return nothing(f"subscription {reversal.subscription_id} is not one payd holds")
    before = sub.status
    change = refunded(
        sub,
        action,
        key=reversal.idempotency_key,
        reason=f"refunded: {reversal.idempotency_key} refunded charge {reversal.original_idempotency_key}",
    )
    if change is None:
        return nothing(f"subscription {sub.id} is already {before.value}")
    await save_subscriptions(cursor, [sub], [sub.id])
    await insert_outbox(cursor, [subscription_event(sub, change, occurred_at=occurred_at)])
    return SubscriptionFollow(action=action, effect=EFFECT_OF_ACTION[action])
