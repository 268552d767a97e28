"""The emergency stop fails safe: an instance that cannot know the halt state calls no provider.

Each test runs a real ``payd run`` process against a private redis-server that
the test refuses (ACL), freezes (SIGSTOP) or stops, and judges from outside:
the sandbox gateway's request count stops growing once the grace has run out,
``/readyz`` is 503 with a reason, ``payd_halt_state_unknown`` is 1 and the log
says why; once Redis answers again, the instance carries on (unless halted).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import aiomysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.halt import HaltKeys, clear_halt, set_halt
from tests.faults.private_redis import PrivateRedis, private_redis  # noqa: F401 (a fixture)
from tests.support import (
    NAMESPACE,
    PAYD,
    Broker,
    DaemonFactory,
    DaemonProcess,
    InProcessDaemon,
    Sandbox,
    eventually,
    request,
    states,
    wait_settled,
)

KEYS = HaltKeys(NAMESPACE)
GRACE_S = 1.0


async def _get(daemon: DaemonProcess, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}{path}") as response,
    ):
        return response.status, await response.text()


async def _readyz(daemon: DaemonProcess) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/readyz") as response,
    ):
        return response.status, dict(await response.json())


async def _unknown_gauge(daemon: DaemonProcess) -> float:
    _, text = await _get(daemon, "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "payd_halt_state_unknown":
                return sample.value
    raise AssertionError("payd_halt_state_unknown is not exported")


async def _start_charging(
    broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, redis_url: str, prefix: str, base_id: int
) -> tuple[DaemonProcess, list[str]]:
    """A daemon on the private Redis, busy with a backlog that outlasts the test's outage."""
    await sandbox.behave(latency_ms=100)
    daemon = await daemons.process(
        redis={"url": redis_url, "halt_grace_s": GRACE_S},
        rabbitmq={"prefetch": 100},
        providers__sandbox={"max_in_flight": 5},
    )
    keys = [f"{prefix}-{i}" for i in range(400)]
    await broker.publish(request(key, subscription_id=base_id + i) for i, key in enumerate(keys))

    async def charging() -> bool:
        return (await sandbox.stats())["charges"] >= 10

    await eventually(charging, timeout=30, what="the daemon to charge")
    return daemon, keys


async def _assert_calls_stopped_and_said_so(
    db: aiomysql.Pool, sandbox: Sandbox, daemon: DaemonProcess, cause: str
) -> None:
    """/readyz turns 503 naming the unknown halt state, then no new request reaches the gateway."""

    async def unready_for_the_halt_state() -> bool:
        status, body = await _readyz(daemon)
        reasons = body.get("reasons")
        return (
            status == 503 and isinstance(reasons, dict) and "unknown" in reasons.get("halt_state_fresh", "")
        )

    await eventually(unready_for_the_halt_state, timeout=20, what="/readyz to report the unknown halt state")
    await asyncio.sleep(0.5)  # calls that passed the gate before it closed reach the gateway
    frozen = (await sandbox.stats())["requests"]
    await asyncio.sleep(GRACE_S + 1.0)
    started = (await sandbox.stats())["requests"] - frozen
    assert started == 0, f"{started} provider calls started while the halt state was unknown"
    assert await _unknown_gauge(daemon) == 1
    log = daemon.log_path.read_text(errors="replace")
    assert "halt.state_unknown" in log and cause in log, daemon.log()
    current = set((await states(db)).values())
    assert not {"failed", "declined"} & current, "an unknown halt state fails nothing"


async def _assert_everything_finishes_once(db: aiomysql.Pool, sandbox: Sandbox, keys: list[str]) -> None:
    settled = await wait_settled(db, keys, timeout=180)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == len(keys)


async def test_an_acl_refusal_of_the_halt_read_stops_new_calls_and_a_halt_written_meanwhile_holds(
    db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    private_redis: PrivateRedis,  # noqa: F811 (the fixture imported above)
) -> None:
    """Redis refuses the daemon's MGET of the halt keys (ACL NOPERM, a ResponseError, which today
    kills the watcher silently while /readyz stays green and charges go on). After the grace no
    new call starts, /readyz, the metric and the log say so; a halt an operator writes meanwhile
    is obeyed once the read works again, and everything finishes after resume, charged once."""
    await clear_halt(private_redis.admin, KEYS, provider=None)
    daemon, keys = await _start_charging(broker, sandbox, daemons, private_redis.url, "acl", 72_000)
    # Redis ACLs: "-<command>" removes a command from the user's rights; a refused command gets a
    # "NOPERM ... has no permissions to run the 'mget' command" error reply.
    # https://redis.io/docs/latest/operate/oss_and_stack/management/security/acl/
    await private_redis.admin.execute_command("ACL", "SETUSER", "default", "-mget")
    try:
        await _assert_calls_stopped_and_said_so(db, sandbox, daemon, "NoPermissionError")
        await set_halt(private_redis.admin, KEYS, provider=None, reason="written meanwhile", by="test")
    finally:
        await private_redis.admin.execute_command("ACL", "SETUSER", "default", "+mget")

    async def ready_again() -> bool:
        return (await _readyz(daemon))[0] == 200

    await eventually(ready_again, timeout=20, what="the halt state to be read again")
    halted = (await sandbox.stats())["requests"]
    await asyncio.sleep(GRACE_S + 1.0)
    assert (await sandbox.stats())["requests"] == halted, "the halt written during the refusal was not obeyed"
    await clear_halt(private_redis.admin, KEYS, provider=None)
    await _assert_everything_finishes_once(db, sandbox, keys)


def _freeze(server: PrivateRedis) -> Callable[[], Awaitable[None]]:
    server.freeze()

    async def thaw() -> None:
        server.thaw()

    return thaw


def _stop(server: PrivateRedis) -> Callable[[], Awaitable[None]]:
    server.stop()
    return server.start


@pytest.mark.parametrize(
    ("outage", "cause"),
    [(_freeze, "TimeoutError"), (_stop, "ConnectionError")],
    ids=["frozen", "stopped"],
)
async def test_a_redis_outage_stops_new_calls_after_the_grace_and_they_resume_after_it(
    db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    private_redis: PrivateRedis,  # noqa: F811 (the fixture imported above)
    outage: Callable[[PrivateRedis], Callable[[], Awaitable[None]]],
    cause: str,
) -> None:
    """A Redis that hangs (today the watcher waits on it forever and calls go on) or is gone
    (today the last state, "running", is kept indefinitely): after the grace no new call starts,
    and when Redis is back the backlog finishes, each attempt charged once."""
    daemon, keys = await _start_charging(
        broker,
        sandbox,
        daemons,
        private_redis.url,
        f"outage-{cause}",
        74_000 if cause == "TimeoutError" else 76_000,
    )
    end_outage = outage(private_redis)
    try:
        await _assert_calls_stopped_and_said_so(db, sandbox, daemon, cause)
    finally:
        await end_outage()
    await _assert_everything_finishes_once(db, sandbox, keys)


async def _payd_status(config_path: Path) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [PAYD, "status", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_payd_status_says_whether_the_halt_state_is_known_and_how_each_duty_is(
    db: aiomysql.Pool,
    broker: Broker,
    daemons: DaemonFactory,
    private_redis: PrivateRedis,  # noqa: F811 (the fixture imported above)
) -> None:
    """``payd status`` used to print only ``global`` and ``stale`` for the halt and the duties
    that were not running: an operator could not see that an instance had stopped calling
    providers because it could not read the halt keys, nor since when, nor why. Now it shows
    the state (known or unknown), the age of the last read and the last error, and every duty's
    state."""
    config, config_path, port = daemons.config(redis={"url": private_redis.url, "halt_grace_s": GRACE_S})
    daemon = InProcessDaemon(config, port)
    await daemon.start()
    try:
        healthy = await _payd_status(config_path)
        assert "state=known" in healthy and "last read " in healthy, healthy
        for duty in ("broker-link", "halt-watcher", "outbox-relay", "reconciler", "health-probe"):
            assert re.search(rf"^{duty}\s+running\s", healthy, re.MULTILINE), healthy
        private_redis.stop()
        seen: list[str] = []

        async def says_unknown() -> bool:
            seen.append(await _payd_status(config_path))
            return "state=UNKNOWN" in seen[-1]

        await eventually(says_unknown, timeout=30, what="payd status to show the unknown halt state")
        assert re.search(r"^halt error ConnectionError", seen[-1], re.MULTILINE), seen[-1]
    finally:
        assert await daemon.stop() == 0
