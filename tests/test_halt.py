"""Invariant 6: a fleet-wide halt stops new provider calls on every instance within a second."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import aiomysql
import redis.asyncio as aioredis

from daemon.halt import HaltKeys
from daemon.secrets import load_secret
from tests.support import (
    NAMESPACE,
    PAYD,
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    request,
    states,
    wait_settled,
)

KEYS = HaltKeys(NAMESPACE)


async def clear_halts() -> None:
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    await client.delete(KEYS.global_key, KEYS.provider_key("sandbox"))
    await client.aclose()


async def test_halt_stops_calls_on_two_daemons_and_resume_restarts_them(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """With two daemons working, `payd halt` freezes the gateway's request count within a second
    (calls in flight finish); nothing fails while halted; `payd resume` lets everything finish,
    each attempt charged once."""
    await clear_halts()
    await sandbox.behave(latency_ms=100)
    first = await daemons.process(rabbitmq={"prefetch": 100}, providers__sandbox={"max_in_flight": 5})
    await daemons.process(rabbitmq={"prefetch": 100}, providers__sandbox={"max_in_flight": 5})
    keys = [f"halt-{i}" for i in range(400)]
    await broker.publish(request(key, subscription_id=70_000 + i) for i, key in enumerate(keys))

    async def working() -> bool:
        return (await sandbox.stats())["charges"] >= 20

    await eventually(working, timeout=30, what="both daemons charging")
    config_path = next(daemons.workdir.glob(f"payd-{first.port}.toml"))
    try:
        await asyncio.to_thread(
            subprocess.run,
            [PAYD, "halt", "--config", str(config_path), "--reason", "test"],
            check=True,
            timeout=30,
        )
        await asyncio.sleep(1.0)  # the bound under test: one second (poll 0.25 s, calls of 0.1 s finish)
        frozen = (await sandbox.stats())["requests"]
        await asyncio.sleep(1.5)
        assert (await sandbox.stats())["requests"] == frozen, "a provider call started while halted"
        current = await states(db)
        assert not {"failed", "declined"} & set(current.values()), "a halt fails nothing"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{first.port}/status") as r,
        ):
            status = await r.json()
        assert status["providers"]["sandbox"]["halted"] is True
        assert status["halt"]["global"]["reason"] == "test"
    finally:
        await asyncio.to_thread(
            subprocess.run, [PAYD, "resume", "--config", str(config_path)], check=True, timeout=30
        )
    settled = await wait_settled(db, keys, timeout=120)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 400


async def test_per_provider_halt_through_the_control_endpoint(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """POST /admin/halt needs the bearer token; a provider halt stops only that provider."""
    await clear_halts()
    async with daemons.in_process() as daemon:
        base = f"http://127.0.0.1:{daemon.port}"
        token = load_secret("control_token")
        assert token is not None
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/admin/halt", json={"provider": "sandbox"}) as response:
                assert response.status == 401
            headers = {"Authorization": f"Bearer {token.reveal()}"}
            async with session.post(
                f"{base}/admin/halt", json={"provider": "sandbox"}, headers=headers
            ) as response:
                assert response.status == 200
            await asyncio.sleep(1.0)  # the contract: every instance honours a halt within a second
            await broker.publish([request("held-1")])

            async def claimed() -> bool:
                return (await states(db)).get("held-1") == "in_flight"

            await eventually(claimed, timeout=10, what="the attempt to be claimed")
            await asyncio.sleep(1.0)
            assert (await sandbox.stats())["requests"] == 0, "a halted provider was called"
            async with session.post(
                f"{base}/admin/resume", json={"provider": "sandbox"}, headers=headers
            ) as response:
                assert (await response.json())["was_halted"] is True
        assert (await wait_settled(db, ["held-1"])) == {"held-1": "succeeded"}


async def test_unreachable_redis_keeps_the_last_halt_state() -> None:
    """A halted fleet stays halted through a Redis outage, and says its view may be stale."""
    from daemon.halt import HaltState  # noqa: PLC0415

    state = HaltState(["sandbox"], KEYS)
    state.apply(b'{"reason": "incident", "by": "ops", "at": "now"}', {"sandbox": None})
    assert state.blocks("sandbox")
    unreachable = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    watcher = asyncio.create_task(state.watch(unreachable))
    try:

        async def stale() -> bool:
            return state.stale

        await eventually(stale, timeout=10, what="the halt state to be marked stale")
        assert state.blocks("sandbox"), "the last known halt still holds"
        assert state.snapshot()["stale"] is True
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await unreachable.aclose()


async def test_a_running_state_is_kept_through_the_grace_and_then_no_provider_is_called() -> None:
    """Redis unreachable: within ``halt_grace_s`` the last state read (running) holds, so a blip
    stops nothing; once the grace has run out every provider is blocked until a read succeeds."""
    from daemon.halt import HaltState  # noqa: PLC0415

    unreachable = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    patient = HaltState(["sandbox"], KEYS, grace_s=60)
    brief = HaltState(["sandbox"], KEYS, grace_s=0.3)
    for state in (patient, brief):
        state.apply(None, {"sandbox": None})
        assert not state.blocks("sandbox")
        await state.read(unreachable)
        assert state.stale, "the failed read is seen"
    assert not patient.blocks("sandbox"), "within the grace the last state read holds"

    async def blocked() -> bool:
        return brief.blocks("sandbox")

    await eventually(blocked, timeout=10, what="the grace to run out")
    assert brief.snapshot()["known"] is False
    await unreachable.aclose()


async def test_a_halt_watcher_that_stops_leaves_the_instance_halted() -> None:
    """However the watcher ends (cancelled from a console, a bug), its reads stop, and after the
    grace no provider is called: freshness is the age of the last read, not the absence of errors."""
    from daemon.halt import HaltState  # noqa: PLC0415

    await clear_halts()
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    state = HaltState(["sandbox"], KEYS, grace_s=0.5)
    assert state.blocks("sandbox"), "before the first read the state is unknown"
    watcher = asyncio.create_task(state.watch(client))
    try:

        async def running() -> bool:
            return not state.blocks("sandbox")

        await eventually(running, timeout=10, what="the first read")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    async def blocked() -> bool:
        return state.blocks("sandbox")

    await eventually(blocked, timeout=10, what="the instance to stop calling")
    await client.aclose()
