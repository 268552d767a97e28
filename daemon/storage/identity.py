"""One live process per instance id, and the takeover of its predecessor's claims.

An instance restarted under the same stable id (the systemd instance name, the
host) finds the attempts its previous process had in flight. That process is
gone, so rather than wait for their leases (``pipeline.lease_s``) the new one
marks them unknown at once and reconciliation asks the provider about them.

"Gone" rests on one process per id: systemd runs one process per unit, and a
MySQL named lock, ``GET_LOCK('payd.instance.DATABASE.ID')``, held on a
connection of its own for the process's lifetime, guards it. A process that
cannot take the lock (another live process has the id, or the server has not
yet noticed that a crashed host's connection is dead) takes over nothing and
runs on; leases settle those claims as before.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import aiomysql
import msgspec
import structlog

from daemon.config import MySQLSettings
from daemon.metrics import Metrics
from daemon.secrets import Secret
from daemon.storage.attempts import take_over_claims
from daemon.storage.db import DB_ERRORS, fetch_one

log = structlog.get_logger("payd")

LOCK_WAIT_S: Final = 5
_MAX_LOCK_NAME: Final = 64  # MySQL and MariaDB refuse longer lock names
_TAKEOVER_BATCH: Final = 1000
_A_YEAR_S: Final = 31536000  # the largest wait_timeout both servers accept


class _Lock(msgspec.Struct, array_like=True, frozen=True):
    """``SELECT GET_LOCK(...)``: 1 taken, 0 timed out, NULL on an error (killed, say)."""

    held: int | None


def lock_name(database: str, instance_id: str) -> str:
    name = f"payd.instance.{database}.{instance_id}"
    if len(name) <= _MAX_LOCK_NAME:
        return name
    return "payd.instance." + hashlib.sha256(name.encode()).hexdigest()[:48]


@asynccontextmanager
async def instance_identity(
    settings: MySQLSettings,
    password: Secret | None,
    pool: aiomysql.Pool,
    *,
    instance_id: str,
    metrics: Metrics,
) -> AsyncIterator[bool]:
    """Hold this instance's lock for the process's lifetime and, holding it, take over the
    previous process's claims; yield whether the lock is held. Enter before claiming anything."""
    try:
        async with asyncio.timeout(settings.acquire_timeout_s):  # the handshake included
            connection = await aiomysql.connect(
                host=settings.host,
                port=settings.port,
                user=settings.user,
                password=password.reveal() if password else "",
                db=settings.database,
                connect_timeout=settings.connect_timeout_s,
                autocommit=True,
            )
    except DB_ERRORS as error:
        # The takeover only shortens recovery; without the lock, leases still settle the claims.
        log.error("instance.lock_unavailable", instance=instance_id, error=repr(error))
        yield False
        return
    try:
        async with connection.cursor() as cursor:
            # An idle connection is closed after wait_timeout (8 h by default), and the lock with it.
            await cursor.execute(f"SET SESSION wait_timeout = {_A_YEAR_S}")
            await cursor.execute(
                "SELECT GET_LOCK(%s, %s)", (lock_name(settings.database, instance_id), LOCK_WAIT_S)
            )
            held = (await fetch_one(cursor, _Lock)).held
        if held == 1:
            await _take_over(pool, instance_id, metrics)
        else:
            log.error(
                "instance.lock_held_elsewhere",
                instance=instance_id,
                consequence="no takeover: another live process may have this instance_id; leases apply",
            )
        yield held == 1
    finally:
        connection.close()  # the server releases the lock with the connection


async def _take_over(pool: aiomysql.Pool, instance_id: str, metrics: Metrics) -> None:
    taken = 0
    while batch := await take_over_claims(pool, instance_id, limit=_TAKEOVER_BATCH):
        taken += len(batch)
        metrics.claims_taken_over.inc(len(batch))
    if taken:
        log.warning("instance.claims_taken_over", instance=instance_id, count=taken, now="unknown")
