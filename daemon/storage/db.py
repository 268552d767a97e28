"""The MySQL/MariaDB connection pool and the transaction helper every query uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
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

Cursor = Any  # aiomysql ships no type information


async def open_pool(settings: MySQLSettings, password: Secret | None) -> aiomysql.Pool:
    address = f"{settings.host}:{settings.port}"
    with naming_tls_failures(Link.MYSQL, address):
        pool = await _connect_pool(settings, password)
    if settings.tls is not None:
        connection = await pool.acquire()  # the one create_pool opened
        pool.release(connection)
        if _in_the_clear(connection):
            await close_pool(pool)
            raise TlsLinkError(Link.MYSQL, address, _NOT_OFFERED)
    return pool


def _in_the_clear(connection: Any) -> bool:
    """aiomysql asked for TLS but carried on unencrypted: it does so when the server does not
    offer TLS (``_request_authentication`` in aiomysql/connection.py), which is also what a
    man in the middle would make it see. Such a connection must not carry payd's queries."""
    return getattr(connection, "_ssl_context", None) is not None and not getattr(connection, "_secure", False)


def _refuse_in_the_clear(connection: Any) -> None:
    if _in_the_clear(connection):  # CR_SSL_CONNECTION_ERROR: callers treat it as any database error
        raise pymysql.err.OperationalError(2026, f"mysql: {_NOT_OFFERED}")


async def _connect_pool(settings: MySQLSettings, password: Secret | None) -> aiomysql.Pool:
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
    half-broken socket never serves the next caller.
    """
    connection = await pool.acquire()
    try:
        async with connection.cursor() as cursor:
            if not getattr(connection, _PREPARED, False):
                _refuse_in_the_clear(connection)
                await cursor.execute(_ISOLATION)
                setattr(connection, _PREPARED, True)
            yield cursor
        await connection.commit()
    except BaseException as error:
        connection.close()
        if classify(error) is DbFault.READ_ONLY:
            # A demoted primary: the idle connections reach it too. Dropped, the next ones go
            # through the virtual address to whichever server is primary now.
            log.warning("mysql.primary_read_only", error=repr(error), dropped_idle=pool.freesize)
            await pool.clear()
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
