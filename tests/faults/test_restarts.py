"""The broker frozen and the database crashed, mid-run: nothing lost, nothing charged twice.

Each on a private instance (its own RabbitMQ node, its own MariaDB), so the
shared services never stop. Judged from outside: the attempts table of that
database, the sandbox gateway's ledger, the queue left empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aio_pika
import aiomysql
import pytest

from tests.faults.mariadb import PrivateMariaDB
from tests.support import (
    NAMESPACE,
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    request,
    reset_broker,
    wait_settled,
)
from tests.tls_servers import PrivateRabbitMQ

pytestmark = pytest.mark.slow


async def _succeeded(pool: aiomysql.Pool) -> int:
    with contextlib.suppress(Exception):  # the server is down for a moment: not yet
        async with pool.acquire() as connection, connection.cursor() as cursor:
            await cursor.execute("SELECT COUNT(*) FROM attempts WHERE state = 'succeeded'")
            (count,) = await cursor.fetchone()
            return int(count)
    return -1


async def test_a_broker_frozen_mid_run_loses_nothing_and_charges_once(
    db: aiomysql.Pool, sandbox: Sandbox, daemons: DaemonFactory, private_broker: PrivateRabbitMQ
) -> None:
    """SIGSTOP of the RabbitMQ node (every connection open, nothing answered: acks, confirms
    and deliveries hang) for 8 s while 20 calls are on the wire, then SIGCONT: every attempt
    ends succeeded, each charged once, and the queue is left empty."""
    url = f"amqp://payd:{private_broker.password}@127.0.0.1:{private_broker.port}/"
    broker = await reset_broker(url)
    await sandbox.behave(latency_ms=300)
    requests = [request(f"freeze-{i}", subscription_id=85_000 + i) for i in range(300)]
    try:
        await broker.publish(requests)
    finally:
        await broker.connection.close()
    await daemons.process(
        rabbitmq={"url": f"amqp://payd@127.0.0.1:{private_broker.port}/", "prefetch": 100},
        providers__sandbox={"max_in_flight": 20},
    )

    async def some_done() -> bool:
        return (await sandbox.stats())["charges"] >= 30

    await eventually(some_done, timeout=60, what="progress before the freeze")
    os.killpg(private_broker.process_group, signal.SIGSTOP)
    try:
        await asyncio.sleep(8)
    finally:
        os.killpg(private_broker.process_group, signal.SIGCONT)

    settled = await wait_settled(db, [r["idempotency_key"] for r in requests], timeout=180)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == len(requests)

    async def queue_empty() -> bool:
        fresh = await aio_pika.connect(url)
        try:
            channel = await fresh.channel()
            queue = await channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
            return queue.declaration_result.message_count == 0
        finally:
            await fresh.close()

    await eventually(queue_empty, timeout=60, what="the attempts queue to be empty")


async def test_a_database_crash_mid_run_loses_nothing_and_charges_once(
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    mariadb: PrivateMariaDB,
    fault_db: aiomysql.Pool,
) -> None:
    """MariaDB killed (SIGKILL, InnoDB crash recovery at restart) with claims and records under
    way, down 3 s, then back: claims that failed went back to the queue, outcomes that could
    not be recorded were kept and retried, every attempt ends succeeded and is charged once."""
    await sandbox.behave(latency_ms=200)
    mysql = {**mariadb.mysql_section, "acquire_timeout_s": 2, "query_timeout_s": 5, "probe_timeout_s": 1}
    await daemons.process(mysql=mysql, providers__sandbox={"max_in_flight": 20})
    keys = [f"crash-{i}" for i in range(300)]
    await broker.publish(request(key, subscription_id=87_000 + i) for i, key in enumerate(keys))

    async def some_done() -> bool:
        return await _succeeded(fault_db) >= 30

    await eventually(some_done, timeout=60, what="progress before the crash")
    await asyncio.to_thread(mariadb.crash_and_restart, 3.0)

    settled = await wait_settled(fault_db, keys, timeout=180)
    assert set(settled.values()) == {"succeeded"}, settled
    assert len(await sandbox.assert_no_double_charge()) == len(keys)
