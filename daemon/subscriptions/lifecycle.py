"""How attempt outcomes and dispatch refusals move a subscription: pure functions, no I/O.

Each function changes the ``Subscription`` it is given (read under its row
lock) and returns the ``Change`` to publish, or None when nothing an observer
cares about happened. The caller writes both in the commit that records the
cause.

    active ──paid──> active (renewed)             past_due ──paid──> active (recovered)
    active|past_due ──soft decline, tries left──> past_due (past_due / retry_scheduled)
    active|past_due ──soft decline, none left──> on_exhausted
    active|past_due ──hard decline / never-retry code──> on_hard_decline
    active|past_due ──due, but a card-network limit reached──> unchanged, deferred (retry_deferred)
    paused, canceled: never dispatched; an attempt already under way still settles
    active|past_due|paused ──full refund of a renewal, "cancel"──> canceled (canceled)
    active|past_due ──full refund of a renewal, "pause"──> paused (paused)
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from daemon.models import AttemptRequest, AttemptState, ChargeResult, Outcome, SubscriptionAction
from daemon.subscriptions.model import CHARGEABLE, ChangeKind, Subscription, SubscriptionStatus
from daemon.subscriptions.periods import period_end, spread
from daemon.subscriptions.policy import SubscriptionPolicy


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One lifecycle event: what happened, why, and the subscription as it is afterwards."""

    kind: ChangeKind
    status_before: SubscriptionStatus
    cycle: int
    idempotency_key: str
    """The attempt (or the refused dispatch) that caused it."""
    reason: str | None = None
    decline_code: str | None = None
    deferred_by: str | None = None
    """For ``retry_deferred``: the network rule that held the try back."""
    retry_at: datetime | None = None
    """For ``retry_deferred``: when the try is looked at again."""


def renewal_due(sub: Subscription, policy: SubscriptionPolicy) -> datetime | None:
    """When the cycle after ``paid_cycle`` falls due: its period start, spread by the jitter."""
    if sub.current_period_end is None:
        return None
    return sub.current_period_end + spread(sub.id, sub.cycle, "renewal", policy.renewal_jitter_s)


def settle_outcome(
    sub: Subscription,
    request: AttemptRequest,
    state: AttemptState,
    result: ChargeResult,
    *,
    now: datetime,
    policy: SubscriptionPolicy,
) -> Change | None:
    """Apply one recorded attempt outcome to its subscription."""
    if state is AttemptState.SUCCEEDED:
        return _paid(sub, request, now=now, policy=policy)
    if request.idempotency_key != sub.pending_key or state is AttemptState.UNKNOWN:
        # Not the try this subscription waits on (a checkout attempt, a stale try), or
        # not settled yet: only a payment moves it.
        return None
    sub.pending_key = None
    if sub.status not in CHARGEABLE:
        return None  # paused or canceled while the try was under way: it simply ends
    if state is AttemptState.FAILED:
        # Nothing was charged and the issuer never answered: not a dunning step.
        sub.next_attempt_at = now + timedelta(seconds=policy.failed_retry_s)
        return Change(
            kind=ChangeKind.RETRY_SCHEDULED,
            status_before=sub.status,
            cycle=sub.cycle,
            idempotency_key=request.idempotency_key,
            reason=f"{result.outcome.value}: nothing charged",
            decline_code=result.decline_code,
        )
    return _declined(sub, request, result, now=now, policy=policy)


def _paid(
    sub: Subscription, request: AttemptRequest, *, now: datetime, policy: SubscriptionPolicy
) -> Change | None:
    cycle = request.cycle
    if cycle is None or cycle <= sub.paid_cycle:
        return None  # an earlier cycle: it was paid already, by this very attempt or another
    before = sub.status
    natural_end = (
        None
        if sub.billing_anchor is None
        else period_end(sub.billing_anchor, sub.anchor_cycle, cycle, sub.interval_unit, sub.interval_count)
    )
    if natural_end is None or natural_end <= now:
        # Paid so late that the period it pays for is over (or it never had an anchor):
        # the paid cycle starts now, so recovery does not trigger a burst of catch-up charges.
        sub.billing_anchor, sub.anchor_cycle = now, cycle - 1
        natural_end = period_end(now, cycle - 1, cycle, sub.interval_unit, sub.interval_count)
    sub.paid_cycle = cycle
    sub.current_period_end = natural_end
    sub.pending_key = None
    sub.next_try = 0
    sub.dunning_step = 0
    sub.deferred_by = sub.deferred_until = None
    if before in CHARGEABLE:
        sub.status = SubscriptionStatus.ACTIVE
        sub.status_reason = None
        sub.next_attempt_at = renewal_due(sub, policy)
        kind = ChangeKind.RECOVERED if before is SubscriptionStatus.PAST_DUE else ChangeKind.RENEWED
    else:
        sub.next_attempt_at = None
        kind = ChangeKind.PAID_WHILE_CANCELED if before is SubscriptionStatus.CANCELED else ChangeKind.RENEWED
    return Change(kind=kind, status_before=before, cycle=cycle, idempotency_key=request.idempotency_key)


def _declined(
    sub: Subscription,
    request: AttemptRequest,
    result: ChargeResult,
    *,
    now: datetime,
    policy: SubscriptionPolicy,
) -> Change:
    dunning = policy.dunning_for(sub.plan, sub.provider)
    key, code = request.idempotency_key, result.decline_code
    if result.outcome is Outcome.HARD_DECLINE:
        return stop(sub, dunning.on_hard_decline, key=key, reason="hard decline", decline_code=code)
    if policy.forbids_retry(result):
        return stop(sub, dunning.on_hard_decline, key=key, reason="do not retry", decline_code=code)
    if sub.dunning_step >= len(dunning.schedule_s):
        return stop(sub, dunning.on_exhausted, key=key, reason="retry schedule exhausted", decline_code=code)
    wait = max(dunning.schedule_s[sub.dunning_step], result.retry_after_s or 0.0)
    jitter = spread(sub.id, sub.cycle, f"retry:{sub.dunning_step}", min(policy.retry_jitter_s, wait / 10))
    sub.dunning_step += 1
    sub.next_attempt_at = now + timedelta(seconds=wait) + jitter
    before = sub.status
    sub.status = SubscriptionStatus.PAST_DUE
    sub.status_reason = "payment declined"
    kind = ChangeKind.PAST_DUE if before is not SubscriptionStatus.PAST_DUE else ChangeKind.RETRY_SCHEDULED
    return Change(
        kind=kind,
        status_before=before,
        cycle=sub.cycle,
        idempotency_key=key,
        reason="soft decline",
        decline_code=code,
    )


def stop(
    sub: Subscription,
    to: SubscriptionStatus,
    *,
    key: str,
    reason: str,
    decline_code: str | None = None,
) -> Change:
    """No further try for this cycle: the subscription moves to ``to`` and waits."""
    before = sub.status
    sub.status = to
    sub.status_reason = reason
    sub.next_attempt_at = None
    sub.pending_key = None
    sub.deferred_by = sub.deferred_until = None
    if to is SubscriptionStatus.CANCELED:
        kind = ChangeKind.CANCELED
    elif before is SubscriptionStatus.PAST_DUE:
        kind = ChangeKind.DUNNING_EXHAUSTED
    else:
        kind = ChangeKind.PAST_DUE
    return Change(
        kind=kind,
        status_before=before,
        cycle=sub.cycle,
        idempotency_key=key,
        reason=reason,
        decline_code=decline_code,
    )


def defer(sub: Subscription, *, rule: str, retry_at: datetime, key: str, reason: str) -> Change:
    """A due try held back by a network limit: the same try is looked at again at ``retry_at``.

    The status, the dunning step and the try number stay as they are: the
    deferral is neither a decline nor a dunning step, and the try keeps its key.
    """
    sub.next_attempt_at = retry_at
    sub.deferred_by = rule
    sub.deferred_until = retry_at
    return Change(
        kind=ChangeKind.RETRY_DEFERRED,
        status_before=sub.status,
        cycle=sub.cycle,
        idempotency_key=key,
        reason=reason,
        deferred_by=rule,
        retry_at=retry_at,
    )


def refunded(sub: Subscription, action: SubscriptionAction, *, key: str, reason: str) -> Change | None:
    """A full refund of one of its renewals, asked to ``action`` the subscription (``key``: the
    refund's). None when the subscription is already where the action would take it (or
    canceled, which nothing undoes)."""
    if sub.status is SubscriptionStatus.CANCELED:
        return None
    if action is SubscriptionAction.CANCEL:
        return stop(sub, SubscriptionStatus.CANCELED, key=key, reason=reason)
    if sub.status is SubscriptionStatus.PAUSED:
        return None
    before = sub.status
    sub.status = SubscriptionStatus.PAUSED
    sub.status_reason = reason
    sub.next_attempt_at = None
    sub.pending_key = None
    sub.deferred_by = sub.deferred_until = None
    return Change(
        kind=ChangeKind.PAUSED, status_before=before, cycle=sub.cycle, idempotency_key=key, reason=reason
    )
