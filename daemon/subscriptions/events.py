"""``subscription.*`` events as they go into the outbox, and from there to ``payd.events``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

import msgspec

from daemon.events import OutboxRow, event_row, iso_utc, stable_id
from daemon.subscriptions.lifecycle import Change
from daemon.subscriptions.model import Subscription

_NAMESPACE: Final = uuid.UUID("0b9c8f7e-2a41-4d3b-9e1c-5d7a6f4e3b20")


class SubscriptionEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Published with routing key ``type``; consumers dedupe on ``event_id``."""

    event_id: str
    type: str
    occurred_at: str
    subscription_id: int
    cycle: int
    status_before: str
    status_after: str
    idempotency_key: str
    """The attempt that caused the change (or the dispatch that was refused)."""
    paid_cycle: int
    current_period_end: str | None
    next_attempt_at: str | None
    reason: str | None
    decline_code: str | None
    deferred_by: str | None = None
    """``subscription.retry_deferred``: the card-network rule that held the try back."""
    retry_at: str | None = None
    """``subscription.retry_deferred``: when the try is looked at again."""


def event_id(idempotency_key: str, event_type: str) -> str:
    """One attempt moves its subscription at most once, so its key names the change."""
    return stable_id(_NAMESPACE, idempotency_key, event_type)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else iso_utc(moment)


def subscription_event(sub: Subscription, change: Change, *, occurred_at: str) -> OutboxRow:
    """The outbox row announcing ``change``; ``sub`` is the subscription after it."""
    event_type = f"subscription.{change.kind.value}"
    # A try may be deferred more than once: each deferral is its own event.
    cause = change.idempotency_key
    if change.retry_at is not None:
        cause = f"{cause}@{_iso(change.retry_at)}"
    identifier = event_id(cause, event_type)
    event = SubscriptionEvent(
        event_id=identifier,
        type=event_type,
        occurred_at=occurred_at,
        subscription_id=sub.id,
        cycle=change.cycle,
        status_before=change.status_before.value,
        status_after=sub.status.value,
        idempotency_key=change.idempotency_key,
        paid_cycle=sub.paid_cycle,
        current_period_end=_iso(sub.current_period_end),
        next_attempt_at=_iso(sub.next_attempt_at),
        reason=change.reason,
        decline_code=change.decline_code,
        deferred_by=change.deferred_by,
        retry_at=_iso(change.retry_at),
    )
    return event_row(identifier, event_type, event)
