"""The MySQL/MariaDB connection pool and the transaction helper every query uses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import aiomysql
import pymysql

from daemon.config import MySQLSettings
from daemon.secrets import Secret

_SESSION_SETUP = (
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO', "
    "SESSION time_zone = '+00:00'"
)
# READ COMMITTED: claims and scans lock the rows they touch, not the gaps between
# them, so concurrent daemons do not deadlock on neighbouring keys. It cannot share
# the SET above (and its variable is named differently in MySQL and MariaDB), so it
# runs once on each new connection.
_ISOLATION = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
_PREPARED = "_payd_prepared"

Cursor = Any  # aiomysql ships no type information

# What a query can raise when the database is down, restarting or unreachable.
DB_ERRORS: Final = (pymysql.err.MySQLError, OSError, asyncio.TimeoutError)


async def open_pool(settings: MySQLSettings, password: Secret | None) -> aiomysql.Pool:
    return await aiomysql.create_pool(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=password.reveal() if password else "",
        db=settings.database,
        minsize=1,
        maxsize=settings.pool_size,
        autocommit=False,
        connect_timeout=settings.connect_timeout_s,
        init_command=_SESSION_SETUP,
        charset="utf8mb4",
        pool_recycle=3600,
    )


async def close_pool(pool: aiomysql.Pool) -> None:
    pool.close()
    await pool.wait_closed()


@asynccontextmanager
async def transaction(pool: aiomysql.Pool) -> AsyncIterator[Cursor]:
    """One transaction on a pooled connection: committed on success, rolled back on error.

    A connection whose transaction failed is closed rather than returned, so a
    half-broken socket never serves the next caller.
    """
    connection = await pool.acquire()
    try:
        async with connection.cursor() as cursor:
            if not getattr(connection, _PREPARED, False):
                await cursor.execute(_ISOLATION)
                setattr(connection, _PREPARED, True)
            yield cursor
        await connection.commit()
    except BaseException:
        connection.close()
        raise
    finally:
        pool.release(connection)


def placeholders(count: int, width: int = 1) -> str:
    """``(%s, %s), (%s, %s)`` for multi-row statements, or ``%s, %s`` for IN lists."""
    if width == 1:
        return ", ".join(["%s"] * count)
    row = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([row] * count)


def union_rows(rows: Sequence[tuple[Any, ...]], names: Sequence[str]) -> tuple[str, list[Any]]:
    """A derived table of literal rows that both MySQL 8 and MariaDB accept."""
    first = "SELECT " + ", ".join(f"%s AS {name}" for name in names)
    rest = " UNION ALL SELECT " + ", ".join(["%s"] * len(names))
    sql = first + rest * (len(rows) - 1)
    return sql, [value for row in rows for value in row]
