"""Recovery after kill -9: an instance restarted under its stable id takes over its own claims.

The attempts the dead process had in flight may have reached the provider
(invariant 3), so they become unknown, never queued; the point here is that
this happens at the new process's start-up rather than after their lease.
"""

from __future__ import annotations

import signal
import uuid

import aiomysql
import pytest

from daemon.storage.identity import lock_name
from tests.support import Broker, DaemonFactory, Sandbox, eventually, request, states

pytestmark = pytest.mark.slow

# The lease is far longer than any wait below: only a takeover can settle the attempts in time.
SECTIONS = {
    "pipeline": {"lease_s": 600},
    "providers.sandbox": {"timeout_s": 30, "connect_timeout_s": 1},
}


async def _all_in(db: aiomysql.Pool, keys: list[str], state: str) -> bool:
    current = await states(db)
    return all(current.get(key) == state for key in keys)


async def test_restart_under_the_same_id_reconciles_the_dead_process_claims_at_once(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Calls on the wire (the gateway has charged, its answer hangs) when the daemon is killed
    with SIGKILL; a new process with the same instance_id marks them unknown at start-up and
    reconciles them to succeeded long before their 600 s lease would run out, one charge each.
    Before the takeover they sat in_flight until the lease expired."""
    await sandbox.behave(hang_s=120)
    instance = {"instance_id": f"recovery-{uuid.uuid4().hex[:8]}"}
    keys = [f"crash-{i}" for i in range(10)]
    first = await daemons.process(daemon=instance, **SECTIONS)
    await broker.publish(request(key, payment_method="pm_timeout") for key in keys)
    await eventually(lambda: _all_in(db, keys, "in_flight"), timeout=60, what="the calls to be on the wire")

    async def all_charged() -> bool:
        return {c["idempotency_key"] for c in await sandbox.ledger()} >= set(keys)

    await eventually(all_charged, timeout=60, what="the gateway to record the charges")
    first.signal(signal.SIGKILL)
    await first.wait_exit(timeout=30)

    await daemons.process(daemon=instance, **SECTIONS)
    await eventually(
        lambda: _all_in(db, keys, "succeeded"), timeout=90, what="the takeover and reconciliation"
    )
    assert len(await sandbox.assert_no_double_charge()) == 10


async def test_a_second_live_process_with_the_same_id_takes_over_nothing(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Two live processes with one instance_id (a misconfiguration systemd would not produce):
    the second cannot take the instance lock, so the first one's live calls stay in_flight
    under its claim instead of being marked unknown under it."""
    await sandbox.behave(hang_s=120)
    instance = {"instance_id": f"twin-{uuid.uuid4().hex[:8]}"}
    keys = [f"twin-{i}" for i in range(5)]
    await daemons.process(daemon=instance, **SECTIONS)
    await broker.publish(request(key, payment_method="pm_timeout") for key in keys)
    await eventually(lambda: _all_in(db, keys, "in_flight"), timeout=60, what="the calls to be on the wire")

    await daemons.process(daemon=instance, **SECTIONS)
    assert await _all_in(db, keys, "in_flight"), "the live process's claims were taken over"


def test_lock_names_fit_the_servers_limit() -> None:
    """MySQL and MariaDB refuse lock names over 64 characters: long ids are hashed, short ones
    stay readable (they show in performance_schema and SHOW PROCESSLIST)."""
    assert lock_name("payd", "web-1") == "payd.instance.payd.web-1"
    long = lock_name("payd_production_eu", "x" * 200)
    assert len(long) <= 64
    assert long != lock_name("payd_production_eu", "x" * 199)
