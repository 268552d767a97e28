"""An adapter that raises or hangs in a lookup cannot stop reconciliation (issue: "the reconciler
dies silently"). Real unknown attempt rows, a real plugin provider kind (tests/faults/lookup_bugs.py)
whose lookup trips aiohttp's own header guard, the sandbox gateway as the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.lookup_bugs import ENTRY_POINT
from tests.support import PAYD, ROOT, Broker, DaemonFactory, InProcessDaemon, Sandbox, eventually, query

POISONED_REFERENCE = "order-7\r\nX-Injected: yes"  # a header value aiohttp refuses to send


@pytest.fixture
def lookup_bugs_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the ``lookup_bugs`` kind as a deployment would: a distribution's entry point."""
    dist = tmp_path / "site" / "payd_lookup_bugs-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: payd-lookup-bugs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[payd.providers]\n{ENTRY_POINT}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@contextlib.asynccontextmanager
async def daemon_with_buggy_lookups(
    daemons: DaemonFactory, sandbox: Sandbox
) -> AsyncIterator[tuple[InProcessDaemon, Path]]:
    config, path, port = daemons.config(
        providers__buggy={
            "kind": "lookup_bugs",
            "base_url": sandbox.url,
            "max_in_flight": 10,
            "timeout_s": 0.5,
            "connect_timeout_s": 0.5,
        }
    )
    daemon = InProcessDaemon(config, port)
    await daemon.start()
    try:
        yield daemon, path
    finally:
        assert await daemon.stop() == 0


async def add_unknown(db: aiomysql.Pool, key: str, *, customer_ref: str | None = None) -> None:
    """An attempt whose charge may have reached the provider: what a timeout leaves behind."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, "
        "customer_ref, state, outcome, reason, claimed_at, recheck_at) "
        "VALUES (%s, 'buggy', 700, 'EUR', 'pm_ok', %s, 'unknown', 'unknown', 'timed out', NOW(6), NOW(6))",
        key,
        customer_ref,
    )


async def row(db: aiomysql.Pool, key: str) -> dict[str, Any]:
    columns = ("state", "parked_at", "reconcile_error", "recheck_at", "reconcile_tries")
    found = await query(db, f"SELECT {', '.join(columns)} FROM attempts WHERE idempotency_key = %s", key)
    return dict(zip(columns, found[0], strict=True))


async def wait_state(db: aiomysql.Pool, key: str, state: str) -> None:
    async def reached() -> bool:
        return (await row(db, key))["state"] == state

    await eventually(reached, timeout=30, what=f"{key} to become {state}")


async def metric(port: int, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.usefixtures("lookup_bugs_kind")
async def test_a_lookup_that_raises_parks_its_attempt_and_reconciliation_goes_on(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """A lookup raising ValueError (aiohttp's header guard) used to end the reconciler: the other
    unknown attempts were never settled again. Now the poisoned attempt is parked: still unknown
    (it may have charged), with the reason, out of automatic passes (no further lookups), shown in
    /status and counted; the others in the same pass, and those that come later, are settled.
    ``payd attempts unpark`` returns it to automatic reconciliation."""
    await add_unknown(db, "poisoned", customer_ref=POISONED_REFERENCE)
    await add_unknown(db, "healthy")
    async with daemon_with_buggy_lookups(daemons, sandbox) as (daemon, config_path):
        await wait_state(db, "healthy", "succeeded")

        async def parked() -> bool:
            return (await row(db, "poisoned"))["parked_at"] is not None

        await eventually(parked, timeout=30, what="the poisoned attempt to be parked")
        poisoned = await row(db, "poisoned")
        assert poisoned["state"] == "unknown"
        assert poisoned["recheck_at"] is None
        assert poisoned["reconcile_error"].startswith("ValueError: ")
        await add_unknown(db, "later")
        await wait_state(db, "later", "succeeded")
        tries_now = (await row(db, "poisoned"))["reconcile_tries"]
        assert tries_now == poisoned["reconcile_tries"], "a parked attempt is not looked up again"

        async def shown() -> bool:
            return bool((await daemon.status())["parked_attempts"]["fleet"] == 1)

        await eventually(shown, timeout=10, what="/status to count the parked attempt")
        recent = (await daemon.status())["parked_attempts"]["recent"]
        assert [(p["idempotency_key"], p["provider"]) for p in recent] == [("poisoned", "buggy")]
        assert await metric(daemon.port, "payd_attempts_parked") == 1
        assert await metric(daemon.port, "payd_reconciled_total", result="parked") == 1
        assert await metric(daemon.port, "payd_duty_crashes_total", duty="reconciler") == 0

        # The operator's way back: unparked, it is looked up again (and, still poisoned, parked again).
        unparked = await asyncio.to_thread(
            subprocess.run,
            [PAYD, "attempts", "unpark", "poisoned", "never-parked", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"},  # the plugin kind
        )
        assert unparked.returncode == 1, "one key was not a parked attempt"
        assert "unparked poisoned" in unparked.stdout and "never-parked" in unparked.stderr

        async def parked_again() -> bool:
            again = await row(db, "poisoned")
            return again["parked_at"] is not None and again["reconcile_tries"] == 1

        await eventually(parked_again, timeout=30, what="the unparked attempt to be looked up again")
    charged = {charge["idempotency_key"] for charge in await sandbox.assert_no_double_charge()}
    assert charged == {"healthy", "later"}, "the parked attempt is never sent again"


@pytest.mark.usefixtures("lookup_bugs_kind")
async def test_a_lookup_that_never_answers_does_not_hold_up_the_others(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A lookup that hangs used to hold the whole pass (and so every unknown attempt) forever.
    Bounded like a charge, it gives up, the attempt stays unknown to be asked again, and the
    other attempts of the pass are settled."""
    await add_unknown(db, "hanging", customer_ref="hang")
    await add_unknown(db, "beside-it")
    async with daemon_with_buggy_lookups(daemons, sandbox) as (daemon, _):
        await wait_state(db, "beside-it", "succeeded")
        hanging = await row(db, "hanging")
        assert (hanging["state"], hanging["parked_at"]) == ("unknown", None)
        assert await metric(daemon.port, "payd_reconciled_total", result="lookup_failed") >= 1


async def test_a_row_that_cannot_be_read_is_parked_and_does_not_stop_the_pass(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """An unknown row whose metadata is not the JSON payd writes (edited by hand, or by another
    version) used to raise while the batch was read, every pass, on every instance; so did an
    expired lease on such a row. Each is parked (unknown, with the reason) instead, and the rows
    read with it are settled."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, "
        "metadata, state, outcome, claimed_at, recheck_at) VALUES "
        "('garbled', 'sandbox', 700, 'EUR', 'pm_ok', '{not json', 'unknown', 'unknown', NOW(6), NOW(6)), "
        "('readable', 'sandbox', 700, 'EUR', 'pm_ok', NULL, 'unknown', 'unknown', NOW(6), NOW(6)), "
        "('garbled-lease', 'sandbox', 700, 'EUR', 'pm_ok', '[1,', 'in_flight', NULL, NOW(6), NOW(6))",
    )
    async with daemons.in_process() as daemon:
        await wait_state(db, "readable", "succeeded")

        async def parked() -> bool:
            return (await row(db, "garbled"))["parked_at"] is not None

        await eventually(parked, timeout=30, what="the unreadable row to be parked")
        for key in ("garbled", "garbled-lease"):
            garbled = await row(db, key)
            assert garbled["state"] == "unknown", key
            assert garbled["reconcile_error"].startswith("row cannot be read: "), key
        assert await metric(daemon.port, "payd_duty_crashes_total", duty="reconciler") == 0
    assert {c["idempotency_key"] for c in await sandbox.ledger()} == {"readable"}
