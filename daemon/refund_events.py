"""Refund events as they go into the outbox: ``refund.succeeded|failed|unknown|pending`` on ``payd.events``.

``refund.pending`` says the provider accepted the reversal and will decide it later (Adyen); a
``refund.succeeded`` or ``refund.failed`` follows. A void's events carry ``operation: "void"``.
"""

from __future__ import annotations

import uuid
from typing import Final

import msgspec

from daemon.events import OutboxRow, event_row, stable_id
from daemon.models import ChargeResult, ReversalOperation, ReversalState

# Not the payment events' namespace: a refund key may equal a charge key (the alphabets are
# the same), and their events must never share an id.
_NAMESPACE: Final = uuid.UUID("0c6e5d0a-3b7e-4f55-9a0e-6a2f1d8c4b17")

ROUTING_KEY_OF_REVERSAL_STATE: Final[dict[ReversalState, str]] = {
    ReversalState.SUCCEEDED: "refund.succeeded",
    ReversalState.FAILED: "refund.failed",
    ReversalState.UNKNOWN: "refund.unknown",
    ReversalState.PENDING: "refund.pending",
}


class RefundEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Published with routing key ``type``; consumers dedupe on event_id."""

    event_id: str
    type: str
    occurred_at: str
    idempotency_key: str
    original_idempotency_key: str
    subscription_id: int | None
    cycle: int | None
    provider: str | None
    """None only for a refund refused because it named no known charge."""
    amount_minor: int
    currency: str | None
    outcome: str | None
    decline_code: str | None
    provider_ref: str | None
    reversal_id: int
    state: str
    reason: str | None = None
    operation: str = ReversalOperation.REFUND.value
    """``refund`` or ``void`` (cancelled before settlement)."""
    subscription_action: str | None = None
    """What the refund asked of the charge's subscription (``cancel``, ``pause``), if anything."""
    subscription_effect: str | None = None
    """What came of it: ``canceled``, ``paused`` or ``none: WHY`` (a partial or failed refund,
    a one-off charge, a subscription already canceled)."""


class RefundFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What an event says of the refund itself, whichever way it was read."""

    reversal_id: int
    idempotency_key: str
    original_idempotency_key: str
    provider: str | None
    amount_minor: int
    currency: str | None
    subscription_id: int | None = None
    cycle: int | None = None
    operation: ReversalOperation = ReversalOperation.REFUND


def refund_event_id(idempotency_key: str, state: ReversalState) -> str:
    """Deterministic: the same transition always carries the same id, so re-publishing dedupes."""
    return stable_id(_NAMESPACE, idempotency_key, state.value)


def refund_event(
    facts: RefundFacts,
    *,
    state: ReversalState,
    result: ChargeResult,
    occurred_at: str,
    subscription: tuple[str, str] | None = None,
) -> OutboxRow:
    """``subscription``: the refund's ``subscription_action`` and what came of it, when it asked one."""
    routing_key = ROUTING_KEY_OF_REVERSAL_STATE[state]
    identifier = refund_event_id(facts.idempotency_key, state)
    event = RefundEvent(
        event_id=identifier,
        type=routing_key,
        occurred_at=occurred_at,
        idempotency_key=facts.idempotency_key,
        original_idempotency_key=facts.original_idempotency_key,
        subscription_id=facts.subscription_id,
        cycle=facts.cycle,
        provider=facts.provider,
        amount_minor=facts.amount_minor,
        currency=facts.currency,
        outcome=result.outcome.value,
        decline_code=result.decline_code,
        provider_ref=result.provider_ref,
        reversal_id=facts.reversal_id,
        state=state.value,
        reason=result.reason,
        operation=facts.operation.value,
        subscription_action=subscription[0] if subscription else None,
        subscription_effect=subscription[1] if subscription else None,
    )
    return event_row(identifier, routing_key, event)
