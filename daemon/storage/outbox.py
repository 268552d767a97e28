"""Reading the outbox for the relay: lock a batch, publish it, delete what was confirmed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import aiomysql

from daemon.events import OutboxRow
from daemon.storage.db import Cursor, placeholders, transaction

Publish = Callable[[Sequence[OutboxRow]], Awaitable[None]]


async def relay_batch(pool: aiomysql.Pool, publish: Publish, *, limit: int) -> int:
    """Publish up to ``limit`` outbox rows with confirms; return how many went out.

    Rows stay locked (SKIP LOCKED lets other relays take the next ones) until
    the broker confirmed them and they are deleted in the same transaction. If
    publishing fails the transaction rolls back and the rows are sent again
    later: at least once, with stable event ids for consumers to dedupe.
    """
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT id, event_id, target, routing_key, payload FROM outbox "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        rows = await cursor.fetchall()
        if not rows:
            return 0
        await publish(
            [OutboxRow(event_id, target, key, bytes(payload)) for _, event_id, target, key, payload in rows]
        )
        ids = [row[0] for row in rows]
        await cursor.execute(f"DELETE FROM outbox WHERE id IN ({placeholders(len(ids))})", ids)  # noqa: S608
    return len(rows)


OLDEST_ROW_AGE_US: Final = (
    "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, NOW(6)) FROM outbox ORDER BY id LIMIT 1"
)
"""The age of the oldest unpublished row, by the primary key: one index dive however long the
outbox is (``MIN(created_at)`` would read every row, and the outbox is longest when the lag
matters). Ids are handed out as rows are written, so the lowest id is the oldest row, give or
take the few transactions in flight. A plain read: rows a relay holds locked still count."""


async def outbox_lag_seconds(pool: aiomysql.Pool) -> float:
    """Age of the oldest unpublished row (0 when empty): the relay's lag."""
    async with transaction(pool) as cursor:
        return await read_outbox_lag(cursor)


async def read_outbox_lag(cursor: Cursor) -> float:
    await cursor.execute(OLDEST_ROW_AGE_US)
    row = await cursor.fetchone()
    return max(0, row[0] or 0) / 1_000_000 if row else 0.0
