"""Dispatching a try through the outbox: the queued attempt row, the request message, the
subscription pushed out, all in the caller's transaction.

A crash before the commit dispatches nothing (the subscription stays due); a
crash after it loses nothing (the outbox relay publishes the message). Keys
are deterministic per (subscription, cycle, try), so publishing a request
twice is one attempt: the claim step stops the duplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Final

import msgspec

from daemon.events import OutboxRow, stable_id
from daemon.models import AttemptRequest, AttemptState
from daemon.pipeline.intake import Invalid, decode_request
from daemon.storage.attempts import RequestRow, request_from
from daemon.storage.db import Cursor, fetch_all, placeholders
from daemon.subscriptions.model import Subscription, dispatch_key
from daemon.subscriptions.policy import SubscriptionPolicy

_NAMESPACE: Final = uuid.UUID("5c2e1a7d-93b4-4f0e-8a6d-1e2f3a4b5c6d")
_encode = msgspec.json.Encoder().encode
# The nine columns of ``RequestRow``, in its order.
_REQUEST_COLUMNS: Final = (
    "idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
    "payment_method, customer_ref, metadata"
)


class _ExistingRow(RequestRow, array_like=True, frozen=True):
    """``_REQUEST_COLUMNS``, then the attempt's state."""

    state: AttemptState


class ExistingAttempt(msgspec.Struct, frozen=True):
    state: AttemptState
    request: AttemptRequest


async def existing_attempts(cursor: Cursor, keys: Sequence[str]) -> dict[str, ExistingAttempt]:
    """The attempts these keys already have (a plain read: no lock on ``attempts``)."""
    if not keys:
        return {}
    await cursor.execute(
        f"SELECT {_REQUEST_COLUMNS}, state FROM attempts "  # noqa: S608 (placeholders only)
        f"WHERE idempotency_key IN ({placeholders(len(keys))})",
        list(keys),
    )
    return {
        row.idempotency_key: ExistingAttempt(row.state, request_from(row))
        for row in await fetch_all(cursor, _ExistingRow)
    }


class Undispatchable(Exception):
    """The subscription's data cannot make a valid request (the intake would dead-letter it)."""


def start_try(
    sub: Subscription, *, now: datetime, policy: SubscriptionPolicy, providers: Collection[str]
) -> tuple[AttemptRequest, OutboxRow]:
    """Open the next try of the current cycle: the request, with its deterministic key, and the
    outbox row that sends it.

    The request is checked by the very decoder the daemons' intake uses, so a
    row with bad data (a zero amount, a card number for a token) is refused
    here, with the reason, instead of looping through the dead-letter queue.
    The subscription then waits on the try (``pending_key``) and is looked at
    again after ``dispatch_timeout_s`` should no outcome be recorded by then.
    """
    key = dispatch_key(sub.id, sub.cycle, sub.next_try)
    try:
        request = AttemptRequest(
            idempotency_key=key,
            subscription_id=sub.id,
            cycle=sub.cycle,
            amount_minor=sub.amount_minor,
            currency=sub.currency,
            provider=sub.provider,
            payment_method=sub.payment_method,
            customer_ref=sub.customer_ref,
            previous_payment_ref=sub.previous_payment_ref,
        )
    except ValueError as error:
        raise Undispatchable(str(error)) from None
    message = request_message(request)
    checked = decode_request(message.payload, providers)
    if isinstance(checked, Invalid):
        raise Undispatchable(checked.reason)
    sub.pending_key = key
    sub.next_try += 1
    sub.next_attempt_at = now + timedelta(seconds=policy.dispatch_timeout_s)
    return request, message


def request_message(request: AttemptRequest) -> OutboxRow:
    """The outbox row that puts ``request`` on ``payd.attempts``; the same key, the same message id."""
    message_id = stable_id(_NAMESPACE, request.idempotency_key, "dispatch")
    return OutboxRow(message_id, "attempts", "attempts", _encode(request))
