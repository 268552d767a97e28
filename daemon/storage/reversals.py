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

The adapter's choice of refund or void is written in the claim's transaction, before
any provider call. A reversal the provider accepted but decides later is ``pending``:
its amount stays reserved, it is never sent again, and it ends by a lookup
(``take_due_reversals``), the provider's notification (``settle_by_notice``) or an
operator (``settle_unknown_reversal``, from ``payd attempts settle``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

import aiomysql
import msgspec
import pymysql

from daemon.events import OutboxRow, now_iso
from daemon.models import (
    OPEN_REVERSAL_STATES,
    RESERVING_REVERSAL_STATES,
    AttemptState,
    ChargeResult,
    Outcome,
    RefundRequest,
    ReversalOperation,
    ReversalRequest,
    ReversalState,
    SubscriptionAction,
)
from daemon.refund_events import RefundFacts, refund_event
from daemon.storage.db import Cursor, fetch_all, fetch_one, placeholders, transaction, update_keyed
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


def reversal_state_of(result: ChargeResult) -> ReversalState:
    """The state a reversal's result leaves it in: an accepted unknown is pending."""
    if result.outcome is Outcome.UNKNOWN and result.accepted:
        return ReversalState.PENDING
    return STATE_OF_REVERSAL_OUTCOME[result.outcome]


# The reversal with what its provider needs of the charge, joined from the charge's row.
# ``charged_at`` is when the provider was called (the charge's claim), not when payd learned
# the outcome: a charge left unknown and settled later has a recent finished_at, and a refund
# or void chosen by it could be a cancel after capture or of a previous day's payment.
_REVERSAL_SELECT: Final = (
    "SELECT r.id, r.idempotency_key, r.original_idempotency_key, a.provider_ref, a.subscription_id, "
    "a.cycle, r.provider, r.amount_minor, r.currency, r.reason, r.operation, a.amount_minor, "
    "COALESCE(a.claimed_at, a.finished_at) FROM reversals r JOIN attempts a ON a.id = r.original_attempt_id "
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
    operation: ReversalOperation
    charge_amount_minor: int
    charged_at: datetime | None


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
        operation=row.operation,
        charge_amount_minor=row.charge_amount_minor,
        charged_at=_utc(row.charged_at),
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
    state: ReversalState


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
        operation=reversal.operation,
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
    operation_of: Callable[[ReversalRequest], ReversalOperation] = lambda _: ReversalOperation.REFUND,
) -> ReversalClaim:
    """The write-ahead row of one refund, claimed in flight, or why it is not sent (see module).

    ``operation_of`` is the adapter's choice of refund or void, asked once, here: it is stored
    in the same commit as the claim, before any provider call."""
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
        claimed = _reversal_of(await _written(cursor))
        operation = operation_of(claimed)
        if operation is not claimed.operation:
            await cursor.execute(
                "UPDATE reversals SET operation = %s WHERE id = %s", (operation.value, reversal_id)
            )
            claimed = msgspec.structs.replace(claimed, operation=operation)
        return ReversalClaim(claimed=claimed)


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
            # recheck_at holds since when it is queued (fail_orphaned_reversals), as for attempts.
            await cursor.execute(
                "UPDATE reversals SET state = 'queued', claimed_by = NULL, recheck_at = NOW(6), "
                "tries = tries + %s WHERE id = %s",
                (tries, reversal.reversal_id),
            )
            return True
        return await _apply(cursor, reversal, state_now, result, tries=tries, recheck_s=unknown_recheck_s)


def _moves(state_now: ReversalState | None, new_state: ReversalState) -> bool:
    """Whether a result may move a reversal from ``state_now`` to ``new_state``.

    Only open reversals move. Unknown comes only from in flight (a later "don't know" says
    nothing new); pending from in flight or unknown (the provider has it now); a final state
    from any open one.
    """
    if state_now not in OPEN_REVERSAL_STATES:
        return False
    if new_state is ReversalState.UNKNOWN:
        return state_now is ReversalState.IN_FLIGHT
    if new_state is ReversalState.PENDING:
        return state_now is not ReversalState.PENDING
    return True


async def _apply(
    cursor: Cursor,
    reversal: ReversalRequest,
    state_now: ReversalState | None,
    result: ChargeResult,
    *,
    tries: int,
    recheck_s: float,
) -> bool:
    """Record ``result`` on a reversal whose row the caller holds locked, with its event."""
    new_state = reversal_state_of(result)
    if not _moves(state_now, new_state):
        return False
    still_open = new_state in OPEN_REVERSAL_STATES
    # An unknown no later answer settles is parked: no automatic lookups (recheck_at NULL).
    parked = new_state is ReversalState.UNKNOWN and result.needs_operator
    await cursor.execute(
        "UPDATE reversals SET state = %s, outcome = %s, decline_code = %s, "
        "provider_ref = COALESCE(%s, provider_ref), result_reason = %s, tries = tries + %s, "
        "recheck_at = IF(%s, NOW(6) + INTERVAL %s MICROSECOND, NULL), "
        "finished_at = IF(%s, NULL, NOW(6)) WHERE id = %s",
        (
            new_state.value,
            result.outcome.value,
            result.decline_code,
            result.provider_ref,
            (result.reason or "")[:255] or None,
            tries,
            still_open and not parked,
            int(recheck_s * 1_000_000),
            still_open,
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


class Settled(enum.StrEnum):
    """What a provider's notification of one reversal came to (``settle_by_notice``)."""

    SETTLED = "settled"
    ALREADY = "already"
    """It had already ended as the notice says: nothing changed (a duplicate notification)."""
    CONFLICT = "conflict"
    """It had already ended otherwise: nothing changed, an operator should look."""
    NOT_OPEN = "not_open"
    """Queued (released unsent, so the provider cannot know it): nothing settled."""
    UNMATCHED = "unmatched"
    """No reversal of this provider has that reference or key."""
    MISMATCH = "mismatch"
    """It names another amount, currency or operation than the reversal: never settled."""


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's notification of one reversal's outcome, as storage matches it."""

    provider: str
    provider_ref: str | None
    idempotency_key: str | None
    operation: ReversalOperation
    amount_minor: int | None
    currency: str | None
    result: ChargeResult
    key_digest: str | None = None
    """SHA-256 hex of payd's key, where the provider echoes a reference payd shortened from it."""


async def settle_by_notice(pool: aiomysql.Pool, notice: Notice) -> tuple[Settled, ReversalRequest | None]:
    """Settle the reversal a provider's notification speaks of, idempotently.

    Matched by payd's key where the provider echoes it (a notification may overtake the first
    answer), else by the digest of a key payd had to shorten (``key_sha256``: known from the
    claim on, so it matches in flight or unknown too), else by the provider's reference of the
    reversal, recorded from its answer. A duplicate changes nothing; a notice naming another
    amount or operation settles nothing.
    """
    async with transaction(pool) as cursor:
        locked = None
        if notice.idempotency_key is not None:  # the unique key's index: the usual way
            locked = await _lock_one(
                cursor, "provider = %s AND idempotency_key = %s", (notice.provider, notice.idempotency_key)
            )
        if locked is None and notice.key_digest is not None:  # a key payd sent shortened
            locked = await _lock_one(
                cursor, "provider = %s AND key_sha256 = %s", (notice.provider, notice.key_digest.lower())
            )
        if locked is None and notice.provider_ref is not None:  # the provider's own reference
            locked = await _lock_one(
                cursor, "provider = %s AND provider_ref = %s", (notice.provider, notice.provider_ref)
            )
        if locked is None:
            return Settled.UNMATCHED, None
        reversal, state_now = locked
        differs = (
            notice.operation is not reversal.operation
            or (notice.amount_minor is not None and notice.amount_minor != reversal.amount_minor)
            or (notice.currency is not None and notice.currency != reversal.currency)
        )
        if differs:
            return Settled.MISMATCH, reversal
        new_state = reversal_state_of(notice.result)
        if state_now in (ReversalState.SUCCEEDED, ReversalState.FAILED):
            return (Settled.ALREADY if state_now is new_state else Settled.CONFLICT), reversal
        if state_now not in OPEN_REVERSAL_STATES:
            return Settled.NOT_OPEN, reversal
        await _apply(cursor, reversal, state_now, notice.result, tries=0, recheck_s=0)
        return Settled.SETTLED, reversal


async def _lock_one(
    cursor: Cursor, where: str, params: Sequence[object]
) -> tuple[ReversalRequest, ReversalState] | None:
    """One reversal's row locked (only that row: the claim locks the charge's row first, so
    locking it here too could deadlock), then read with what its provider needs of the charge.

    A reversal naming no charge (refused ``no_charge`` at once, never sent) is not one: no
    provider speaks of it and there is nothing to settle."""
    await cursor.execute(
        f"SELECT id, state FROM reversals WHERE {where} AND original_attempt_id IS NOT NULL "  # noqa: S608
        "LIMIT 1 FOR UPDATE",
        params,
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    await cursor.execute(_REVERSAL_SELECT + "WHERE r.id = %s", (row[0],))
    return _reversal_of(await _written(cursor)), ReversalState(row[1])


class StalePending(msgspec.Struct, frozen=True, kw_only=True):
    idempotency_key: str
    provider: str
    age_s: float


class _Count(msgspec.Struct, frozen=True, array_like=True):
    count: int


class _StaleRow(msgspec.Struct, frozen=True, array_like=True):
    idempotency_key: str
    provider: str
    age_us: int = 0


async def stale_pending(
    pool: aiomysql.Pool, *, older_than_s: float, limit: int = 20
) -> tuple[int, list[StalePending]]:
    """How many reversals have been pending longer than ``older_than_s``, and the oldest few.

    Age is measured from the claim (``claimed_at``), not ``updated_at``: every reconciliation
    pass writes ``reconcile_tries``/``recheck_at`` on a pending row, which refreshes
    ``updated_at`` at least every maximum backoff, so an age read from it never grows past
    that. ``claimed_at`` is written only by a claim, and a pending reversal is never claimed
    again; it is at most the time it became pending, so the alarm can only come early."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT COUNT(*) FROM reversals WHERE state = 'pending' "
            "AND claimed_at < NOW(6) - INTERVAL %s MICROSECOND",
            (int(older_than_s * 1_000_000),),
        )
        count = (await fetch_one(cursor, _Count)).count
        if not count:
            return 0, []
        await cursor.execute(
            "SELECT idempotency_key, provider, COALESCE(TIMESTAMPDIFF(MICROSECOND, claimed_at, NOW(6)), 0) "
            "FROM reversals "
            "WHERE state = 'pending' AND claimed_at < NOW(6) - INTERVAL %s MICROSECOND "
            "ORDER BY claimed_at LIMIT %s",
            (int(older_than_s * 1_000_000), limit),
        )
        oldest = [
            StalePending(
                idempotency_key=row.idempotency_key, provider=row.provider, age_s=row.age_us / 1_000_000
            )
            for row in await fetch_all(cursor, _StaleRow)
        ]
    return int(count), oldest


LEASE_EXPIRED: Final = "lease expired: the instance that claimed this refund stopped"


async def expire_reversal_leases(pool: aiomysql.Pool, *, limit: int) -> int:
    """In-flight reversals whose claimer stopped renewing become unknown: they may have been sent."""
    async with transaction(pool) as cursor:
        ids = await _lock_due(cursor, ("in_flight",), "<", limit)
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


REVERSAL_NEVER_SENT: Final = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="never_sent",
    reason="queued with no owner (its message was lost or dead-lettered): never sent, nothing refunded",
)


async def fail_orphaned_reversals(
    pool: aiomysql.Pool, *, queued_for_s: float, limit: int
) -> list[ReversalRequest]:
    """Queued reversals nobody claimed for ``queued_for_s`` end failed as ``never_sent``, each
    with its ``refund.failed`` event; the reversals failed.

    A reversal is queued only when released unsent (halt, open breaker, drain): its message
    went back to the broker, and its claim moves it to in flight before any provider call,
    so a queued one was never sent. Past ``queued_for_s`` its message is taken to be gone
    (dead-lettered at the delivery limit, purged), and its amount, reserved while it is
    queued, is released. ``recheck_at`` holds since when it is queued; a row released before
    that was written is aged from its last claim. A copy of the message that turns up after
    all finds the key failed and sends nothing."""
    older_than_us = int(queued_for_s * 1_000_000)
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id FROM reversals WHERE state = 'queued' "
            "AND (recheck_at < NOW(6) - INTERVAL %s MICROSECOND "
            "OR (recheck_at IS NULL AND claimed_at < NOW(6) - INTERVAL %s MICROSECOND)) "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (older_than_us, older_than_us, limit),
        )
        ids = [row.id for row in await fetch_all(cursor, _Id)]
        if not ids:
            return []
        reversals = await _read_reversals(cursor, ids)
        result = REVERSAL_NEVER_SENT
        await cursor.execute(
            "UPDATE reversals SET state = 'failed', outcome = %s, decline_code = %s, result_reason = %s, "  # noqa: S608
            "claimed_by = NULL, recheck_at = NULL, finished_at = NOW(6) "
            f"WHERE id IN ({placeholders(len(ids))}) AND state = 'queued'",
            (result.outcome.value, result.decline_code, result.reason, *ids),
        )
        occurred_at = now_iso()
        events: list[OutboxRow] = []
        for reversal in reversals:
            follow = await follow_refund(cursor, reversal, ReversalState.FAILED, occurred_at=occurred_at)
            events.append(
                refund_event(
                    _facts(reversal),
                    state=ReversalState.FAILED,
                    result=result,
                    occurred_at=occurred_at,
                    subscription=None if follow is None else (follow.action.value, follow.effect),
                )
            )
        await insert_outbox(cursor, events)
    return reversals


class DueReversal(msgspec.Struct, frozen=True, kw_only=True):
    reversal: ReversalRequest
    reconcile_tries: int
    seconds_since_claim: float
    state: ReversalState = ReversalState.UNKNOWN
    """Unknown (may be looked up, or re-sent where that is safe) or pending (looked up only)."""


async def take_due_reversals(
    pool: aiomysql.Pool, *, limit: int, backoff_s: Sequence[float]
) -> list[DueReversal]:
    """Unknown and pending reversals due a lookup, pushed back by their next backoff so no one
    else takes them."""
    async with transaction(pool) as cursor:
        ids = await _lock_due(cursor, ("unknown", "pending"), "<=", limit)
        if not ids:
            return []
        await cursor.execute(
            "SELECT id, reconcile_tries, TIMESTAMPDIFF(MICROSECOND, claimed_at, NOW(6)), state "  # noqa: S608
            f"FROM reversals WHERE id IN ({placeholders(len(ids))})",
            ids,
        )
        counters = {
            row.id: (row.reconcile_tries, row.since_claim_us or 0, row.state)
            for row in await fetch_all(cursor, _DueCounter)
        }
        for reversal_id, (tries, _age, _state) in counters.items():
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
            state=counters[reversal.reversal_id][2],
        )
        for reversal in reversals
    ]


async def _lock_due(cursor: Cursor, states: Sequence[str], before: str, limit: int) -> list[int]:
    """Ids of reversals in ``states`` whose ``recheck_at`` has come, locked (``SKIP LOCKED``: other
    instances take others). Only ``reversals`` rows are locked: a lock on the charge's row too
    would hold up a claim of another refund of it for the length of this pass."""
    await cursor.execute(
        f"SELECT id FROM reversals WHERE state IN ({placeholders(len(states))}) "  # noqa: S608 (fixed text)
        f"AND recheck_at {before} NOW(6) ORDER BY recheck_at LIMIT %s FOR UPDATE SKIP LOCKED",
        (*states, limit),
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
    operation: ReversalOperation = ReversalOperation.REFUND
    """Refund or void (cancel before settlement)."""


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
    operation: ReversalOperation


async def reversals_of(cursor: Cursor, original_idempotency_key: str) -> list[ReversalLine]:
    """Every reversal asked of one charge, oldest first (refused ones included)."""
    await cursor.execute(
        "SELECT id, idempotency_key, amount_minor, state, decline_code, provider_ref, reason, result_reason, "
        "tries, reconcile_tries, created_at, finished_at, subscription_action, operation FROM reversals "
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


async def unpark_reversals(pool: aiomysql.Pool, keys: Sequence[str] | None) -> list[str]:
    """Parked refunds (``keys``, or all when None) due a lookup now, their backoff from the start."""
    return await update_keyed(
        pool,
        table="reversals",
        where="state = 'unknown' AND recheck_at IS NULL",
        keys=keys,
        assign="recheck_at = NOW(6), reconcile_tries = 0, result_reason = NULL",
    )


class UnknownReversal(msgspec.Struct, frozen=True, kw_only=True):
    """An unknown refund, locked for an operator's settle."""

    reversal: ReversalRequest
    original_attempt_id: int


class _LockedState(msgspec.Struct, array_like=True, frozen=True):
    id: int
    state: ReversalState
    original_attempt_id: int | None


async def lock_reversal(cursor: Cursor, key: str) -> tuple[ReversalState, UnknownReversal | None] | None:
    """The refund with this key and its state, locked; None when there is none. Its second part
    is None for a refund that named no charge (refused ``no_charge`` at once: failed, never
    sent), which has no charge to read."""
    await cursor.execute(
        "SELECT id, state, original_attempt_id FROM reversals WHERE idempotency_key = %s FOR UPDATE", (key,)
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    locked = msgspec.convert(row, _LockedState)
    if locked.original_attempt_id is None:
        return locked.state, None
    await cursor.execute(_REVERSAL_SELECT + "WHERE r.id = %s", (locked.id,))
    reversal = _reversal_of(await _written(cursor))
    return locked.state, UnknownReversal(
        reversal=reversal, original_attempt_id=locked.original_attempt_id or 0
    )


async def settle_unknown_reversal(
    cursor: Cursor, reversal: ReversalRequest, state: ReversalState, result: ChargeResult
) -> tuple[bool, str | None]:
    """An operator's verdict on an unknown or pending refund, with its ``refund.*`` event and
    its subscription's follow-up, in the caller's transaction: (False, None) if it is no longer
    unknown or pending, else (True, what came of its ``subscription_action``)."""
    await cursor.execute(
        "UPDATE reversals SET state = %s, outcome = %s, decline_code = %s, "
        "provider_ref = COALESCE(%s, provider_ref), result_reason = %s, recheck_at = NULL, "
        "finished_at = NOW(6) WHERE id = %s AND state IN ('unknown', 'pending')",
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
