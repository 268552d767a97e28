"""A database that stops answering (SIGSTOP on a private MariaDB): payd notices and recovers.

The server is frozen, not stopped: its sockets stay open and connects are still
accepted by the kernel, so nothing fails fast. Only timeouts can tell.
"""

from __future__ import annotations

import asyncio

import aiohttp
import aiomysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import MySQLSettings
from daemon.secrets import load_secret
from daemon.storage.db import close_pool, open_pool, transaction
from tests.faults.mariadb import DATABASE, PrivateMariaDB
from tests.support import NAMESPACE, Broker, DaemonFactory, Sandbox, eventually, request

pytestmark = pytest.mark.slow

# Generous bound on a hang: the configured timeouts are 1-2 s; reaching this means "waits forever".
HANG_S = 60.0


async def _states(pool: aiomysql.Pool) -> dict[str, str]:
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SELECT idempotency_key, state FROM attempts")
        return {key: state for key, state in await cursor.fetchall()}


async def _ready(port: int) -> bool:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status == 200


async def _finishes(task: asyncio.Task[object], server: PrivateMariaDB) -> BaseException | None:
    """What ``task`` raised, failing the test if it is still waiting after HANG_S."""
    done, _ = await asyncio.wait({task}, timeout=HANG_S)
    if not done:
        # Let the server answer so the waiting query (and the pool) can finish, then fail.
        server.thaw()
        await asyncio.wait({task}, timeout=HANG_S)
        raise AssertionError(f"still waiting on the frozen database after {HANG_S} s")
    return task.exception()


async def test_pool_operations_time_out_on_a_frozen_server(mariadb: PrivateMariaDB) -> None:
    """With the server frozen, a query on an open connection and the opening of a new one
    (TCP accepted by the kernel, handshake never answered) both end in TimeoutError within
    the configured bounds instead of waiting forever; after SIGCONT the same pool works."""
    settings = MySQLSettings(
        port=mariadb.port, database=DATABASE, pool_size=2, acquire_timeout_s=1, query_timeout_s=1
    )
    pool = await open_pool(settings, load_secret("mysql_password"))

    async def one_query() -> object:
        async with transaction(pool) as cursor:
            await cursor.execute("SELECT 1")
            return await cursor.fetchone()

    try:
        assert await one_query() == (1,)
        mariadb.freeze()
        # The pooled connection: its statement is never answered.
        assert isinstance(await _finishes(asyncio.create_task(one_query()), mariadb), TimeoutError)
        # That connection was closed, so this one must be opened: the handshake is never answered.
        assert isinstance(await _finishes(asyncio.create_task(one_query()), mariadb), TimeoutError)
        mariadb.thaw()
        assert await one_query() == (1,)
    finally:
        mariadb.thaw()
        await close_pool(pool)


async def test_readyz_sees_a_frozen_database_and_payd_recovers(
    mariadb: PrivateMariaDB,
    fault_db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
) -> None:
    """Issue: with MariaDB frozen, /readyz stayed 200. Now the probe's bounded round trip
    fails, /readyz turns 503 and payd_database_ok drops to 0; attempts published during
    the freeze wait (nothing is charged without its write-ahead row), and after SIGCONT
    /readyz is green again and every attempt succeeds exactly once."""
    mysql = {**mariadb.mysql_section, "acquire_timeout_s": 1, "query_timeout_s": 2, "probe_timeout_s": 1}
    before = [f"db-before-{i}" for i in range(20)]
    during = [f"db-during-{i}" for i in range(20)]
    async with daemons.in_process(mysql=mysql) as daemon:
        await broker.publish(request(key) for key in before)

        async def settled(keys: list[str]) -> bool:
            current = await _states(fault_db)
            return all(current.get(key) == "succeeded" for key in keys)

        await eventually(lambda: settled(before), timeout=60, what="attempts before the freeze")
        assert await _ready(daemon.port)

        mariadb.freeze()
        try:
            await broker.publish(request(key) for key in during)
            await eventually(lambda: _not_ready(daemon.port), timeout=HANG_S, what="/readyz to turn red")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
            ):
                assert "payd_database_ok 0.0" in await response.text()
            charged_while_frozen = {c["idempotency_key"] for c in await sandbox.ledger()}
            assert not charged_while_frozen & set(during), "a call went out without its write-ahead row"
        finally:
            mariadb.thaw()

        await eventually(lambda: _ready(daemon.port), timeout=HANG_S, what="/readyz to turn green again")
        await eventually(lambda: settled(before + during), timeout=120, what="every attempt to succeed")
    approved = await sandbox.assert_no_double_charge()
    assert {c["idempotency_key"] for c in approved} == set(before + during)


async def _not_ready(port: int) -> bool:
    return not await _ready(port)


async def _metric(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_intake_pauses_while_the_database_does_not_answer_and_resumes_after(
    mariadb: PrivateMariaDB,
    fault_db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
) -> None:
    """While the database was frozen the daemon went on taking deliveries it could not claim,
    holding them in memory and handing them back to the queue over and over. Now intake pauses
    while the probe says the database does not answer: requests published meanwhile stay in the
    queue with no consumer of this instance on it (another instance could take them), the pause
    is shown by payd_intake_paused; once the database answers, intake resumes and every request
    is charged exactly once."""
    mysql = {**mariadb.mysql_section, "acquire_timeout_s": 1, "query_timeout_s": 2, "probe_timeout_s": 1}
    keys = [f"paused-{i}" for i in range(20)]
    async with daemons.in_process(mysql=mysql) as daemon:
        assert await _metric(daemon.port, "payd_intake_paused") == 0
        mariadb.freeze()
        try:
            await eventually(lambda: _not_ready(daemon.port), timeout=HANG_S, what="/readyz to turn red")
            await broker.publish(request(key) for key in keys)

            async def left_in_the_queue() -> bool:
                queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
                result = queue.declaration_result
                return result.message_count == len(keys) and result.consumer_count == 0

            await eventually(left_in_the_queue, timeout=HANG_S, what="the requests to wait unconsumed")
            assert await _metric(daemon.port, "payd_intake_paused") == 1
        finally:
            mariadb.thaw()

        async def settled() -> bool:
            current = await _states(fault_db)
            return all(current.get(key) == "succeeded" for key in keys)

        await eventually(settled, timeout=120, what="every request to be charged after the thaw")
        assert await _metric(daemon.port, "payd_intake_paused") == 0
    approved = await sandbox.assert_no_double_charge()
    assert {c["idempotency_key"] for c in approved} == set(keys)


async def test_an_admin_request_held_up_by_a_frozen_database_is_a_503_that_does_not_blame_redis(
    mariadb: PrivateMariaDB, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """``payd attempts show`` over HTTP while MariaDB is frozen: the bounded round trip times
    out and the answer is a 503 saying the request did not finish, whose effect is unknown. It
    used to say "the halt store (Redis) failed", sending the operator to the wrong service."""
    mysql = {**mariadb.mysql_section, "acquire_timeout_s": 1, "query_timeout_s": 2, "probe_timeout_s": 1}
    token = load_secret("control_token")
    assert token is not None
    headers = {"Authorization": f"Bearer {token.reveal()}"}
    async with daemons.in_process(mysql=mysql) as daemon:
        mariadb.freeze()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{daemon.port}/admin/attempts/frozen-1", headers=headers
                ) as answer,
            ):
                status, body = answer.status, await answer.json()
        finally:
            mariadb.thaw()
    assert status == 503, body
    assert "did not finish in time" in body["error"] and "Redis) failed" not in body["error"]
    assert body["changed"].startswith("unknown")
