"""Every statement on the ``subscriptions`` table, plus the dispatch writes, batched.

Nothing here commits: callers run these inside the transaction whose cause
they belong to (a recorded outcome, a scheduler batch, a manual retry).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from daemon.models import AttemptRequest, AttemptState
from daemon.storage.db import Cursor, fetch_one, placeholders, union_rows
from daemon.subscriptions.model import Subscription

# The columns are the struct's fields, in its order: a row is decoded by name and type.
SUBSCRIPTION_COLUMNS: Final = ", ".join(Subscription.__struct_fields__)
_SAVED: Final = (
    "status",
    "paid_cycle",
    "billing_anchor",
    "anchor_cycle",
    "current_period_end",
    "next_attempt_at",
    "pending_key",
    "next_try",
    "dunning_step",
    "status_reason",
    "deferred_by",
    "deferred_until",
)
_ATTEMPT_COLUMNS: Final = (
    "idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
    "payment_method, customer_ref, metadata, state"
)
_encode = msgspec.json.Encoder().encode


def subscription_from_row(row: Sequence[Any]) -> Subscription:
    """A row of ``SUBSCRIPTION_COLUMNS``, checked field by field (a NULL where none may be, an
    unknown status or interval unit fail here, naming the field)."""
    return msgspec.convert(dict(zip(Subscription.__struct_fields__, row, strict=True)), Subscription)


async def save_chains(cursor: Cursor, chains: Sequence[tuple[int, str, str, str]]) -> None:
    """Keep each (subscription id, provider, payment method, provider reference) of an approved
    attempt as the subscription's stored-credential chain, for its next renewal to send."""
    if not chains:
        return
    derived, params = union_rows(sorted(chains), ("id", "provider", "method", "ref"))
    await cursor.execute(
        f"UPDATE subscriptions s JOIN ({derived}) v ON s.id = v.id SET "  # noqa: S608 (placeholders only)
        "s.chain_provider = v.provider, s.chain_payment_method = v.method, s.chain_ref = v.ref",
        params,
    )


class _Now(msgspec.Struct, array_like=True, frozen=True):
    now: datetime


async def database_now(cursor: Cursor) -> datetime:
    """The database's clock: every instance schedules against the same one."""
    await cursor.execute("SELECT NOW(6)")
    return (await fetch_one(cursor, _Now)).now


async def lock_subscriptions(cursor: Cursor, ids: Sequence[int]) -> dict[int, Subscription]:
    """Read and lock these subscriptions (waiting for other holders), in id order."""
    await cursor.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions "  # noqa: S608 (placeholders only)
        f"WHERE id IN ({placeholders(len(ids))}) ORDER BY id FOR UPDATE",
        list(ids),
    )
    subs = [subscription_from_row(row) for row in await cursor.fetchall()]
    return {sub.id: sub for sub in subs}


async def claim_due(
    cursor: Cursor, *, now: datetime, limit: int, after: tuple[datetime, int] | None
) -> list[Subscription]:
    """Lock up to ``limit`` due subscriptions nobody else holds, oldest due first.

    Served by ``ix_subscriptions_due (next_attempt_at, id)``: a range from the
    start of the due part of the index (or from the ``after`` cursor, the last
    row of the previous batch of this pass) up to ``now``, stopping after
    ``limit`` rows. Rows locked by another scheduler are skipped, not waited
    for. The cost of a batch depends on ``limit``, not on the table.
    """
    keyset = ""
    params: list[Any] = [now]
    if after is not None:
        keyset = "AND next_attempt_at >= %s AND (next_attempt_at > %s OR id > %s) "
        params += [after[0], after[0], after[1]]
    await cursor.execute(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions FORCE INDEX (ix_subscriptions_due) "  # noqa: S608
        f"WHERE next_attempt_at <= %s {keyset}"
        "ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
        [*params, limit],
    )
    return [subscription_from_row(row) for row in await cursor.fetchall()]


async def save_subscriptions(
    cursor: Cursor, subs: Sequence[Subscription], status_changed: Iterable[int] = ()
) -> None:
    """Write the lifecycle columns of ``subs`` back in one statement."""
    if not subs:
        return
    changed = set(status_changed)
    rows = [
        (
            s.id,
            s.status.value,
            s.paid_cycle,
            s.billing_anchor,
            s.anchor_cycle,
            s.current_period_end,
            s.next_attempt_at,
            s.pending_key,
            s.next_try,
            s.dunning_step,
            s.status_reason,
            s.deferred_by,
            s.deferred_until,
            1 if s.id in changed else 0,
        )
        for s in subs
    ]
    derived, params = union_rows(rows, ("id", *_SAVED, "status_changed"))
    assignments = ", ".join(f"s.{column} = v.{column}" for column in _SAVED)
    await cursor.execute(
        f"UPDATE subscriptions s JOIN ({derived}) v ON s.id = v.id SET {assignments}, "  # noqa: S608
        "s.status_changed_at = IF(v.status_changed = 1, NOW(6), s.status_changed_at)",
        params,
    )


async def mark_dispatched(cursor: Cursor, ids: Sequence[int], *, next_attempt_at: datetime) -> None:
    """The scheduler's common case in one plain statement: each row now waits on try
    ``next_try`` of cycle ``paid_cycle + 1``, whose key ``model.dispatch_key`` also builds.

    The rows are locked by this transaction since they were read, so the key
    computed here from their columns is the one the caller dispatched. Assigning
    ``pending_key`` before ``next_try`` gives the same result whether the server
    assigns left to right (MySQL) or simultaneously (MariaDB's optional mode).
    Five times cheaper than ``save_subscriptions``' derived table for a batch.
    """
    if ids:
        await cursor.execute(
            "UPDATE subscriptions SET "  # noqa: S608 (placeholders only)
            "pending_key = CONCAT('renew:', id, ':', paid_cycle + 1, ':', next_try), "
            "next_try = next_try + 1, deferred_by = NULL, deferred_until = NULL, "
            f"next_attempt_at = %s WHERE id IN ({placeholders(len(ids))})",
            [next_attempt_at, *ids],
        )


async def insert_queued_attempts(cursor: Cursor, requests: Sequence[AttemptRequest]) -> None:
    """The write-ahead rows of dispatched tries, ``queued`` until a daemon claims them.

    ``recheck_at`` says since when, as for a released attempt, so the orphan sweep sees them:
    it leaves the scheduler the tries it still waits on and ends those nobody will send again
    (their subscription canceled or paused while the try was queued)."""
    if not requests:
        return
    values: list[Any] = []
    for r in requests:
        values += (
            r.idempotency_key,
            r.subscription_id,
            r.cycle,
            r.provider,
            r.amount_minor,
            r.currency,
            r.payment_method,
            r.customer_ref,
            _encode(r.metadata) if r.metadata else None,
            AttemptState.QUEUED.value,
        )
    await cursor.execute(
        f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}, recheck_at) "  # noqa: S608 (placeholders only)
        f"VALUES {_queued_rows(len(requests))} ON DUPLICATE KEY UPDATE id = id",
        values,
    )


def _queued_rows(count: int) -> str:
    return ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NOW(6))"] * count)
