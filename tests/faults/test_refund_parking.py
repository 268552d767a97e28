"""Unknown refunds for operators: a refund whose lookup raises is parked as a charge is, listed
beside unknown charges, unparked and settled by an operator (audited, with its events).

Real unknown reversal rows (as a timeout leaves them), the ``lookup_bugs`` plugin kind
(tests/faults/lookup_bugs.py) whose ``lookup_refund`` raises, a daemon in process, the ``payd``
commands as processes and the control endpoint over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest

from daemon.secrets import load_secret
from tests.faults.test_reconciler import (
    daemon_with_buggy_lookups,
    lookup_bugs_kind,  # noqa: F401 (a fixture, used by name)
    metric,
)
from tests.support import PAYD, ROOT, Broker, DaemonFactory, Sandbox, eventually, query


async def add_charge(db: aiomysql.Pool, key: str, *, subscription_id: int | None = None) -> None:
    """A succeeded charge taken through the ``buggy`` connection."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, state, outcome, provider_ref, finished_at) VALUES (%s, %s, %s, 'buggy', 1000, "
        "'EUR', 'pm_ok', 'succeeded', 'approved', %s, NOW(6))",
        key,
        subscription_id,
        None if subscription_id is None else 1,
        f"ch_{key}",
    )


async def add_unknown_refund(
    db: aiomysql.Pool, key: str, charge: str, *, reason: str, parked: bool = False, action: str | None = None
) -> None:
    """A refund whose answer never came (a timeout): unknown, due a lookup now (or parked)."""
    await query(
        db,
        "INSERT INTO reversals (idempotency_key, original_idempotency_key, original_attempt_id, provider, "
        "amount_minor, currency, reason, state, outcome, result_reason, claimed_at, recheck_at, tries, "
        "subscription_action) SELECT %s, idempotency_key, id, provider, amount_minor, currency, %s, "
        "'unknown', 'unknown', 'timed out', NOW(6), IF(%s, NULL, NOW(6)), 1, %s FROM attempts "
        "WHERE idempotency_key = %s",
        key,
        reason,
        parked,
        action,
        charge,
    )


async def refund_row(db: aiomysql.Pool, key: str) -> dict[str, Any]:
    columns = ("state", "recheck_at", "result_reason", "reconcile_tries", "decline_code")
    found = await query(db, f"SELECT {', '.join(columns)} FROM reversals WHERE idempotency_key = %s", key)
    return dict(zip(columns, found[0], strict=True))


async def payd(config_path: Path, site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [PAYD, *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": f"{site}:{ROOT}"},  # the plugin kind
    )


@pytest.mark.usefixtures("lookup_bugs_kind")
async def test_a_refund_whose_lookup_raises_is_parked_listed_unparked_and_settled(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """The lookup raises: the refund stays unknown (it may have refunded) but is parked (no more
    lookups, the reason kept, ``refund.parked`` counted). ``payd attempts list --state unknown``
    shows it beside the unknown charges, marked as a parked refund (text and JSON). ``unpark``
    makes it due again (looked up, parked again). ``settle --as failed`` closes it, audited on
    the charge, with a refund.failed event; a second settle is refused."""
    await broker.follow_events()
    await query(db, "DELETE FROM attempt_audit WHERE idempotency_key = 'ch-poison'")  # an earlier run's
    await add_charge(db, "ch-poison")
    await add_unknown_refund(db, "rf-poison", "ch-poison", reason="raise: unreadable")
    site = tmp_path / "site"
    async with daemon_with_buggy_lookups(daemons, sandbox) as (daemon, config_path):

        async def parked() -> bool:
            found = await refund_row(db, "rf-poison")
            return found["recheck_at"] is None and found["reconcile_tries"] >= 1

        await eventually(parked, timeout=30, what="the refund to be parked")
        poisoned = await refund_row(db, "rf-poison")
        assert poisoned["state"] == "unknown"
        assert poisoned["result_reason"] == "parked: lookup raised ValueError: cannot read refund rf-poison"
        assert await metric(daemon.port, "payd_reconciled_total", result="refund_parked") == 1

        async def gauge_says_parked() -> bool:  # the probe counts it fleet-wide every 2 s
            return await metric(daemon.port, "payd_refunds_parked") == 1

        await eventually(gauge_says_parked, timeout=20, what="payd_refunds_parked to count the refund")

        listed = await payd(config_path, site, "attempts", "list", "--state", "unknown")
        assert listed.returncode == 0, listed.stderr
        assert "no unknown attempts match" in listed.stdout
        [line] = [text for text in listed.stdout.splitlines() if text.startswith("rf-poison")]
        assert line.split()[:5] == ["rf-poison", "ch-poison", "parked", "buggy", "1000"]
        assert "1 unknown/pending refunds" in listed.stdout
        as_json = await payd(config_path, site, "attempts", "list", "--state", "unknown", "--json")
        [refund] = json.loads(as_json.stdout)["refunds"]
        assert (refund["kind"], refund["idempotency_key"], refund["state"], refund["parked"]) == (
            "refund",
            "rf-poison",
            "unknown",
            True,
        )
        await asyncio.sleep(1.5)  # a few reconciliation passes (1 s apart)
        assert (await refund_row(db, "rf-poison"))["reconcile_tries"] == poisoned["reconcile_tries"], (
            "a parked refund is not looked up again"
        )

        unparked = await payd(config_path, site, "attempts", "unpark", "rf-poison")
        assert unparked.returncode == 0, unparked.stderr
        assert "unparked refund rf-poison" in unparked.stdout

        async def parked_again() -> bool:
            again = await refund_row(db, "rf-poison")
            return again["recheck_at"] is None and again["reconcile_tries"] == 1

        await eventually(parked_again, timeout=30, what="the unparked refund to be looked up again")

        settle = ("attempts", "settle", "rf-poison", "--as", "failed", "--operator", "bob")
        settled = await payd(config_path, site, *settle, "--reason", "not on the dashboard")
        assert settled.returncode == 0, settled.stderr
        assert "settled refund rf-poison of charge ch-poison as failed (recorded: bob" in settled.stdout
        again = await payd(config_path, site, *settle, "--reason", "twice")
        assert again.returncode == 1
        assert "refund rf-poison is failed; only an unknown or pending refund can be settled" in again.stderr

        async def failed_event() -> bool:
            return any(e["type"] == "refund.failed" for e in broker.events)

        await eventually(failed_event, timeout=20, what="the refund.failed event")
    closed = await refund_row(db, "rf-poison")
    assert (closed["state"], closed["decline_code"], closed["recheck_at"]) == (
        "failed",
        "operator_settled",
        None,
    )
    assert closed["result_reason"] == "settled by bob (cli@" + closed["result_reason"].split("(cli@")[1]
    assert closed["result_reason"].endswith(": not on the dashboard")
    audit = await query(
        db,
        "SELECT idempotency_key, action, state_before, state_after, operator, reason FROM attempt_audit "
        "WHERE idempotency_key = 'ch-poison'",
    )
    assert audit == [
        ("ch-poison", "settle_refund", "unknown", "failed", "bob", "refund rf-poison: not on the dashboard")
    ]
    [event] = [e for e in broker.events if e["type"] == "refund.failed"]
    assert (event["idempotency_key"], event["original_idempotency_key"]) == ("rf-poison", "ch-poison")
    assert event["decline_code"] == "operator_settled"
    assert (await sandbox.stats())["refund_requests"] == 0, "nothing was sent"


@pytest.mark.usefixtures("lookup_bugs_kind")
async def test_settling_a_parked_full_refund_over_http_moves_its_subscription(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """``POST /admin/attempts/{refund key}/settle`` as succeeded: the refund succeeds, and as it
    asked to cancel and leaves nothing of the renewal, the subscription is canceled in the same
    commit (subscription.canceled naming the refund); the answer says so."""
    await broker.follow_events()
    await query(
        db,
        "INSERT INTO subscriptions (id, status, provider, payment_method, amount_minor, currency, "
        "paid_cycle) VALUES (801, 'active', 'buggy', 'pm_ok', 1000, 'EUR', 1)",
    )
    await add_charge(db, "renew:801:1:0", subscription_id=801)
    await add_unknown_refund(db, "rf-801", "renew:801:1:0", reason="raise", parked=True, action="cancel")
    token = load_secret("control_token")
    assert token is not None
    headers = {"Authorization": f"Bearer {token.reveal()}", "X-Payd-Operator": "carol"}
    async with (
        daemon_with_buggy_lookups(daemons, sandbox) as (daemon, _),
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{daemon.port}/admin/attempts/rf-801/settle"
        body = {"as": "succeeded", "reason": "refunded on the dashboard", "provider_ref": "re_801"}
        async with http.post(url, json=body, headers=headers) as answer:
            assert answer.status == 200
            settled = await answer.json()

        async def both() -> bool:
            types = {e["type"] for e in broker.events}
            return {"refund.succeeded", "subscription.canceled"} <= types

        await eventually(both, timeout=20, what="refund.succeeded and subscription.canceled")
    assert settled["operation"] == "refund"
    assert (settled["state"], settled["original_idempotency_key"]) == ("succeeded", "renew:801:1:0")
    assert settled["subscription_effect"] == "canceled"
    assert await query(db, "SELECT status, status_reason FROM subscriptions") == [
        ("canceled", "refunded: rf-801 refunded charge renew:801:1:0")
    ]
    assert await query(db, "SELECT state, provider_ref FROM reversals") == [("succeeded", "re_801")]
    [canceled] = [e for e in broker.events if e["type"] == "subscription.canceled"]
    assert (canceled["idempotency_key"], canceled["subscription_id"]) == ("rf-801", 801)


@pytest.mark.usefixtures("lookup_bugs_kind")
async def test_a_refund_lookup_that_hangs_is_cut_off_and_asked_again_not_parked(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A lookup that never answers is bounded (the provider's timeouts): the refund stays unknown
    and is asked again after its backoff (no answer is not an adapter bug, so it is not parked),
    while a raising lookup in the same passes is parked: one refund cannot stall the others."""
    await add_charge(db, "ch-hang")
    await add_charge(db, "ch-raise")
    await add_unknown_refund(db, "rf-hang", "ch-hang", reason="hang")
    await add_unknown_refund(db, "rf-raise", "ch-raise", reason="raise")
    async with daemon_with_buggy_lookups(daemons, sandbox) as (daemon, _):

        async def asked_twice_and_other_parked() -> bool:
            hung, raised = await refund_row(db, "rf-hang"), await refund_row(db, "rf-raise")
            return hung["reconcile_tries"] >= 2 and raised["recheck_at"] is None

        await eventually(asked_twice_and_other_parked, timeout=60, what="two bounded lookups and a parking")
        hung = await refund_row(db, "rf-hang")
        assert hung["state"] == "unknown" and hung["recheck_at"] is not None, "not parked"
        assert hung["result_reason"] == "timed out"
        assert await metric(daemon.port, "payd_reconciled_total", result="refund_parked") == 1
        assert await metric(daemon.port, "payd_duty_crashes_total", duty="reconciler") == 0
    assert (await refund_row(db, "rf-raise"))["state"] == "unknown"
