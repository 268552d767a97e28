"""The pipeline end to end, in-process, against MariaDB, RabbitMQ and the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import json
import random

import aiomysql
import msgspec

from daemon.config import MySQLSettings, SubscriptionSettings
from daemon.models import AttemptRequest
from daemon.secrets import load_secret
from daemon.storage.attempts import Record, claim_attempts, record_outcomes
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.policy import SubscriptionPolicy
from tests.support import (
    DATABASE,
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    query,
    request,
    states,
    wait_settled,
)

TOKENS = ["pm_ok"] * 6 + ["pm_insufficient_funds", "pm_stolen", "pm_error", "pm_rate_limited", "pm_random"]

INVALID = [
    (b"{not json", "not a JSON object"),
    (json.dumps({"idempotency_key": "x"}).encode(), "invalid request"),
    (json.dumps(request("bad key!")).encode(), "idempotency_key"),
    (json.dumps(request("neg", amount_minor=-5)).encode(), "amount_minor"),
    (json.dumps({**request("cur"), "currency": "eur"}).encode(), "currency"),
    (json.dumps({**request("prov"), "provider": "nope"}).encode(), "unknown provider"),
    (json.dumps(request("pan", payment_method="4242 4242 4242 4242")).encode(), "card number"),
    (json.dumps({**request("half"), "subscription_id": 5}).encode(), "subscription_id and cycle"),
    (b"[]", "invalid request"),
]


async def test_burst_with_duplicates_and_invalid_messages(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Every valid request ends terminal exactly once; every invalid one is dead-lettered with
    its reason; redeliveries change nothing; the gateway charged no key or cycle twice."""
    rng = random.Random(7)
    valid = [
        request(f"burst-{i}", payment_method=rng.choice(TOKENS), subscription_id=10_000 + i)
        for i in range(300)
    ]
    duplicates = rng.sample(valid, 80)
    await broker.follow_events()
    async with daemons.in_process(rabbitmq={"prefetch": 100}):
        await broker.publish([*valid[:150], *duplicates, *(body for body, _ in INVALID), *valid[150:]])
        await broker.publish(duplicates)
        settled = await wait_settled(db, [r["idempotency_key"] for r in valid])

        async def events_out() -> bool:
            return len(broker.events) >= len(valid)

        await eventually(events_out, timeout=20, what="an event per attempt")

    assert len(settled) == 300
    rows = await query(db, "SELECT COUNT(*) FROM attempts")
    assert rows[0][0] == 300, "one attempt row per idempotency key"
    assert {state for state in settled.values()} >= {"succeeded", "declined", "failed"}

    dead = await broker.dead_letters()
    assert len(dead) == len(INVALID)
    reasons = sorted(headers["x-payd-error"] for _, headers in dead)
    for body, expected in INVALID:
        match = [h["x-payd-error"] for b, h in dead if b == body]
        assert match and expected in match[0], (body, match)
    assert all("4242" not in reason for reason in reasons), "a card number leaked into a reason"

    approved = await sandbox.assert_no_double_charge()
    succeeded = {key for key, state in settled.items() if state == "succeeded"}
    assert {c["idempotency_key"] for c in approved} == succeeded

    by_key: dict[str, list[str]] = {}
    for event in broker.events:
        by_key.setdefault(event["idempotency_key"], []).append(event["type"])
    for key, state in settled.items():
        assert f"payment.{state}" in by_key[key], key
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)], "the outbox drained"


async def test_timeout_is_unknown_then_reconciled_to_one_charge(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """pm_timeout charges but answers too late: the attempt becomes unknown, is looked up (not
    re-sent), and ends succeeded with exactly one charge at the gateway."""
    await sandbox.behave(hang_s=5)
    await broker.follow_events()
    async with daemons.in_process(providers__sandbox={"timeout_s": 0.5}):
        await broker.publish([request("slow-1", payment_method="pm_timeout", subscription_id=42)])
        settled = await wait_settled(db, ["slow-1"], timeout=30)

        async def both_events() -> bool:
            return len(broker.events) >= 2

        await eventually(both_events, timeout=10, what="unknown and succeeded events")

    assert settled == {"slow-1": "succeeded"}
    assert [e["type"] for e in broker.events] == ["payment.unknown", "payment.succeeded"]
    ledger = await sandbox.ledger()
    assert [c["idempotency_key"] for c in ledger] == ["slow-1"], "charged exactly once"
    stats = await sandbox.stats()
    assert stats["lookups"] >= 1, "the outcome came from a lookup"
    assert stats["requests"] == 1, "the charge was never sent again"
    (reconcile_tries,) = (await query(db, "SELECT reconcile_tries FROM attempts"))[0]
    assert reconcile_tries >= 1


async def test_provider_limit_is_never_exceeded(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Invariant 4: the gateway never sees more concurrent calls than max_in_flight, even with
    hundreds of attempts claimed at once (and the limit is actually reached)."""
    await sandbox.behave(latency_ms=40)
    async with daemons.in_process(providers__sandbox={"max_in_flight": 7}, rabbitmq={"prefetch": 400}):
        await broker.publish(request(f"lim-{i}") for i in range(300))
        await wait_settled(db, [f"lim-{i}" for i in range(300)])
    stats = await sandbox.stats()
    assert stats["accounts"]["sandbox"]["peak_in_flight"] == 7
    assert stats["approved"] == 300


async def test_rate_limited_and_errors_retry_with_the_same_key_then_fail(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A 429 or a 500 charged nothing: payd tries again (same key) up to max_tries, then the
    attempt fails cleanly, never as a decline, with nothing charged."""
    await sandbox.behave(retry_after_s=0)
    async with daemons.in_process(providers__sandbox={"max_tries": 3, "max_rate_limited_tries": 3}):
        await broker.publish(
            [request("rl", payment_method="pm_rate_limited"), request("er", payment_method="pm_error")]
        )
        settled = await wait_settled(db, ["rl", "er"])
    assert settled == {"rl": "failed", "er": "failed"}
    rows = dict(await query(db, "SELECT idempotency_key, CONCAT(outcome, '/', tries) FROM attempts"))
    assert rows == {"rl": "rate_limited/3", "er": "provider_error/3"}
    assert await sandbox.ledger() == []


async def test_second_attempt_for_a_paid_cycle_is_refused_by_the_database(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Two different keys for one (subscription, cycle): only one may be in flight or succeed;
    the other fails with cycle_taken without reaching the gateway."""
    async with daemons.in_process():
        await broker.publish([request("cyc-a", subscription_id=77, cycle=3)])
        await wait_settled(db, ["cyc-a"])
        await broker.publish([request("cyc-b", subscription_id=77, cycle=3)])
        settled = await wait_settled(db, ["cyc-b"])
    assert settled == {"cyc-b": "failed"}
    (code,) = (await query(db, "SELECT decline_code FROM attempts WHERE idempotency_key = 'cyc-b'"))[0]
    assert code == "cycle_taken"
    assert [c["idempotency_key"] for c in await sandbox.ledger()] == ["cyc-a"]


async def test_reused_key_with_other_parameters_is_dead_lettered(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A sender bug (one key, two amounts) must not charge the second amount."""
    async with daemons.in_process():
        await broker.publish([request("reuse", amount_minor=100)])
        await wait_settled(db, ["reuse"])
        await broker.publish([request("reuse", amount_minor=999)])

        async def dead_lettered() -> bool:
            return bool(await broker.dead_letters()) or False

        dead: list[tuple[bytes, dict[str, object]]] = []

        async def collect() -> bool:
            dead.extend(await broker.dead_letters())
            return bool(dead)

        await eventually(collect, timeout=10, what="the dead letter")
    assert "different parameters" in str(dead[0][1]["x-payd-error"])
    assert [c["amount_minor"] for c in await sandbox.ledger()] == [100]


async def test_a_trailing_newline_is_dead_lettered_as_such_and_leaves_no_row(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Currency "EUR\\n" once passed validation, was stored as "EUR" (MariaDB's CHAR(3) drops
    the newline), read back as another request under this key, dead-lettered as a reused key
    and left queued forever; key "nl-key\\n" was charged. Both are now refused at intake for
    what they are, no row is left, and the corrected request under the same key is charged."""
    async with daemons.in_process():
        await broker.publish([{**request("nl-cur"), "currency": "EUR\n"}, request("nl-key\n")])
        dead: list[tuple[bytes, dict[str, object]]] = []

        async def both_dead() -> bool:
            dead.extend(await broker.dead_letters())
            return len(dead) >= 2

        await eventually(both_dead, timeout=20, what="both dead letters")
        reasons = sorted(str(headers["x-payd-error"]) for _, headers in dead)
        assert [reason.rsplit(" - at ", 1)[-1] for reason in reasons] == [
            "`$.currency`",
            "`$.idempotency_key`",
        ], reasons
        assert not any("different parameters" in reason for reason in reasons)
        assert await query(db, "SELECT idempotency_key, state FROM attempts") == []

        await broker.publish([request("nl-cur")])
        assert await wait_settled(db, ["nl-cur"]) == {"nl-cur": "succeeded"}
    assert [c["currency"] for c in await sandbox.ledger()] == ["EUR"]


async def test_claim_removes_a_row_the_database_stored_differently(db: aiomysql.Pool) -> None:
    """Should a value ever pass validation that its column cannot hold, the claim tells it
    apart from a reused key (the row is its own), reports it as altered and leaves no row;
    a key truly reused with other parameters still keeps the first request."""

    def make(key: str, currency: str, amount: int = 100) -> AttemptRequest:
        # Constructing a Struct runs no Meta constraint: this is what intake would once let by.
        return AttemptRequest(
            idempotency_key=key,
            amount_minor=amount,
            currency=currency,
            provider="sandbox",
            payment_method="pm_ok",
        )

    first = await claim_attempts(db, [make("kept", "EUR")], claimed_by="t/1", lease_s=30)
    assert set(first.claimed) == {"kept"}
    outcome = await claim_attempts(
        db, [make("altered", "EUR\n"), make("kept", "EUR", amount=999)], claimed_by="t/2", lease_s=30
    )
    assert outcome.altered == {"altered"} and outcome.mismatched == {"kept"}
    assert not outcome.claimed and not outcome.already
    assert await query(db, "SELECT idempotency_key, amount_minor, state FROM attempts") == [
        ("kept", 100, "in_flight")
    ]


async def test_overlapping_claims_in_opposite_orders_all_succeed(db: aiomysql.Pool) -> None:
    """Two claims of the same keys, delivered in opposite orders (a redelivery, two daemons
    holding copies), run at once, again and again: each key ends claimed exactly once and no
    claim fails. InnoDB's duplicate-key checks can deadlock such claims (MySQL 1213); the
    batch that lost used to go back to the queue, and now is claimed again at once."""
    # A pool like the daemon's (transactions, READ COMMITTED), not the tests' autocommit one.
    pool = await open_pool(MySQLSettings(database=DATABASE, pool_size=4), load_secret("mysql_password"))
    try:
        await _claim_in_opposite_orders(pool)
    finally:
        await close_pool(pool)


async def _claim_in_opposite_orders(db: aiomysql.Pool) -> None:
    for round_ in range(15):
        keys = [f"dl-{round_}-{i:03d}" for i in range(150)]
        bodies = [msgspec.convert(request(key), AttemptRequest) for key in keys]
        results = await asyncio.gather(
            claim_attempts(db, bodies, claimed_by=f"t/a{round_}", lease_s=30),
            claim_attempts(db, bodies[::-1], claimed_by=f"t/b{round_}", lease_s=30),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"round {round_}: {failures!r}"
        claimed = [key for r in results if not isinstance(r, BaseException) for key in r.claimed]
        assert sorted(claimed) == keys, "each key claimed once, by one of the two"


async def test_a_queued_attempt_whose_message_is_gone_fails_as_never_sent(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Released attempts (never sent) wait queued for their message. When it never comes back
    (dead-lettered at the delivery limit, purged), the sweep fails them as never_sent with a
    payment.failed event; a subscription's pending try is left to the scheduler; and a copy of
    the message that turns up after all changes nothing and charges nothing."""
    orphan, pending = request("orphan-1"), request("pending-1", subscription_id=4242, cycle=2)
    # Claimed, then released unsent (as a drain or an open breaker does): queued again.
    requests = [msgspec.convert(body, AttemptRequest) for body in (orphan, pending)]
    claimed = await claim_attempts(db, requests, claimed_by="t/1", lease_s=30)
    await record_outcomes(
        db,
        [Record(attempt_id=claimed.claimed[r.idempotency_key], request=r, result=None) for r in requests],
        unknown_recheck_s=1,
        policy=SubscriptionPolicy(SubscriptionSettings()),
    )
    await query(
        db,
        "INSERT INTO subscriptions (id, provider, payment_method, amount_minor, currency, paid_cycle, "
        "next_attempt_at, pending_key) VALUES (4242, 'sandbox', 'pm_ok', 1000, 'EUR', 1, "
        "NOW(6) + INTERVAL 1 DAY, 'pending-1')",
    )
    await broker.follow_events()
    async with daemons.in_process(pipeline={"queued_orphan_after_s": 1}) as daemon:

        async def swept() -> bool:
            return (await states(db)).get("orphan-1") == "failed"

        async def event_out() -> bool:
            return any(e["idempotency_key"] == "orphan-1" for e in broker.events)

        await eventually(swept, timeout=20, what="the orphan to be failed")
        await eventually(event_out, timeout=10, what="its payment.failed event")
        await broker.publish([orphan])  # the lost message turns up after all

        async def acked_as_duplicate() -> bool:
            return int((await daemon.status())["counters"]["duplicates"]) >= 1

        await eventually(acked_as_duplicate, timeout=10, what="the late copy to be acked")

    rows = await query(db, "SELECT idempotency_key, state, decline_code, tries FROM attempts ORDER BY id")
    assert rows == [("orphan-1", "failed", "never_sent", 0), ("pending-1", "queued", None, 0)]
    (event,) = [e for e in broker.events if e["idempotency_key"] == "orphan-1"]
    assert event["type"] == "payment.failed" and event["decline_code"] == "never_sent"
    assert await broker.dead_letters() == []
    assert await sandbox.ledger() == [], "nothing was ever sent"


async def test_a_queued_row_that_cannot_be_read_is_set_aside_not_swept_forever(db: aiomysql.Pool) -> None:
    """A queued row payd cannot read back (metadata edited by hand) must not stop the sweep:
    it leaves the sweep with the reason on the row, and a readable orphan next to it is failed."""
    from daemon.storage.attempts import fail_orphaned_queued  # noqa: PLC0415

    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, metadata, "
        "state, recheck_at) VALUES ('bad-md', 'sandbox', 100, 'EUR', 'pm_ok', '{not json', 'queued', "
        "NOW(6) - INTERVAL 2 HOUR), ('good', 'sandbox', 100, 'EUR', 'pm_ok', NULL, 'queued', "
        "NOW(6) - INTERVAL 2 HOUR)",
    )
    failed, unreadable = await fail_orphaned_queued(db, queued_for_s=3600, limit=10)
    assert len(failed) == 1 and [p.idempotency_key for p in unreadable] == ["bad-md"]
    rows = await query(
        db, "SELECT idempotency_key, state, recheck_at IS NULL, reason FROM attempts ORDER BY id"
    )
    assert [row[:3] for row in rows] == [("bad-md", "queued", 1), ("good", "failed", 1)]
    assert str(rows[0][3]).startswith("row cannot be read")
    assert await fail_orphaned_queued(db, queued_for_s=3600, limit=10) == ([], []), "nothing left to sweep"
