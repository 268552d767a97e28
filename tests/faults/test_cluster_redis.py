"""Redis through Sentinel: the halt follows the master through a failover, fail-safe meanwhile.

A private master, replica and three Sentinels (tests/faults/clusters.py); the
machine's Redis is not touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from tests.faults.clusters import SentinelSet, redis_with_sentinels
from tests.support import PAYD, Broker, DaemonFactory, Sandbox, eventually, request, states, wait_settled


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    with redis_with_sentinels(tmp_path / "redis") as found:
        yield found


async def _master_port(cluster: SentinelSet) -> int | None:
    """What the Sentinels say (https://redis.io/docs/latest/operate/oss_and_stack/management/
    sentinel/#obtaining-the-address-of-the-current-master)."""
    client = aioredis.Redis(host="127.0.0.1", port=cluster.sentinels[0].port)
    try:
        answer = await client.execute_command("SENTINEL", "get-master-addr-by-name", cluster.service)
    finally:
        await client.aclose()
    return int(answer[1]) if answer else None


async def test_the_halt_follows_the_redis_master_through_a_sentinel_failover(
    sentinels: SentinelSet, db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """payd given only the Sentinels finds the master; when the master is killed, the halt view
    goes stale (readyz red) while no master answers, then follows the promoted replica: `payd halt`
    issued after the failover stops every provider call on the daemon, `payd resume` lets the
    requests finish, each charged once. Fails on the code that took one Redis URL only
    (``sentinels`` is an unknown key there, and a client of the old master never sees the halt)."""
    redis_section = {
        "url": "redis://ignored.invalid/0",
        "sentinels": sentinels.addresses,
        "sentinel_service": "payd",
    }
    daemon = await daemons.process(redis=redis_section, providers__sandbox={"max_in_flight": 5})
    config_path = next(daemons.workdir.glob(f"payd-{daemon.port}.toml"))
    assert (await daemon.status())["halt"]["stale"] is False

    killed = time.monotonic()
    os.killpg(sentinels.master.process.pid, signal.SIGKILL)  # a crashed master: no goodbye
    sentinels.master.process.wait(timeout=10)

    async def stale() -> bool:
        status = await daemon.status()
        return bool(status["halt"]["stale"]) and not status["ready"]["halt_state_fresh"]

    await eventually(stale, timeout=30, what="the halt view to be marked stale while no master answers")

    async def promoted() -> bool:
        return await _master_port(sentinels) == sentinels.replica.port

    await eventually(promoted, timeout=60, what="the Sentinels to promote the replica", interval=0.5)

    async def fresh() -> bool:
        return (await daemon.status())["halt"]["stale"] is False

    await eventually(fresh, timeout=30, what="the daemon to read the halt from the new master")
    print(
        f"halt state fresh again {time.monotonic() - killed:.1f} s after the master was killed"
    )  # docs/scaling.md

    halt = [PAYD, "halt", "--config", str(config_path), "--reason", "after failover"]
    await asyncio.to_thread(subprocess.run, halt, check=True, timeout=30)
    try:

        async def halted() -> bool:
            return bool((await daemon.status())["providers"]["sandbox"]["halted"])

        await eventually(halted, timeout=10, what="the halt written to the new master to reach the daemon")
        keys = [f"sentinel-{i}" for i in range(20)]
        await broker.publish(request(key) for key in keys)

        async def claimed() -> bool:
            return len(await states(db)) == len(keys)

        await eventually(claimed, timeout=30, what="the requests to be claimed")
        assert (await sandbox.stats())["requests"] == 0, "a provider was called while halted"
    finally:
        resume = [PAYD, "resume", "--config", str(config_path)]
        await asyncio.to_thread(subprocess.run, resume, check=True, timeout=30)
    settled = await wait_settled(db, keys, timeout=60)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == len(keys)
