"""A subscription as payd holds it: its status, its billing position and its dunning progress."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Final

import msgspec

from daemon.cards import holds_card_number
from daemon.subscriptions.periods import IntervalUnit


class SubscriptionStatus(enum.StrEnum):
    ACTIVE = "active"
    """In good standing: the next renewal is scheduled."""
    PAST_DUE = "past_due"
    """The current cycle is unpaid; dunning retries it, or (exhausted) waits for an operator."""
    CANCELED = "canceled"
    """Never charged again."""
    PAUSED = "paused"
    """Not charged while paused; an attempt already under way still settles."""


CHARGEABLE: Final = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE})


class ChangeKind(enum.StrEnum):
    """What happened to a subscription; the event type is ``subscription.<kind>``."""

    RENEWED = "renewed"
    """A cycle was paid in good standing (or while paused): the period advanced."""
    RECOVERED = "recovered"
    """A past-due cycle was paid: back to active."""
    PAID_WHILE_CANCELED = "paid_while_canceled"
    """An attempt under way at cancellation was approved: money moved, an operator decides."""
    PAST_DUE = "past_due"
    """The cycle went unpaid: from active to past_due (with or without a retry scheduled)."""
    RETRY_SCHEDULED = "retry_scheduled"
    """Still unpaid; another try is scheduled (``next_attempt_at``)."""
    RETRY_DEFERRED = "retry_deferred"
    """A due try held back by a card network's limit until ``retry_at`` (``deferred_by`` names it)."""
    DUNNING_EXHAUSTED = "dunning_exhausted"
    """Past due and no further try: the retry schedule ran out."""
    CANCELED = "canceled"
    """Canceled by a hard decline, a never-retry code, exhausted dunning, or a full refund
    asked to cancel it (``subscription_action``)."""
    PAUSED = "paused"
    """Paused by a full refund of a renewal asked to pause it (``subscription_action``)."""


class Subscription(msgspec.Struct, kw_only=True):
    """One ``subscriptions`` row, read under its row lock and changed in memory before writing."""

    id: int
    status: SubscriptionStatus
    plan: str | None
    provider: str
    payment_method: str
    card_brand: str | None
    customer_ref: str | None
    amount_minor: int
    currency: str
    interval_unit: IntervalUnit
    interval_count: int
    paid_cycle: int
    billing_anchor: datetime | None
    anchor_cycle: int
    current_period_end: datetime | None
    next_attempt_at: datetime | None
    pending_key: str | None
    """The idempotency key of the dispatched try this subscription waits on, if any."""
    next_try: int
    """The try number the next new dispatch of this cycle uses."""
    dunning_step: int
    """Soft declines so far in this cycle: the index into the retry schedule."""
    status_reason: str | None
    deferred_by: str | None = None
    """The network rule (``networks.NetworkRule.name``) that last held back a due try, if any."""
    deferred_until: datetime | None = None
    """When that rule lets the try go; cleared when a try is dispatched or the cycle is paid."""
    chain_provider: str | None = None
    chain_payment_method: str | None = None
    chain_ref: str | None = None
    """The provider's reference of the last approved payment (its stored-credential chain), valid
    while ``chain_provider`` and ``chain_payment_method`` are still the subscription's."""

    @property
    def previous_payment_ref(self) -> str | None:
        """What a renewal sends to chain to the last approved payment, if that chain still holds."""
        if self.chain_provider != self.provider or self.chain_payment_method != self.payment_method:
            return None
        # A reference of 13-19 digits (an Adyen pspReference) can pass the Luhn check by chance;
        # intake would refuse the whole renewal as carrying a card number, so it is left out.
        if self.chain_ref is None or holds_card_number(self.chain_ref):
            return None
        return self.chain_ref

    @property
    def cycle(self) -> int:
        """The cycle being billed: always the one after the last paid."""
        return self.paid_cycle + 1


def dispatch_key(subscription_id: int, cycle: int, try_number: int) -> str:
    """Deterministic per (subscription, cycle, try): a repeated dispatch is one attempt.

    ``store.mark_dispatched`` builds the same key in SQL; change both together.
    """
    return f"renew:{subscription_id}:{cycle}:{try_number}"
