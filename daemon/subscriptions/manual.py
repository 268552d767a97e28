"""``payd retry SUBSCRIPTION_ID``: one try of the unpaid cycle, now, through the outbox.

The same dispatch as the scheduler's (a queued attempt, its message in the
outbox, one commit), under the same rules: the card networks' limits apply, and a
canceled or paused subscription, or one with a try already under way, is
refused with the reason. The outcome moves the subscription like any other.
"""

from __future__ import annotations

from collections.abc import Collection

import aiomysql
import msgspec

from daemon.models import TERMINAL_STATES
from daemon.storage.db import transaction
from daemon.storage.outbox import insert_outbox
from daemon.subscriptions.dispatch import Undispatchable, existing_attempts, start_try
from daemon.subscriptions.model import SubscriptionStatus
from daemon.subscriptions.netbudget import NetworkCounters
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.store import (
    database_now,
    insert_queued_attempts,
    lock_subscriptions,
    save_subscriptions,
)


class RetryRefused(Exception):
    """The retry was not dispatched; the message says why and what would change it."""


class RetryDispatched(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: int
    cycle: int
    idempotency_key: str
    status: SubscriptionStatus


async def retry_subscription(
    pool: aiomysql.Pool, subscription_id: int, *, policy: SubscriptionPolicy, providers: Collection[str]
) -> RetryDispatched:
    """Dispatch one try of the subscription's unpaid cycle, or raise ``RetryRefused``."""
    async with transaction(pool) as cursor:
        sub = (await lock_subscriptions(cursor, [subscription_id])).get(subscription_id)
        if sub is None:
            raise RetryRefused(f"no subscription with id {subscription_id}")
        name = f"subscription {subscription_id}"
        if sub.status is SubscriptionStatus.CANCELED:
            why = f" ({sub.status_reason})" if sub.status_reason else ""
            raise RetryRefused(f"{name} is canceled{why}; a canceled subscription is never charged again")
        if sub.status is SubscriptionStatus.PAUSED:
            raise RetryRefused(f"{name} is paused; resume it before retrying")
        if sub.provider not in providers:
            raise RetryRefused(f"{name} is billed through provider {sub.provider!r}, not configured here")
        now = await database_now(cursor)
        if sub.pending_key is not None:
            existing = (await existing_attempts(cursor, [sub.pending_key])).get(sub.pending_key)
            if existing is not None and existing.state not in TERMINAL_STATES:
                raise RetryRefused(
                    f"{name}: attempt {sub.pending_key} for cycle {sub.cycle} is {existing.state.value}; "
                    "wait for its outcome"
                )
        if (
            sub.status is SubscriptionStatus.ACTIVE
            and sub.next_attempt_at is not None
            and sub.next_attempt_at > now
        ):
            held = f" (held back by {sub.deferred_by})" if sub.deferred_by else ""
            raise RetryRefused(
                f"{name} is active and cycle {sub.cycle} is not due until "
                f"{sub.next_attempt_at.isoformat(timespec='seconds')}Z{held}; nothing to retry"
            )
        counters = await NetworkCounters.load(cursor, [sub.payment_method], now=now)
        deferral = counters.check_subscription(sub, policy)
        if deferral is not None:
            raise RetryRefused(
                f"{name}: {deferral.reason} ({deferral.rule.source}); "
                f"it may be tried at {deferral.retry_at.isoformat(timespec='seconds')}Z"
            )
        try:
            request, message = start_try(sub, now=now, policy=policy, providers=providers)
        except Undispatchable as error:
            raise RetryRefused(f"{name} cannot be charged as it is: {error}") from None
        await insert_queued_attempts(cursor, [request])
        await insert_outbox(cursor, [message])
        await save_subscriptions(cursor, [sub])
    return RetryDispatched(
        subscription_id=sub.id,
        cycle=sub.cycle,
        idempotency_key=request.idempotency_key,
        status=sub.status,
    )
