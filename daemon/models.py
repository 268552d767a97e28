"""Domain values shared by every stage: the wire request, states, outcomes, events."""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

# Every pattern ends in \Z, never $: Python's $ also matches before a trailing newline,
# so "EUR\n" would pass ^[A-Z]{3}$ (msgspec applies patterns with re.search).
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9:_-]+\Z")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}\Z")]
PositiveAmount = Annotated[int, msgspec.Meta(gt=0, le=10**15)]
Id = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=40)], Annotated[str, msgspec.Meta(max_length=500)]],
    msgspec.Meta(max_length=50),
]

# A payment method is a provider's stored token. Anything that looks like a card
# number is refused before it can be stored, logged or forwarded (intake screens
# the other fields for Luhn-valid card numbers).
_CARD_NUMBER: Final = re.compile(r"(?:\d[ -]?){12,18}\d")


class AttemptRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt request as it arrives on ``payd.attempts``. Unknown fields are ignored."""

    idempotency_key: IdempotencyKey
    subscription_id: Id | None = None
    cycle: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    amount_minor: PositiveAmount
    currency: Currency
    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    payment_method: ShortText
    customer_ref: ShortText | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    previous_payment_ref: ShortText | None = None
    """The provider's reference of the approved payment this merchant-initiated one follows (the
    stored-credential chain; Checkout.com ``previous_payment_id``). Optional: senders that do not
    know it leave it out, and adapters whose provider chains by itself ignore it."""

    def __post_init__(self) -> None:
        if (self.subscription_id is None) != (self.cycle is None):
            raise ValueError("subscription_id and cycle go together: give both or neither")
        if _CARD_NUMBER.search(self.payment_method):
            raise ValueError("payment_method looks like a card number; send the provider's token")

    @property
    def merchant_reference(self) -> str:
        """What the provider sees as our reference: ``SUBSCRIPTION_ID:CYCLE`` or the key."""
        if self.subscription_id is not None:
            return f"{self.subscription_id}:{self.cycle}"
        return self.idempotency_key


class RecordedAttempt(AttemptRequest, frozen=True, kw_only=True):
    """An attempt request as reconciliation asks a provider about it: with what payd recorded of
    it. Never decoded from the queue (intake decodes ``AttemptRequest``), so no sender sets it."""

    provider_ref: str | None = None
    """The provider's reference from an earlier answer (iyzico ``paymentId``), when one came."""


class AttemptState(enum.StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    FAILED = "failed"
    UNKNOWN = "unknown"


TERMINAL_STATES: Final = frozenset({AttemptState.SUCCEEDED, AttemptState.DECLINED, AttemptState.FAILED})


class Outcome(enum.StrEnum):
    """What a provider call came to. Only APPROVED and UNKNOWN may have moved money."""

    APPROVED = "approved"
    SOFT_DECLINE = "soft_decline"
    """Declined, may succeed later (insufficient funds): dunning retries it."""
    HARD_DECLINE = "hard_decline"
    """Declined for good (stolen card, closed account): never retried."""
    RATE_LIMITED = "rate_limited"
    """Refused before processing; nothing charged; try again after ``retry_after_s``."""
    PROVIDER_ERROR = "provider_error"
    """Failed before anything was charged: safe to try again."""
    UNKNOWN = "unknown"
    """The request may have reached the provider: only a lookup can tell."""


STATE_OF_OUTCOME: Final[dict[Outcome, AttemptState]] = {
    Outcome.APPROVED: AttemptState.SUCCEEDED,
    Outcome.SOFT_DECLINE: AttemptState.DECLINED,
    Outcome.HARD_DECLINE: AttemptState.DECLINED,
    Outcome.RATE_LIMITED: AttemptState.FAILED,
    Outcome.PROVIDER_ERROR: AttemptState.FAILED,
    Outcome.UNKNOWN: AttemptState.UNKNOWN,
}

CHARGED_NOTHING: Final = frozenset({Outcome.RATE_LIMITED, Outcome.PROVIDER_ERROR})


class ChargeResult(msgspec.Struct, frozen=True, kw_only=True):
    """A provider adapter's verdict on one call; errors carry their data, not just a string."""

    outcome: Outcome
    provider_ref: str | None = None
    decline_code: str | None = None
    retry_after_s: float | None = None
    retryable: bool = True
    """For outcomes that charged nothing: whether trying again could help."""
    reached_provider: bool = True
    """False only when the request never left payd (no connection): the one case failover may take."""
    reason: str | None = None
    """Short, secret-free explanation for logs and the attempt row."""
    needs_operator: bool = False
    """For UNKNOWN: no later answer of the provider will settle it (a state that never ends by
    itself, a replayed answer): reconciliation parks it for an operator, with ``reason``."""
    accepted: bool = False
    """For UNKNOWN: the provider acknowledged the request and will decide it later (Adyen's
    ``received``): it reached the provider, so it is never sent again. A reversal answered so
    becomes ``pending`` until a lookup, the provider's notification or an operator settles it."""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed attempt: the request plus the identity of its write-ahead row."""

    attempt_id: int
    request: AttemptRequest
    claimed_by: str


class PaymentEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Published on ``payd.events`` with routing key ``type``; consumers dedupe on event_id."""

    event_id: str
    type: str
    occurred_at: str
    idempotency_key: str
    subscription_id: int | None
    cycle: int | None
    provider: str
    amount_minor: int
    currency: str
    outcome: str | None
    decline_code: str | None
    provider_ref: str | None
    attempt_id: int
    state: str
    reason: str | None = None


# -- reversals (refunds) --------------------------------------------------------


class SubscriptionAction(enum.StrEnum):
    """What a full refund of a subscription's renewal does to the subscription (by request)."""

    CANCEL = "cancel"
    PAUSE = "pause"


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A refund request as it arrives on ``payd.attempts`` (``"operation": "refund"``).

    The provider and currency are the charge's own: a refund goes where the money
    was taken, never elsewhere. Unknown fields are ignored.
    """

    operation: Literal["refund"]
    idempotency_key: IdempotencyKey
    original_idempotency_key: IdempotencyKey
    amount_minor: PositiveAmount
    reason: ShortText | None = None
    subscription_action: SubscriptionAction | None = None
    """What the charge's subscription does once this refund succeeds and leaves nothing of the
    charge unrefunded (``daemon.subscriptions.refunds``); None: nothing."""


class ReversalState(enum.StrEnum):
    QUEUED = "queued"
    """Released unsent (drain, halt); its amount stays reserved until it is sent."""
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    PENDING = "pending"
    """The provider accepted it and tells its outcome later (``ChargeResult.accepted``): never
    sent again; settled by a lookup, the provider's notification or an operator."""


RESERVING_REVERSAL_STATES: Final = frozenset(
    {
        ReversalState.QUEUED,
        ReversalState.IN_FLIGHT,
        ReversalState.SUCCEEDED,
        ReversalState.UNKNOWN,
        ReversalState.PENDING,
    }
)
"""The states whose amounts count against a charge (invariant 7)."""

OPEN_REVERSAL_STATES: Final = frozenset(
    {ReversalState.IN_FLIGHT, ReversalState.UNKNOWN, ReversalState.PENDING}
)
"""Sent (or maybe sent) and not yet decided: the states a result may still be recorded in."""


class ReversalOperation(enum.StrEnum):
    """How the provider is asked to reverse a charge; chosen by the adapter at the claim."""

    REFUND = "refund"
    VOID = "void"
    """Cancelled before settlement: always the whole charge, and cheaper where offered."""


class ReversalRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider adapter is asked to reverse: a claimed refund of one succeeded charge."""

    reversal_id: int
    idempotency_key: str
    """The reversal's own key, sent to the provider as its idempotency key."""
    original_idempotency_key: str
    original_provider_ref: str | None
    """The provider's id of the charge (what refund endpoints are addressed by)."""
    original_merchant_reference: str
    provider: str
    amount_minor: int
    currency: str
    reason: str | None = None
    subscription_id: int | None = None
    """The charge's subscription and cycle, for events (a one-off charge has neither)."""
    cycle: int | None = None
    operation: ReversalOperation = ReversalOperation.REFUND
    """Refund or void: the adapter's choice (``reversal_operation``), written with the claim
    before any provider call, so a retry or a lookup always addresses the same operation."""
    charge_amount_minor: int | None = None
    """What the charge took (a void reverses exactly this much)."""
    charged_at: datetime | None = None
    """When the provider was called for the charge (its claim; UTC), else when it was recorded
    succeeded: whether it can still be voided depends on it."""
