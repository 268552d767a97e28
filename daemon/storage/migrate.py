"""``payd migrate``: versioned, checksummed, idempotent schema migrations.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in
order under a named lock so two hosts migrating at once do not collide. DDL
commits implicitly in MySQL, so each file is recorded right after it applies;
every statement is written to be re-runnable (``IF NOT EXISTS``) in case a
run dies between the two.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable
from importlib import resources

import aiomysql
import msgspec
import pymysql

from daemon.storage.db import fetch_all, fetch_one, transaction
from daemon.storage.sqlsplit import split_statements

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql\Z")
_LOCK_NAME = "payd.migrate"


class Migration(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        return split_statements(self.sql)


class _Applied(msgspec.Struct, array_like=True, frozen=True):
    version: int
    checksum: str


class _Lock(msgspec.Struct, array_like=True, frozen=True):
    """``SELECT GET_LOCK(...)``: 1 taken, 0 timed out, NULL on an error."""

    held: int | None


class MigrationError(Exception):
    pass


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("daemon.storage").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(
                Migration(version=int(match["version"]), name=match["name"], sql=entry.read_text("utf-8"))
            )
    return sorted(found, key=lambda m: m.version)


async def migrate(pool: aiomysql.Pool, progress: Callable[[str], None] = print) -> int:
    """Apply pending migrations; return how many were applied."""
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SELECT GET_LOCK(%s, 60)", (_LOCK_NAME,))
        if (await fetch_one(cursor, _Lock)).held != 1:
            raise MigrationError("another payd migrate holds the migration lock; try again")
        try:
            return await _apply_pending(pool, progress)
        finally:
            await cursor.execute("SELECT RELEASE_LOCK(%s)", (_LOCK_NAME,))


async def _apply_pending(pool: aiomysql.Pool, progress: Callable[[str], None]) -> int:
    with warnings.catch_warnings():
        # "Table already exists" notes from IF NOT EXISTS are expected on re-runs.
        warnings.simplefilter("ignore", pymysql.Warning)
        return await _apply_pending_quietly(pool, progress)


async def _apply_pending_quietly(pool: aiomysql.Pool, progress: Callable[[str], None]) -> int:
    async with transaction(pool) as cursor:
        await cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INT UNSIGNED NOT NULL PRIMARY KEY,"
            " name VARCHAR(128) NOT NULL,"
            " checksum CHAR(64) CHARACTER SET ascii NOT NULL,"
            " applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
            ") ENGINE=InnoDB"
        )
        await cursor.execute("SELECT version, checksum FROM schema_migrations")
        applied = {row.version: row.checksum for row in await fetch_all(cursor, _Applied)}

    count = 0
    for migration in available_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} changed after it was "
                    "applied; add a new migration instead of editing an applied one"
                )
            continue
        progress(f"applying {migration.version:04d}_{migration.name}")
        async with transaction(pool) as cursor:
            for statement in migration.statements():
                await cursor.execute(statement)
            await cursor.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
        count += 1
    progress(f"schema up to date ({len(applied) + count} migrations applied)")
    return count
