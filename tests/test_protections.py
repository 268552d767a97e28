"""Per-provider protections: 429 handling, the circuit breaker, fleet-wide rate limits, plugins."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from daemon.models import Outcome
from daemon.pipeline.breaker import BreakerState, CircuitBreaker
from daemon.pipeline.limiter import ProviderLimiter
from daemon.pipeline.ratelimit import FleetTokenBucket
from tests.support import (
    PAYD,
    Broker,
    DaemonFactory,
    Sandbox,
    config_text,
    query,
    request,
    running_sandbox,
    states,
    wait_settled,
)


async def test_429_slows_payd_without_failing_attempts(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A provider answering 429 to a third of calls: payd pauses the lane for Retry-After and
    tries again under the same key; every attempt succeeds, none fails, none is charged twice."""
    await sandbox.behave(rate_limit_rate=0.3, retry_after_s=0, seed=11)
    keys = [f"rl-{i}" for i in range(120)]
    async with daemons.in_process() as daemon:
        await broker.publish(request(key) for key in keys)
        settled = await wait_settled(db, keys)
        assert (await daemon.status())["providers"]["sandbox"]["breaker"] == "closed", "429s are not failures"
    assert set(settled.values()) == {"succeeded"}
    stats = await sandbox.stats()
    assert stats["requests"] > 120, "some calls were answered 429 and tried again"
    assert len(await sandbox.assert_no_double_charge()) == 120


async def test_failing_provider_opens_its_breaker_while_others_keep_going(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Provider "bad" errors on every call: its breaker opens and its attempts wait (not fail,
    not decline) while provider "good" finishes all of its work; when "bad" heals, its attempts
    complete through the half-open probe."""
    async with running_sandbox(error_rate=1.0) as bad_gateway:
        bad = {
            "kind": "sandbox",
            "base_url": bad_gateway.url,
            "max_in_flight": 10,
            "timeout_s": 2,
            "max_tries": 20,
            "retry_backoff_s": 0.01,
            "breaker_min_calls": 5,
            "breaker_open_s": 0.5,
            "breaker_max_open_s": 1,
            "breaker_probes": 1,
        }
        good_keys = [f"good-{i}" for i in range(100)]
        bad_keys = [f"bad-{i}" for i in range(30)]
        async with daemons.in_process(providers__bad=bad) as daemon:
            await broker.publish(request(key, provider="bad") for key in bad_keys)
            await broker.publish(request(key) for key in good_keys)
            await wait_settled(db, good_keys)
            current = await states(db)
            assert all(current[key] == "in_flight" for key in bad_keys), "bad attempts wait"
            status = (await daemon.status())["providers"]["bad"]
            assert status["breaker_trips"] >= 1
            assert status["breaker"] in ("open", "half_open")
            calls_while_broken = (await bad_gateway.stats())["requests"]
            assert calls_while_broken < 30 * 20, "the breaker kept most calls from being made"

            await bad_gateway.behave(error_rate=0.0)
            settled = await wait_settled(db, bad_keys)
        assert set(settled.values()) == {"succeeded"}
        assert len(await bad_gateway.assert_no_double_charge()) == 30
        assert len(await sandbox.assert_no_double_charge()) == 100


def test_breaker_trips_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(
        failure_ratio=0.5, min_calls=4, window_s=10, open_s=1, max_open_s=4, probes=2, clock=lambda: now[0]
    )
    for outcome in (Outcome.APPROVED, Outcome.PROVIDER_ERROR, Outcome.UNKNOWN, Outcome.PROVIDER_ERROR):
        assert breaker.try_enter()
        breaker.record(outcome)
    assert breaker.state is BreakerState.OPEN and not breaker.try_enter()
    now[0] = 1.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_enter() and breaker.try_enter() and not breaker.try_enter(), "two probes only"
    breaker.record(Outcome.PROVIDER_ERROR)
    assert breaker.state is BreakerState.OPEN and breaker.retry_in_s == pytest.approx(2.0), (
        "open twice as long"
    )
    now[0] = 3.0
    assert breaker.try_enter() and breaker.try_enter()
    breaker.record(Outcome.SOFT_DECLINE)  # a decline is a healthy provider
    breaker.record(Outcome.APPROVED)
    assert breaker.state is BreakerState.CLOSED


async def test_fleet_rate_limit_never_over_grants_across_instances() -> None:
    """Two instances share one Redis bucket: together they never start more calls than
    burst + rate x elapsed (an upper bound, so a slow machine cannot make this fail)."""
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    key = f"payd:test:ratelimit:{time.monotonic_ns()}"
    rate, burst = 200.0, 20.0
    buckets = [
        FleetTokenBucket(client, key=key, rate_per_s=rate, burst=burst, fallback_rate_per_s=1)
        for _ in range(2)
    ]
    taken = 0
    started = time.monotonic()

    async def spend(bucket: FleetTokenBucket) -> None:
        nonlocal taken
        while time.monotonic() - started < 1.0:
            await bucket.take()
            taken += 1

    await asyncio.gather(*(spend(bucket) for bucket in buckets for _ in range(5)))
    elapsed = time.monotonic() - started
    chunk = int(rate / 20)
    assert taken <= burst + rate * elapsed + 2 * chunk, (taken, elapsed)
    assert taken >= burst, "the bucket did grant"
    assert all(bucket.redis_ok for bucket in buckets)
    await client.delete(key)
    await client.aclose()


async def test_fleet_rate_limit_falls_back_when_redis_is_unreachable() -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    bucket = FleetTokenBucket(client, key="payd:test:gone", rate_per_s=100, burst=10, fallback_rate_per_s=50)
    for _ in range(5):
        await bucket.take()
    assert not bucket.redis_ok
    await client.aclose()


def test_plugin_provider_kind_from_an_installed_package(tmp_path: Path) -> None:
    """A package that declares a ``payd.providers`` entry point is picked up without a fork,
    and its own configuration keys are validated."""
    site = tmp_path / "site"
    shutil.copytree(Path(__file__).parent / "plugins" / "payd_echo_provider", site / "payd_echo_provider")
    dist = site / "payd_echo_provider-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: payd-echo-provider\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[payd.providers]\necho = payd_echo_provider:EchoProvider\n")
    text = config_text(sandbox_url="http://127.0.0.1:1", http_port=0) + '\n[providers.echo]\nkind = "echo"\n'
    text += 'base_url = "http://127.0.0.1:1"\nmax_in_flight = 5\ngreeting = "hello"\n'
    good = tmp_path / "good.toml"
    good.write_text(text)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('greeting = "hello"', "greting = 1"))
    env = {"PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent)}
    ok = subprocess.run(
        [PAYD, "check-config", "--config", str(good)], check=False, capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert '"greeting": "hello"' in ok.stdout
    refused = subprocess.run(
        [PAYD, "check-config", "--config", str(bad)], check=False, capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2
    assert "providers.echo: Object contains unknown field `greting`" in refused.stderr


UNREACHABLE = {
    "kind": "sandbox",
    "base_url": "http://127.0.0.1:1",  # nothing listens: every call fails to connect, nothing is sent
    "max_in_flight": 10,
    "timeout_s": 2,
    "connect_timeout_s": 0.5,
    "max_tries": 2,
    "retry_backoff_s": 0.01,
    "failover_to": "sandbox",
}


async def test_failover_only_when_the_first_connection_was_never_reached(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A primary that cannot be connected to: attempts go to the failover connection, charged
    once there, and the row and event name the connection that charged."""
    await broker.follow_events()
    keys = [f"fo-{i}" for i in range(20)]
    async with daemons.in_process(providers__primary=UNREACHABLE):
        await broker.publish(request(key, provider="primary") for key in keys)
        settled = await wait_settled(db, keys)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 20
    routed = {row[0] for row in await query(db, "SELECT DISTINCT routed_provider FROM attempts")}
    assert routed == {"sandbox"}
    assert {e["provider"] for e in broker.events if e["type"] == "payment.succeeded"} == {"sandbox"}


async def test_no_failover_after_the_provider_was_reached(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A primary that answers 500 was reached: its attempts fail there, never go elsewhere."""
    async with running_sandbox(error_rate=1.0) as primary:
        reached = {**UNREACHABLE, "base_url": primary.url, "breaker_min_calls": 10_000}
        async with daemons.in_process(providers__primary=reached):
            await broker.publish(request(f"nofo-{i}", provider="primary") for i in range(10))
            settled = await wait_settled(db, [f"nofo-{i}" for i in range(10)])
    assert set(settled.values()) == {"failed"}
    assert await sandbox.ledger() == [], "nothing went to the failover connection"
    routed = await query(db, "SELECT COUNT(*) FROM attempts WHERE routed_provider IS NOT NULL")
    assert routed == [(0,)]


async def test_unknown_after_failover_is_reconciled_where_it_was_sent(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A timeout at the failover connection: the lookup goes to that connection (the primary
    was never reached and cannot answer), and finds the one charge."""
    await sandbox.behave(hang_s=4)
    async with daemons.in_process(
        providers__primary={**UNREACHABLE, "timeout_s": 1}, providers__sandbox={"timeout_s": 1}
    ):
        await broker.publish([request("fo-slow", provider="primary", payment_method="pm_timeout")])
        settled = await wait_settled(db, ["fo-slow"], timeout=30)
    assert settled == {"fo-slow": "succeeded"}
    assert [c["idempotency_key"] for c in await sandbox.ledger()] == ["fo-slow"]
    assert (await sandbox.stats())["lookups"] >= 1


@pytest.mark.parametrize(
    ("failover_to", "message"),
    [("nosuch", "must name another provider"), ("primary", "must name another provider")],
)
def test_failover_target_is_validated(failover_to: str, message: str) -> None:
    from daemon.config import ConfigError, parse_config  # noqa: PLC0415

    text = config_text(sandbox_url="http://127.0.0.1:1", http_port=0)
    text += '\n[providers.primary]\nkind = "sandbox"\nbase_url = "http://x"\nmax_in_flight = 1\n'
    text += f'failover_to = "{failover_to}"\n'
    with pytest.raises(ConfigError, match=rf"providers\.primary\.failover_to: {message}"):
        parse_config(text)


async def test_breaker_waiters_sleep_until_a_probe_reports() -> None:
    """Thousands of attempts may wait on a half-open breaker: they must not poll. Waiters stay
    asleep while every probe slot is taken and all wake when a probe's verdict arrives."""
    now = [0.0]
    breaker = CircuitBreaker(
        failure_ratio=0.5, min_calls=2, window_s=10, open_s=1, max_open_s=4, probes=1, clock=lambda: now[0]
    )
    breaker.record(Outcome.PROVIDER_ERROR)
    breaker.record(Outcome.PROVIDER_ERROR)
    now[0] = 1.0
    assert breaker.try_enter(), "the one probe"
    waiters = [asyncio.create_task(breaker.wait(at_most_s=30)) for _ in range(200)]
    await asyncio.sleep(0.3)
    assert not any(w.done() for w in waiters), "a waiter woke without a change (polling)"
    breaker.record(Outcome.APPROVED)
    await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
    assert breaker.state is BreakerState.CLOSED


async def test_provider_never_sees_more_than_max_in_flight_when_calls_time_out(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Calls that time out at payd keep running at the provider (the sandbox answers pm_timeout
    only after hang_s). If a timeout freed its slot at once, the next calls would start while
    the abandoned ones still run, and the gateway's peak concurrency would exceed
    max_in_flight. Holding the slot for slot_hold_s keeps the gateway's view within the limit,
    and every hold ends: all attempts are reconciled to the one charge each."""
    await sandbox.behave(hang_s=2.5)
    keys = [f"hold-{i}" for i in range(20)]
    lane = {"max_in_flight": 5, "timeout_s": 0.5, "slot_hold_s": 3, "breaker_min_calls": 10_000}
    async with daemons.in_process(providers__sandbox=lane):
        await broker.publish(request(key, payment_method="pm_timeout") for key in keys)
        settled = await wait_settled(db, keys, timeout=120)
    assert set(settled.values()) == {"succeeded"}
    assert len(await sandbox.assert_no_double_charge()) == 20
    peak = (await sandbox.stats())["peak_in_flight"]
    assert peak <= 5, f"the gateway saw {peak} concurrent charges against max_in_flight = 5"


async def test_a_held_slot_is_released_when_its_hold_ends() -> None:
    """A stuck provider cannot wedge a lane: a held slot counts against the limit (the next
    caller waits) and is handed on when the hold ends."""
    limiter = ProviderLimiter(1)
    released: list[bool] = []
    assert await limiter.acquire()
    limiter.hold(0.2, on_release=lambda: released.append(True))
    assert (limiter.in_flight, limiter.held) == (1, 1)
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert not waiter.done(), "a held slot is still taken"
    assert await asyncio.wait_for(waiter, timeout=10)
    assert (limiter.in_flight, limiter.held, released) == (1, 0, [True])
