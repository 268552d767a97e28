"""Subscriptions end to end: renewals, dunning, budgets, concurrent schedulers, commands.

Real MariaDB, RabbitMQ and the sandbox gateway over HTTP. Time is made
controllable instead of waited for: due times are put in the past, retry
schedules are fractions of a second, and "a month passes" is an UPDATE of
``next_attempt_at``. The timeouts in ``eventually`` bound a hang; no test
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.config import MySQLSettings, SubscriptionSettings
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.secrets import load_secret
from daemon.storage.attempts import Record, claim_attempts, record_outcomes
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.periods import add_months
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.scheduler import RenewalScheduler
from tests.support import DATABASE, PAYD, Broker, DaemonFactory, Sandbox, eventually, query

SCHEDULE = [0.05, 0.05]
SUBSCRIPTIONS: dict[str, Any] = {
    "batch_size": 50,
    "dispatch_rate_per_s": 100000,
    "poll_interval_s": 0.05,
    "renewal_jitter_s": 0,
}
DUNNING: dict[str, Any] = {"schedule_s": SCHEDULE, "failed_retry_s": 3600, "retry_jitter_s": 0}
# pm_timeout answers after the client gave up: unknown, then settled by a lookup.
FAST_SANDBOX: dict[str, Any] = {"timeout_s": 0.5, "max_tries": 2, "retry_backoff_s": 0.01}


def settings(**changes: Any) -> SubscriptionSettings:
    return msgspec.convert({**SUBSCRIPTIONS, "dunning": DUNNING, **changes}, SubscriptionSettings)


def sections(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "subscriptions": SUBSCRIPTIONS,
        "subscriptions__dunning": DUNNING,
        "providers__sandbox": FAST_SANDBOX,
        **extra,
    }


@pytest.fixture
async def sched_pool() -> AsyncIterator[aiomysql.Pool]:
    """A pool like the daemon's: transactions, READ COMMITTED."""
    pool = await open_pool(MySQLSettings(database=DATABASE, pool_size=4), load_secret("mysql_password"))
    yield pool
    await close_pool(pool)


async def add_subscriptions(
    pool: aiomysql.Pool,
    specs: Sequence[tuple[int, str, str | None]],
    *,
    status: str = "active",
    plan: str | None = None,
    due: bool = True,
) -> None:
    """(id, payment method, card brand) rows, cycle 1 starting a minute ago and due (or not)."""
    values: list[Any] = []
    for sid, method, brand in specs:
        values += [sid, status, plan, method, brand, 1000 + sid, due]
    row = (
        "(%s, %s, %s, 'sandbox', %s, %s, %s, 'EUR', NOW(6) - INTERVAL 1 MINUTE, "
        "IF(%s, NOW(6) - INTERVAL 1 MINUTE, NULL))"
    )
    await query(
        pool,
        "INSERT INTO subscriptions (id, status, plan, provider, payment_method, card_brand, amount_minor, "
        "currency, billing_anchor, next_attempt_at) VALUES " + ", ".join([row] * len(specs)),
        *values,
    )


async def add_history(pool: aiomysql.Pool, method: str, *rows: tuple[str, str | None, int]) -> None:
    """Earlier attempts on a payment method, elsewhere: (key, outcome, days ago)."""
    for key, outcome, days in rows:
        await query(
            pool,
            "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, state, "
            "outcome, created_at) VALUES (%s, 'other_psp', 500, 'EUR', %s, 'declined', %s, "
            "NOW(6) - INTERVAL %s DAY)",
            key,
            method,
            outcome,
            days,
        )


async def subscription_rows(pool: aiomysql.Pool) -> dict[int, dict[str, Any]]:
    columns = (
        "id, status, paid_cycle, billing_anchor, current_period_end, next_attempt_at, pending_key, "
        "dunning_step, status_reason, NOW(6)"
    )
    rows = await query(pool, f"SELECT {columns} FROM subscriptions")
    names = [c.strip() for c in columns.replace("NOW(6)", "now").split(",")]
    return {row[0]: dict(zip(names, row, strict=True)) for row in rows}


async def attempt_history(pool: aiomysql.Pool) -> dict[tuple[int, int], list[dict[str, Any]]]:
    rows = await query(
        pool,
        "SELECT subscription_id, cycle, idempotency_key, state, outcome, created_at, finished_at "
        "FROM attempts WHERE subscription_id IS NOT NULL ORDER BY id",
    )
    history: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for sid, cycle, key, state, outcome, created, finished in rows:
        history.setdefault((sid, cycle), []).append(
            {"key": key, "state": state, "outcome": outcome, "created": created, "finished": finished}
        )
    return history


async def wait_at_rest(pool: aiomysql.Pool, *, timeout: float = 90) -> None:
    """Until no subscription waits on a try or is due within a minute, and the outbox is empty."""

    async def at_rest() -> bool:
        rows = await query(
            pool,
            "SELECT (SELECT COUNT(*) FROM subscriptions WHERE pending_key IS NOT NULL "
            "OR next_attempt_at <= NOW(6) + INTERVAL 60 SECOND), (SELECT COUNT(*) FROM outbox)",
        )
        return rows[0] == (0, 0)

    await eventually(at_rest, timeout=timeout, what="every subscription at rest and the outbox drained")


def expected_from(history: list[dict[str, Any]], retries: int) -> tuple[str, bool, list[str]]:
    """Replay one cycle's attempts through the documented rules: (status, paid, event kinds)."""
    kinds: list[str] = []
    retries_left = retries
    status = "active"
    for attempt in history:
        last = attempt is history[-1]
        outcome = attempt["outcome"]
        assert attempt["state"] != "unknown", "at rest, nothing is left unknown"
        if outcome == "approved":
            assert last, "nothing is tried after a payment"
            kinds.append("recovered" if status == "past_due" else "renewed")
            return "active", True, kinds
        if outcome == "hard_decline":
            assert last, "a hard decline is never retried"
            kinds.append("canceled")
            return "canceled", False, kinds
        if outcome in ("rate_limited", "provider_error"):
            assert last, "the retry after a failure is an hour away"
            kinds.append("retry_scheduled")
            return status, False, kinds
        assert outcome == "soft_decline", attempt
        if retries_left == 0:
            assert last, "the schedule is exhausted"
            kinds.append("canceled")
            return "canceled", False, kinds
        kinds.append("past_due" if status == "active" else "retry_scheduled")
        status = "past_due"
        retries_left -= 1
    raise AssertionError(f"a cycle at rest ends in a decided state: {history}")


def subscription_events(broker: Broker) -> dict[int, list[dict[str, Any]]]:
    events: dict[int, list[dict[str, Any]]] = {}
    for event in broker.events:
        if event["type"].startswith("subscription."):
            events.setdefault(event["subscription_id"], []).append(event)
    return events


async def dispatched_by(port: int) -> float:
    """This daemon's scheduler counter of new tries, from its /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('payd_scheduler_rows_total{result="dispatched"}'):
            return float(line.split()[-1])
    return 0.0


async def payd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        PAYD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=os.environ.copy()
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- lifecycle through the whole daemon -------------------------------------------------


async def test_population_renews_on_schedule_and_dunning_follows_the_outcomes(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A population with the sandbox's token mix: each subscription ends in exactly the state the
    lifecycle rules give for its attempt history (paid -> active with the period advanced; soft
    declines retried on schedule, then canceled; hard declines at once; failures an hour later),
    with the matching subscription.* events; a month later the paid ones renew cycle 2 from their
    anchor; the gateway never charged a key or a cycle twice."""
    await sandbox.behave(
        seed=5,
        retry_after_s=0,
        hang_s=1,
        mix={"approve": 0.6, "soft_decline": 0.25, "hard_decline": 0.1, "error": 0.05},
    )
    rng = random.Random(3)
    fixed = (
        [("pm_ok", "visa")] * 5
        + [("pm_insufficient_funds", "mastercard")] * 3
        + [("pm_stolen", None)] * 3
        + [("pm_error", None)] * 2
        + [("pm_rate_limited", None)] * 2
        + [("pm_timeout", "visa")] * 2
    )
    mixed = [(f"pm_mix_{i}", rng.choice(["visa", "mastercard", "amex", None])) for i in range(100)]
    specs = [(sid, method, brand) for sid, (method, brand) in enumerate(fixed + mixed, start=1)]
    await add_subscriptions(db, specs)
    await broker.follow_events()

    async with daemons.in_process(**sections()):
        await wait_at_rest(db)
        first = await subscription_rows(db)
        history = await attempt_history(db)

        # A month passes for the paid ones: their renewal falls due.
        await query(
            db, "UPDATE subscriptions SET next_attempt_at = NOW(6) - INTERVAL 1 SECOND WHERE paid_cycle = 1"
        )
        await wait_at_rest(db)
        second = await subscription_rows(db)
        history = await attempt_history(db)

    paid_first = set()
    for sid, row in first.items():
        status, paid, _ = expected_from(history[(sid, 1)], retries=len(SCHEDULE))
        assert (row["status"], row["paid_cycle"]) == (status, 1 if paid else 0), (sid, history[(sid, 1)])
        if paid:
            paid_first.add(sid)
            assert row["current_period_end"] == add_months(row["billing_anchor"], 1)
            assert row["next_attempt_at"] == row["current_period_end"], "renewal due when the period ends"
            assert row["dunning_step"] == 0
        elif status == "canceled":
            assert row["next_attempt_at"] is None
        else:  # a failure that charged nothing: an hour later
            assert row["next_attempt_at"] > row["now"] + timedelta(minutes=59)
    assert {
        s for s, (m, _) in enumerate(fixed + mixed, start=1) if m in ("pm_ok", "pm_timeout")
    } <= paid_first
    counts = Counter(row["status"] for row in first.values())
    assert counts["active"] >= 50 and counts["canceled"] >= 15, counts

    for sid in paid_first:
        status, paid, _ = expected_from(history[(sid, 2)], retries=len(SCHEDULE))
        row = second[sid]
        assert (row["status"], row["paid_cycle"]) == (status, 2 if paid else 1), (sid, history[(sid, 2)])
        if paid:
            assert row["current_period_end"] == add_months(row["billing_anchor"], 2), (
                "counted from the anchor"
            )
    assert not any(cycle == 2 for sid, cycle in history if sid not in paid_first)

    # The events tell the same story, each transition once.
    events = subscription_events(broker)
    for sid in first:
        kinds = [
            k
            for cycle in (1, 2)
            if (sid, cycle) in history
            for k in expected_from(history[(sid, cycle)], 2)[2]
        ]
        got = events.get(sid, [])
        assert Counter(e["type"] for e in got) == Counter(f"subscription.{k}" for k in kinds), sid
        assert len({e["event_id"] for e in got}) == len(got)
        for event in got:
            assert event["idempotency_key"].startswith(f"renew:{sid}:{event['cycle']}:")
            assert {"occurred_at", "status_before", "status_after"} <= event.keys()

    approved = await sandbox.assert_no_double_charge()
    paid_refs = {f"{sid}:1" for sid in paid_first} | {
        f"{s}:2" for s, r in second.items() if r["paid_cycle"] == 2
    }
    assert {c["merchant_reference"] for c in approved} == paid_refs


async def test_soft_declines_follow_the_schedule_and_defer_at_the_network_limit(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A mastercard held to 4 declines in 30 days, one already declined elsewhere within 30 days
    (an older one and an uncharged one do not count): three tries, each at least the scheduled
    wait after the previous outcome; the fourth is deferred to when the oldest counted decline
    leaves the window, still past due, with a subscription.retry_deferred event naming the rule.
    A plan override sends another subscription to past_due when its schedule ends."""
    await sandbox.behave(mix={"soft_decline": 1})
    await add_history(
        db,
        "pm_soft_1",
        ("psp-recent", "soft_decline", 10),
        ("psp-old", "soft_decline", 40),
        ("psp-error", "provider_error", 1),
    )
    await add_subscriptions(db, [(1, "pm_soft_1", "mastercard")])
    await add_subscriptions(db, [(2, "pm_soft_2", "visa")], plan="gold")
    await broker.follow_events()
    wait = 0.3
    config = sections(
        subscriptions__dunning={**DUNNING, "schedule_s": [wait] * 3},
        subscriptions__retry_budget={"mastercard": 4},
        subscriptions__dunning__plans__gold={"schedule_s": [0.05], "on_exhausted": "past_due"},
    )
    async with daemons.in_process(**config):
        await wait_at_rest(db)

    rows = await subscription_rows(db)
    history = await attempt_history(db)
    tries = history[(1, 1)]
    assert [a["key"] for a in tries] == ["renew:1:1:0", "renew:1:1:1", "renew:1:1:2"]
    assert all(a["outcome"] == "soft_decline" for a in tries)
    for earlier, later in itertools.pairwise(tries):
        assert later["created"] - earlier["finished"] >= timedelta(seconds=wait), "the schedule's wait"
    assert rows[1]["status"] == "past_due"
    oldest_leaves = rows[1]["now"] + timedelta(days=20)
    assert abs(rows[1]["next_attempt_at"] - oldest_leaves) < timedelta(minutes=1), "deferred, not dropped"
    ledger = [c for c in await sandbox.ledger() if c["merchant_reference"] == "1:1"]
    assert len(ledger) == 3, "the gateway saw exactly the allowed tries"

    assert [a["key"] for a in history[(2, 1)]] == ["renew:2:1:0", "renew:2:1:1"]
    assert (rows[2]["status"], rows[2]["next_attempt_at"]) == ("past_due", None)
    assert rows[2]["status_reason"] == "retry schedule exhausted"
    kinds = [e["type"] for e in subscription_events(broker)[2]]
    assert sorted(kinds) == ["subscription.dunning_exhausted", "subscription.past_due"]
    deferred = [e for e in subscription_events(broker)[1] if e["type"] == "subscription.retry_deferred"]
    assert deferred and deferred[0]["idempotency_key"] == "renew:1:1:3", "names the deferred try"
    assert deferred[0]["deferred_by"] == "mastercard_declines_30d"


async def test_hard_declines_are_never_retried(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """pm_stolen: one attempt, then canceled with its reason; nothing further is ever dispatched."""
    await add_subscriptions(db, [(sid, "pm_stolen", "visa") for sid in (1, 2, 3)])
    async with daemons.in_process(**sections(subscriptions__dunning={**DUNNING, "schedule_s": [0.01] * 5})):
        await wait_at_rest(db)
    rows = await subscription_rows(db)
    history = await attempt_history(db)
    for sid in (1, 2, 3):
        assert [a["outcome"] for a in history[(sid, 1)]] == ["hard_decline"]
        assert (rows[sid]["status"], rows[sid]["next_attempt_at"]) == ("canceled", None)
        assert rows[sid]["status_reason"] == "hard decline"
    assert len(await sandbox.ledger()) == 3


async def test_never_retry_codes_and_retry_advice_through_the_record_path(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool
) -> None:
    """Outcomes recorded by the pipeline's own write path: Mastercard MAC 03 and a Visa category-1
    code stop dunning at once although they arrive as soft declines; a provider's earliest-retry
    advice pushes the next try past the schedule; an approval pays and renews; all in the same
    commit as the attempt's outcome, with its event in the outbox."""
    await add_subscriptions(db, [(sid, f"pm_code_{sid}", "mastercard") for sid in (1, 2, 3, 4)])
    scheduler = RenewalScheduler(
        pool=sched_pool, settings=settings(), policy=SubscriptionPolicy(settings()), providers={"sandbox"}
    )
    await scheduler.run_pass()
    # What the daemon would take off payd.attempts, claimed as the pipeline claims it.
    payloads = await query(db, "SELECT payload FROM outbox WHERE target = 'attempts'")
    decoded = (msgspec.json.decode(payload, type=AttemptRequest) for (payload,) in payloads)
    requests = {request.subscription_id: request for request in decoded}
    claim = await claim_attempts(sched_pool, list(requests.values()), claimed_by="test", lease_s=30)
    results = {
        1: ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="mastercard:mac_03"),
        2: ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="visa:43"),
        3: ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="insufficient_funds", retry_after_s=7200),
        4: ChargeResult(outcome=Outcome.APPROVED, provider_ref="ch_4"),
    }
    await record_outcomes(
        sched_pool,
        [
            Record(attempt_id=claim.claimed[r.idempotency_key], request=r, result=results[sid or 0], tries=1)
            for sid, r in requests.items()
        ],
        unknown_recheck_s=1,
        policy=SubscriptionPolicy(settings()),
    )
    rows = await subscription_rows(db)
    assert (rows[1]["status"], rows[1]["status_reason"]) == ("canceled", "do not retry")
    assert (rows[2]["status"], rows[2]["status_reason"]) == ("canceled", "do not retry")
    assert rows[3]["status"] == "past_due"
    assert rows[3]["next_attempt_at"] >= rows[3]["now"] + timedelta(seconds=7100)
    assert (rows[4]["status"], rows[4]["paid_cycle"]) == ("active", 1)
    types = dict(
        await query(db, "SELECT routing_key, COUNT(*) FROM outbox WHERE target = 'events' GROUP BY 1")
    )
    assert types["subscription.canceled"] == 2
    assert types["subscription.past_due"] == 1
    assert types["subscription.renewed"] == 1
    assert types["payment.declined"] == 3


# -- concurrency and crashes ---------------------------------------------------------------


async def test_two_schedulers_on_one_database_never_dispatch_a_renewal_twice(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool
) -> None:
    """Two schedulers race over 2000 due subscriptions in batches of 100: every renewal is
    dispatched exactly once (one queued attempt, one request message), none is left due."""
    await add_subscriptions(db, [(sid, f"pm_race_{sid}", None) for sid in range(1, 2001)])
    other_pool = await open_pool(MySQLSettings(database=DATABASE, pool_size=4), load_secret("mysql_password"))
    try:
        schedulers = [
            RenewalScheduler(
                pool=pool,
                settings=settings(batch_size=100),
                policy=SubscriptionPolicy(settings()),
                providers={"sandbox"},
            )
            for pool in (sched_pool, other_pool)
        ]
        await asyncio.gather(*(s.run_pass() for s in schedulers))
        await asyncio.gather(*(s.run_pass() for s in schedulers))  # a pass may end early on skipped rows
    finally:
        await close_pool(other_pool)
    keys = [json.loads(p)["idempotency_key"] for (p,) in await query(db, "SELECT payload FROM outbox")]
    assert len(keys) == 2000 and len(set(keys)) == 2000
    assert set(keys) == {f"renew:{sid}:1:0" for sid in range(1, 2001)}
    assert sum(s.totals.dispatched for s in schedulers) == 2000
    assert await query(db, "SELECT COUNT(*), MIN(state), MAX(state) FROM attempts") == [
        (2000, "queued", "queued")
    ]
    assert await query(db, "SELECT COUNT(*) FROM subscriptions WHERE next_attempt_at <= NOW(6)") == [(0,)]
    # Each subscription waits on exactly the attempt dispatched for it, and its next try is 1.
    waiting_on_own = await query(
        db,
        "SELECT COUNT(*) FROM subscriptions s JOIN attempts a "
        "ON a.idempotency_key = s.pending_key AND a.subscription_id = s.id AND s.next_try = 1",
    )
    assert waiting_on_own == [(2000,)]


async def test_two_daemons_renew_each_subscription_once(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Two daemons, each running the scheduler and the pipeline: between them they dispatch each
    try once (their dispatch counters add up to the distinct tries), the tries of a cycle never
    overlap, and no cycle is charged twice."""
    await sandbox.behave(seed=9, mix={"approve": 0.7, "soft_decline": 0.3})
    await add_subscriptions(db, [(sid, f"pm_two_{sid}", None) for sid in range(1, 401)])
    async with daemons.in_process(**sections()) as one, daemons.in_process(**sections()) as two:
        await wait_at_rest(db)
        counted = await dispatched_by(one.port) + await dispatched_by(two.port)
    history = await attempt_history(db)
    tries = sum(len(attempts) for attempts in history.values())
    assert counted == tries, "no try was dispatched by both daemons"
    for attempts in history.values():
        for earlier, later in itertools.pairwise(attempts):
            assert earlier["state"] == "declined" and earlier["finished"] <= later["created"]
    approved = await sandbox.assert_no_double_charge()
    paid = await query(db, "SELECT COUNT(*) FROM subscriptions WHERE paid_cycle = 1")
    assert paid == [(len(approved),)]


async def test_a_scheduler_cancelled_mid_batch_loses_nothing(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool
) -> None:
    """The scheduler is cancelled while its 4th batch waits inside the database (an INSERT blocked
    by another transaction): batches 1-3 stay dispatched, batch 4 rolls back whole, and a new
    scheduler then dispatches every remaining renewal, each exactly once."""
    await add_subscriptions(db, [(sid, f"pm_kill_{sid}", None) for sid in range(1, 301)])
    password = load_secret("mysql_password")
    blocker = await aiomysql.connect(
        host="127.0.0.1", user="payd", password=password.reveal() if password else "", db=DATABASE
    )
    async with blocker.cursor() as cursor:
        await cursor.execute("BEGIN")
        await cursor.execute(
            "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, "
            "currency, payment_method, state) "
            "VALUES ('renew:175:1:0', 175, 1, 'sandbox', 1175, 'EUR', 'pm_kill_175', 'queued')"
        )
    scheduler = RenewalScheduler(
        pool=sched_pool,
        settings=settings(batch_size=50),
        policy=SubscriptionPolicy(settings()),
        providers={"sandbox"},
    )
    task = asyncio.create_task(scheduler.run_pass())

    async def blocked() -> bool:
        rows = await query(
            db,
            # The 4th batch's INSERT, which carries the blocked key: not any other insert.
            "SELECT COUNT(*) FROM information_schema.processlist "
            "WHERE db = DATABASE() AND info LIKE 'INSERT INTO attempts%%renew:175:1:%%'",
        )
        return bool(rows[0][0] == 1)

    await eventually(blocked, timeout=30, what="the scheduler's 4th batch to wait on the blocked row")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await blocker.rollback()
    blocker.close()

    async def rolled_back() -> bool:
        rows = await query(db, "SELECT COUNT(*) FROM (SELECT id FROM subscriptions FOR UPDATE SKIP LOCKED) t")
        return bool(rows[0][0] == 300)

    await eventually(rolled_back, timeout=30, what="the cancelled batch's transaction to end")
    pending = await query(db, "SELECT id FROM subscriptions WHERE pending_key IS NOT NULL ORDER BY id")
    assert [sid for (sid,) in pending] == list(range(1, 151)), "three whole batches, nothing of the 4th"
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(150,)]
    assert await query(db, "SELECT COUNT(*) FROM attempts") == [(150,)]

    await RenewalScheduler(
        pool=sched_pool,
        settings=settings(batch_size=50),
        policy=SubscriptionPolicy(settings()),
        providers={"sandbox"},
    ).run_pass()
    keys = [json.loads(p)["idempotency_key"] for (p,) in await query(db, "SELECT payload FROM outbox")]
    assert sorted(keys) == sorted(f"renew:{sid}:1:0" for sid in range(1, 301))
    assert await query(db, "SELECT COUNT(*) FROM subscriptions WHERE next_attempt_at <= NOW(6)") == [(0,)]


async def test_bad_subscription_data_is_unscheduled_without_blocking_its_batch(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool
) -> None:
    """A row the intake would refuse (a zero amount, a card number for a token) is taken out of
    the schedule with the reason, while the rest of its batch is dispatched."""
    await add_subscriptions(db, [(sid, f"pm_data_{sid}", None) for sid in range(1, 6)])
    await query(db, "UPDATE subscriptions SET amount_minor = 0 WHERE id = 3")
    await query(db, "UPDATE subscriptions SET payment_method = '4111 1111 1111 1111' WHERE id = 4")
    scheduler = RenewalScheduler(
        pool=sched_pool, settings=settings(), policy=SubscriptionPolicy(settings()), providers={"sandbox"}
    )
    totals = await scheduler.run_pass()
    assert (totals.dispatched, totals.undispatchable) == (3, 2)
    rows = await subscription_rows(db)
    for sid in (3, 4):
        assert rows[sid]["next_attempt_at"] is None and rows[sid]["pending_key"] is None
        assert rows[sid]["status_reason"].startswith("cannot dispatch: ")
    assert "amount_minor" in rows[3]["status_reason"]
    assert "card number" in rows[4]["status_reason"] and "4111" not in rows[4]["status_reason"]
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(3,)]


async def test_a_try_queued_when_its_subscription_is_canceled_ends_failed_and_the_rest_wait(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool
) -> None:
    """Dispatched tries used to be queued with no "since when", so the orphan sweep never saw
    them: a try whose subscription was canceled while its message was lost stayed queued for
    good. Now the sweep ends it as ``never_sent`` with its payment.failed event (nothing was
    sent), while a try the scheduler still waits on (an active subscription's) stays queued,
    left for the scheduler to publish again."""
    from daemon.storage.attempts import fail_orphaned_queued  # noqa: PLC0415

    await add_subscriptions(db, [(1, "pm_ok", "visa"), (2, "pm_ok", "visa")])
    scheduler = RenewalScheduler(
        pool=sched_pool, settings=settings(), policy=SubscriptionPolicy(settings()), providers={"sandbox"}
    )
    assert (await scheduler.run_pass()).dispatched == 2
    await query(db, "DELETE FROM outbox")  # the request messages are lost: no daemon claims them
    await query(
        db, "UPDATE subscriptions SET status = 'canceled', status_reason = 'by the customer' WHERE id = 1"
    )
    await asyncio.sleep(0.1)
    failed, unreadable = await fail_orphaned_queued(db, queued_for_s=0.05, limit=10)
    assert unreadable == []
    rows = await query(
        db, "SELECT subscription_id, state, decline_code FROM attempts ORDER BY subscription_id"
    )
    assert rows == [(1, "failed", "never_sent"), (2, "queued", None)]
    assert len(failed) == 1
    events = [json.loads(payload) for (payload,) in await query(db, "SELECT payload FROM outbox")]
    assert [(e["type"], e["subscription_id"]) for e in events] == [("payment.failed", 1)]


async def test_a_renewal_queued_when_its_subscription_is_canceled_or_paused_is_never_sent(
    db: aiomysql.Pool, sched_pool: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A customer cancels (or a subscription is paused) while the renewal's request waits in
    the queue: the claim sees the subscription's status and ends the try failed
    (``subscription_canceled``, ``subscription_paused``), never sent, so nobody is charged
    after canceling (the old behaviour charged it and reported
    ``subscription.paid_while_canceled``). The active subscription's renewal is charged."""
    await add_subscriptions(db, [(1, "pm_ok", "visa"), (2, "pm_ok", "visa"), (3, "pm_ok", "visa")])
    scheduler = RenewalScheduler(
        pool=sched_pool, settings=settings(), policy=SubscriptionPolicy(settings()), providers={"sandbox"}
    )
    assert (await scheduler.run_pass()).dispatched == 3  # the requests wait in the outbox
    await query(
        db, "UPDATE subscriptions SET status = 'canceled', status_reason = 'by the customer' WHERE id = 1"
    )
    await query(db, "UPDATE subscriptions SET status = 'paused', status_reason = 'refunded' WHERE id = 3")
    await broker.follow_events()
    async with daemons.in_process(**sections()):
        # Like the orphan sweep's never_sent, the try ends without moving the canceled
        # subscription, which keeps its pending_key: wait for the attempts, not for rest.
        async def both_reported() -> bool:
            reported = {e.get("subscription_id") for e in broker.events if e["type"].startswith("payment.")}
            return reported == {1, 2, 3}

        await eventually(both_reported, timeout=30, what="a payment event for each renewal")
    rows = await query(
        db, "SELECT subscription_id, state, decline_code FROM attempts ORDER BY subscription_id"
    )
    assert rows == [
        (1, "failed", "subscription_canceled"),
        (2, "succeeded", None),
        (3, "failed", "subscription_paused"),
    ]
    assert [c["merchant_reference"] for c in await sandbox.assert_no_double_charge()] == ["2:1"]
    subscriptions = await subscription_rows(db)
    assert (subscriptions[1]["status"], subscriptions[3]["status"]) == ("canceled", "paused")
    assert not [e for e in broker.events if e["type"] == "subscription.paid_while_canceled"]


# -- commands --------------------------------------------------------------------------------


async def test_import_reports_bad_rows_and_is_idempotent(
    db: aiomysql.Pool, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """CSV and JSON lines: good rows are imported with their derived billing position, bad rows
    are reported by line number and reason; a second import changes nothing."""
    _, config_path, _ = daemons.config()
    csv_file = tmp_path / "subs.csv"
    csv_file.write_text(
        "id,provider,payment_method,amount_minor,currency,billing_anchor,interval_unit,card_brand,paid_cycle,status\n"
        "1,sandbox,pm_a,999,EUR,2026-01-31T10:00:00Z,month,visa,2,active\n"
        "2,sandbox,pm_b,500,USD,2026-01-01,week,,0,paused\n"
        "3,nowhere,pm_c,500,USD,2026-01-01,month,,0,active\n"
        "4,sandbox,pm_d,0,USD,2026-01-01,month,,0,active\n"
        "1,sandbox,pm_e,500,USD,2026-01-01,month,,0,active\n"
        "5,sandbox,pm_f,500,USD,2026-01-01,month,diners,0,active\n"
    )
    code, out, err = await payd("subscriptions", "import", "--config", str(config_path), str(csv_file))
    assert code == 1, (out, err)
    assert f"{csv_file}:4: rejected: provider: 'nowhere' is not a configured provider" in out
    assert f"{csv_file}:5: rejected: amount_minor:" in out
    assert f"{csv_file}:6: rejected: id: 1 is already on line 2" in out
    assert f"{csv_file}:7: rejected: card_brand:" in out
    assert "6 rows: 2 imported, 0 already present (left unchanged), 4 rejected" in out
    assert "rows read" in err, "progress goes to stderr"
    rows = await subscription_rows(db)
    assert set(rows) == {1, 2}
    assert rows[1]["current_period_end"] == datetime(2026, 3, 31, 10, 0)
    assert rows[1]["next_attempt_at"] >= rows[1]["current_period_end"], "due when the paid period ends"
    assert (rows[2]["status"], rows[2]["next_attempt_at"]) == ("paused", None)

    jsonl = tmp_path / "subs.jsonl"
    jsonl.write_text(
        json.dumps({"id": 6, "provider": "sandbox", "payment_method": "pm_g", "amount_minor": 100,
                    "currency": "EUR", "billing_anchor": "2026-02-01T00:00:00Z"}) + "\n"
        + '{"id": 7, "provider": "sandbox"}\n'
    )  # fmt: skip
    code, out, _ = await payd("subscriptions", "import", "--config", str(config_path), str(jsonl))
    assert code == 1 and f"{jsonl}:2: rejected: Object missing required field" in out

    before = await query(db, "SELECT * FROM subscriptions ORDER BY id")
    code, out, _ = await payd("subscriptions", "import", "--config", str(config_path), str(csv_file))
    assert "6 rows: 0 imported, 2 already present (left unchanged), 4 rejected" in out
    code, out, _ = await payd("subscriptions", "import", "--config", str(config_path), str(jsonl))
    assert "2 rows: 0 imported, 1 already present (left unchanged), 1 rejected" in out
    assert await query(db, "SELECT * FROM subscriptions ORDER BY id") == before, "not even touched"

    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("id,provider,amount\n1,sandbox,5\n")
    code, out, _ = await payd("subscriptions", "import", "--config", str(config_path), str(bad_header))
    assert code == 2 and "unknown column(s) amount" in out


async def test_retry_refuses_what_it_must_and_dispatches_the_rest(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """payd retry: a canceled subscription is refused with the reason, so is one whose card has
    reached Visa's reattempt limit for its amount, and an active one not yet due; a past-due one is
    dispatched through the outbox and recovers."""
    await add_subscriptions(db, [(1, "pm_ok", "visa")], status="canceled", due=False)
    await query(db, "UPDATE subscriptions SET status_reason = 'hard decline' WHERE id = 1")
    await add_subscriptions(db, [(2, "pm_ok", "visa")], status="past_due", due=False)
    await add_subscriptions(db, [(3, "pm_spent", "visa")], status="past_due", due=False)
    await query(db, "UPDATE subscriptions SET amount_minor = 500 WHERE id = 3")  # add_history's amount
    await add_history(db, "pm_spent", *((f"spent-{i}", "soft_decline", 1) for i in range(16)))
    await add_subscriptions(db, [(4, "pm_ok", "visa")], due=False)
    await query(db, "UPDATE subscriptions SET next_attempt_at = NOW(6) + INTERVAL 5 DAY WHERE id = 4")
    _, config_path, _ = daemons.config(**sections())

    code, _, err = await payd("retry", "--config", str(config_path), "1")
    assert code == 1
    assert "subscription 1 is canceled (hard decline); a canceled subscription is never charged again" in err
    code, _, err = await payd("retry", "--config", str(config_path), "3")
    assert code == 1 and "deferred by visa_reattempts_30d: 15 declined reattempts" in err
    code, _, err = await payd("retry", "--config", str(config_path), "4")
    assert code == 1 and "is active and cycle 1 is not due until" in err
    code, _, err = await payd("retry", "--config", str(config_path), "99")
    assert code == 1 and "no subscription with id 99" in err
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)], "a refusal writes nothing"

    code, out, _ = await payd("retry", "--config", str(config_path), "2")
    assert code == 0 and "dispatched renew:2:1:0" in out
    code, _, err = await payd("retry", "--config", str(config_path), "2")
    assert code == 1 and "attempt renew:2:1:0 for cycle 1 is queued; wait for its outcome" in err
    await broker.follow_events()
    async with daemons.in_process(**sections(subscriptions={**SUBSCRIPTIONS, "scheduler": False})):
        await wait_at_rest(db)
    rows = await subscription_rows(db)
    assert (rows[2]["status"], rows[2]["paid_cycle"]) == ("active", 1)
    assert [e["type"] for e in subscription_events(broker)[2]] == ["subscription.recovered"]
    assert [c["merchant_reference"] for c in await sandbox.ledger()] == ["2:1"]
