"""Events as they go into the outbox, and from there to ``payd.events``: how every event
is built (a stable id, one timestamp format, the row), and the ``payment.*`` events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Final

import msgspec

from daemon.models import AttemptRequest, AttemptState, ChargeResult, PaymentEvent

_NAMESPACE: Final = uuid.UUID("6f1b0c52-8d8e-4c1e-9a53-3f0c1f3a9d21")
_encode = msgspec.json.Encoder().encode

ROUTING_KEY_OF_STATE: Final[dict[AttemptState, str]] = {
    AttemptState.SUCCEEDED: "payment.succeeded",
    AttemptState.DECLINED: "payment.declined",
    AttemptState.FAILED: "payment.failed",
    AttemptState.UNKNOWN: "payment.unknown",
}


class OutboxRow(msgspec.Struct, frozen=True):
    event_id: str
    target: str
    routing_key: str
    payload: bytes


def stable_id(namespace: uuid.UUID, cause: str, kind: str) -> str:
    """Deterministic: the same cause and kind always give the same id, so re-publishing dedupes."""
    return str(uuid.uuid5(namespace, f"{cause}/{kind}"))


def event_row(identifier: str, routing_key: str, event: msgspec.Struct) -> OutboxRow:
    """The outbox row of one event for ``payd.events``."""
    return OutboxRow(identifier, "events", routing_key, _encode(event))


def event_id(idempotency_key: str, state: AttemptState) -> str:
    return stable_id(_NAMESPACE, idempotency_key, state.value)


def iso_utc(moment: datetime) -> str:
    """Every timestamp in an event: ISO 8601, UTC, microseconds, ``Z``. A naive datetime is
    UTC already (read from the database, whose sessions run at ``+00:00``)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


def now_iso() -> str:
    return iso_utc(datetime.now(UTC))


def payment_event(
    *,
    attempt_id: int,
    request: AttemptRequest,
    state: AttemptState,
    result: ChargeResult,
    occurred_at: str,
    provider: str | None = None,
) -> OutboxRow:
    """``provider`` is the connection that was called, when a failover made it another."""
    routing_key = ROUTING_KEY_OF_STATE[state]
    identifier = event_id(request.idempotency_key, state)
    event = PaymentEvent(
        event_id=identifier,
        type=routing_key,
        occurred_at=occurred_at,
        idempotency_key=request.idempotency_key,
        subscription_id=request.subscription_id,
        cycle=request.cycle,
        provider=provider or request.provider,
        amount_minor=request.amount_minor,
        currency=request.currency,
        outcome=result.outcome.value,
        decline_code=result.decline_code,
        provider_ref=result.provider_ref,
        attempt_id=attempt_id,
        state=state.value,
        reason=result.reason,
    )
    return event_row(identifier, routing_key, event)
