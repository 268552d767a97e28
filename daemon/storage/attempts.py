"""Every statement on the ``attempts`` table, each batch in one transaction.

The write-ahead rule lives here: an attempt row exists, and is ``in_flight``
under this instance's claim, before any provider call. State changes go
through ``record_outcomes``, which writes the attempt, the subscription and the
outbox events in one commit.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import aiomysql
import msgspec
import pymysql

from daemon.events import OutboxRow, now_iso, payment_event
from daemon.models import (
    STATE_OF_OUTCOME,
    TERMINAL_STATES,
    AttemptRequest,
    AttemptState,
    ChargeResult,
    Outcome,
)
from daemon.storage.db import Cursor, fetch_all, placeholders, transaction, union_rows, update_keyed
from daemon.storage.outbox import insert_outbox
from daemon.subscriptions.effects import apply_subscription_effects
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.store import save_chains

_ER_DUP_ENTRY: Final = 1062
_encode_metadata = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(dict[str, str]).decode

_REQUEST_COLUMNS: Final = (
    "idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
    "payment_method, customer_ref, metadata"
)


class ClaimOutcome(msgspec.Struct, kw_only=True):
    """What one claim batch came to, by idempotency key."""

    claimed: dict[str, int] = msgspec.field(default_factory=dict)
    """Now in_flight under our claim: key -> attempt id."""
    already: dict[str, AttemptState] = msgspec.field(default_factory=dict)
    """Someone has or had it (in flight elsewhere, finished, unknown): nothing to do."""
    mismatched: set[str] = msgspec.field(default_factory=set)
    """The key exists with other parameters: the request is refused, the old attempt stands."""
    cycle_taken: set[str] = msgspec.field(default_factory=set)
    """Another attempt holds this (subscription, cycle): sending would risk a double charge."""
    altered: set[str] = msgspec.field(default_factory=set)
    """The row this claim wrote reads back different from the request (the database altered
    a value it cannot hold): the row is removed again and the request is invalid."""
    subscription_canceled: set[str] = msgspec.field(default_factory=set)
    """A renewal of a subscription canceled or paused since its request was published: failed
    unsent."""


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt's result to write; ``result=None`` returns the attempt to ``queued``."""

    attempt_id: int
    request: AttemptRequest
    result: ChargeResult | None
    tries: int = 0
    provider: str | None = None
    """The connection that was called, when a failover sent it elsewhere than requested."""


class RecordOutcome(msgspec.Struct, kw_only=True):
    applied: list[Record] = msgspec.field(default_factory=list)
    skipped: list[Record] = msgspec.field(default_factory=list)
    """Rows another actor had already settled; their results were not written."""


def _request_row(request: AttemptRequest) -> tuple[Any, ...]:
    return (
        request.idempotency_key,
        request.subscription_id,
        request.cycle,
        request.provider,
        request.amount_minor,
        request.currency,
        request.payment_method,
        request.customer_ref,
        _encode_metadata(request.metadata) if request.metadata else None,
    )


class RequestRow(msgspec.Struct, array_like=True, frozen=True):
    """The nine ``_REQUEST_COLUMNS``, in their order."""

    idempotency_key: str
    subscription_id: int | None
    cycle: int | None
    provider: str
    amount_minor: int
    currency: str
    payment_method: str
    customer_ref: str | None
    metadata: str | None


def request_from_row(row: Sequence[Any]) -> AttemptRequest:
    """Rebuild a request from the nine ``_REQUEST_COLUMNS`` of a row."""
    return request_from(msgspec.convert(row, RequestRow))


def request_from(r: RequestRow) -> AttemptRequest:
    """The request a decoded ``RequestRow`` (or a row struct extending it) holds."""
    return AttemptRequest(
        idempotency_key=r.idempotency_key,
        subscription_id=r.subscription_id,
        cycle=r.cycle,
        provider=r.provider,
        amount_minor=r.amount_minor,
        currency=r.currency,
        payment_method=r.payment_method,
        customer_ref=r.customer_ref,
        metadata=_decode_metadata(r.metadata) if r.metadata else {},
    )


class _ClaimRow(msgspec.Struct, array_like=True, frozen=True):
    """What a claim reads back of each row it wrote or found."""

    idempotency_key: str
    id: int
    subscription_id: int | None
    cycle: int | None
    provider: str
    amount_minor: int
    currency: str
    payment_method: str
    state: AttemptState
    claimed_by: str | None


class _StateRow(msgspec.Struct, array_like=True, frozen=True):
    id: int
    state: AttemptState


class _PendingKey(msgspec.Struct, array_like=True, frozen=True):
    pending_key: str


class _StateCount(msgspec.Struct, array_like=True, frozen=True):
    state: AttemptState
    count: int


class _DueHead(msgspec.Struct, array_like=True, frozen=True):
    """The columns ``take_due_unknown`` selects before the request's."""

    id: int
    reconcile_tries: int
    us_since_claim: int | None
    routed_provider: str | None
    provider_ref: str | None


_DUE_HEAD: Final = len(_DueHead.__struct_fields__)


def _same_charge(request: AttemptRequest, row: _ClaimRow) -> bool:
    return (
        request.subscription_id == row.subscription_id
        and request.cycle == row.cycle
        and request.provider == row.provider
        and request.amount_minor == row.amount_minor
        and request.currency == row.currency
        and request.payment_method == row.payment_method
    )


_ER_LOCK_DEADLOCK: Final = 1213
DEADLOCK_RETRIES: Final = 4


async def claim_attempts(
    pool: aiomysql.Pool, requests: Sequence[AttemptRequest], *, claimed_by: str, lease_s: float
) -> ClaimOutcome:
    """Write the write-ahead rows and move the claimable ones from queued to in_flight.

    ``requests`` must have distinct idempotency keys. A duplicate delivery, or
    a second daemon holding the same message, finds the row already claimed
    and stops here.

    Two claims holding some of the same keys can still deadlock in InnoDB's unique-key
    checks (the duplicate check's shared next-key locks), even in key order. The server then
    rolls one transaction back whole, so it is simply claimed again, a few times, before the
    error reaches the pipeline (which would put the batch back on the queue).
    """
    for retry in range(DEADLOCK_RETRIES + 1):
        try:
            return await _claim(pool, requests, claimed_by=claimed_by, lease_s=lease_s)
        except pymysql.err.OperationalError as error:
            if error.args[0] != _ER_LOCK_DEADLOCK or retry == DEADLOCK_RETRIES:
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * (retry + 1)))  # noqa: S311 (jitter, not secrecy)
    raise AssertionError("unreachable: the last retry returns or raises")


async def _claim(
    pool: aiomysql.Pool, requests: Sequence[AttemptRequest], *, claimed_by: str, lease_s: float
) -> ClaimOutcome:
    outcome = ClaimOutcome()
    # In key order: two claims holding some of the same keys (a redelivery, a second daemon)
    # take their row locks in the same order, which leaves only the duplicate-key checks'
    # deadlocks (retried by claim_attempts).
    requests = sorted(requests, key=lambda request: request.idempotency_key)
    by_key = {request.idempotency_key: request for request in requests}
    keys = list(by_key)
    async with transaction(pool) as cursor:
        # New rows carry this claim's name (unique per batch), so a row that reads back
        # different from its request is told apart below from a reused key.
        await cursor.execute(
            f"INSERT INTO attempts ({_REQUEST_COLUMNS}, state, claimed_by) VALUES "  # noqa: S608 (placeholders only)
            f"{placeholders(len(requests), 11)} ON DUPLICATE KEY UPDATE id = id",
            [value for r in requests for value in (*_request_row(r), AttemptState.QUEUED.value, claimed_by)],
        )
        await cursor.execute(
            "SELECT idempotency_key, id, subscription_id, cycle, provider, amount_minor, currency, "  # noqa: S608
            "payment_method, state, claimed_by FROM attempts "
            f"WHERE idempotency_key IN ({placeholders(len(keys))}) FOR UPDATE",
            keys,
        )
        claimable: dict[str, int] = {}
        altered: list[int] = []
        for row in await fetch_all(cursor, _ClaimRow):
            key, attempt_id, state = row.idempotency_key, row.id, row.state
            if not _same_charge(by_key[key], row):
                if state is AttemptState.QUEUED and row.claimed_by == claimed_by:
                    # Written by this very statement, yet it reads back different: not a reused
                    # key but a value the column could not hold. Leave no row behind.
                    outcome.altered.add(key)
                    altered.append(attempt_id)
                else:
                    outcome.mismatched.add(key)
            elif state is AttemptState.QUEUED:
                claimable[key] = attempt_id
            else:
                outcome.already[key] = state
        if claimable:
            await _drop_stopped(cursor, claimable, by_key, outcome)
        if claimable:
            await _mark_in_flight(cursor, claimable, outcome, claimed_by=claimed_by, lease_s=lease_s)
        if outcome.cycle_taken:
            await fail_unsent(cursor, [(claimable[k], by_key[k]) for k in outcome.cycle_taken], CYCLE_TAKEN)
        if altered:
            await cursor.execute(
                f"DELETE FROM attempts WHERE id IN ({placeholders(len(altered))}) AND state = 'queued'",  # noqa: S608
                altered,
            )
    return outcome


SUBSCRIPTION_STOPPED: Final = {
    status: ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        retryable=False,
        decline_code=f"subscription_{status}",
        reason=f"the subscription was {status} after this renewal was published: not sent",
    )
    for status in ("canceled", "paused")
}


class _StoppedSubscription(msgspec.Struct, frozen=True, array_like=True):
    id: int
    status: Literal["canceled", "paused"]


async def _drop_stopped(
    cursor: Cursor, claimable: dict[str, int], by_key: Mapping[str, AttemptRequest], outcome: ClaimOutcome
) -> None:
    """Renewals of subscriptions canceled or paused since their request was published end
    failed, unsent.

    A customer who canceled (or whose subscription was paused, e.g. by ``payd refund --then
    pause``) is not charged for a try that was only queued: the change may have come while the
    request waited in the queue (or in a prefetch buffer). A plain read, not a locking one: the
    subscription's row is the record step's to lock, and a change committed after this read
    meets an attempt already under way (``paid_while_canceled``). Requests for subscriptions
    payd does not hold are not affected.
    """
    wanted = {by_key[key].subscription_id for key in claimable} - {None}
    if not wanted:
        return
    await cursor.execute(
        "SELECT id, status FROM subscriptions "  # noqa: S608 (placeholders only)
        f"WHERE id IN ({placeholders(len(wanted))}) AND status IN ('canceled', 'paused')",
        tuple(wanted),
    )
    stopped = {row.id: row.status for row in await fetch_all(cursor, _StoppedSubscription)}
    for status, result in SUBSCRIPTION_STOPPED.items():
        keys = [key for key in claimable if stopped.get(by_key[key].subscription_id or 0) == status]
        if keys:
            await fail_unsent(cursor, [(claimable[key], by_key[key]) for key in keys], result)
        for key in keys:
            del claimable[key]
            outcome.subscription_canceled.add(key)


CYCLE_TAKEN: Final = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="cycle_taken",
    reason="another attempt for this subscription cycle is in flight, unknown or succeeded",
)


async def fail_unsent(
    cursor: Cursor, rows: Sequence[tuple[int, AttemptRequest]], result: ChargeResult
) -> None:
    """Queued attempts that were never sent and never will be end failed, with their events.

    Kill Bill's CANCELED ("never submitted"), as opposed to UNDEFINED: a queued
    row has not reached a provider (the claim moves it to in_flight first), so
    finishing it cannot hide a charge.
    """
    ids = [attempt_id for attempt_id, _ in rows]
    await cursor.execute(
        "UPDATE attempts SET state = 'failed', outcome = %s, decline_code = %s, reason = %s, "  # noqa: S608
        "recheck_at = NULL, finished_at = NOW(6) "
        f"WHERE id IN ({placeholders(len(ids))}) AND state = 'queued'",
        (result.outcome.value, result.decline_code, result.reason, *ids),
    )
    occurred_at = now_iso()
    await insert_outbox(
        cursor,
        (
            payment_event(
                attempt_id=attempt_id,
                request=request,
                state=AttemptState.FAILED,
                result=result,
                occurred_at=occurred_at,
            )
            for attempt_id, request in rows
        ),
    )


async def _mark_in_flight(
    cursor: Cursor,
    claimable: dict[str, int],
    outcome: ClaimOutcome,
    *,
    claimed_by: str,
    lease_s: float,
) -> None:
    statement = (
        "UPDATE attempts SET state = 'in_flight', claimed_by = %s, claimed_at = NOW(6), "
        "recheck_at = NOW(6) + INTERVAL %s MICROSECOND "
        "WHERE id IN ({}) AND state = 'queued'"
    )
    lease_us = int(lease_s * 1_000_000)
    ids = list(claimable.values())
    try:
        await cursor.execute(statement.format(placeholders(len(ids))), (claimed_by, lease_us, *ids))
    except pymysql.err.IntegrityError as error:
        if error.args[0] != _ER_DUP_ENTRY:
            raise
    else:
        outcome.claimed.update(claimable)
        return
    # Some (subscription, cycle) in the batch is already held by another attempt.
    # InnoDB rolled back only the statement: claim row by row to find which.
    for key, attempt_id in claimable.items():
        try:
            await cursor.execute(statement.format("%s"), (claimed_by, lease_us, attempt_id))
            outcome.claimed[key] = attempt_id
        except pymysql.err.IntegrityError as error:
            if error.args[0] != _ER_DUP_ENTRY:
                raise
            outcome.cycle_taken.add(key)


async def record_outcomes(
    pool: aiomysql.Pool,
    records: Sequence[Record],
    *,
    unknown_recheck_s: float,
    policy: SubscriptionPolicy,
) -> RecordOutcome:
    """Write results, releases, subscription changes (under ``policy``) and events in one commit.

    A deadlock with a concurrent batch (MySQL 1213) rolls the whole transaction back, so the
    batch is simply written again, a few times, before the error reaches the pipeline (which
    counts a batch error and retries with backoff).
    """
    for retry in range(DEADLOCK_RETRIES + 1):
        result = RecordOutcome()
        try:
            async with transaction(pool) as cursor:
                await write_outcomes(
                    cursor, records, result, unknown_recheck_s=unknown_recheck_s, policy=policy
                )
        except pymysql.err.OperationalError as error:
            if error.args[0] != _ER_LOCK_DEADLOCK or retry == DEADLOCK_RETRIES:
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * (retry + 1)))  # noqa: S311 (jitter, not secrecy)
        else:
            return result
    raise AssertionError("unreachable: the last retry returns or raises")


async def write_outcomes(
    cursor: Cursor,
    records: Sequence[Record],
    into: RecordOutcome,
    *,
    unknown_recheck_s: float,
    policy: SubscriptionPolicy,
) -> None:
    ids = [record.attempt_id for record in records]
    await cursor.execute(
        f"SELECT id, state FROM attempts WHERE id IN ({placeholders(len(ids))}) FOR UPDATE",  # noqa: S608
        ids,
    )
    current = {row.id: row.state for row in await fetch_all(cursor, _StateRow)}

    updates: list[tuple[Any, ...]] = []
    events: list[OutboxRow] = []
    changes: list[tuple[AttemptRequest, AttemptState, ChargeResult]] = []
    chains: dict[int, tuple[int, str, str, str]] = {}
    occurred_at = now_iso()
    recheck_us = int(unknown_recheck_s * 1_000_000)
    for record in records:
        state_now = current.get(record.attempt_id)
        if record.result is None:
            # A release: never sent (drain, or its lease ran short). Back to the queue.
            if state_now is not AttemptState.IN_FLIGHT:
                into.skipped.append(record)
                continue
            # recheck_at becomes the queued-since time the orphan sweep looks at.
            updates.append((record.attempt_id, "queued", None, None, None, None, 0, record.tries))
            into.applied.append(record)
            continue
        new_state = STATE_OF_OUTCOME[record.result.outcome]
        settled = state_now is None or state_now in TERMINAL_STATES or state_now is AttemptState.QUEUED
        if settled or (new_state is AttemptState.UNKNOWN and state_now is AttemptState.UNKNOWN):
            into.skipped.append(record)
            continue
        r = record.result
        updates.append(
            (
                record.attempt_id,
                new_state.value,
                r.outcome.value,
                r.decline_code,
                r.provider_ref,
                (r.reason or "")[:255] or None,
                recheck_us if new_state is AttemptState.UNKNOWN else None,
                record.tries,
            )
        )
        events.append(
            payment_event(
                attempt_id=record.attempt_id,
                request=record.request,
                state=new_state,
                result=r,
                occurred_at=occurred_at,
                provider=record.provider,
            )
        )
        changes.append((record.request, new_state, r))
        sub_id = record.request.subscription_id
        if new_state is AttemptState.SUCCEEDED and sub_id is not None and r.provider_ref:
            # The stored-credential chain the subscription's next renewal continues.
            provider = record.provider or record.request.provider
            chains[sub_id] = (sub_id, provider, record.request.payment_method, r.provider_ref[:255])
        into.applied.append(record)

    if updates:
        derived, params = union_rows(
            updates,
            ("id", "state", "outcome", "decline_code", "provider_ref", "reason", "recheck_us", "tries"),
        )
        await cursor.execute(
            f"UPDATE attempts a JOIN ({derived}) v ON a.id = v.id SET "  # noqa: S608
            "a.state = v.state, a.outcome = v.outcome, a.decline_code = v.decline_code, "
            "a.provider_ref = v.provider_ref, a.reason = v.reason, "
            "a.recheck_at = IF(v.recheck_us IS NULL, NULL, NOW(6) + INTERVAL v.recheck_us MICROSECOND), "
            "a.finished_at = IF(v.state IN ('succeeded', 'declined', 'failed'), NOW(6), NULL), "
            "a.claimed_by = IF(v.state = 'queued', NULL, a.claimed_by), a.tries = a.tries + v.tries",
            params,
        )
    if changes:
        await apply_subscription_effects(cursor, changes, occurred_at=occurred_at, policy=policy)
        await save_chains(cursor, list(chains.values()))  # rows locked by the line above
    await insert_outbox(cursor, events)


class ParkedAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """An unknown attempt taken out of automatic reconciliation, and why."""

    attempt_id: int
    idempotency_key: str
    provider: str
    reason: str


async def expire_leases(pool: aiomysql.Pool, *, limit: int) -> list[int]:
    """In_flight rows whose claimer stopped renewing become unknown: they may have been sent."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            f"SELECT id, {_REQUEST_COLUMNS} FROM attempts "  # noqa: S608
            "WHERE state = 'in_flight' AND recheck_at < NOW(6) "
            "ORDER BY recheck_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        return await _make_unknown(cursor, await cursor.fetchall(), LEASE_EXPIRED)


LEASE_EXPIRED: Final = "lease expired: the instance that claimed it stopped"
TAKEN_OVER: Final = "taken over at start-up: the previous process of this instance stopped"


async def take_over_claims(pool: aiomysql.Pool, instance_id: str, *, limit: int) -> list[int]:
    """This instance's in_flight rows from an earlier process, made unknown now, lease or not.

    Only for a process that holds its instance's lock (``daemon.storage.identity``)
    and has claimed nothing yet: every such row belongs to a process that is gone,
    and may have reached the provider. Claims are ``INSTANCE_ID/SEQUENCE``.
    """
    prefix = f"{instance_id}/"
    async with transaction(pool) as cursor:
        await cursor.execute(
            f"SELECT id, {_REQUEST_COLUMNS} FROM attempts "  # noqa: S608
            "WHERE state = 'in_flight' AND LEFT(claimed_by, %s) = %s "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (len(prefix), prefix, limit),
        )
        return await _make_unknown(cursor, await cursor.fetchall(), TAKEN_OVER)


async def _make_unknown(cursor: Cursor, rows: Sequence[Sequence[Any]], reason: str) -> list[int]:
    """In_flight rows (id + request columns) to unknown, due a lookup now, with their events;
    a row whose request cannot be read back is parked instead of stopping the scan."""
    if not rows:
        return []
    ids = [row[0] for row in rows]
    await cursor.execute(
        "UPDATE attempts SET state = 'unknown', outcome = 'unknown', reason = %s, "  # noqa: S608
        f"recheck_at = NOW(6) WHERE id IN ({placeholders(len(ids))})",
        (reason, *ids),
    )
    unknown = ChargeResult(outcome=Outcome.UNKNOWN, reason=reason)
    occurred_at = now_iso()
    readable, unreadable = _read_requests(rows, first=1)
    await insert_outbox(
        cursor,
        (
            payment_event(
                attempt_id=row[0],
                request=request,
                state=AttemptState.UNKNOWN,
                result=unknown,
                occurred_at=occurred_at,
            )
            for row, request in readable
        ),
    )
    await _park(cursor, [(p.attempt_id, p.reason) for p in unreadable])
    return ids


def _read_requests(
    rows: Sequence[Sequence[Any]], *, first: int
) -> tuple[list[tuple[Sequence[Any], AttemptRequest]], list[ParkedAttempt]]:
    """Each row's request (its ``_REQUEST_COLUMNS`` start at ``first``), or why it cannot be read.

    A row payd cannot read back (metadata edited by hand, say) must not stop a
    scan that found it, on this instance or any other: it is parked instead.
    """
    readable: list[tuple[Sequence[Any], AttemptRequest]] = []
    unreadable: list[ParkedAttempt] = []
    for row in rows:
        try:
            readable.append((row, request_from_row(row[first:])))
        except (msgspec.MsgspecError, ValueError, TypeError) as error:
            unreadable.append(
                ParkedAttempt(
                    attempt_id=row[0],
                    idempotency_key=row[first],
                    provider=row[first + 3],
                    reason=f"row cannot be read: {type(error).__name__}: {error}"[:255],
                )
            )
    return readable, unreadable


NEVER_SENT: Final = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR,
    retryable=False,
    decline_code="never_sent",
    reason="queued with no owner (its message was lost or dead-lettered): never sent, nothing charged",
)


async def fail_orphaned_queued(
    pool: aiomysql.Pool, *, queued_for_s: float, limit: int
) -> tuple[list[int], list[ParkedAttempt]]:
    """Queued attempts nobody will claim end failed as ``never_sent``: their ids, and the
    rows that cannot be read back (left queued, out of the sweep, the reason on the row).

    A row is queued after a release (its message went back to the broker) or a
    dispatch, and ``recheck_at`` holds since when. Past ``queued_for_s`` without
    a claim, its message is taken to be gone (dead-lettered at the delivery
    limit, purged). An active or past-due subscription's pending try is the
    scheduler's: it publishes the request again, so such rows are only looked at
    again later. A canceled or paused one's try is failed like any orphan. A copy of the message
    that turns up after all finds the attempt settled and changes nothing.
    """
    async with transaction(pool) as cursor:
        await cursor.execute(
            f"SELECT id, {_REQUEST_COLUMNS} FROM attempts "  # noqa: S608
            "WHERE state = 'queued' AND recheck_at < NOW(6) - INTERVAL %s MICROSECOND "
            "ORDER BY recheck_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (int(queued_for_s * 1_000_000), limit),
        )
        readable, unreadable = _read_requests(await cursor.fetchall(), first=1)
        if unreadable:
            # Out of the sweep (recheck_at NULL), the reason on the row for an operator.
            derived, params = union_rows([(p.attempt_id, p.reason) for p in unreadable], ("id", "reason"))
            await cursor.execute(
                f"UPDATE attempts a JOIN ({derived}) v ON a.id = v.id "  # noqa: S608
                "SET a.recheck_at = NULL, a.reason = v.reason WHERE a.state = 'queued'",
                params,
            )
        rows = [(row[0], request) for row, request in readable]
        owned = await _scheduler_owned(cursor, [request for _, request in rows])
        if owned:
            await cursor.execute(
                "UPDATE attempts SET recheck_at = NOW(6) "  # noqa: S608
                f"WHERE idempotency_key IN ({placeholders(len(owned))}) AND state = 'queued'",
                sorted(owned),
            )
        orphans = [
            (attempt_id, request) for attempt_id, request in rows if request.idempotency_key not in owned
        ]
        if orphans:
            await fail_unsent(cursor, orphans, NEVER_SENT)
    return [attempt_id for attempt_id, _ in orphans], unreadable


async def _scheduler_owned(cursor: Cursor, requests: Sequence[AttemptRequest]) -> set[str]:
    """Keys that are the pending try of a scheduled subscription (a plain read, no locks).

    Only an active or past-due subscription's: the scheduler unschedules a canceled or paused
    one instead of publishing its try again, so that try is nobody's and ends here."""
    ids = sorted({r.subscription_id for r in requests if r.subscription_id is not None})
    if not ids:
        return set()
    await cursor.execute(
        "SELECT pending_key FROM subscriptions "  # noqa: S608
        f"WHERE id IN ({placeholders(len(ids))}) AND next_attempt_at IS NOT NULL AND pending_key IS NOT NULL "
        "AND status IN ('active', 'past_due')",
        ids,
    )
    pending = {row.pending_key for row in await fetch_all(cursor, _PendingKey)}
    return {r.idempotency_key for r in requests if r.idempotency_key in pending}


async def route_attempt(pool: aiomysql.Pool, attempt_id: int, provider: str) -> None:
    """Write-ahead for a failover: record where the attempt is about to be sent."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            "UPDATE attempts SET routed_provider = %s WHERE id = %s AND state = 'in_flight'",
            (provider, attempt_id),
        )


class DueUnknown(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: int
    request: AttemptRequest
    reconcile_tries: int
    seconds_since_claim: float
    routed_provider: str | None = None
    """Where a failover sent it; reconciliation must ask there."""
    provider_ref: str | None = None
    """The provider's reference from an earlier answer, if one came (iyzico looks up by it)."""

    @property
    def provider(self) -> str:
        return self.routed_provider or self.request.provider


async def take_due_unknown(
    pool: aiomysql.Pool, *, limit: int, backoff_s: Sequence[float]
) -> tuple[list[DueUnknown], list[ParkedAttempt]]:
    """Unknown attempts due a lookup, pushed back by their next backoff so no one else takes them.

    Rows that cannot be read back are parked in the same transaction and returned second.
    """
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id, reconcile_tries, TIMESTAMPDIFF(MICROSECOND, claimed_at, NOW(6)), routed_provider, "  # noqa: S608
            "provider_ref, "
            f"{_REQUEST_COLUMNS} "
            "FROM attempts WHERE state = 'unknown' AND recheck_at <= NOW(6) AND parked_at IS NULL "
            "ORDER BY recheck_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        rows = await cursor.fetchall()
        heads = {row[0]: msgspec.convert(row[:_DUE_HEAD], _DueHead) for row in rows}
        by_wait: dict[int, list[int]] = {}
        for head in heads.values():
            wait_us = int(backoff_s[min(head.reconcile_tries, len(backoff_s) - 1)] * 1_000_000)
            by_wait.setdefault(wait_us, []).append(head.id)
        for wait_us, ids in by_wait.items():
            await cursor.execute(
                "UPDATE attempts SET reconcile_tries = reconcile_tries + 1, "  # noqa: S608
                "recheck_at = NOW(6) + INTERVAL %s MICROSECOND "
                f"WHERE id IN ({placeholders(len(ids))})",
                (wait_us, *ids),
            )
        readable, unreadable = _read_requests(rows, first=_DUE_HEAD)
        due = [
            DueUnknown(
                attempt_id=head.id,
                reconcile_tries=head.reconcile_tries,
                seconds_since_claim=(head.us_since_claim or 0) / 1_000_000,
                routed_provider=head.routed_provider,
                provider_ref=head.provider_ref,
                request=request,
            )
            for head, request in ((heads[row[0]], request) for row, request in readable)
        ]
        await _park(cursor, [(p.attempt_id, p.reason) for p in unreadable])
    return due, unreadable


async def park_attempts(pool: aiomysql.Pool, parked: Sequence[tuple[int, str]]) -> None:
    """Take unknown attempts (id, reason) out of automatic reconciliation.

    They stay unknown (they may have charged); ``recheck_at`` NULL keeps every
    scan away until an operator settles them or unparks them.
    """
    if parked:
        async with transaction(pool) as cursor:
            await _park(cursor, parked)


async def _park(cursor: Cursor, parked: Sequence[tuple[int, str]]) -> None:
    if not parked:
        return
    derived, params = union_rows(parked, ("id", "reason"))
    await cursor.execute(
        f"UPDATE attempts a JOIN ({derived}) v ON a.id = v.id SET "  # noqa: S608
        "a.parked_at = NOW(6), a.reconcile_error = v.reason, a.recheck_at = NULL "
        "WHERE a.state = 'unknown'",
        params,
    )


async def unpark_attempts(pool: aiomysql.Pool, keys: Sequence[str] | None) -> list[str]:
    """Return parked attempts (``keys``, or all when None) to automatic reconciliation, due now.

    For after the cause is fixed (a new adapter release, say); their backoff
    starts again from its first step.
    """
    return await update_keyed(
        pool,
        table="attempts",
        where="state = 'unknown' AND parked_at IS NOT NULL",
        keys=keys,
        assign="parked_at = NULL, reconcile_error = NULL, reconcile_tries = 0, recheck_at = NOW(6)",
    )


async def count_by_state(pool: aiomysql.Pool) -> dict[str, int]:
    """For /status and tests: a small aggregate, served by the state index."""
    async with transaction(pool) as cursor:
        await cursor.execute("SELECT state, COUNT(*) FROM attempts GROUP BY state")
        return {row.state.value: row.count for row in await fetch_all(cursor, _StateCount)}


REQUEST_COLUMNS: Final = _REQUEST_COLUMNS
"""The nine columns ``request_from_row`` reads, for queries outside this module."""
