"""Every statement on the ``reversals`` table: claim, record, lease expiry, reconciliation scans.

Invariant 7 lives in ``claim_reversal``: in one transaction it locks the charged
attempt's row (``SELECT ... FOR UPDATE``), sums the amounts of that charge's
reversals that are queued, in flight, unknown or succeeded (a locking read, so it
sees every committed reversal, whatever the isolation level), and writes the new
reversal in flight only if the sum stays within the charge. Every claim of a
reversal of the same charge waits on that one row lock, so two daemons, duplicate
requests and concurrent operators are serialised there and cannot overshoot.
A refusal is written too, as a terminal ``failed`` row with its reason and its
``refund.failed`` event, so a redelivery of the same request finds it and does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aiomysql
import msgspec
import pymysql

from daemon.events import OutboxRow, now_iso
from daemon.models import (
    RESERVING_REVERSAL_STATES,
    AttemptState,
    ChargeResult,
    Outcome,
    RefundRequest,
    ReversalRequest,
    ReversalState,
    SubscriptionAction,
)
from daemon.refund_events import RefundFacts, refund_event
from daemon.storage.db import Cursor, fetch_all, placeholders, transaction
from daemon.storage.outbox import insert_outbox
from daemon.subscriptions.refunds import follow_refund

_ER_DUP_ENTRY: Final = 1062
_RESERVING: Final = tuple(sorted(state.value for state in RESERVING_REVERSAL_STATES))

STATE_OF_REVERSAL_OUTCOME: Final[dict[Outcome, ReversalState]] = {
    Outcome.APPROVED: ReversalState.SUCCEEDED,
    Outcome.UNKNOWN: ReversalState.UNKNOWN,
    Outcome.SOFT_DECLINE: ReversalState.FAILED,
    Outcome.HARD_DECLINE: ReversalState.FAILED,
    Outcome.RATE_LIMITED: ReversalState.FAILED,
    Outcome.PROVIDER_ERROR: ReversalState.FAILED,
}

# The reversal with what its provider needs of the charge, joined from the charge's row.
_REVERSAL_SELECT: Final = (
    "SELECT r.id, r.idempotency_key, r.original_idempotency_key, a.provider_ref, a.subscription_id, "
    "a.cycle, r.provider, r.amount_minor, r.currency, r.reason "
    "FROM reversals r JOIN attempts a ON a.id = r.original_attempt_id "
)


class _ReversalRow(msgspec.Struct, frozen=True, array_like=True):
    """A row of ``_REVERSAL_SELECT``, its columns in order."""

    id: int
    idempotency_key: str
    original_idempotency_key: str
    provider_ref: str | None
    subscription_id: int | None
    cycle: int | None
    provider: str
    amount_minor: int
    currency: str
    reason: str | None


def _reversal_of(row: _ReversalRow) -> ReversalRequest:
    original_key = row.original_idempotency_key
    reference = f"{row.subscription_id}:{row.cycle}" if row.subscription_id is not None else original_key
    return ReversalRequest(
        reversal_id=row.id,
        idempotency_key=row.idempotency_key,
        original_idempotency_key=original_key,
        original_provider_ref=row.provider_ref,
        original_merchant_reference=reference,
        provider=row.provider,
        amount_minor=row.amount_minor,
        currency=row.currency,
        reason=row.reason,
        subscription_id=row.subscription_id,
        cycle=row.cycle,
    )


class _Earlier(msgspec.Struct, frozen=True, array_like=True):
    """A refund key seen before, as the claim reads it."""

    id: int
    original_idempotency_key: str
    amount_minor: int
    state: ReversalState


class _Amount(msgspec.Struct, frozen=True, array_like=True):
    amount_minor: int


class _State(msgspec.Struct, frozen=True, array_like=True):
    state: ReversalState


class _Id(msgspec.Struct, frozen=True, array_like=True):
    id: int


class _DueCounter(msgspec.Struct, frozen=True, array_like=True):
    id: int
    reconcile_tries: int
    since_claim_us: int | None


def _facts(reversal: ReversalRequest) -> RefundFacts:
    return RefundFacts(
        reversal_id=reversal.reversal_id,
        idempotency_key=reversal.idempotency_key,
        original_idempotency_key=reversal.original_idempotency_key,
        provider=reversal.provider,
        amount_minor=reversal.amount_minor,
        currency=reversal.currency,
        subscription_id=reversal.subscription_id,
        cycle=reversal.cycle,
    )


class ReversalClaim(msgspec.Struct, frozen=True, kw_only=True):
    """What claiming one refund request came to: exactly one field is set."""

    claimed: ReversalRequest | None = None
    """In flight under our claim: send it."""
    already: ReversalState | None = None
    """The key was seen before (in flight elsewhere, finished, unknown): nothing to do."""
    refused: ChargeResult | None = None
    """Refused now, never sent: written as failed with this result and its event."""
    mismatched: bool = False
    """The key exists for another charge or amount: the request is refused, the old one stands."""


class _Charge(msgspec.Struct, frozen=True, array_like=True):
    attempt_id: int
    state: AttemptState
    provider: str
    routed_provider: str | None
    amount_minor: int
    currency: str
    subscription_id: int | None
    cycle: int | None

    @property
    def called_provider(self) -> str:
        """Where the money was taken (a failover's connection when there was one)."""
        return self.routed_provider or self.provider


def refusal(code: str, reason: str) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR, retryable=False, decline_code=code, reason=reason[:255]
    )


def _judge(
    request: RefundRequest, charge: _Charge | None, reserved: int, refundable: bool
) -> ChargeResult | None:
    """Why this refund must not be sent, or None when it may."""
    original = request.original_idempotency_key
    if charge is None:
        return refusal("no_charge", f"no charge with idempotency key {original}")
    if charge.state is not AttemptState.SUCCEEDED:
        advice = {
            AttemptState.UNKNOWN: "its outcome is unknown: wait for reconciliation or settle it first",
            AttemptState.IN_FLIGHT: "it is still being charged",
            AttemptState.QUEUED: "it is still being charged",
        }.get(charge.state, "nothing was charged")
        return refusal("charge_not_succeeded", f"charge {original} is {charge.state.value}: {advice}")
    if not refundable:
        return refusal(
            "refunds_unsupported",
            f"provider {charge.called_provider} cannot refund (its adapter has no refunds)",
        )
    if reserved + request.amount_minor > charge.amount_minor:
        remaining = max(0, charge.amount_minor - reserved)
        return refusal(
            "exceeds_remaining",
            f"{request.amount_minor} exceeds what remains of charge {original}: "
            f"{remaining} of {charge.amount_minor} {charge.currency}",
        )
    return None


async def claim_reversal(
    pool: aiomysql.Pool,
    request: RefundRequest,
    *,
    claimed_by: str,
    lease_s: float,
    refundable: Callable[[str], bool],
) -> ReversalClaim:
    """The write-ahead row of one refund, claimed in flight, or why it is not sent (see module)."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id, state, provider, routed_provider, amount_minor, currency, subscription_id, cycle "
            "FROM attempts "
            "WHERE idempotency_key = %s FOR UPDATE",
            (request.original_idempotency_key,),
        )
        found = await cursor.fetchone()
        charge = msgspec.convert(found, _Charge) if found else None
        await cursor.execute(
            "SELECT id, original_idempotency_key, amount_minor, state FROM reversals "
            "WHERE idempotency_key = %s FOR UPDATE",
            (request.idempotency_key,),
        )
        earlier = await cursor.fetchone()
        if earlier is not None:
            return await _seen_before(
                cursor, request, msgspec.convert(earlier, _Earlier), claimed_by=claimed_by, lease_s=lease_s
            )
        reserved = 0
        if charge is not None:
            # A locking read: it sees every committed reversal of this charge.
            await cursor.execute(
                "SELECT amount_minor FROM reversals "  # noqa: S608 (placeholders only)
                f"WHERE original_attempt_id = %s AND state IN ({placeholders(len(_RESERVING))}) FOR UPDATE",
                (charge.attempt_id, *_RESERVING),
            )
            reserved = sum(row.amount_minor for row in await fetch_all(cursor, _Amount))
        verdict = _judge(request, charge, reserved, charge is not None and refundable(charge.called_provider))
        try:
            await cursor.execute(
                "INSERT INTO reversals (idempotency_key, original_idempotency_key, original_attempt_id, "
                "provider, amount_minor, currency, reason, state, outcome, decline_code, result_reason, "
                "claimed_by, claimed_at, recheck_at, finished_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                "%s, %s, %s, %s, %s, NOW(6), IF(%s, NOW(6) + INTERVAL %s MICROSECOND, NULL), "
                "IF(%s, NULL, NOW(6)))",
                (
                    request.idempotency_key,
                    request.original_idempotency_key,
                    charge.attempt_id if charge else None,
                    charge.called_provider if charge else None,
                    request.amount_minor,
                    charge.currency if charge else None,
                    request.reason,
                    ReversalState.FAILED.value if verdict else ReversalState.IN_FLIGHT.value,
                    verdict.outcome.value if verdict else None,
                    verdict.decline_code if verdict else None,
                    verdict.reason if verdict else None,
                    claimed_by,
                    verdict is None,
                    int(lease_s * 1_000_000),
                    verdict is None,
                ),
            )
        except pymysql.err.IntegrityError as error:
            # Only possible without a charge row to lock: another claim of this key got there first.
            if error.args[0] != _ER_DUP_ENTRY:
                raise
            return ReversalClaim(already=ReversalState.FAILED)
        reversal_id = cursor.lastrowid
        if request.subscription_action is not None:
            await cursor.execute(
                "UPDATE reversals SET subscription_action = %s WHERE id = %s",
                (request.subscription_action.value, reversal_id),
            )
        if verdict is not None:
            facts = RefundFacts(
                reversal_id=reversal_id,
                idempotency_key=request.idempotency_key,
                original_idempotency_key=request.original_idempotency_key,
                provider=charge.called_provider if charge else None,
                amount_minor=request.amount_minor,
                currency=charge.currency if charge else None,
                subscription_id=charge.subscription_id if charge else None,
                cycle=charge.cycle if charge else None,
            )
            subscription = (
                (
                    request.subscription_action.value,
                    "none: the refund was refused; the subscription is left as it is",
                )
                if request.subscription_action is not None
                else None
            )
            event = refund_event(
                facts,
                state=ReversalState.FAILED,
                result=verdict,
                occurred_at=now_iso(),
                subscription=subscription,
            )
            await insert_outbox(cursor, [event])
            return ReversalClaim(refused=verdict)
        await cursor.execute(_REVERSAL_SELECT + "WHERE r.id = %s", (reversal_id,))
        return ReversalClaim(claimed=_reversal_of(await _written(cursor)))


async def _seen_before(
    cursor: Cursor, request: RefundRequest, row: _Earlier, *, claimed_by: str, lease_s: float
) -> ReversalClaim:
    reversal_id, original_key, amount, state = (
        row.id,
        row.original_idempotency_key,
        row.amount_minor,
        row.state,
    )
    if original_key != request.original_idempotency_key or amount != request.amount_minor:
        return ReversalClaim(mismatched=True)
    if state is not ReversalState.QUEUED:
        return ReversalClaim(already=state)
    # Released unsent earlier; its amount has stayed reserved, so no new check is due.
    await cursor.execute(
        "UPDATE reversals SET state = 'in_flight', claimed_by = %s, claimed_at = NOW(6), "
        "recheck_at = NOW(6) + INTERVAL %s MICROSECOND WHERE id = %s AND state = 'queued'",
        (claimed_by, int(lease_s * 1_000_000), reversal_id),
    )
    await cursor.execute(_REVERSAL_SELECT + "WHERE r.id = %s", (reversal_id,))
    return ReversalClaim(claimed=_reversal_of(await _written(cursor)))


async def _written(cursor: Cursor) -> _ReversalRow:
    """The row this transaction has just written or holds locked: it cannot be missing."""
    row = await cursor.fetchone()
    if row is None:
        raise LookupError("a reversal row written in this transaction is not there")
    return msgspec.convert(row, _ReversalRow)


async def record_reversal(
    pool: aiomysql.Pool,
    reversal: ReversalRequest,
    result: ChargeResult | None,
    *,
    tries: int,
    unknown_recheck_s: float,
) -> bool:
    """Write one reversal's result and its event in one commit; ``None`` releases it unsent.

    False when another actor had already settled it (nothing written).
    """
    async with transaction(pool) as cursor:
        await cursor.execute("SELECT state FROM reversals WHERE id = %s FOR UPDATE", (reversal.reversal_id,))
        row = await cursor.fetchone()
        state_now = msgspec.convert(row, _State).state if row else None
        if result is None:
            if state_now is not ReversalState.IN_FLIGHT:
                return False
            await cursor.execute(
                "UPDATE reversals SET state = 'queued', claimed_by = NULL, recheck_at = NULL, "
                "tries = tries + %s WHERE id = %s",
                (tries, reversal.reversal_id),
            )
            return True
        new_state = STATE_OF_REVERSAL_OUTCOME[result.outcome]
        open_now = state_now in (ReversalState.IN_FLIGHT, ReversalState.UNKNOWN)
        if not open_now or (new_state is ReversalState.UNKNOWN and state_now is ReversalState.UNKNOWN):
            return False
        await cursor.execute(
            "UPDATE reversals SET state = %s, outcome = %s, decline_code = %s, provider_ref = %s, "
            "result_reason = %s, tries = tries + %s, "
            "recheck_at = IF(%s, NOW(6) + INTERVAL %s MICROSECOND, NULL), "
            "finished_at = IF(%s, NULL, NOW(6)) WHERE id = %s",
            (
                new_state.value,
                result.outcome.value,
                result.decline_code,
                result.provider_ref,
                (result.reason or "")[:255] or None,
                tries,
                new_state is ReversalState.UNKNOWN,
                int(unknown_recheck_s * 1_000_000),
                new_state is ReversalState.UNKNOWN,
                reversal.reversal_id,
            ),
        )
        occurred_at = now_iso()
        follow = await follow_refund(cursor, reversal, new_state, occurred_at=occurred_at)
        event = refund_event(
            _facts(reversal),
            state=new_state,
            result=result,
            occurred_at=occurred_at,
            subscription=None if follow is None else (follow.action.value, follow.effect),
        )
        await insert_outbox(cursor, [event])
        return True


LEASE_EXPIRED: Final = "lease expired: the instance that claimed this refund stopped"


async def expire_reversal_leases(pool: aiomysql.Pool, *, limit: int) -> int:
    """In-flight reversals whose claimer stopped renewing become unknown: they may have been sent."""
    async with transaction(pool) as cursor:
        ids = await _lock_due(cursor, "in_flight", "<", limit)
        if not ids:
            return 0
        reversals = await _read_reversals(cursor, ids)
        await cursor.execute(
            "UPDATE reversals SET state = 'unknown', outcome = 'unknown', result_reason = %s, "  # noqa: S608
            f"recheck_at = NOW(6) WHERE id IN ({placeholders(len(ids))})",
            (LEASE_EXPIRED, *ids),
        )
        unknown = ChargeResult(outcome=Outcome.UNKNOWN, reason=LEASE_EXPIRED)
        occurred_at = now_iso()
        events: list[OutboxRow] = [
            refund_event(_facts(r), state=ReversalState.UNKNOWN, result=unknown, occurred_at=occurred_at)
            for r in reversals
        ]
        await insert_outbox(cursor, events)
        return len(ids)


class DueReversal(msgspec.Struct, frozen=True, kw_only=True):
    reversal: ReversalRequest
    reconcile_tries: int
    seconds_since_claim: float


async def take_due_reversals(
    pool: aiomysql.Pool, *, limit: int, backoff_s: Sequence[float]
) -> list[DueReversal]:
    """Unknown reversals due a lookup, pushed back by their next backoff so no one else takes them."""
    async with transaction(pool) as cursor:
        ids = await _lock_due(cursor, "unknown", "<=", limit)
        if not ids:
            return []
        await cursor.execute(
            "SELECT id, reconcile_tries, TIMESTAMPDIFF(MICROSECOND, claimed_at, NOW(6)) FROM reversals "  # noqa: S608
            f"WHERE id IN ({placeholders(len(ids))})",
            ids,
        )
        counters = {
            row.id: (row.reconcile_tries, row.since_claim_us or 0)
            for row in await fetch_all(cursor, _DueCounter)
        }
        for reversal_id, (tries, _age) in counters.items():
            wait_us = int(backoff_s[min(tries, len(backoff_s) - 1)] * 1_000_000)
            await cursor.execute(
                "UPDATE reversals SET reconcile_tries = reconcile_tries + 1, "
                "recheck_at = NOW(6) + INTERVAL %s MICROSECOND WHERE id = %s",
                (wait_us, reversal_id),
            )
        reversals = await _read_reversals(cursor, ids)
    return [
        DueReversal(
            reversal=reversal,
            reconcile_tries=counters[reversal.reversal_id][0],
            seconds_since_claim=counters[reversal.reversal_id][1] / 1_000_000,
        )
        for reversal in reversals
    ]


async def _lock_due(cursor: Cursor, state: str, before: str, limit: int) -> list[int]:
    """Ids of reversals in ``state`` whose ``recheck_at`` has come, locked (``SKIP LOCKED``: other
    instances take others). Only ``reversals`` rows are locked: a lock on the charge's row too
    would hold up a claim of another refund of it for the length of this pass."""
    await cursor.execute(
        f"SELECT id FROM reversals WHERE state = %s AND recheck_at {before} NOW(6) "  # noqa: S608 (fixed text)
        "ORDER BY recheck_at LIMIT %s FOR UPDATE SKIP LOCKED",
        (state, limit),
    )
    return [row.id for row in await fetch_all(cursor, _Id)]


async def _read_reversals(cursor: Cursor, ids: Sequence[int]) -> list[ReversalRequest]:
    """The reversals with what their provider needs of the charge (a plain read, no locks)."""
    await cursor.execute(_REVERSAL_SELECT + f"WHERE r.id IN ({placeholders(len(ids))})", ids)
    return [_reversal_of(row) for row in await fetch_all(cursor, _ReversalRow)]


class ReversalLine(msgspec.Struct, frozen=True, kw_only=True):
    """One reversal of a charge, as ``payd attempts show`` and ``payd refund`` read it."""

    reversal_id: int
    idempotency_key: str
    amount_minor: int
    state: ReversalState
    decline_code: str | None
    provider_ref: str | None
    reason: str | None
    """The operator's reason for the refund."""
    result_reason: str | None
    tries: int
    reconcile_tries: int
    created_at: datetime
    finished_at: datetime | None
    subscription_action: SubscriptionAction | None = None
    """What the refund asks of the charge's subscription once it succeeds in full."""


class _LineRow(msgspec.Struct, frozen=True, array_like=True):
    """A row of ``reversals_of``'s SELECT, its columns in order (``ReversalLine``'s fields)."""

    reversal_id: int
    idempotency_key: str
    amount_minor: int
    state: ReversalState
    decline_code: str | None
    provider_ref: str | None
    reason: str | None
    result_reason: str | None
    tries: int
    reconcile_tries: int
    created_at: datetime
    finished_at: datetime | None
    subscription_action: SubscriptionAction | None


async def reversals_of(cursor: Cursor, original_idempotency_key: str) -> list[ReversalLine]:
    """Every reversal asked of one charge, oldest first (refused ones included)."""
    await cursor.execute(
        "SELECT id, idempotency_key, amount_minor, state, decline_code, provider_ref, reason, result_reason, "
        "tries, reconcile_tries, created_at, finished_at, subscription_action FROM reversals "
        "WHERE original_idempotency_key = %s ORDER BY id",
        (original_idempotency_key,),
    )
    return [
        ReversalLine(
            **{
                **msgspec.structs.asdict(row),
                "created_at": _utc(row.created_at),
                "finished_at": _utc(row.finished_at),
            }
        )
        for row in await fetch_all(cursor, _LineRow)
    ]


def _utc(moment: datetime | None) -> datetime | None:
    """The database's DATETIME columns hold UTC (the session's time zone is +00:00)."""
    return None if moment is None else moment.replace(tzinfo=UTC)


def reserved_minor(lines: Sequence[ReversalLine]) -> int:
    """What counts against the charge (invariant 7): queued, in flight, unknown and succeeded."""
    return sum(line.amount_minor for line in lines if line.state in RESERVING_REVERSAL_STATES)


async def load_reversals(pool: aiomysql.Pool, original_idempotency_key: str) -> list[ReversalLine]:
    async with transaction(pool) as cursor:
        return await reversals_of(cursor, original_idempotency_key)


# -- parked refunds and the operator's settle ---------------------------------------------
# A refund whose lookup raised (an adapter bug) or whose provider says only an operator can
# settle it is *parked*: it stays unknown (it may have refunded), with ``recheck_at`` NULL so
# no reconciliation pass takes it (``_lock_due`` wants ``recheck_at <= NOW``), and the reason in
# ``result_reason``. ``payd attempts unpark KEY`` makes it due again; ``payd attempts settle``
# closes it.

PARKED_PREFIX: Final = "parked: "


async def park_reversal(pool: aiomysql.Pool, reversal_id: int, reason: str) -> bool:
    """Take one unknown refund out of automatic reconciliation; False if it is no longer unknown."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            "UPDATE reversals SET recheck_at = NULL, result_reason = %s WHERE id = %s AND state = 'unknown'",
            ((PARKED_PREFIX + reason)[:255], reversal_id),
        )
        return bool(cursor.rowcount == 1)


class _ReversalKey(msgspec.Struct, array_like=True, frozen=True):
    idempotency_key: str


async def unpark_reversals(pool: aiomysql.Pool, keys: Sequence[str] | None) -> list[str]:
    """Parked refunds (``keys``, or all when None) due a lookup now, their backoff from the start."""
    where = "state = 'unknown' AND recheck_at IS NULL"
    params: list[Any] = []
    if keys is not None:
        if not keys:
            return []
        where += f" AND idempotency_key IN ({placeholders(len(keys))})"
        params.extend(keys)
    async with transaction(pool) as cursor:
        await cursor.execute(f"SELECT idempotency_key FROM reversals WHERE {where} FOR UPDATE", params)  # noqa: S608
        found = [row.idempotency_key for row in await fetch_all(cursor, _ReversalKey)]
        if found:
            await cursor.execute(
                "UPDATE reversals SET recheck_at = NOW(6), reconcile_tries = 0, result_reason = NULL "  # noqa: S608
                f"WHERE {where}",
                params,
            )
    return found


class UnknownReversal(msgspec.Struct, frozen=True, kw_only=True):
    """An unknown refund, locked for an operator's settle."""

    reversal: ReversalRequest
    original_attempt_id: int


class _LockedState(msgspec.Struct, array_like=True, frozen=True):
    id: int
    state: ReversalState
    original_attempt_id: int | None


async def lock_reversal(cursor: Cursor, key: str) -> tuple[ReversalState, UnknownReversal] | None:
    """The refund with this key and its state, locked; None when there is none."""
    await cursor.execute(
        "SELECT id, state, original_attempt_id FROM reversals WHERE idempotency_key = %s FOR UPDATE", (key,)
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    locked = msgspec.convert(row, _LockedState)
    await cursor.execute(_REVERSAL_SELECT + "WHERE r.id = %s", (locked.id,))
    reversal = _reversal_of(await _written(cursor))
    return locked.state, UnknownReversal(
        reversal=reversal, original_attempt_id=locked.original_attempt_id or 0
    )


async def settle_unknown_reversal(
    cursor: Cursor, reversal: ReversalRequest, state: ReversalState, result: ChargeResult
) -> tuple[bool, str | None]:
    """An operator's verdict on an unknown refund, with its ``refund.*`` event and its
    subscription's follow-up, in the caller's transaction: (False, None) if it is no longer
    unknown, else (True, what came of its ``subscription_action``)."""
    await cursor.execute(
        "UPDATE reversals SET state = %s, outcome = %s, decline_code = %s, "
        "provider_ref = COALESCE(%s, provider_ref), result_reason = %s, recheck_at = NULL, "
        "finished_at = NOW(6) WHERE id = %s AND state = 'unknown'",
        (
            state.value,
            result.outcome.value,
            result.decline_code,
            result.provider_ref,
            (result.reason or "")[:255] or None,
            reversal.reversal_id,
        ),
    )
    if cursor.rowcount != 1:
        return False, None
    occurred_at = now_iso()
    follow = await follow_refund(cursor, reversal, state, occurred_at=occurred_at)
    event = refund_event(
        _facts(reversal),
        state=state,
        result=result,
        occurred_at=occurred_at,
        subscription=None if follow is None else (follow.action.value, follow.effect),
    )
    await insert_outbox(cursor, [event])
    return True, None if follow is None else follow.effect
