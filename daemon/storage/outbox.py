"""Reading the outbox for the relay: lock a batch, publish it, delete what was confirmed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

import aiomysql
import msgspec

from daemon.events import OutboxRow
from daemon.storage.db import Cursor, fetch_all, placeholders, transaction

Publish = Callable[[Sequence[OutboxRow]], Awaitable[None]]


class _QueuedEvent(msgspec.Struct, array_like=True, frozen=True):
    id: int
    event_id: str
    target: str
    routing_key: str
    payload: bytes
    age_us: int
    """How long ago the row was written (MySQL's clock, at the locking read)."""


class _Lag(msgspec.Struct, array_like=True, frozen=True):
    oldest_us: int | None


async def insert_outbox(cursor: Cursor, rows: Iterable[OutboxRow]) -> None:
    """Queue events for the relay, in the transaction of the change they announce."""
    values = [value for row in rows for value in (row.event_id, row.target, row.routing_key, row.payload)]
    if values:
        await cursor.execute(
            "INSERT INTO outbox (event_id, target, routing_key, payload) VALUES "  # noqa: S608
            + placeholders(len(values) // 4, 4),
            values,
        )


async def relay_batch(
    pool: aiomysql.Pool,
    publish: Publish,
    *,
    limit: int,
    observe_lag: Callable[[float], None] | None = None,
    report_backlog_age: Callable[[float], None] | None = None,
) -> int:
    """Publish up to ``limit`` outbox rows with confirms; return how many went out.

    Rows stay locked (SKIP LOCKED lets other relays take the next ones) until
    the broker confirmed them and they are deleted in the same transaction. If
    publishing fails the transaction rolls back and the rows are sent again
    later: at least once, with stable event ids for consumers to dedupe.

    ``observe_lag`` gets, per row the broker confirmed, the seconds from the row's
    write (in the transaction of the change it announces) to the confirm: the row's age
    at the locking read, by MySQL's clock, plus the publish's duration, by this process's.
    ``report_backlog_age`` gets, once the batch is over, the age of the oldest row still
    waiting (rows other relays hold included), read in this transaction: no round trip of
    its own.
    """
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id, event_id, target, routing_key, payload, "
            "TIMESTAMPDIFF(MICROSECOND, created_at, NOW(6)) FROM outbox "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        rows = await fetch_all(cursor, _QueuedEvent)
        publish_s = 0.0
        if rows:
            read_at = time.monotonic()
            await publish([OutboxRow(row.event_id, row.target, row.routing_key, row.payload) for row in rows])
            publish_s = time.monotonic() - read_at
            ids = [row.id for row in rows]
            await cursor.execute(f"DELETE FROM outbox WHERE id IN ({placeholders(len(ids))})", ids)  # noqa: S608
        backlog_age = await read_outbox_lag(cursor) if report_backlog_age is not None else 0.0
    # Once committed: a batch rolled back goes out (and counts) again.
    if report_backlog_age is not None:
        report_backlog_age(backlog_age)
    if observe_lag is not None:
        for row in rows:
            observe_lag(max(0, row.age_us) / 1_000_000 + publish_s)
    return len(rows)


OLDEST_ROW_AGE_US: Final = (
    "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, NOW(6)) FROM outbox ORDER BY id LIMIT 1"
)
"""The age of the oldest unpublished row, by the primary key: one index dive however long the
outbox is (``MIN(created_at)`` would read every row, and the outbox is longest when the lag
matters). Ids are handed out as rows are written, so the lowest id is the oldest row, give or
take the few transactions in flight. A plain read: rows a relay holds locked still count."""


async def read_outbox_lag(cursor: Cursor) -> float:
    await cursor.execute(OLDEST_ROW_AGE_US)
    oldest = await fetch_all(cursor, _Lag)  # no row while the outbox is empty
    return max(0, oldest[0].oldest_us or 0) / 1_000_000 if oldest else 0.0
