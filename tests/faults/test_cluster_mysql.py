"""A MySQL primary that turns read-only (demoted in a failover) costs payd no work and no charge.

A private MariaDB (its own data directory and port); the machine's MariaDB is not touched.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import aiomysql
import pymysql
import pytest

from daemon.config import MySQLSettings, parse_config
from daemon.secrets import Secret
from daemon.storage.db import close_pool, open_pool, transaction
from daemon.storage.faults import DbFault, classify
from daemon.storage.migrate import migrate
from tests.support import (
    DATABASE,
    Broker,
    DaemonFactory,
    DaemonProcess,
    Sandbox,
    config_text,
    eventually,
    query,
    request,
    wait_settled,
)
from tests.tls_servers import PrivateServer, private_mariadb


class Primary:
    def __init__(self, server: PrivateServer, directory: Path) -> None:
        self.server = server
        self.socket = directory / "mariadb.sock"
        self.settings = parse_config(
            config_text(
                sandbox_url="http://127.0.0.1:1",
                http_port=0,
                mysql={"port": server.port, "database": DATABASE, "pool_size": 4},
            )
        ).mysql

    def read_only(self, on: bool) -> None:
        """As a failover manager demotes a primary (https://mariadb.com/kb/en/server-system-variables/#read_only):
        users without the READ ONLY ADMIN privilege, such as payd's, can no longer write."""
        statement = f"SET GLOBAL read_only = {'ON' if on else 'OFF'}"
        command = ["mariadb", "--no-defaults", "-uroot", f"--socket={self.socket}", "-e", statement]
        subprocess.run(command, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Primary]:
    directory = tmp_path_factory.mktemp("primary") / "mariadb"
    with private_mariadb(directory, None, DATABASE) as server:
        yield Primary(server, directory)


@pytest.fixture
async def pool(primary: Primary) -> AsyncIterator[aiomysql.Pool]:
    primary.read_only(False)
    opened = await open_pool(primary.settings, Secret(primary.server.password, "test"))
    await migrate(opened, progress=lambda _: None)
    async with transaction(opened) as cursor:
        for table in ("attempts", "outbox", "subscriptions"):
            await cursor.execute(f"DELETE FROM {table}")
    yield opened
    await close_pool(opened)
    primary.read_only(False)


@pytest.fixture
async def reader(primary: Primary) -> AsyncIterator[aiomysql.Pool]:
    """The test's own view of the rows: autocommit, so each read sees the latest commits."""
    opened = await aiomysql.create_pool(
        host="127.0.0.1",
        port=primary.server.port,
        user="payd",
        password=primary.server.password,
        db=DATABASE,
        autocommit=True,
    )
    yield opened
    await close_pool(opened)


async def _fill(pool: aiomysql.Pool, count: int) -> None:
    held = [await pool.acquire() for _ in range(count)]
    for connection in held:
        pool.release(connection)


async def test_a_read_only_primary_drops_every_idle_connection_of_the_pool(
    primary: Primary, pool: aiomysql.Pool
) -> None:
    """A write refused with error 1290 (read-only) is classified READ_ONLY, and the pool's idle
    connections, which behind a virtual address would still reach the demoted server, are closed
    with it; a write after the primary takes writes again succeeds on a fresh connection. Fails
    on the code before: the one failed connection was closed, the idle ones kept."""
    await _fill(pool, 3)
    assert pool.freesize == 3
    await asyncio.to_thread(primary.read_only, True)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        async with transaction(pool) as cursor:
            await cursor.execute("DELETE FROM outbox")
    assert refused.value.args[0] == 1290  # ER_OPTION_PREVENTS_STATEMENT
    assert classify(refused.value) is DbFault.READ_ONLY
    assert pool.freesize == 0, "idle connections to the demoted primary were kept"
    await asyncio.to_thread(primary.read_only, False)
    async with transaction(pool) as cursor:
        await cursor.execute("DELETE FROM outbox")


async def test_a_connection_killed_mid_transaction_is_a_lost_connection(
    pool: aiomysql.Pool, reader: aiomysql.Pool
) -> None:
    """A connection the server kills mid-transaction (as a failover does to clients of the old
    primary) raises an error classified LOST_CONNECTION, and the next transaction runs on a fresh
    connection. Fails if the classification table loses the MariaDB/MySQL lost-connection codes."""
    with pytest.raises(pymysql.err.MySQLError) as lost:
        async with transaction(pool) as cursor:
            await cursor.execute("SELECT CONNECTION_ID()")
            (own_id,) = await cursor.fetchone()
            await query(reader, f"KILL {int(own_id)}")
            await cursor.execute("DELETE FROM outbox")
    assert classify(lost.value) is DbFault.LOST_CONNECTION, repr(lost.value)
    async with transaction(pool) as cursor:
        await cursor.execute("SELECT 1")


async def _batch_errors(daemon: DaemonProcess) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("payd_batch_errors_total{")
    )


async def test_a_primary_switched_read_only_mid_run_and_back_loses_nothing_and_charges_once(
    primary: Primary,
    pool: aiomysql.Pool,
    reader: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon working through 300 requests meets a primary switched to read_only (its batches
    fail, counted in payd_batch_errors_total) and then back: every attempt ends succeeded, the
    sandbox charged each key once. The claim releases its batch to the broker and the record keeps
    its outcomes and retries, so no work is lost while writes are refused."""
    monkeypatch.setenv("PAYD_MYSQL_PASSWORD", primary.server.password)
    await sandbox.behave(latency_ms=100)
    settings: MySQLSettings = primary.settings
    daemon = await daemons.process(
        mysql={"port": settings.port, "database": DATABASE}, providers__sandbox={"max_in_flight": 10}
    )
    keys = [f"ro-{i}" for i in range(300)]
    await broker.publish(request(key) for key in keys)

    async def under_way() -> bool:
        return int((await query(reader, "SELECT COUNT(*) FROM attempts"))[0][0]) >= 30

    await eventually(under_way, timeout=60, what="the run to be under way")
    await asyncio.to_thread(primary.read_only, True)
    try:

        async def refused() -> bool:
            return await _batch_errors(daemon) > 0

        await eventually(refused, timeout=30, what="the daemon to meet the read-only primary")
    finally:
        await asyncio.to_thread(primary.read_only, False)
    settled = await wait_settled(reader, keys, timeout=120)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == len(keys)


async def test_a_deadlock_is_a_conflict_that_rolls_back_one_side_only(
    pool: aiomysql.Pool, reader: aiomysql.Pool
) -> None:
    """Two transactions locking two rows in opposite orders: the server picks one to roll back
    with error 1213 (https://mariadb.com/kb/en/mariadb-error-code-reference/, ER_LOCK_DEADLOCK),
    classified CONFLICT; the other commits, and the pool keeps its idle connections (only a
    read-only primary empties it). Fails if the classification loses the deadlock code."""
    await query(reader, "CREATE TABLE IF NOT EXISTS lock_probe (id INT PRIMARY KEY, n INT NOT NULL)")
    await query(reader, "REPLACE INTO lock_probe VALUES (1, 0), (2, 0)")
    await _fill(pool, 3)
    holds = {1: asyncio.Event(), 2: asyncio.Event()}

    async def cross(first: int, second: int) -> None:
        async with transaction(pool) as cursor:
            await cursor.execute("UPDATE lock_probe SET n = n + 1 WHERE id = %s", (first,))
            holds[first].set()
            await holds[second].wait()
            await cursor.execute("UPDATE lock_probe SET n = n + 1 WHERE id = %s", (second,))

    results = await asyncio.gather(cross(1, 2), cross(2, 1), return_exceptions=True)
    errors = [result for result in results if isinstance(result, BaseException)]
    assert len(errors) == 1, results
    assert classify(errors[0]) is DbFault.CONFLICT, repr(errors[0])
    assert await query(reader, "SELECT SUM(n) FROM lock_probe") == [(2,)], (
        "one side committed, one rolled back"
    )
    assert pool.freesize >= 1
