"""The sandbox gateway, over real HTTP: tokens, idempotency, faults, stats, control, CLI.

Each test starts its own gateway on 127.0.0.1 with a free port and talks to it with
aiohttp's client, the way payd's adapter does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from payd_sandbox.behaviour import Dice, LatencyDist
from payd_sandbox.gateway import (
    LISTEN_BACKLOG,
    SandboxBehaviour,
    SandboxSettings,
    add_arguments,
    build_app,
    serve,
    settings_from_args,
)

Json = dict[str, Any]


class Sandbox:
    """A running gateway and a client for it."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.url = base_url
        self.http = http

    async def charge(
        self,
        key: str | None,
        payment_method: str = "pm_ok",
        *,
        account: str | None = None,
        **fields: Any,
    ) -> tuple[int, dict[str, str], Json]:
        body = {
            "amount_minor": 1999,
            "currency": "EUR",
            "payment_method": payment_method,
            "merchant_reference": "123:4",
            "customer_ref": None,
            "metadata": {"plan": "monthly"},
        } | fields
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if account is not None:
            headers["Sandbox-Account"] = account
        async with self.http.post(
            f"{self.url}/v1/charges",
            json=body,
            headers=headers,
        ) as response:
            return response.status, dict(response.headers), await response.json()

    async def lookup(self, key: str) -> tuple[int, Json]:
        async with self.http.get(f"{self.url}/v1/charges/{key}") as response:
            return response.status, await response.json()

    async def ledger(self) -> list[Json]:
        async with self.http.get(f"{self.url}/_sandbox/ledger") as response:
            charges: list[Json] = (await response.json())["charges"]
            return charges

    async def stats(self) -> Json:
        async with self.http.get(f"{self.url}/_sandbox/stats") as response:
            stats: Json = await response.json()
            return stats

    async def set_behaviour(self, **changes: Any) -> tuple[int, Json]:
        async with self.http.post(f"{self.url}/_sandbox/behaviour", json=changes) as response:
            return response.status, await response.json()


StartSandbox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start_sandbox(http: aiohttp.ClientSession) -> AsyncIterator[StartSandbox]:
    runners: list[web.AppRunner] = []

    async def start(**behaviour: Any) -> Sandbox:
        runner = web.AppRunner(
            build_app(SandboxBehaviour(**behaviour)), handle_signals=False, access_log=None
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return Sandbox(f"http://127.0.0.1:{runner.addresses[0][1]}", http)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def sandbox(start_sandbox: StartSandbox) -> Sandbox:
    return await start_sandbox()


# --- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "status", "decline_code", "retryable"),
    [
        ("pm_ok", 200, None, False),
        ("pm_insufficient_funds", 402, "insufficient_funds", True),
        ("pm_stolen", 402, "stolen_card", False),
    ],
)
async def test_executing_tokens_answer_and_enter_the_ledger(
    sandbox: Sandbox, token: str, status: int, decline_code: str | None, retryable: bool
) -> None:
    """Approvals and both declines answer the documented object and are one ledger entry."""
    got_status, _, body = await sandbox.charge("k1", token)

    assert got_status == status
    assert body["status"] == ("approved" if status == 200 else "declined")
    assert (body["decline_code"], body["retryable"]) == (decline_code, retryable)
    assert re.fullmatch(r"ch_[0-9a-f]+", body["id"])
    assert body["idempotency_key"] == "k1"
    assert (body["merchant_reference"], body["amount_minor"], body["currency"]) == (
        "123:4",
        1999,
        "EUR",
    )
    assert isinstance(body["created_at"], float)
    [entry] = await sandbox.ledger()
    assert entry == {
        "id": body["id"],
        "idempotency_key": "k1",
        "merchant_reference": "123:4",
        "amount_minor": 1999,
        "currency": "EUR",
        "status": body["status"],
        "decline_code": decline_code,
        "account": "default",
        "created_at": body["created_at"],
        "refunded_minor": 0,
        "net_minor": 1999 if status == 200 else 0,
    }


async def test_rate_limited_token_charges_nothing_and_leaves_the_key_free(
    start_sandbox: StartSandbox,
) -> None:
    """pm_rate_limited is a 429 with Retry-After; the key then charges normally."""
    sandbox = await start_sandbox(retry_after_s=7)
    status, headers, body = await sandbox.charge("k1", "pm_rate_limited")

    assert status == 429
    assert headers["Retry-After"] == "7"
    assert body["error"]["type"] == "rate_limited"
    assert await sandbox.ledger() == []
    status, headers, _ = await sandbox.charge("k1", "pm_ok")
    assert (status, "Idempotent-Replayed" in headers) == (200, False)


async def test_error_token_charges_nothing_and_leaves_the_key_free(sandbox: Sandbox) -> None:
    """pm_error is a 500 saying charged=false; nothing is stored under the key."""
    status, _, body = await sandbox.charge("k1", "pm_error")

    assert status == 500
    assert body["error"]["type"] == "api_error"
    assert body["error"]["charged"] is False
    assert await sandbox.ledger() == []
    assert (await sandbox.lookup("k1"))[0] == 404
    assert (await sandbox.charge("k1", "pm_ok"))[0] == 200


async def test_timeout_token_charges_before_hanging(start_sandbox: StartSandbox) -> None:
    """pm_timeout is approved and recorded while the client that sent it has timed out."""
    sandbox = await start_sandbox(hang_s=30.0)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await sandbox.charge("k1", "pm_timeout")

    [entry] = await sandbox.ledger()
    assert (entry["idempotency_key"], entry["status"]) == ("k1", "approved")
    status, body = await sandbox.lookup("k1")
    assert (status, body["status"], body["id"]) == (200, "approved", entry["id"])
    # The retry payd must not send blindly would be answered from the store, not charged.
    status, headers, body = await sandbox.charge("k1", "pm_timeout")
    assert (status, headers["Idempotent-Replayed"], body["id"]) == (200, "true", entry["id"])
    assert len(await sandbox.ledger()) == 1


async def test_other_tokens_follow_the_seeded_mix(start_sandbox: StartSandbox) -> None:
    """Unknown tokens roll the mix; the same seed gives the same sequence, every outcome
    in the mix appears, and a replay returns the stored result, not a new roll."""
    mix = {"approve": 0.4, "soft_decline": 0.2, "hard_decline": 0.2, "error": 0.2}
    first = await start_sandbox(mix=mix, seed=42)
    second = await start_sandbox(mix=mix, seed=42)

    async def run(sandbox: Sandbox) -> list[tuple[int, str | None]]:
        results = []
        for n in range(60):
            status, _, body = await sandbox.charge(f"k{n}", "pm_card_visa")
            results.append((status, body.get("decline_code")))
        return results

    sequence = await run(first)
    assert sequence == await run(second)
    assert {status for status, _ in sequence} == {200, 402, 500}
    assert {code for _, code in sequence} == {None, "insufficient_funds", "stolen_card"}
    for n, (status, code) in enumerate(sequence):
        if status != 500:
            replay_status, _, body = await first.charge(f"k{n}", "pm_card_visa")
            assert (replay_status, body["decline_code"]) == (status, code)


# --- idempotency ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["pm_ok", "pm_insufficient_funds"])
async def test_replay_returns_the_same_answer_and_charges_once(sandbox: Sandbox, token: str) -> None:
    """A completed key answers the identical status and body, marked as a replay."""
    status, headers, body = await sandbox.charge("k1", token)
    replay_status, replay_headers, replay_body = await sandbox.charge("k1", token)

    assert "Idempotent-Replayed" not in headers
    assert replay_headers["Idempotent-Replayed"] == "true"
    assert (replay_status, replay_body) == (status, body)
    assert len(await sandbox.ledger()) == 1


async def test_concurrent_requests_with_one_key_charge_once(
    start_sandbox: StartSandbox,
) -> None:
    """While a key is being processed a second request with it gets 409, not a charge."""
    sandbox = await start_sandbox(latency_ms=300)

    results = await asyncio.gather(sandbox.charge("k1"), sandbox.charge("k1"))

    assert sorted(status for status, _, _ in results) == [200, 409]
    conflict = next(body for status, _, body in results if status == 409)
    assert conflict == {"error": {"type": "idempotency_conflict"}}
    assert len(await sandbox.ledger()) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"amount_minor": 2000},
        {"currency": "USD"},
        {"payment_method": "pm_stolen"},
        {"merchant_reference": "123:5"},
    ],
)
async def test_reusing_a_key_for_another_charge_is_refused(sandbox: Sandbox, change: Json) -> None:
    """A key reused with different charge parameters gets 422 and charges nothing."""
    await sandbox.charge("k1")
    status, _, body = await sandbox.charge("k1", **change)

    assert status == 422
    assert body == {"error": {"type": "idempotency_mismatch"}}
    assert len(await sandbox.ledger()) == 1


async def test_a_key_is_global_across_accounts(sandbox: Sandbox) -> None:
    """A second account reusing a key gets the replay, so one key never charges twice."""
    _, _, body = await sandbox.charge("k1", account="a")
    status, headers, replay = await sandbox.charge("k1", account="b")

    assert (status, headers["Idempotent-Replayed"], replay) == (200, "true", body)
    assert [entry["account"] for entry in await sandbox.ledger()] == ["a"]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, {"amount_minor": 1, "currency": "EUR", "payment_method": "pm_ok"}),
        ({"Idempotency-Key": "k1"}, {"amount_minor": 0}),
        ({"Idempotency-Key": "k1"}, "not json"),
        ({"Idempotency-Key": "k1"}, {"amount_minor": "1", "currency": "EUR"}),
    ],
)
async def test_invalid_requests_are_400(sandbox: Sandbox, headers: Json, body: Any) -> None:
    """A missing key or an invalid body is invalid_request and charges nothing."""
    raw = body.encode() if isinstance(body, str) else None
    async with sandbox.http.post(
        f"{sandbox.url}/v1/charges",
        headers=headers,
        json=None if raw else body,
        data=raw,
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request"
    assert await sandbox.ledger() == []


async def test_unknown_body_fields_are_ignored(sandbox: Sandbox) -> None:
    """Senders evolve: extra fields do not make a charge invalid."""
    status, _, _ = await sandbox.charge("k1", future_field={"x": 1})
    assert status == 200


# --- lookups -------------------------------------------------------------------------------


async def test_lookup_returns_the_stored_charge_or_404(sandbox: Sandbox) -> None:
    """Lookup by key returns approved (200) and declined (402) charges as charged, else 404."""
    _, _, approved = await sandbox.charge("ok")
    _, _, declined = await sandbox.charge("stolen", "pm_stolen")

    assert await sandbox.lookup("ok") == (200, approved)
    assert await sandbox.lookup("stolen") == (402, declined)
    assert await sandbox.lookup("never") == (404, {"error": {"type": "not_found"}})


# --- fault injection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "status", "error"),
    [
        ("error_rate", 500, {"type": "api_error", "charged": False}),
        ("rate_limit_rate", 429, {"type": "rate_limited"}),
        ("hang_rate", 503, {"type": "unavailable", "charged": False}),
    ],
)
async def test_injected_faults_at_rate_one_charge_nothing(
    start_sandbox: StartSandbox, rate: str, status: int, error: Json
) -> None:
    """At rate 1.0 every charge request fails before processing, whatever its token,
    nothing is charged, and the key stays free for a later request."""
    behaviour: Json = {rate: 1.0, "hang_s": 0.2, "retry_after_s": 3}
    sandbox = await start_sandbox(**behaviour)

    for token in ("pm_ok", "pm_stolen", "pm_timeout"):
        started = time.monotonic()
        got_status, headers, body = await sandbox.charge(f"k-{token}", token)
        assert got_status == status
        assert body["error"].items() >= error.items()
        if status == 429:
            assert headers["Retry-After"] == "3"
        if status == 503:
            assert time.monotonic() - started >= 0.2
    assert await sandbox.ledger() == []

    await sandbox.set_behaviour(**{rate: 0.0})
    got_status, headers, _ = await sandbox.charge("k-pm_ok")
    assert (got_status, "Idempotent-Replayed" in headers) == (200, False)


async def test_latency_is_added_to_charges(start_sandbox: StartSandbox) -> None:
    """latency_ms delays a charge by about that long."""
    sandbox = await start_sandbox(latency_ms=150)
    started = time.monotonic()
    await sandbox.charge("k1")
    assert 0.15 <= time.monotonic() - started < 1.0


@pytest.mark.parametrize("dist", list(LatencyDist))
def test_every_latency_distribution_has_the_configured_mean(dist: LatencyDist) -> None:
    """Each distribution's samples average to latency_ms (within 5%), never below 0."""
    behaviour = SandboxBehaviour(latency_ms=40.0, latency_dist=dist)
    dice = Dice(behaviour, rng=random.Random(1), latency_rng=random.Random(2))
    samples = [dice.latency_s() for _ in range(20_000)]
    assert min(samples) >= 0
    assert statistics.fmean(samples) == pytest.approx(0.040, rel=0.05)


# --- stats and control ---------------------------------------------------------------------


async def test_stats_show_peak_concurrency_per_account(start_sandbox: StartSandbox) -> None:
    """N slow concurrent requests for an account show as a peak of exactly N for it."""
    sandbox = await start_sandbox(latency_ms=400)

    async def observe_in_flight() -> Json:
        await asyncio.sleep(0.2)
        return await sandbox.stats()

    charges = [sandbox.charge(f"a{n}", account="shop-a") for n in range(8)]
    charges += [sandbox.charge(f"b{n}", account="shop-b") for n in range(3)]
    observer = asyncio.create_task(observe_in_flight())
    await asyncio.gather(*charges)
    during = await observer
    await sandbox.charge("a-late", account="shop-a")  # alone: must not lower the peak
    after = await sandbox.stats()

    assert during["in_flight"] == 11
    assert during["accounts"]["shop-a"]["in_flight"] == 8
    assert after["accounts"] == {
        "shop-a": {"requests": 9, "in_flight": 0, "peak_in_flight": 8},
        "shop-b": {"requests": 3, "in_flight": 0, "peak_in_flight": 3},
    }
    assert after["requests"] == 12
    assert (after["in_flight"], after["peak_in_flight"]) == (0, 11)
    assert (after["charges"], after["approved"], after["declined"]) == (12, 12, 0)


async def test_reset_clears_ledger_store_and_stats(sandbox: Sandbox) -> None:
    """After a reset nothing is remembered: the ledger and stats are empty, a used key
    charges afresh."""
    await sandbox.charge("k1")
    await sandbox.charge("k2", "pm_stolen")

    async with sandbox.http.post(f"{sandbox.url}/_sandbox/reset") as response:
        assert response.status == 204

    assert await sandbox.ledger() == []
    stats = await sandbox.stats()
    assert stats["requests"] == stats["peak_in_flight"] == stats["charges"] == 0
    assert stats["accounts"] == {}
    status, headers, _ = await sandbox.charge("k1")
    assert (status, "Idempotent-Replayed" in headers) == (200, False)


async def test_behaviour_changes_live_and_refuses_bad_values(sandbox: Sandbox) -> None:
    """POST /_sandbox/behaviour changes a running gateway and returns the full settings;
    a bad value is a 400 naming the setting and changes nothing."""
    async with sandbox.http.get(f"{sandbox.url}/_sandbox/behaviour") as response:
        initial = await response.json()
    assert initial["error_rate"] == 0.0
    assert initial["hang_s"] == 30.0

    status, current = await sandbox.set_behaviour(error_rate=1.0)
    assert (status, current) == (200, initial | {"error_rate": 1.0})
    assert (await sandbox.charge("k1"))[0] == 500

    bad_values: list[tuple[Json, str]] = [
        ({"error_rate": 1.5}, "error_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"mix": {"approve": 1, "refund": 1}}, "mix"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ]
    for bad, named in bad_values:
        status, body = await sandbox.set_behaviour(**bad)
        assert status == 400
        assert named in body["error"]["message"]
    status, current = await sandbox.set_behaviour()
    assert current["error_rate"] == 1.0


# --- command line --------------------------------------------------------------------------


def parse(*argv: str) -> SandboxSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_flags_map_to_settings() -> None:
    """Defaults match the structs, and every flag lands in its setting."""
    assert parse() == SandboxSettings()
    settings = parse(
        *("--host", "0.0.0.0", "--port", "9000", "--latency-ms", "25"),
        *("--latency-dist", "lognormal", "--hang-s", "2", "--retry-after-s", "5"),
        *("--error-rate", "0.1", "--rate-limit-rate", "0.2", "--hang-rate", "0.3"),
        *("--mix", "approve=0.9, hard_decline=0.1", "--seed", "7"),
    )
    assert settings == SandboxSettings(
        host="0.0.0.0",
        port=9000,
        behaviour=SandboxBehaviour(
            latency_ms=25,
            latency_dist=LatencyDist.LOGNORMAL,
            hang_s=2,
            retry_after_s=5,
            error_rate=0.1,
            rate_limit_rate=0.2,
            hang_rate=0.3,
            mix={"approve": 0.9, "hard_decline": 0.1},
            seed=7,
        ),
    )


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--latency-ms", "-1"], "--latency-ms"),
        (["--hang-s", "nan"], "--hang-s"),
        (["--retry-after-s", "-1"], "--retry-after-s"),
        (["--error-rate", "1.5"], "--error-rate"),
        (["--rate-limit-rate", "-0.1"], "--rate-limit-rate"),
        (["--hang-rate", "2"], "--hang-rate"),
        (["--mix", "approve=0.5,refund=0.5"], "--mix"),
        (["--mix", "approve"], "--mix"),
        (["--mix", "approve=lots"], "--mix"),
        (["--mix", "approve=0,error=0"], "--mix"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_flags_raise_value_error_naming_the_flag(argv: list[str], flag: str) -> None:
    """A bad value is a ValueError whose message starts with the flag."""
    with pytest.raises(ValueError, match=f"^{re.escape(flag)}: "):
        parse(*argv)


# --- serve ---------------------------------------------------------------------------------


async def test_serve_listens_until_the_event_then_ends_hangs_cleanly(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """serve() prints where it listens, answers, and returns promptly once shutdown is set,
    even with a 30 s pm_timeout hang in flight, logging no errors on the way out."""
    caplog.set_level(logging.WARNING)
    shutdown = asyncio.Event()
    settings = SandboxSettings(port=0, behaviour=SandboxBehaviour(hang_s=30))
    server = asyncio.create_task(serve(settings, shutdown))

    url = ""
    for _ in range(200):
        if match := re.search(r"sandbox gateway listening on (http://\S+)", capsys.readouterr().out):
            url = match.group(1)
            break
        await asyncio.sleep(0.01)
    assert url.startswith("http://127.0.0.1:")
    sandbox = Sandbox(url, http)
    assert (await sandbox.charge("k1"))[0] == 200
    hanging = asyncio.create_task(sandbox.charge("k2", "pm_timeout"))
    for _ in range(200):  # until the hang has begun
        if (await sandbox.stats())["in_flight"] == 1:
            break
        await asyncio.sleep(0.01)

    started = time.monotonic()
    shutdown.set()
    await asyncio.wait_for(server, timeout=5)
    assert time.monotonic() - started < 2
    await asyncio.gather(hanging, return_exceptions=True)
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen queue")
async def test_serve_listens_with_a_backlog_for_thousands_of_connections(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The listening socket queues up to LISTEN_BACKLOG connections (as far as somaxconn allows),
    not aiohttp's 128: at 10,000 calls in flight the daemon opens connections faster than a busy
    gateway accepts them, and overflowing SYNs turned into connect timeouts and an open breaker."""
    somaxconn = int(await asyncio.to_thread(Path("/proc/sys/net/core/somaxconn").read_text))
    if somaxconn <= 128:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: no backlog above aiohttp's default possible")
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(SandboxSettings(port=0), shutdown))
    try:
        port = ""
        for _ in range(200):
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", capsys.readouterr().out):
                port = match.group(1)
                break
            await asyncio.sleep(0.01)
        assert port, "serve() never said where it listens"
        ss = await asyncio.to_thread(
            subprocess.run, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        )
        listing = ss.stdout.split()
        # LISTEN <queued now> <backlog> <local address> <peer>: Send-Q of a listener is its backlog.
        assert listing[0] == "LISTEN" and listing[3].endswith(f":{port}"), listing
        assert int(listing[2]) == min(LISTEN_BACKLOG, somaxconn)
    finally:
        shutdown.set()
        await asyncio.wait_for(server, timeout=5)
