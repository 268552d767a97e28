"""What a recorded attempt outcome does to its subscription, inside the record's own commit."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from daemon.events import OutboxRow
from daemon.models import AttemptRequest, AttemptState, ChargeResult
from daemon.storage.db import Cursor
from daemon.storage.outbox import insert_outbox
from daemon.subscriptions.events import subscription_event
from daemon.subscriptions.lifecycle import settle_outcome
from daemon.subscriptions.model import Subscription
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.store import database_now, lock_subscriptions, save_subscriptions


async def apply_subscription_effects(
    cursor: Cursor,
    outcomes: Sequence[tuple[AttemptRequest, AttemptState, ChargeResult]],
    *,
    occurred_at: str,
    policy: SubscriptionPolicy,
) -> None:
    """Called by ``write_outcomes`` with every state change it is about to commit.

    Locks the subscriptions concerned (in id order, so concurrent record
    batches cannot deadlock on them), moves each through its lifecycle, and
    writes the changed rows and their ``subscription.*`` events in the same
    transaction as the outcomes themselves. Attempts without a subscription,
    or for one payd does not hold, change nothing.
    """
    relevant = [item for item in outcomes if item[0].subscription_id is not None]
    if not relevant:
        return
    ids = sorted({request.subscription_id for request, _, _ in relevant if request.subscription_id})
    subs = await lock_subscriptions(cursor, ids)
    if not subs:
        return
    now = await database_now(cursor)
    before: dict[int, Subscription] = {}
    events: list[OutboxRow] = []
    for request, state, result in relevant:
        sub = subs.get(request.subscription_id or 0)
        if sub is None:
            continue
        before.setdefault(sub.id, msgspec.structs.replace(sub))
        change = settle_outcome(sub, request, state, result, now=now, policy=policy)
        if change is not None:
            events.append(subscription_event(sub, change, occurred_at=occurred_at))
    changed = [subs[sid] for sid, old in before.items() if subs[sid] != old]
    await save_subscriptions(cursor, changed, [s.id for s in changed if s.status != before[s.id].status])
    await insert_outbox(cursor, events)
