"""``payd rollback``: bulk refunds over MariaDB, RabbitMQ, Redis and the sandbox gateway's ledger.

Selections are judged on rows written as the pipeline leaves a succeeded charge;
runs on charges a daemon really took at the sandbox, refunded by that daemon,
with the gateway's ledger as the judge of "each charge reversed exactly once".
The command runs as a process (``payd rollback``), as an operator runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomysql
import pytest
import redis.asyncio as aioredis

from daemon.config import MySQLSettings
from daemon.halt import HaltKeys, HaltOrder
from daemon.operator.rollback import (
    Selection,
    chunks,
    create_run,
    parse_amount,
    parse_moment,
    refund_key,
    where,
)
from daemon.operator.rollback_run import pace
from daemon.secrets import load_secret
from daemon.storage.db import close_pool, open_pool, transaction
from tests.support import (
    DATABASE,
    NAMESPACE,
    PAYD,
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    query,
    request,
    reset_broker,
    wait_settled,
)
from tests.tls_servers import RABBITMQ_SERVER, PrivateRabbitMQ

KEYS = HaltKeys(NAMESPACE)


@pytest.fixture
async def rb(db: aiomysql.Pool) -> AsyncIterator[aiomysql.Pool]:
    """The test database without earlier runs (``db`` empties attempts and reversals)."""
    await query(db, "DELETE FROM rollback_items")
    await query(db, "DELETE FROM rollback_runs")
    await _clear_halts()
    yield db
    await _clear_halts()


async def payd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        PAYD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def dry_run(config: Path, *filters: str) -> dict[str, Any]:
    code, out, err = await payd("rollback", "--config", str(config), "--dry-run", "--json", *filters)
    assert code == 0, err
    return dict(json.loads(out))


def totals(
    preview: dict[str, Any], key: str = "by_currency"
) -> dict[tuple[str, str | None], tuple[int, ...]]:
    return {
        (g["currency"], g["provider"]): (
            g["charges"],
            g["charged_minor"],
            g["reserved_minor"],
            g["to_reverse_minor"],
            g["already_reversed"],
        )
        for g in preview[key]
    }


async def add_charge(
    db: aiomysql.Pool,
    key: str,
    *,
    amount: int = 1000,
    currency: str = "EUR",
    provider: str = "sandbox",
    routed: str | None = None,
    state: str = "succeeded",
    finished: str = "2026-03-01 12:00:00",
    subscription_id: int | None = None,
) -> None:
    """A charge row as the pipeline leaves it."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, routed_provider, "
        "amount_minor, currency, payment_method, state, outcome, finished_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, 'pm_ok', %s, 'approved', %s)",
        key,
        subscription_id,
        None if subscription_id is None else 1,
        provider,
        routed,
        amount,
        currency,
        state,
        finished,
    )


async def test_selection_filters_and_keys_not_selected(
    rb: aiomysql.Pool, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Each filter selects what it names and nothing else: the provider that took the money (a
    failover's), the completion window, the plan, an exact amount and a range, the currency, and
    a list of keys (arguments and a file), where an unknown key, a declined and an unknown charge
    are reported as not selected; filters combine with AND. No filter at all is refused."""
    db = rb
    await query(
        db,
        "INSERT INTO subscriptions (id, plan, provider, payment_method, amount_minor, currency) "
        "VALUES (1, 'gold', 'sandbox', 'pm_ok', 1000, 'EUR'), (2, 'basic', 'sandbox', 'pm_ok', 500, 'EUR')",
    )
    await add_charge(db, "a", amount=1000, finished="2026-03-01 10:00:00", subscription_id=1)
    await add_charge(db, "b", amount=500, finished="2026-03-02 10:00:00", subscription_id=2)
    await add_charge(db, "c", amount=700, currency="USD", routed="backup", finished="2026-03-03 10:00:00")
    await add_charge(db, "d", amount=700, provider="other", finished="2026-03-04 10:00:00")
    await add_charge(db, "declined", state="declined")
    await add_charge(db, "unknown", state="unknown")
    _, config, _ = daemons.config(**connections(daemons, "backup", "other"))

    async def keys(**filters: Any) -> list[str]:
        # The very clause the dry run, the run's freeze and the report's selection use.
        selection = Selection(**filters)
        clause, args = where(selection, chunks(selection)[0])
        return [
            key
            for (key,) in await query(
                db, f"SELECT a.idempotency_key FROM attempts a WHERE {clause} ORDER BY 1", *args
            )
        ]

    assert await keys(provider="sandbox") == ["a", "b"]
    assert await keys(provider="backup") == ["c"], (
        "a failover's charge belongs to the connection that took it"
    )
    assert await keys(
        since=parse_moment("--since", "2026-03-02"), until=parse_moment("--until", "2026-03-04")
    ) == [
        "b",
        "c",
    ]
    assert await keys(since=parse_moment("--since", "2026-03-02T11:00:00+01:00")) == ["b", "c", "d"]
    assert await keys(plan="gold") == ["a"]
    assert await keys(amount_min=700, amount_max=700) == ["c", "d"]
    assert parse_amount("600..1000") == (600, 1000) and parse_amount("..600") == (0, 600)
    assert await keys(amount_min=600, amount_max=1000) == ["a", "c", "d"]
    assert await keys(currency="USD") == ["c"]
    assert await keys(currency="EUR", amount_min=700, amount_max=700) == ["d"]
    assert await keys(keys=("a", "declined", "unknown", "nope")) == ["a"]
    preview = await dry_run(config, "--since", "2026-03-02T11:00:00+01:00", "--amount-minor", "..600")
    assert totals(preview) == {("EUR", None): (1, 500, 0, 500, 0)}

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# charges of the bad batch\na\n\nunknown\nno-such-charge\n")
    preview = await dry_run(config, "--keys-file", str(keys_file), "declined", "d")
    assert preview["charges"] == 2
    assert totals(preview) == {("EUR", None): (2, 1700, 0, 1700, 0)}
    assert {(u["key"], u["why"]) for u in preview["unselected_keys"]} == {
        ("unknown", "charge is unknown"),
        ("declined", "charge is declined"),
        ("no-such-charge", "no such charge"),
    }
    filtered = await dry_run(config, "--provider", "other", "a", "d")
    assert [(u["key"], u["why"]) for u in filtered["unselected_keys"]] == [("a", "outside the other filters")]

    code, _, err = await payd("rollback", "--config", str(config), "--dry-run")
    assert code == 2 and "at least one filter" in err
    code, _, err = await payd("rollback", "--config", str(config), "--run", "r1")
    assert code == 2 and "at least one filter" in err
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text("a\n4242 4242 4242 4242\n")
    code, _, err = await payd("rollback", "--config", str(config), "--dry-run", "--keys-file", str(bad_file))
    assert code == 2 and f"{bad_file}:2:" in err
    code, _, err = await payd("rollback", "--config", str(config), "--dry-run", "--amount-minor", "ten")
    assert code == 2 and "--amount-minor 'ten'" in err
    code, _, err = await payd("rollback", "--config", str(config), "--dry-run", "--keys-file", "/nonexistent")
    assert code == 2 and "--keys-file:" in err
    # A reason the daemon's intake would refuse (it looks like a card number) would dead-letter every refund.
    code, _, err = await payd(
        "rollback", "--config", str(config), "--run", "r1", "a", "--reason", "card 4242424242424242"
    )
    assert code == 2 and err.startswith("payd rollback: --reason:") and "4242" not in err, err
    code, _, err = await payd("rollback", "--config", str(config), "--run", "bad name", "a")
    assert code == 2 and "run name 'bad name'" in err
    assert await query(db, "SELECT COUNT(*) FROM rollback_runs") == [(0,)], (
        "a dry run or a refusal records nothing"
    )


BULK = 100_000
DIGITS = (
    "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 "
    "UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)"
)
SEQUENCE = (
    f"(SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d AS n "
    f"FROM {DIGITS} a, {DIGITS} b, {DIGITS} c, {DIGITS} e, {DIGITS} f) AS seq"
)
CURRENCIES = ("EUR", "USD", "GBP")
# Earlier reversals of the bulk charges: (n modulo, remainder, amount (None: the whole charge), state).
EARLIER = (
    (10, 0, 100, "succeeded"),
    (100, 1, None, "succeeded"),
    (50, 2, 50, "failed"),
    (70, 3, 30, "pending"),
    (70, 13, 20, "unknown"),
)


def bulk_amount(n: int) -> int:
    return 100 + n % 900


def connections(daemons: DaemonFactory, *names: str) -> dict[str, dict[str, Any]]:
    """Configuration sections for more connections to the sandbox gateway (its adapter refunds),
    so charges of those providers are ones payd can refund through."""
    table = {"kind": "sandbox", "base_url": daemons.sandbox.url, "max_in_flight": 5}
    return {f"providers__{name}": dict(table) for name in names}


def bulk_provider(n: int) -> str:
    return "sandbox_b" if n % 4 == 0 else "sandbox"


async def seed_bulk(db: aiomysql.Pool) -> None:
    """100,000 succeeded charges completed 2026-01-01 00:00 + n seconds, with earlier reversals,
    in a few INSERT ... SELECT statements (seconds, not a round trip per row)."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, routed_provider, amount_minor, currency, "
        "payment_method, state, outcome, finished_at) SELECT CONCAT('bulk-', n), 'sandbox', "
        "IF(n % 4 = 0, 'sandbox_b', NULL), 100 + n % 900, ELT(n % 3 + 1, 'EUR', 'USD', 'GBP'), 'pm_ok', "
        f"'succeeded', 'approved', TIMESTAMP('2026-01-01 00:00:00') + INTERVAL n SECOND FROM {SEQUENCE}",
    )
    for modulo, remainder, amount, state in EARLIER:
        await query(
            db,
            "INSERT INTO reversals (idempotency_key, original_idempotency_key, original_attempt_id, "
            "provider, amount_minor, currency, state) SELECT CONCAT('earlier-', %s, '-', a.id), "
            "a.idempotency_key, a.id, a.provider, COALESCE(%s, a.amount_minor), a.currency, %s "
            "FROM attempts a WHERE a.idempotency_key LIKE 'bulk-%%' "
            "AND CAST(SUBSTRING(a.idempotency_key, 6) AS UNSIGNED) %% %s = %s",
            f"{modulo}-{remainder}",
            amount,
            state,
            modulo,
            remainder,
        )
    # What must not be selected: before the window, declined or unknown inside it.
    await add_charge(db, "outside", finished="2025-12-31 23:59:59")
    await add_charge(db, "declined-in", state="declined", finished="2026-01-01 10:00:00")
    await add_charge(db, "unknown-in", state="unknown", finished="2026-01-01 10:00:00")


def expected_bulk() -> tuple[
    dict[tuple[str, str | None], tuple[int, ...]], dict[tuple[str, str | None], tuple[int, ...]]
]:
    """The dry run's totals, computed here from the seed's formulas (not by the database)."""
    per: dict[tuple[str, str], list[int]] = {}
    for n in range(BULK):
        amount = bulk_amount(n)
        reserved = sum(
            amount if value is None else value
            for modulo, remainder, value, state in EARLIER
            if n % modulo == remainder and state != "failed"
        )
        sums = per.setdefault((CURRENCIES[n % 3], bulk_provider(n)), [0] * 5)
        for i, value in enumerate((1, amount, reserved, max(amount - reserved, 0), int(reserved >= amount))):
            sums[i] += value
    by_currency: dict[str, list[int]] = {}
    for (currency, _), sums in per.items():
        total = by_currency.setdefault(currency, [0] * 5)
        for i, value in enumerate(sums):
            total[i] += value
    return (
        {(c, None): tuple(s) for c, s in by_currency.items()},
        {key: tuple(s) for key, s in per.items()},
    )


async def test_dry_run_over_100000_charges_totals_exactly_and_publishes_nothing(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """Over 100,000 succeeded charges in a completion window (with earlier reversals: succeeded,
    whole, failed, pending, unknown), the dry run's count and totals per currency and per provider
    are exactly what the seed implies (what was already reversed or held subtracted; a failed
    reversal holds nothing), charges outside the window or not succeeded are left out, nothing is
    published and no run is recorded. A narrow window is read through ix_attempts_finished."""
    db = rb
    await seed_bulk(db)
    _, config, _ = daemons.config(**connections(daemons, "sandbox_b"))
    preview = await dry_run(config, "--since", "2026-01-01", "--until", "2026-01-03")
    by_currency, by_provider = expected_bulk()
    assert preview["charges"] == BULK
    assert totals(preview) == by_currency
    assert totals(preview, "by_provider") == by_provider
    queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
    assert queue.declaration_result.message_count == 0
    assert await query(db, "SELECT COUNT(*) FROM rollback_items") == [(0,)]

    async with db.acquire() as connection, connection.cursor(aiomysql.DictCursor) as cursor:
        await cursor.execute(
            "EXPLAIN SELECT a.id FROM attempts a WHERE a.state = 'succeeded' "
            "AND a.finished_at >= '2026-01-01 05:00:00' AND a.finished_at < '2026-01-01 06:00:00'"
        )
        plan = await cursor.fetchall()
    assert plan[0]["key"] == "ix_attempts_finished", plan


# -- runs, with a daemon and the sandbox ------------------------------------------------------


def refund_body(key: str, original: str, amount: int) -> dict[str, Any]:
    return {
        "operation": "refund",
        "idempotency_key": key,
        "original_idempotency_key": original,
        "amount_minor": amount,
    }


async def take_charges(db: aiomysql.Pool, broker: Broker, keys: list[str], amount: int = 1000) -> None:
    await broker.publish([request(key, amount_minor=amount) for key in keys])
    settled = await wait_settled(db, keys, timeout=120)
    assert set(settled.values()) == {"succeeded"}


def refunds_per_charge(ledger: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {c["idempotency_key"]: (c["refunded_minor"], c["net_minor"]) for c in ledger}


async def test_a_run_reverses_each_charge_once_and_a_rerun_reverses_nothing_twice(
    rb: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A run over 30 charges (one refunded wholly before, one in part) refunds what remains of
    each exactly once at the gateway, under the keys rollback:RUN:KEY, and its report says so;
    the same command again publishes nothing and refunds nothing; another run with the same
    filters finds everything already reversed; --report prints the same report later; a
    declined charge named by key is not selected; resuming with other filters is refused."""
    db = rb
    keys = [f"ch-{i:02d}" for i in range(30)]
    async with daemons.in_process() as daemon:
        await take_charges(db, broker, keys)
        await broker.publish([request("ch-declined", payment_method="pm_stolen")])
        await wait_settled(db, ["ch-declined"])
        await broker.publish(
            [refund_body("before-whole", "ch-00", 1000), refund_body("before-part", "ch-01", 300)]
        )
        await eventually(
            lambda: _count(db, "SELECT COUNT(*) FROM reversals WHERE state = 'succeeded'", 2),
            timeout=30,
            what="the earlier refunds",
        )
        config = str(daemons.workdir / f"payd-{daemon.port}.toml")
        run = ("rollback", "--config", config, "--run", "bad-price", "--reason", "wrong price in March")
        code, out, err = await payd(*run, *keys, "ch-declined", "--wait", "60")
        assert code == 0, out + err
        assert "30 succeeded charges selected and frozen" in err
        assert "published 29 of 29" in err
        report = await _report(config, "bad-price")
        assert report["counts"] == {
            "reversed": 29,
            "already_reversed": 1,
            "refused": 0,
            "unknown": 0,
            "pending": 0,
            "not_published": 0,
        }
        assert {(t["outcome"], t["currency"], t["amount_minor"]) for t in report["tallies"]} == {
            ("reversed", "EUR", 28 * 1000 + 700),
            ("already_reversed", "EUR", 1000),
        }
        stats = await sandbox.stats()

        code, out, err = await payd(*run, "--wait", "30")  # resumed: no filters, the frozen charges
        assert code == 0, out + err
        assert "published 0 of 0" in err
        code, out, err = await payd(*run, "ch-declined", *reversed(keys), "--wait", "30")  # also a resume
        assert code == 0, out + err
        code, _, err = await payd(*run, "--provider", "sandbox")
        assert code == 2 and "exists with another selection" in err
        code, out, err = await payd(
            "rollback",
            "--config",
            config,
            "--run",
            "again",
            "--provider",
            "sandbox",
            "--json",
            "--wait",
            "30",
        )
        assert code == 0, out + err
        assert json.loads(out)["counts"]["already_reversed"] == 30
        await asyncio.sleep(1)  # let any stray refund request reach the daemon before judging
    assert await sandbox.stats() == stats, "nothing was sent after the first run"
    refunds = await sandbox.refunds()
    by_key = Counter(r["idempotency_key"] for r in refunds)
    assert sorted(k for k in by_key if k.startswith("rollback:")) == sorted(
        f"rollback:bad-price:{k}" for k in keys[1:]
    )
    assert set(by_key.values()) == {1}
    assert refunds_per_charge(await sandbox.ledger()) == {
        **{key: (1000, 0) for key in keys},
        "ch-declined": (0, 0),
    }
    code, out, _ = await payd("rollback", "--config", config, "--report", "bad-price")
    assert code == 0
    assert "reversed                 29  28700 EUR" in out
    assert await query(
        db, "SELECT reason FROM reversals WHERE idempotency_key = 'rollback:bad-price:ch-05'"
    ) == [("wrong price in March",)]


async def _count(db: aiomysql.Pool, sql: str, wanted: int) -> bool:
    return (await query(db, sql))[0][0] >= wanted


async def _report(config: str, run: str) -> dict[str, Any]:
    code, out, err = await payd("rollback", "--config", config, "--report", run, "--json")
    assert code == 0, err
    return dict(json.loads(out))


async def test_kill_9_in_the_middle_of_a_rollback_of_1000_then_resume_reverses_each_once(
    rb: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """kill -9 of ``payd rollback`` after some hundreds of its 1,000 refunds are published; the
    same command again resumes and waits: every charge is refunded exactly once at the gateway
    (1,000 refunds, one per charge, none twice) and the report counts 1,000 reversed."""
    db = rb
    keys = [f"k9-{i:04d}" for i in range(1000)]
    async with daemons.in_process() as daemon:
        await take_charges(db, broker, keys, amount=500)
        config = str(daemons.workdir / f"payd-{daemon.port}.toml")
        command = ("rollback", "--config", config, "--run", "k9", "--provider", "sandbox", "--rate", "150")
        victim = await asyncio.create_subprocess_exec(
            PAYD, *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        assert victim.stderr is not None
        published = 0
        while published < 300:
            line = (await asyncio.wait_for(victim.stderr.readline(), 60)).decode()
            assert line, "payd rollback ended before it was killed"
            if " published " in line:
                published = int(line.split(" published ")[1].split()[0])
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        assert published < 1000
        recorded = (await query(db, "SELECT COUNT(*) FROM rollback_items WHERE published_at IS NOT NULL"))[0][
            0
        ]
        assert 0 < recorded < 1000, "killed partway"

        code, out, err = await payd(*command, "--wait", "120")
        assert code == 0, out + err[-2000:]
        assert "resuming rollback k9" in err
    refunds = await sandbox.refunds()
    assert len(refunds) == 1000
    assert Counter(r["idempotency_key"] for r in refunds) == Counter(f"rollback:k9:{k}" for k in keys)
    assert refunds_per_charge(await sandbox.ledger()) == {key: (500, 0) for key in keys}
    assert (await sandbox.stats())["refund_requests"] == 1000, "no refund was sent twice"
    assert (await _report(config, "k9"))["counts"]["reversed"] == 1000


async def test_a_halted_fleet_gets_nothing_published_until_it_resumes(
    rb: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """While the fleet is halted (globally, or the charges' provider), a run publishes nothing:
    with --stop-if-halted it stops at once (exit 1, its report shows everything not published);
    otherwise it says so and waits, and after the halt is lifted it publishes and every charge
    is refunded once. A charge refunded in part by someone else after the run froze it is
    refused (exceeds_remaining: the frozen amount no longer fits), named in the report, exit 1."""
    db = rb
    keys = [f"halt-{i}" for i in range(5)]
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    order = HaltOrder(reason="bad renewal batch", by="test", at="2026-11-29T10:00:00Z")
    try:
        async with daemons.in_process() as daemon:
            await take_charges(db, broker, keys)
            config = str(daemons.workdir / f"payd-{daemon.port}.toml")
            await client.set(
                KEYS.global_key, json.dumps({"reason": order.reason, "by": order.by, "at": order.at})
            )
            command = ("rollback", "--config", config, "--run", "held", *keys)
            code, out, err = await payd(*command, "--stop-if-halted", "--json")
            assert code == 1
            assert "the fleet is halted (bad renewal batch" in err
            assert json.loads(out)["counts"]["not_published"] == 5

            await client.delete(KEYS.global_key)
            await broker.publish([refund_body("someone-else", "halt-0", 300)])
            await eventually(
                lambda: _count(db, "SELECT COUNT(*) FROM reversals WHERE state = 'succeeded'", 1),
                timeout=30,
                what="the other refund",
            )
            await client.set(
                KEYS.provider_key("sandbox"), json.dumps({"reason": "x", "by": "t", "at": "now"})
            )
            waiting = await asyncio.create_subprocess_exec(
                PAYD, *command, "--wait", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            assert waiting.stderr is not None
            said = ""
            while "waiting for payd resume" not in said:
                said = (await asyncio.wait_for(waiting.stderr.readline(), 30)).decode()
                assert said, "payd rollback ended while halted"
            assert "provider sandbox is halted" in said
            await asyncio.sleep(1)
            queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
            assert queue.declaration_result.message_count == 0
            assert await query(db, "SELECT COUNT(*) FROM reversals") == [(1,)], (
                "nothing published while halted"
            )
            await client.delete(KEYS.provider_key("sandbox"))
            out_bytes, _ = await asyncio.wait_for(waiting.communicate(), 90)
            assert waiting.returncode == 1, "a refusal is not a clean finish"
            text = out_bytes.decode()
            assert "  reversed                  4  4000 EUR" in text
            assert "  refused exceeds_remaining: 1, e.g. 1000 exceeds what remains of charge halt-0" in text
            assert "failed: halt-0 (refund rollback:held:halt-0): 1000 exceeds what remains" in text
    finally:
        await client.aclose()
    assert refunds_per_charge(await sandbox.ledger()) == {
        "halt-0": (300, 700),
        **{key: (1000, 0) for key in keys[1:]},
    }
    assert (await sandbox.stats())["refund_requests"] == 5, "4 of the run and the other one"


async def test_interrupted_by_sigterm_stops_after_the_publish_in_progress_and_resumes(
    rb: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """SIGTERM stops a slow run cleanly (exit 1, says how to resume, what it published is
    recorded as published); while it runs, a second process of the same run is turned away; the
    same command then finishes the rest, each charge refunded once."""
    db = rb
    keys = [f"term-{i:02d}" for i in range(40)]
    async with daemons.in_process() as daemon:
        await take_charges(db, broker, keys)
        config = str(daemons.workdir / f"payd-{daemon.port}.toml")
        command = ("rollback", "--config", config, "--run", "term", "--rate", "3", *keys)
        running = await asyncio.create_subprocess_exec(
            PAYD, *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert running.stderr is not None
        while "published" not in (line := (await asyncio.wait_for(running.stderr.readline(), 60)).decode()):
            assert line, "payd rollback ended early"
        code, _, err = await payd(*command)
        assert code == 1 and "is being run by another process right now" in err, err
        running.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(running.communicate(), 30)
        assert running.returncode == 1
        assert "rollback term interrupted; run the same command again to resume" in rest.decode()
        published = (await query(db, "SELECT COUNT(*) FROM rollback_items WHERE published_at IS NOT NULL"))[
            0
        ][0]
        assert 0 < published < 40
        assert (
            json.loads((await payd("rollback", "--config", config, "--report", "term", "--json"))[1])[
                "counts"
            ]["not_published"]
            == 40 - published
        )
        code, out_text, err = await payd(*command, "--rate", "200", "--wait", "60")
        assert code == 0, out_text + err
    assert refunds_per_charge(await sandbox.ledger()) == {key: (1000, 0) for key in keys}
    assert (await sandbox.stats())["refund_requests"] == 40


async def _clear_halts() -> None:
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    await client.delete(KEYS.global_key, KEYS.provider_key("sandbox"))
    await client.aclose()


def test_pace_stays_under_the_providers_configured_rates(daemons: DaemonFactory) -> None:
    """A run's pace per provider is --rate, lowered to the provider's fleet-wide or local rate."""
    config, _, _ = daemons.config(
        providers__sandbox={"rate_per_s": 20},
        providers__fleet={
            "kind": "sandbox",
            "base_url": "http://127.0.0.1:1",
            "max_in_flight": 1,
            "fleet_rate_per_s": 5,
            "rate_per_s": 40,
        },
    )
    assert pace(config, "sandbox", 50) == 20
    assert pace(config, "sandbox", 10) == 10
    assert pace(config, "fleet", 50) == 5
    assert pace(config, "gone", 50) == 50, "a provider no longer configured: --rate alone"


async def test_freeze_keeps_what_remained_and_long_keys_get_a_digest(rb: aiomysql.Pool) -> None:
    """A run's frozen items carry what remained of each charge (reserving reversals subtracted,
    a failed one not), 0 for a charge wholly reversed, and the refund key rollback:RUN:KEY, or
    the key's digest where it would pass 128 characters: the database computes the very key
    ``refund_key`` does."""
    db = rb
    long_key = "L" * 128
    for key in ("part", "whole", "failed-before", long_key):
        await add_charge(db, key)
    for key, charge, amount, state in (
        ("r1", "part", 300, "succeeded"),
        ("r2", "whole", 600, "succeeded"),
        ("r3", "whole", 400, "unknown"),
        ("r4", "failed-before", 1000, "failed"),
    ):
        await query(
            db,
            "INSERT INTO reversals (idempotency_key, original_idempotency_key, original_attempt_id, "
            "provider, amount_minor, currency, state) SELECT %s, %s, id, 'sandbox', %s, 'EUR', %s "
            "FROM attempts WHERE idempotency_key = %s",
            key,
            charge,
            amount,
            state,
            charge,
        )
    pool = await open_pool(MySQLSettings(database=DATABASE), load_secret("mysql_password"))
    try:
        async with transaction(pool) as cursor:
            _, frozen = await create_run(
                cursor, "r", Selection(provider="sandbox"), reason=None, created_by="test"
            )
    finally:
        await close_pool(pool)
    assert frozen == 4
    items = dict(
        await query(db, "SELECT charge_key, CONCAT(refund_key, ' ', remaining_minor) FROM rollback_items")
    )
    assert items == {
        "part": "rollback:r:part 700",
        "whole": "rollback:r:whole 0",
        "failed-before": "rollback:r:failed-before 1000",
        long_key: f"{refund_key('r', long_key)} 1000",
    }
    assert refund_key("r", long_key) == "rollback:r:" + hashlib.sha256(long_key.encode()).hexdigest()[:40]


async def test_an_unreadable_halt_state_publishes_nothing(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """Redis out of reach: the halt state is unknown, which counts as halted (daemon/halt.py), so
    the run publishes nothing and says why."""
    await add_charge(rb, "redis-down")
    _, config, _ = daemons.config(redis={"url": "redis://127.0.0.1:1/0"})
    code, out, err = await payd(
        "rollback", "--config", str(config), "--run", "blind", "redis-down", "--stop-if-halted"
    )
    assert code == 1, out + err
    assert "the halt state cannot be read" in err
    assert "not published             1" in out
    queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
    assert queue.declaration_result.message_count == 0


async def _published(db: aiomysql.Pool) -> int:
    return int((await query(db, "SELECT COUNT(*) FROM rollback_items WHERE published_at IS NOT NULL"))[0][0])


async def _queued_refund_keys(broker: Broker) -> Counter[str]:
    """The refund keys waiting in the attempts queue (taken off it: no daemon runs here)."""
    queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
    keys: Counter[str] = Counter()
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        keys[json.loads(message.body)["idempotency_key"]] += 1
    return keys


async def test_sigterm_stops_a_run_waiting_for_its_next_token(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """At one refund in 1000 s the run publishes its first and waits for the next token; SIGTERM
    ends that wait (exit 1, interrupted, resumable) instead of being read after the token."""
    db = rb
    keys = [f"slow-{i}" for i in range(3)]
    for key in keys:
        await add_charge(db, key)
    _, config, _ = daemons.config()
    command = ("rollback", "--config", str(config), "--run", "slow", "--rate", "0.001", *keys)
    running = await asyncio.create_subprocess_exec(
        PAYD, *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    try:
        queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)

        async def one_queued() -> bool:
            fresh = await broker.channel.declare_queue(queue.name, passive=True)
            return fresh.declaration_result.message_count >= 1

        await eventually(one_queued, timeout=60, what="the run's first publish")
        assert running.returncode is None
        running.send_signal(signal.SIGTERM)
        _, said = await asyncio.wait_for(running.communicate(), 60)  # a hang guard: the token is 1000 s away
    finally:
        if running.returncode is None:
            running.kill()
            await running.wait()
    assert running.returncode == 1
    text = said.decode()
    assert "stopping after the publish in progress" in text
    assert "rollback slow interrupted; run the same command again to resume" in text
    assert await _published(db) == 1
    assert await _queued_refund_keys(broker) == Counter({"rollback:slow:slow-0": 1})


def _connection_states(node: PrivateRabbitMQ) -> list[str]:
    # https://www.rabbitmq.com/docs/man/rabbitmqctl.8#list_connections (state: blocked once a
    # connection publishes under a resource alarm)
    done = subprocess.run(
        [str(RABBITMQ_SERVER.with_name("rabbitmqctl")), "-q", "-n", node.node, "list_connections", "state"],
        check=True,
        capture_output=True,
        timeout=120,
        env=node.env,
    )
    return done.stdout.decode().split()


async def test_a_broker_that_confirms_nothing_neither_hangs_a_run_nor_a_second_signal(
    rb: aiomysql.Pool, daemons: DaemonFactory, private_broker: PrivateRabbitMQ
) -> None:
    """Under a memory alarm the broker blocks publishers and confirms nothing
    (https://www.rabbitmq.com/docs/memory#configuring-threshold: a threshold of 0 raises it at
    once). A run blocked in its publish: the first SIGTERM waits for that publish, a second one
    stops it at once (exit 1, nothing counted as published). With --confirm-timeout 2 the run
    stops by itself, naming the refund not confirmed, nothing counted. Once the alarm clears the
    same command publishes every item; the only key that may be queued twice is the one whose
    confirm never came (the daemon's claim deduplicates it). The node is the test's own."""
    db = rb
    keys = [f"alarm-{i}" for i in range(3)]
    for key in keys:
        await add_charge(db, key)
    url = f"amqp://payd:{private_broker.password}@127.0.0.1:{private_broker.port}/"
    broker = await reset_broker(url)
    _, config, _ = daemons.config(rabbitmq={"url": f"amqp://payd@127.0.0.1:{private_broker.port}/"})
    command = ("rollback", "--config", str(config), "--run", "alarm", *keys)
    try:
        await asyncio.to_thread(private_broker.ctl, "set_vm_memory_high_watermark", "0")
        running = await asyncio.create_subprocess_exec(
            PAYD,
            *command,
            "--confirm-timeout",
            "600",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert running.stderr is not None
        try:

            async def blocked() -> bool:
                return "blocked" in await asyncio.to_thread(_connection_states, private_broker)

            await eventually(blocked, timeout=60, what="the run's publish blocked by the alarm")
            running.send_signal(signal.SIGTERM)
            while "stopping after the publish in progress" not in (
                line := (await asyncio.wait_for(running.stderr.readline(), 60)).decode()
            ):
                assert line, "payd rollback ended before it was told"
            assert running.returncode is None, "the first signal waits for the publish in progress"
            running.send_signal(signal.SIGTERM)
            _, rest = await asyncio.wait_for(running.communicate(), 60)  # a hang guard (600 s bound)
        finally:
            if running.returncode is None:
                running.kill()
                await running.wait()
        assert running.returncode == 1
        assert "stopped at once; run alarm again to resume" in rest.decode()
        assert await _published(db) == 0

        code, _, err = await payd(*command, "--confirm-timeout", "2")
        assert code == 1
        assert "refund rollback:alarm:alarm-0 not confirmed within 2s" in err
        assert "run the same command again to resume" in err
        assert await _published(db) == 0
    finally:
        await asyncio.to_thread(private_broker.ctl, "set_vm_memory_high_watermark", "0.4")
    try:
        code, out, err = await payd(*command)
        assert code == 0, out + err
        assert await _published(db) == 3
        queued = await _queued_refund_keys(broker)
        assert set(queued) == {f"rollback:alarm:{key}" for key in keys}
        assert all(count == 1 for key, count in queued.items() if key != "rollback:alarm:alarm-0")
    finally:
        await broker.connection.close()


async def test_a_run_that_loses_its_lock_stops_cleanly_and_resumes(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """The connection holding the run's GET_LOCK goes away (killed here; wait_timeout or a
    failover do the same): the run notices within its lock check, stops after the publish in
    progress (exit 1, says why and how to resume) rather than running unguarded or failing at
    the end with "cannot reach the database"; the same command then finishes the rest."""
    db = rb
    keys = [f"lost-{i}" for i in range(3)]
    for key in keys:
        await add_charge(db, key)
    _, config, _ = daemons.config()
    command = ("rollback", "--config", str(config), "--run", "lost", *keys)
    running = await asyncio.create_subprocess_exec(
        PAYD, *command, "--rate", "0.001", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:

        async def one_queued() -> bool:
            queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
            return bool(queue.declaration_result.message_count)

        await eventually(one_queued, timeout=60, what="the run's first publish")
        [(holder,)] = await query(
            db,
            "SELECT IS_USED_LOCK(CONCAT('payd.rollback.', LEFT(SHA2(CONCAT(DATABASE(), ':', %s), 256), 40)))",
            "lost",
        )
        assert holder is not None
        await query(db, f"KILL CONNECTION {int(holder)}")
        _, said = await asyncio.wait_for(running.communicate(), 60)  # a hang guard: the token is 1000 s away
    finally:
        if running.returncode is None:
            running.kill()
            await running.wait()
    text = said.decode()
    assert running.returncode == 1, text
    assert "lost the run's lock" in text and "cannot reach" not in text
    assert "rollback lost interrupted; run the same command again to resume" in text
    assert await _published(db) == 1
    code, out, err = await payd(*command)
    assert code == 0, out + err
    assert await _published(db) == 3
    assert set(await _queued_refund_keys(broker)) == {f"rollback:lost:{key}" for key in keys}


async def test_a_halt_set_while_a_slow_run_waits_for_its_token_is_seen_before_the_publish(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """At one refund in 10 s the run publishes its first, then waits for its next token; the
    fleet is halted during that wait. The halt is read after the token, before the publish:
    with --stop-if-halted nothing more is published (exit 1, the halt named)."""
    db = rb
    keys = [f"late-halt-{i}" for i in range(3)]
    for key in keys:
        await add_charge(db, key)
    _, config, _ = daemons.config()
    command = ("rollback", "--config", str(config), "--run", "latehalt", "--rate", "0.1", "--stop-if-halted")
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    running = await asyncio.create_subprocess_exec(
        PAYD, *command, *keys, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:

        async def one_queued() -> bool:
            queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
            return bool(queue.declaration_result.message_count)

        await eventually(one_queued, timeout=60, what="the run's first publish")
        await client.set(KEYS.global_key, json.dumps({"reason": "late", "by": "test", "at": "now"}))
        _, said = await asyncio.wait_for(running.communicate(), 60)
    finally:
        await client.aclose()
        if running.returncode is None:
            running.kill()
            await running.wait()
    assert running.returncode == 1
    assert "the fleet is halted (late, by test" in said.decode()
    assert await _queued_refund_keys(broker) == Counter({"rollback:latehalt:late-halt-0": 1})
    assert await _published(db) == 1


async def test_charges_of_a_provider_payd_cannot_refund_through_are_counted_apart_and_left_out(
    rb: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """A charge taken by a connection this configuration does not have (the daemon's claim
    would refuse its refund as refunds_unsupported, ``can_refund``) is not counted "to refund"
    by the dry run: it is shown apart, with its totals, and a run leaves it out."""
    db = rb
    await add_charge(db, "cr-a")
    await add_charge(db, "cr-b", amount=500)
    await add_charge(db, "cr-gone", amount=700, provider="gone")
    await add_charge(db, "cr-routed", amount=300, routed="gone")
    _, config, _ = daemons.config()
    keys = ("cr-a", "cr-b", "cr-gone", "cr-routed")
    found = await dry_run(config, *keys)
    assert found["charges"] == 2
    assert totals(found) == {("EUR", None): (2, 1500, 0, 1500, 0)}
    assert totals(found, "cannot_refund") == {("EUR", "gone"): (2, 1000, 0, 1000, 0)}
    code, out, err = await payd("rollback", "--config", str(config), "--dry-run", *keys)
    assert code == 0, err
    assert "would reverse 2 succeeded charges" in out
    assert "cannot refund through payd (provider gone" in out and ": 2 charges, 1000 EUR charged" in out

    code, out, err = await payd("rollback", "--config", str(config), "--run", "able", *keys)
    assert code == 0, out + err
    assert "providers payd can refund through are selected: sandbox" in err
    assert await query(db, "SELECT charge_key, provider FROM rollback_items ORDER BY charge_key") == [
        ("cr-a", "sandbox"),
        ("cr-b", "sandbox"),
    ]
    assert set(await _queued_refund_keys(broker)) == {"rollback:able:cr-a", "rollback:able:cr-b"}
