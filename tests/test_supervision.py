"""The service tree: a background duty that dies is logged, counted and restarted; one that keeps
dying turns /readyz red and, when it is critical, stops the systemd watchdog.

Crashes are caused with ``FaultInjector`` (``serve(faults=...)``), which makes a named duty
raise while it runs, as its own code would; tests/faults/test_reconciler.py causes the
reconciler's through a real adapter bug. Everything is observed from outside: the control
endpoint, /metrics, the systemd notify socket and the JSON log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import DunningSettings, MySQLSettings, SubscriptionSettings
from daemon.logs import configure_logging
from daemon.metrics import Metrics
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.secrets import load_secret
from daemon.storage.attempts import Record, claim_attempts, record_outcomes
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.supervisor import FaultInjector, RestartPolicy, Supervisor, Tier
from tests.support import (
    DATABASE,
    Broker,
    DaemonFactory,
    InProcessDaemon,
    Sandbox,
    eventually,
    notify_socket,
    query,
    request,
    states,
)

DUTIES = {
    "broker-link",
    "halt-watcher",
    "outbox-relay",
    "reconciler",
    "health-probe",
    "config-reloader",
    "renewal-scheduler",
}


class JsonLines(io.StringIO):
    """Stands in for stdout (what journald would store)."""

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.getvalue().splitlines() if line.strip())
        return [line for line in lines if line.get("event") == name]


@pytest.fixture
def log_lines() -> Iterator[JsonLines]:
    stream = JsonLines()
    configure_logging("warning", "json", stream=stream)
    yield stream
    configure_logging("warning", "console")


@contextlib.asynccontextmanager
async def supervised_daemon(
    daemons: DaemonFactory, faults: FaultInjector, **daemon_settings: Any
) -> AsyncIterator[InProcessDaemon]:
    config, _, port = daemons.config(
        daemon={"duty_restart_backoff_s": [0.1], "duty_failing_after": 3, **daemon_settings}
    )
    daemon = InProcessDaemon(config, port, faults)
    await daemon.start()
    try:
        yield daemon
    finally:
        assert await daemon.stop() == 0


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def metric(port: int, name: str, **labels: str) -> float:
    _, text = await get(port, "/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def duty(daemon: InProcessDaemon, name: str) -> dict[str, Any]:
    return dict((await daemon.status())["duties"][name])


async def crash_and_wait(daemon: InProcessDaemon, faults: FaultInjector, name: str, crashes: int) -> None:
    """Crash ``name`` once more and wait until it has been restarted (its ``crashes``-th crash)."""
    faults.crash(name, ValueError(f"injected into {name}"))

    async def restarted() -> bool:
        state = await duty(daemon, name)
        return bool(state["crashes"] == crashes and state["state"] in ("running", "failing"))

    await eventually(restarted, timeout=20, what=f"{name} to crash and run again")


async def test_each_duty_that_dies_is_logged_counted_and_restarted(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory, log_lines: JsonLines
) -> None:
    """Every declared duty (at least those in DUTIES), killed by an exception it does not
    expect: its crash is logged with the traceback, counted in payd_duty_crashes_total{duty},
    and it runs again (payd_duty_up 1, /status "running"); one crash leaves the instance ready.
    Before the service tree a dead duty was a finished task that nobody read."""
    faults = FaultInjector()
    async with supervised_daemon(daemons, faults) as daemon:
        declared = set((await daemon.status())["duties"])
        assert declared >= DUTIES, "every background duty is in the service tree"
        for name in sorted(declared):
            await crash_and_wait(daemon, faults, name, crashes=1)
            assert await metric(daemon.port, "payd_duty_crashes_total", duty=name) == 1
            assert await metric(daemon.port, "payd_duty_up", duty=name) == 1
            state = await duty(daemon, name)
            assert state["state"] == "running"
            assert state["last_error"] == f"ValueError: injected into {name}"
        status, body = await get(daemon.port, "/readyz")
        assert status == 200, body
    crashed = {line["duty"]: line for line in log_lines.events("duty.crashed")}
    assert set(crashed) == declared
    for name, line in crashed.items():
        assert line["level"] == "error"
        assert "Traceback" in line["exception"] and f"ValueError: injected into {name}" in line["exception"]


async def test_a_restarted_reconciler_still_settles_unknown_attempts(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """Restarted means working: after its crash the reconciler settles an unknown attempt (the
    sandbox has no record of it, so it is sent again under its key and succeeds)."""
    faults = FaultInjector()
    async with supervised_daemon(daemons, faults) as daemon:
        await crash_and_wait(daemon, faults, "reconciler", crashes=1)
        async with db.acquire() as connection, connection.cursor() as cursor:
            await cursor.execute(
                "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, "
                "state, outcome, claimed_at, recheck_at) VALUES "
                "('after-crash', 'sandbox', 500, 'EUR', 'pm_ok', 'unknown', 'unknown', NOW(6), NOW(6))"
            )

        async def settled() -> bool:
            async with db.acquire() as connection, connection.cursor() as cursor:
                await cursor.execute("SELECT state FROM attempts WHERE idempotency_key = 'after-crash'")
                return (await cursor.fetchone())[0] == "succeeded"

        await eventually(settled, timeout=30, what="the unknown attempt to be reconciled")


def watchdog_pings(listener: socket.socket) -> int:
    """WATCHDOG=1 datagrams received since the last call."""
    count = 0
    while True:
        try:
            count += listener.recv(4096).decode().splitlines()[0] == "WATCHDOG=1"
        except BlockingIOError:
            return count


async def test_a_critical_duty_that_keeps_dying_turns_readyz_red_and_withholds_the_watchdog(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Three crashes in a row of the reconciler (critical): /readyz answers 503 naming the
    duties, /status and payd_duty_failing say which, and the watchdog is no longer pinged, so
    systemd would restart the process. Once it runs stably again, all of it comes back."""
    faults = FaultInjector()
    with notify_socket(tmp_path / "notify.sock") as listener:
        async with supervised_daemon(daemons, faults, duty_stable_after_s=2) as daemon:
            await asyncio.sleep(0.5)
            assert watchdog_pings(listener) >= 1, "pinged while healthy"
            for crashes in (1, 2, 3):
                await crash_and_wait(daemon, faults, "reconciler", crashes=crashes)
            assert (await duty(daemon, "reconciler"))["state"] == "failing"
            status, body = await get(daemon.port, "/readyz")
            assert status == 503
            assert json.loads(body)["checks"]["duties_ok"] is False
            assert await metric(daemon.port, "payd_duty_failing", duty="reconciler") == 1
            watchdog_pings(listener)  # forget pings sent before the third crash
            await asyncio.sleep(1.0)  # five watchdog intervals
            assert watchdog_pings(listener) == 0, "the watchdog is withheld"

            async def recovered() -> bool:
                return (await get(daemon.port, "/readyz"))[0] == 200

            await eventually(recovered, timeout=20, what="the reconciler to run stably again")
            assert (await duty(daemon, "reconciler"))["state"] == "running"
            await asyncio.sleep(0.5)
            assert watchdog_pings(listener) >= 1, "pinged again"


async def test_a_non_critical_duty_that_keeps_dying_turns_readyz_red_but_keeps_the_watchdog(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """The config reloader is not worth restarting the process for: crashing in a row it turns
    /readyz red, and the watchdog keeps being pinged."""
    faults = FaultInjector()
    with notify_socket(tmp_path / "notify.sock") as listener:
        async with supervised_daemon(daemons, faults, duty_stable_after_s=60) as daemon:
            for crashes in (1, 2, 3):
                await crash_and_wait(daemon, faults, "config-reloader", crashes=crashes)
            assert (await get(daemon.port, "/readyz"))[0] == 503
            watchdog_pings(listener)
            await asyncio.sleep(1.0)
            assert watchdog_pings(listener) >= 2


async def test_duties_start_in_tier_order_and_stop_in_reverse() -> None:
    """The declared order is the order: tiers start links first and work last, and stop in the
    reverse order, one tier at a time (the drain's steps); within a tier, reverse of declaration."""
    events: list[str] = []

    def duty_named(name: str) -> Any:
        async def run() -> None:
            events.append(f"start {name}")
            try:
                await asyncio.Event().wait()
            finally:
                events.append(f"stop {name}")

        return run

    supervisor = Supervisor(metrics=Metrics(), policy=RestartPolicy())
    supervisor.add("scheduler", duty_named("scheduler"), tier=Tier.WORK)
    supervisor.add("relay", duty_named("relay"), tier=Tier.EVENTS)
    supervisor.add("broker", duty_named("broker"), tier=Tier.LINKS)
    supervisor.add("reconciler", duty_named("reconciler"), tier=Tier.WORK)
    supervisor.start()
    await asyncio.sleep(0.05)
    assert events == ["start broker", "start relay", "start scheduler", "start reconciler"]
    events.clear()
    await supervisor.stop(Tier.WORK)
    assert events == ["stop reconciler", "stop scheduler"]
    assert supervisor.snapshot()["relay"]["state"] == "running"
    await supervisor.stop_all()
    assert events == ["stop reconciler", "stop scheduler", "stop relay", "stop broker"]
    assert {d["state"] for d in supervisor.snapshot().values()} == {"stopped"}


async def test_a_duty_that_returns_is_restarted_too() -> None:
    """Duties run until stopped: one that returns is as dead as one that raised, so it counts
    as a crash and runs again after its backoff."""
    runs = 0

    async def returns_at_once() -> None:
        nonlocal runs
        runs += 1

    metrics = Metrics()
    supervisor = Supervisor(metrics=metrics, policy=RestartPolicy(backoff_s=(0.01,), failing_after=100))
    supervisor.add("quitter", returns_at_once, tier=Tier.WORK)
    supervisor.start()
    await eventually(lambda: _at_least(runs, 3), timeout=10, what="three runs")
    await supervisor.stop_all()
    assert (metrics.registry.get_sample_value("payd_duty_crashes_total", {"duty": "quitter"}) or 0) >= 2
    assert "returned" in (supervisor.snapshot()["quitter"]["last_error"] or "")


async def _at_least(value: int, bound: int) -> bool:
    return value >= bound


async def test_the_subscription_policy_reaches_the_record_path_as_an_argument(db: aiomysql.Pool) -> None:
    """The policy is an argument of record_outcomes, not a context variable: a task created
    before the policy existed (which a ContextVar would have left on the default policy) records a
    hard decline under the policy it was handed: past_due here, where the default cancels."""
    pool = await open_pool(MySQLSettings(database=DATABASE, pool_size=2), load_secret("mysql_password"))
    try:
        await query(
            db,
            "INSERT INTO subscriptions (id, status, provider, payment_method, amount_minor, currency, "
            "billing_anchor, next_attempt_at, pending_key) VALUES (901, 'active', 'sandbox', 'pm_stolen', "
            "1000, 'EUR', NOW(6) - INTERVAL 1 MINUTE, NOW(6), 'renew:901:1')",
        )
        renewal = AttemptRequest(
            idempotency_key="renew:901:1",
            subscription_id=901,
            cycle=1,
            amount_minor=1000,
            currency="EUR",
            provider="sandbox",
            payment_method="pm_stolen",
        )
        claim = await claim_attempts(pool, [renewal], claimed_by="test", lease_s=30)
        record = Record(
            attempt_id=claim.claimed[renewal.idempotency_key],
            request=renewal,
            result=ChargeResult(outcome=Outcome.HARD_DECLINE, decline_code="stolen_card"),
            tries=1,
        )
        handed: asyncio.Queue[SubscriptionPolicy] = asyncio.Queue()

        async def recorder() -> None:
            policy = await handed.get()
            await record_outcomes(pool, [record], unknown_recheck_s=1, policy=policy)

        task = asyncio.create_task(recorder())
        dunning = DunningSettings(on_hard_decline="past_due")
        await handed.put(SubscriptionPolicy(SubscriptionSettings(dunning=dunning)))
        await task
        [(status,)] = await query(db, "SELECT status FROM subscriptions WHERE id = 901")
        assert status == "past_due"
    finally:
        await close_pool(pool)


async def test_the_drain_publishes_every_event_its_commits_wrote_before_the_links_close(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """The drain's order: intake stops, the work duties stop, calls on the wire finish and
    commit, then the relay flushes and only then do the links close. Every attempt that
    finished during the drain has its event on payd.events when serve returns, and the outbox
    is empty: nothing waits for another instance's relay."""
    await broker.follow_events()
    await sandbox.behave(latency_ms=400)
    keys = [f"drain-{i}" for i in range(20)]
    config, _, port = daemons.config()
    daemon = InProcessDaemon(config, port)
    await daemon.start()
    await broker.publish(request(key) for key in keys)

    async def calls_on_the_wire() -> bool:
        return bool((await daemon.status())["in_flight"] >= 5)

    await eventually(calls_on_the_wire, timeout=20, what="attempts in flight")
    assert await daemon.stop() == 0
    finished = {key for key, state in (await states(db)).items() if state in ("succeeded", "failed")}
    assert finished, "some attempts finished during the drain"
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)], "the relay flushed before exit"

    async def all_events_in() -> bool:
        return finished <= {event["idempotency_key"] for event in broker.events}

    await eventually(all_events_in, timeout=10, what="an event for every attempt finished in the drain")


async def test_a_duty_with_a_stop_finishes_its_work_instead_of_being_cancelled() -> None:
    """The relay's last flush depends on it: a duty declared with ``stop`` is asked to finish,
    runs its last round to the end (no CancelledError inside it) and is not counted as a crash."""
    finished = asyncio.Event()
    asked = asyncio.Event()
    cancelled = False

    async def flushes_on_stop() -> None:
        nonlocal cancelled
        try:
            await asked.wait()
            await asyncio.sleep(0.05)  # the last round, e.g. a publish awaiting confirms
            finished.set()
        except asyncio.CancelledError:
            cancelled = True
            raise

    metrics = Metrics()
    supervisor = Supervisor(metrics=metrics, policy=RestartPolicy())
    supervisor.add("relay", flushes_on_stop, tier=Tier.EVENTS, stop=asked.set)
    supervisor.start()
    await asyncio.sleep(0.01)
    await supervisor.stop(Tier.EVENTS)
    assert finished.is_set() and not cancelled
    assert metrics.registry.get_sample_value("payd_duty_crashes_total", {"duty": "relay"}) == 0
