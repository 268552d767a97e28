"""The MySQL/MariaDB connection pool and the transaction helper every query uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, TypeVar

import aiomysql
import msgspec
import pymysql
import structlog

from daemon.config import MySQLSettings
from daemon.secrets import Secret
from daemon.storage.faults import DbFault, classify
from daemon.tls import Link, TlsLinkError, client_context, naming_tls_failures

log = structlog.get_logger("payd.mysql")

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
_NOT_OFFERED = "the server did not offer TLS, so the connection was dropped unused"
_TIMEOUTS = "_payd_timeouts"

Row = tuple[Any, ...]
RowT = TypeVar("RowT", bound=msgspec.Struct)


class Cursor(Protocol):
    """What payd uses of an aiomysql cursor (aiomysql ships no type information).

    Rows come back as tuples; read them through ``fetch_all``/``fetch_one`` into an
    ``array_like`` Struct per SELECT, so each value has a name and a checked type.
    """

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Sequence[Sequence[Any]]:
        """Per column of the last result: its name first (PEP 249)."""
        ...

    @property
    def lastrowid(self) -> int:
        """The AUTO_INCREMENT id the last INSERT generated."""
        ...

    async def execute(self, query: str, args: Any = None) -> int: ...

    async def executemany(self, query: str, args: Any) -> int: ...

    async def fetchone(self) -> Row | None: ...

    async def fetchall(self) -> Sequence[Row]: ...


async def fetch_all(cursor: Cursor, row_type: type[RowT]) -> list[RowT]:
    """The result rows as ``row_type``, an ``array_like`` Struct whose fields are the SELECT
    list in order: a column added, dropped or of another type fails here, by name, instead
    of shifting every positional read after it."""
    return [msgspec.convert(row, row_type) for row in await cursor.fetchall()]


async def fetch_one(cursor: Cursor, row_type: type[RowT]) -> RowT:
    """The one row of a query that always has one (an aggregate, a function call)."""
    row = await cursor.fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return msgspec.convert(row, row_type)


# What a query can raise when the database is down, restarting or unreachable.
DB_ERRORS: Final = (pymysql.err.MySQLError, OSError, asyncio.TimeoutError)


class DatabaseTimeouts(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on waiting for the database, so a server that stops answering (frozen, a
    half-open connection) turns into errors instead of callers that wait forever.

    aiomysql bounds only the TCP connect; the handshake and every read wait forever
    without these.
    """

    acquire_s: float | None
    """A pooled connection, or a new one through its handshake."""
    query_s: float | None
    """One round trip: a statement with its result, or the commit."""
    probe_s: float
    """The health probe's whole transaction."""


UNBOUNDED: Final = DatabaseTimeouts(acquire_s=None, query_s=None, probe_s=3.0)
"""For pools opened elsewhere (tests, tools), and for migrations whose DDL may run long."""


def timeouts_of(pool: aiomysql.Pool) -> DatabaseTimeouts:
    timeouts: DatabaseTimeouts = getattr(pool, _TIMEOUTS, UNBOUNDED)
    return timeouts


async def open_pool(
    settings: MySQLSettings, password: Secret | None, *, bounded: bool = True
) -> aiomysql.Pool:
    """The pool every query uses; ``bounded=False`` lifts the query timeout (``payd migrate``)."""
    address = f"{settings.host}:{settings.port}"
    with naming_tls_failures(Link.MYSQL, address):
        pool = await _create_pool(settings, password)
    if settings.tls is not None:
        connection = await pool.acquire()  # the one create_pool opened
        pool.release(connection)
        if _in_the_clear(connection):
            await close_pool(pool)
            raise TlsLinkError(Link.MYSQL, address, _NOT_OFFERED)
    timeouts = DatabaseTimeouts(
        acquire_s=settings.acquire_timeout_s,
        query_s=settings.query_timeout_s if bounded else None,
        probe_s=settings.probe_timeout_s,
    )
    setattr(pool, _TIMEOUTS, timeouts)
    return pool


def _in_the_clear(connection: Any) -> bool:
    """aiomysql asked for TLS but carried on unencrypted: it does so when the server does not
    offer TLS (``_request_authentication`` in aiomysql/connection.py), which is also what a
    man in the middle would make it see. Such a connection must not carry payd's queries."""
    return getattr(connection, "_ssl_context", None) is not None and not getattr(connection, "_secure", False)


def _refuse_in_the_clear(connection: Any) -> None:
    if _in_the_clear(connection):  # CR_SSL_CONNECTION_ERROR: callers treat it as any database error
        raise pymysql.err.OperationalError(2026, f"mysql: {_NOT_OFFERED}")


async def _create_pool(settings: MySQLSettings, password: Secret | None) -> aiomysql.Pool:
    # The first connection is opened here; its handshake gets the acquire bound too.
    async with asyncio.timeout(settings.acquire_timeout_s):
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
            pool_recycle=settings.pool_recycle_s,
            ssl=client_context(Link.MYSQL, settings.tls) if settings.tls is not None else None,
        )


async def close_pool(pool: aiomysql.Pool) -> None:
    pool.close()
    await pool.wait_closed()


@asynccontextmanager
async def transaction(pool: aiomysql.Pool) -> AsyncIterator[Cursor]:
    """One transaction on a pooled connection: committed on success, rolled back on error.

    A connection whose transaction failed is closed rather than returned, so a
    half-broken socket never serves the next caller. Waiting for a connection and
    each round trip are bounded by the pool's ``DatabaseTimeouts``: past them the
    caller gets ``TimeoutError`` (one of ``DB_ERRORS``).
    """
    timeouts = timeouts_of(pool)
    async with asyncio.timeout(timeouts.acquire_s):
        connection = await pool.acquire()
    try:
        async with connection.cursor() as raw_cursor:
            cursor: Cursor = (
                raw_cursor if timeouts.query_s is None else _TimedCursor(raw_cursor, timeouts.query_s)
            )
            if not getattr(connection, _PREPARED, False):
                _refuse_in_the_clear(connection)
                await cursor.execute(_ISOLATION)
                setattr(connection, _PREPARED, True)
            yield cursor
        async with asyncio.timeout(timeouts.query_s):
            await connection.commit()
    except BaseException as error:
        connection.close()
        if classify(error) is DbFault.READ_ONLY:
            # A demoted primary: the idle connections reach it too. Dropped, the next ones go
            # through the virtual address to whichever server is primary now.
            log.warning("mysql.primary_read_only", error=repr(error), dropped_idle=pool.freesize)
            with contextlib.suppress(TimeoutError):  # the dropped ones are closed anyway, unsaid
                async with asyncio.timeout(timeouts.acquire_s):
                    await pool.clear()
        raise
    finally:
        pool.release(connection)


class _TimedCursor:
    """A cursor whose round trips give up after ``limit_s``; everything else is the cursor's own.

    A timed-out statement leaves the connection mid-protocol, so ``transaction``
    closes it (the server rolls the transaction back when the socket goes).
    """

    __slots__ = ("_cursor", "_limit_s")

    def __init__(self, cursor: Any, limit_s: float) -> None:
        self._cursor = cursor
        self._limit_s = limit_s

    async def execute(self, query: str, args: Any = None) -> int:
        async with asyncio.timeout(self._limit_s):
            count: int = await self._cursor.execute(query, args)
            return count

    async def executemany(self, query: str, args: Any) -> int:
        async with asyncio.timeout(self._limit_s):
            count: int = await self._cursor.executemany(query, args)
            return count

    # The rest reads what execute already received: no round trip to bound.
    @property
    def rowcount(self) -> int:
        count: int = self._cursor.rowcount
        return count

    @property
    def lastrowid(self) -> int:
        generated: int = self._cursor.lastrowid
        return generated

    @property
    def description(self) -> Sequence[Sequence[Any]]:
        described: Sequence[Sequence[Any]] = self._cursor.description
        return described

    async def fetchone(self) -> Row | None:
        row: Row | None = await self._cursor.fetchone()
        return row

    async def fetchall(self) -> Sequence[Row]:
        rows: Sequence[Row] = await self._cursor.fetchall()
        return rows


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


class _KeyRow(msgspec.Struct, array_like=True, frozen=True):
    idempotency_key: str


async def update_keyed(
    pool: aiomysql.Pool, *, table: str, where: str, keys: Sequence[str] | None, assign: str
) -> list[str]:
    """Lock the rows of ``table`` matching ``where`` (and ``keys``, or all when None), apply
    ``assign`` to them in the same transaction, and return their idempotency keys.

    ``table``, ``where`` and ``assign`` are the caller's fixed SQL text, never input.
    """
    params: list[Any] = []
    if keys is not None:
        if not keys:
            return []
        where += f" AND idempotency_key IN ({placeholders(len(keys))})"
        params.extend(keys)
    async with transaction(pool) as cursor:
        await cursor.execute(f"SELECT idempotency_key FROM {table} WHERE {where} FOR UPDATE", params)  # noqa: S608
        found = [row.idempotency_key for row in await fetch_all(cursor, _KeyRow)]
        if found:
            await cursor.execute(f"UPDATE {table} SET {assign} WHERE {where}", params)  # noqa: S608
    return found
