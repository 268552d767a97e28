"""Invariants under real process behaviour: several daemons, kill -9, signals, broker restarts.

Each daemon here is a real ``payd run`` process, as under systemd.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aio_pika
import aiomysql
import pytest

from tests.support import (
    NAMESPACE,
    TERMINAL,
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    query,
    request,
    reset_broker,
    states,
    wait_settled,
)
from tests.tls_servers import PrivateRabbitMQ

pytestmark = pytest.mark.slow

# Short leases so that attempts orphaned by a killed daemon are reconciled within a test.
FAST_RECOVERY = {"pipeline": {"lease_s": 2.5}, "providers__sandbox": {"timeout_s": 1}}


async def count_in(db: aiomysql.Pool, *wanted: str) -> int:
    return sum(1 for state in (await states(db)).values() if state in wanted)


async def test_two_daemons_on_one_queue(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Two daemons consume the same queue while every message is delivered twice: each
    attempt is charged once, both daemons did work, every attempt ends terminal."""
    await sandbox.behave(latency_ms=20)
    first = await daemons.process(rabbitmq={"prefetch": 50})
    second = await daemons.process(rabbitmq={"prefetch": 50})
    requests = [request(f"two-{i}", subscription_id=20_000 + i) for i in range(400)]
    await broker.publish(requests)
    await broker.publish(requests)  # every message twice
    settled = await wait_settled(db, [r["idempotency_key"] for r in requests])
    assert set(settled.values()) == {"succeeded"}
    approved = await sandbox.assert_no_double_charge()
    assert len(approved) == 400
    claimed = [(await d.status())["counters"]["claimed"] for d in (first, second)]
    assert all(count > 0 for count in claimed), f"both daemons should have worked: {claimed}"
    assert sum(claimed) == 400


@pytest.mark.parametrize("kill_after", [1, 60, 150])
async def test_kill_9_mid_flight_then_restart(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, kill_after: int
) -> None:
    """kill -9 after ``kill_after`` attempts settled, twice, then a clean daemon: nothing is
    lost (unknowns are reconciled) and nothing is charged twice."""
    await sandbox.behave(latency_ms=150, latency_dist="uniform")
    requests = [request(f"k9-{i}", subscription_id=30_000 + i) for i in range(200)]
    keys = [r["idempotency_key"] for r in requests]
    await broker.publish(requests)
    for round_number in range(2):
        victim = await daemons.process(rabbitmq={"prefetch": 100}, **FAST_RECOVERY)
        target = kill_after * (round_number + 1)

        async def progressed(target: int = target) -> bool:
            return await count_in(db, *TERMINAL) >= min(target, 150)

        await eventually(progressed, timeout=60, what=f"{target} settled attempts")
        victim.process.send_signal(signal.SIGKILL)
        await victim.wait_exit(10)
    in_flight_when_killed = await count_in(db, "in_flight")

    await daemons.process(rabbitmq={"prefetch": 100}, **FAST_RECOVERY)
    settled = await wait_settled(db, keys, timeout=90)
    assert set(settled.values()) == {"succeeded"}, "pm_ok always succeeds, however often we crash"
    approved = await sandbox.assert_no_double_charge()
    assert {c["idempotency_key"] for c in approved} == set(keys)
    if in_flight_when_killed:
        (reconciled,) = (await query(db, "SELECT COUNT(*) FROM attempts WHERE reconcile_tries > 0"))[0]
        assert reconciled >= 1, "orphaned in-flight attempts went through reconciliation"


async def test_sigterm_under_load_drains_and_exits_zero(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """SIGTERM mid-run: exit 0 within the drain timeout, no attempt left in_flight, what was not
    sent went back to the queue, and a later daemon finishes everything, charged once."""
    await sandbox.behave(latency_ms=400)
    requests = [request(f"drain-{i}", subscription_id=40_000 + i) for i in range(300)]
    await broker.publish(requests)
    daemon = await daemons.process(rabbitmq={"prefetch": 300}, providers__sandbox={"max_in_flight": 40})

    async def busy() -> bool:
        return await count_in(db, "succeeded") >= 40

    await eventually(busy, timeout=60, what="the daemon to be busy")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = await daemon.wait_exit(20)
    assert code == 0, daemon.log()
    assert time.monotonic() - started < 10 + 2, "drain finished within drain_timeout_s"
    after = await states(db)
    assert "in_flight" not in after.values(), "drain settled or returned every claimed attempt"

    await daemons.process()
    settled = await wait_settled(db, [r["idempotency_key"] for r in requests], timeout=90)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 300


async def test_second_sigterm_exits_at_once_without_double_charge(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A second signal cuts a long drain short: the process is gone while its calls are still
    on the wire; they are reconciled later, never charged twice, and all end terminal."""
    await sandbox.behave(latency_ms=8000)
    requests = [request(f"twice-{i}", subscription_id=50_000 + i) for i in range(20)]
    await broker.publish(requests)
    daemon = await daemons.process(
        daemon={"drain_timeout_s": 30},
        pipeline={"lease_s": 20},
        providers__sandbox={"timeout_s": 9},
    )

    async def calling() -> bool:
        return (await sandbox.stats())["in_flight"] >= 20

    await eventually(calling, timeout=20, what="calls on the wire")
    daemon.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_exit(30)
    assert (await sandbox.stats())["in_flight"] > 0, "it exited without waiting for its calls"

    await daemons.process(pipeline={"lease_s": 20}, providers__sandbox={"timeout_s": 9})
    settled = await wait_settled(db, [r["idempotency_key"] for r in requests], timeout=120)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 20


async def test_broker_restart_mid_run(
    db: aiomysql.Pool, sandbox: Sandbox, daemons: DaemonFactory, private_broker: PrivateRabbitMQ
) -> None:
    """RabbitMQ stops and starts while attempts are in flight: the daemon reconnects, finishes
    every attempt, charges none twice (stale deliveries are never acked on the new channel).
    The broker is a private node, so the stop affects this test alone."""
    url = f"amqp://payd:{private_broker.password}@127.0.0.1:{private_broker.port}/"
    broker = await reset_broker(url)
    # 300 attempts at 400 ms, 20 at a time, take about 6 s: the broker stops with most of them left.
    await sandbox.behave(latency_ms=400)
    requests = [request(f"rmq-{i}", subscription_id=60_000 + i) for i in range(300)]
    try:
        await broker.publish(requests)
    finally:
        await broker.connection.close()
    daemon = await daemons.process(
        rabbitmq={"url": f"amqp://payd@127.0.0.1:{private_broker.port}/", "prefetch": 100},
        providers__sandbox={"max_in_flight": 20},
    )

    async def some_done() -> bool:
        return await count_in(db, "succeeded") >= 30

    await eventually(some_done, timeout=60, what="progress before the restart")
    # https://www.rabbitmq.com/docs/man/rabbitmqctl.8 (stop_app, start_app, await_startup)
    await asyncio.to_thread(private_broker.ctl, "stop_app")
    try:
        await asyncio.sleep(2)
    finally:
        await asyncio.to_thread(private_broker.ctl, "start_app")
        await asyncio.to_thread(private_broker.ctl, "await_startup")

    settled = await wait_settled(db, [r["idempotency_key"] for r in requests], timeout=120)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 300

    async def reconnected() -> bool:
        return int((await daemon.status())["broker_reconnects"]) >= 1

    # The daemon may still be in its reconnect back-off when the last attempt settles.
    await eventually(reconnected, timeout=60, what="the daemon's broker reconnect")
    # A fresh connection shows nothing was stranded: no request is left in the attempts queue.
    fresh = await aio_pika.connect(url)
    try:
        channel = await fresh.channel()
        attempts = await channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
        assert attempts.declaration_result.message_count == 0
    finally:
        await fresh.close()
