"""``payd attempts show KEY``: one attempt's whole story, read from what the database holds.

The story is a struct (``--json`` prints it as it is) built by ``load_story``
and rendered section by section by ``render_story``. A new part of the story
(reversals, say) is a new field on ``AttemptStory``, filled in
``load_story``, and a new function in ``SECTIONS``.

What payd keeps per attempt is its row (the request, the latest outcome, the
counters of provider calls and lookups, where it was routed), the operator
actions in ``attempt_audit``, and its subscription. Events leave the outbox
once published; their ids are deterministic, so the story names each event
the attempt's transitions emitted and whether it still waits in the outbox.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import aiomysql
import msgspec

from daemon.events import event_id as payment_event_id
from daemon.models import TERMINAL_STATES, AttemptState
from daemon.operator.keys import is_idempotency_key
from daemon.storage.attempts import REQUEST_COLUMNS, request_from_row
from daemon.storage.db import Cursor, fetch_all, placeholders, transaction
from daemon.storage.reversals import ReversalLine, reserved_minor, reversals_of
from daemon.subscriptions.events import event_id as subscription_event_id
from daemon.subscriptions.model import ChangeKind

_RENEWAL_KEY: Final = re.compile(r"^renew:(?P<sid>\d+):(?P<cycle>\d+):(?P<try>\d+)\Z")


class Request(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: int | None
    cycle: int | None
    amount_minor: int
    currency: str
    provider: str
    payment_method: str
    """The provider's stored token (payd never holds a card number)."""
    customer_ref: str | None
    metadata: dict[str, str]


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: int
    state: AttemptState
    outcome: str | None
    decline_code: str | None
    provider_ref: str | None
    reason: str | None
    routed_provider: str | None
    """The connection a failover sent it to, when not the requested one."""
    claimed_by: str | None
    claimed_at: datetime | None
    provider_calls: int
    reconcile_lookups: int
    recheck_at: datetime | None
    """While in_flight: the lease's end; while unknown: the next lookup."""
    parked_at: datetime | None
    """When automatic reconciliation stopped because a lookup raised (``payd attempts unpark``)."""
    reconcile_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class OperatorAction(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    action: str
    state_before: str | None
    state_after: str | None
    operator: str
    via: str
    reason: str
    provider_ref: str | None


class SubscriptionView(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: int
    status: str
    status_reason: str | None
    paid_cycle: int
    pending_key: str | None
    """The try the subscription waits on."""
    next_attempt_at: datetime | None
    deferred_by: str | None
    """The card-network rule that last held a due try back."""
    deferred_until: datetime | None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    type: str
    published: bool
    """False while the event still waits in the outbox."""


class AttemptStory(msgspec.Struct, frozen=True, kw_only=True):
    idempotency_key: str
    found: bool
    """Whether an attempt row exists; a renewal try held back by a network rule has none yet."""
    request: Request | None = None
    attempt: Attempt | None = None
    operator_actions: list[OperatorAction] = msgspec.field(default_factory=list)
    subscription: SubscriptionView | None = None
    events: list[Event] = msgspec.field(default_factory=list)
    reversals: list[ReversalLine] = msgspec.field(default_factory=list)
    """Refunds asked of this charge, oldest first, refused ones included."""


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=UTC)


async def _rows(cursor: Cursor, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
    await cursor.execute(sql, args)
    names = [column[0] for column in cursor.description]
    return [
        {
            name: _utc(value) if isinstance(value, datetime) else value
            for name, value in zip(names, row, strict=True)
        }
        for row in await cursor.fetchall()
    ]


async def load_story(pool: aiomysql.Pool, key: str) -> AttemptStory:
    if not is_idempotency_key(key):  # names nothing; never compared with the key columns
        return AttemptStory(idempotency_key=key, found=False, subscription=None)
    async with transaction(pool) as cursor:
        await cursor.execute(
            f"SELECT {REQUEST_COLUMNS} FROM attempts WHERE idempotency_key = %s",  # noqa: S608
            (key,),
        )
        request_row = await cursor.fetchone()
        if request_row is None:
            renewal = _RENEWAL_KEY.match(key)
            subscription = None if renewal is None else await _subscription(cursor, int(renewal["sid"]))
            return AttemptStory(idempotency_key=key, found=False, subscription=subscription)
        wire = request_from_row(request_row)
        request = msgspec.convert(msgspec.structs.asdict(wire), Request)
        (row,) = await _rows(
            cursor,
            "SELECT id AS attempt_id, state, outcome, decline_code, provider_ref, reason, routed_provider, "
            "claimed_by, claimed_at, tries AS provider_calls, reconcile_tries AS reconcile_lookups, "
            "recheck_at, parked_at, reconcile_error, created_at, updated_at, finished_at FROM attempts "
            "WHERE idempotency_key = %s",
            (key,),
        )
        attempt = msgspec.convert(row, Attempt)
        actions = [
            msgspec.convert(action, OperatorAction)
            for action in await _rows(
                cursor,
                "SELECT created_at AS at, action, state_before, state_after, operator, via, reason, "
                "provider_ref FROM attempt_audit WHERE idempotency_key = %s ORDER BY id",
                (key,),
            )
        ]
        subscription = (
            None if wire.subscription_id is None else await _subscription(cursor, wire.subscription_id)
        )
        events = await _events(cursor, key, attempt, actions)
        reversals = await reversals_of(cursor, key)
    return AttemptStory(
        idempotency_key=key,
        found=True,
        request=request,
        attempt=attempt,
        operator_actions=actions,
        subscription=subscription,
        events=events,
        reversals=reversals,
    )


async def _subscription(cursor: Cursor, subscription_id: int) -> SubscriptionView | None:
    rows = await _rows(
        cursor,
        "SELECT id AS subscription_id, status, status_reason, paid_cycle, pending_key, next_attempt_at, "
        "deferred_by, deferred_until FROM subscriptions WHERE id = %s",
        (subscription_id,),
    )
    return msgspec.convert(rows[0], SubscriptionView) if rows else None


class _EventId(msgspec.Struct, frozen=True, array_like=True):
    event_id: str


async def _events(
    cursor: Cursor, key: str, attempt: Attempt, actions: Sequence[OperatorAction]
) -> list[Event]:
    """The payment events the attempt's transitions emitted (derived: every path into
    ``unknown`` ends in a lookup or an operator's settle), plus its ``subscription.*``
    events that still wait in the outbox. Published ``subscription.*`` events are not kept."""
    emitted: list[tuple[str, str]] = []
    was_unknown = (
        attempt.state is AttemptState.UNKNOWN
        or attempt.reconcile_lookups > 0
        or any(action.state_before == AttemptState.UNKNOWN.value for action in actions)
    )
    if was_unknown:
        emitted.append((payment_event_id(key, AttemptState.UNKNOWN), "payment.unknown"))
    if attempt.state in TERMINAL_STATES:
        emitted.append((payment_event_id(key, attempt.state), f"payment.{attempt.state.value}"))
    subscription_ids = {
        subscription_event_id(key, f"subscription.{kind.value}"): f"subscription.{kind.value}"
        for kind in ChangeKind
    }
    candidates = [identifier for identifier, _ in emitted] + list(subscription_ids)
    await cursor.execute(
        f"SELECT event_id FROM outbox WHERE event_id IN ({placeholders(len(candidates))})",  # noqa: S608
        candidates,
    )
    pending = {row.event_id for row in await fetch_all(cursor, _EventId)}
    events = [Event(event_id=i, type=t, published=i not in pending) for i, t in emitted]
    events += [
        Event(event_id=i, type=t, published=False) for i, t in subscription_ids.items() if i in pending
    ]
    return events


# -- text ----------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _line(out: TextIO, label: str, value: object) -> None:
    print(f"  {label:<16}{'-' if value is None or value == '' else value}", file=out)


def _request_section(story: AttemptStory, out: TextIO) -> None:
    request, attempt = story.request, story.attempt
    if request is None or attempt is None:
        return
    print("request", file=out)
    if request.subscription_id is not None:
        _line(out, "subscription", f"{request.subscription_id} cycle {request.cycle}")
    _line(out, "amount", f"{request.amount_minor} {request.currency} (minor units)")
    _line(out, "provider", request.provider)
    _line(out, "payment method", request.payment_method)
    _line(out, "customer", request.customer_ref)
    _line(out, "metadata", ", ".join(f"{k}={v}" for k, v in sorted(request.metadata.items())))
    _line(out, "received", _when(attempt.created_at))


def _tries_section(story: AttemptStory, out: TextIO) -> None:
    attempt, request = story.attempt, story.request
    if attempt is None or request is None:
        return
    print("tries and routing", file=out)
    _line(out, "claimed by", attempt.claimed_by)
    _line(out, "claimed at", _when(attempt.claimed_at))
    _line(out, "provider calls", attempt.provider_calls)
    routed = attempt.routed_provider
    _line(out, "sent to", f"{routed} (failover from {request.provider})" if routed else request.provider)


def _outcome_section(story: AttemptStory, out: TextIO) -> None:
    attempt = story.attempt
    if attempt is None:
        return
    print("outcome", file=out)
    _line(out, "state", attempt.state.value)
    _line(out, "outcome", attempt.outcome)
    _line(out, "decline code", attempt.decline_code)
    _line(out, "provider ref", attempt.provider_ref)
    _line(out, "reason", attempt.reason)
    _line(out, "finished", _when(attempt.finished_at))


def _reconciliation_section(story: AttemptStory, out: TextIO) -> None:
    attempt = story.attempt
    if attempt is None:
        return
    print("reconciliation", file=out)
    _line(out, "lookups", attempt.reconcile_lookups)
    if attempt.parked_at is not None:
        _line(out, "parked", f"{_when(attempt.parked_at)}: {attempt.reconcile_error} (payd attempts unpark)")
    if attempt.state is AttemptState.UNKNOWN:
        _line(out, "next lookup", _when(attempt.recheck_at))
    elif attempt.state is AttemptState.IN_FLIGHT:
        _line(out, "lease ends", _when(attempt.recheck_at))


def _operator_section(story: AttemptStory, out: TextIO) -> None:
    if not story.found:
        return
    print("operator actions", file=out)
    if not story.operator_actions:
        _line(out, "none", "")
    for action in story.operator_actions:
        change = f"{action.state_before} -> {action.state_after}" if action.state_after else ""
        print(
            f"  {_when(action.at)}  {action.action} {change} by {action.operator} ({action.via}): "
            f"{action.reason}" + (f" [provider ref {action.provider_ref}]" if action.provider_ref else ""),
            file=out,
        )


def _subscription_section(story: AttemptStory, out: TextIO) -> None:
    sub = story.subscription
    if sub is None:
        return
    print(f"subscription {sub.subscription_id}", file=out)
    status = sub.status + (f" ({sub.status_reason})" if sub.status_reason else "")
    _line(out, "status", status)
    _line(out, "paid cycle", sub.paid_cycle)
    _line(out, "waits on", sub.pending_key)
    _line(out, "next attempt", _when(sub.next_attempt_at))
    _line(out, "deferred by", sub.deferred_by)
    _line(out, "deferred until", _when(sub.deferred_until))


def _events_section(story: AttemptStory, out: TextIO) -> None:
    if not story.found:
        return
    print("events", file=out)
    if not story.events:
        _line(out, "none", "")
    for event in story.events:
        print(
            f"  {event.type:<32}{event.event_id}  {'published' if event.published else 'in the outbox'}",
            file=out,
        )


def _reversals_section(story: AttemptStory, out: TextIO) -> None:
    if story.request is None:
        return
    print("reversals", file=out)
    if not story.reversals:
        _line(out, "none", "")
        return
    for line in story.reversals:
        why = line.result_reason if line.state.value in ("failed", "unknown") else line.reason
        print(
            f"  {_when(line.created_at)}  {line.operation.value} {line.idempotency_key} {line.amount_minor}: "
            f"{line.state.value}"
            + (f" ({line.decline_code})" if line.decline_code else "")
            + (f" [provider ref {line.provider_ref}]" if line.provider_ref else "")
            + (
                f" [then {line.subscription_action.value} the subscription]"
                if line.subscription_action
                else ""
            )
            + (f" - {why}" if why else ""),
            file=out,
        )
    reserved = reserved_minor(story.reversals)
    _line(out, "refunded/held", f"{reserved} of {story.request.amount_minor} {story.request.currency}")
    _line(out, "remaining", story.request.amount_minor - reserved)


SECTIONS: Final[tuple[Callable[[AttemptStory, TextIO], None], ...]] = (
    _request_section,
    _tries_section,
    _outcome_section,
    _reconciliation_section,
    _reversals_section,
    _operator_section,
    _subscription_section,
    _events_section,
)


def render_story(story: AttemptStory, out: TextIO) -> None:
    if story.attempt is not None:
        print(
            f"attempt {story.idempotency_key} (id {story.attempt.attempt_id}): {story.attempt.state.value}",
            file=out,
        )
    elif story.subscription is not None:
        print(
            f"attempt {story.idempotency_key}: no attempt row; this renewal try has not been dispatched",
            file=out,
        )
    for section in SECTIONS:
        section(story, out)
