"""Operator commands: attempts show/list/settle and dead list/replay, over the real services.

Stuck ``unknown`` attempts are written as the pipeline leaves them (a row in
``unknown`` whose next lookup is an hour away), so no reconciler settles them
under the test. Dead letters are made by a running daemon's intake. Charges
are counted on the sandbox gateway's ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.broker import ERROR_HEADER
from daemon.config import Config, MySQLSettings, SubscriptionSettings
from daemon.models import ChargeResult, Outcome
from daemon.operator.dead import REFRESH_AT, list_dead
from daemon.operator.listing import parse_duration
from daemon.operator.settle import SettleAs, SettleOrder, SettleRefused, settle_attempt
from daemon.secrets import load_secret
from daemon.storage.attempts import Record, record_outcomes, request_from_row
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.policy import SubscriptionPolicy
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
    wait_settled,
)

DEAD_QUEUE = f"{NAMESPACE}.attempts.dead"
FAILED_RETRY_S = 3600
POLICY = SubscriptionPolicy(
    msgspec.convert({"dunning": {"failed_retry_s": FAILED_RETRY_S}}, SubscriptionSettings)
)


@pytest.fixture
async def pool(db: aiomysql.Pool) -> AsyncIterator[aiomysql.Pool]:
    """A pool like the daemon's (transactions, READ COMMITTED), on a database with no audit rows."""
    await query(db, "DELETE FROM attempt_audit")
    daemon_like = await open_pool(
        MySQLSettings(database=DATABASE, pool_size=8), load_secret("mysql_password")
    )
    yield daemon_like
    await close_pool(daemon_like)


async def add_subscription(
    db: aiomysql.Pool, sid: int, *, status: str = "active", pending: str | None
) -> None:
    await query(
        db,
        "INSERT INTO subscriptions (id, status, provider, payment_method, card_brand, amount_minor, "
        "currency, billing_anchor, next_attempt_at, pending_key, next_try) VALUES (%s, %s, 'sandbox', "
        "'pm_ok', 'visa', 1000, 'EUR', NOW(6) - INTERVAL 1 MINUTE, NULL, %s, 1)",
        sid,
        status,
        pending,
    )


async def add_attempt(
    db: aiomysql.Pool,
    key: str,
    *,
    state: str = "unknown",
    provider: str = "sandbox",
    subscription: tuple[int, int] | None = None,
    hours_ago: int = 0,
) -> int:
    """An attempt as the pipeline leaves it; an unknown one's next lookup is an hour away."""
    sid, cycle = subscription or (None, None)
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, state, outcome, reason, claimed_by, claimed_at, tries, recheck_at, created_at) "
        "VALUES (%s, %s, %s, %s, 1000, 'EUR', 'pm_ok', %s, %s, %s, 'host:1/1', NOW(6), 1, "
        "IF(%s = 'unknown', NOW(6) + INTERVAL 1 HOUR, NULL), NOW(6) - INTERVAL %s HOUR)",
        key,
        sid,
        cycle,
        provider,
        state,
        "unknown" if state == "unknown" else "approved",
        "timed out after 2 s" if state == "unknown" else None,
        state,
        hours_ago,
    )
    ((attempt_id,),) = await query(db, "SELECT id FROM attempts WHERE idempotency_key = %s", key)
    return int(attempt_id)


async def outbox_types(db: aiomysql.Pool) -> list[str]:
    return [key for (key,) in await query(db, "SELECT routing_key FROM outbox ORDER BY id")]


async def payd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        PAYD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else os.environ.copy(),
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def order(key: str, settle_as: SettleAs, *, operator: str = "alice") -> SettleOrder:
    return SettleOrder(
        idempotency_key=key,
        settle_as=settle_as,
        reason="dashboard shows the charge",
        operator=operator,
        via="test",
    )


# -- settle ------------------------------------------------------------------------


async def test_settle_as_succeeded_moves_the_subscription_like_an_approval_and_is_audited(
    db: aiomysql.Pool, pool: aiomysql.Pool, daemons: DaemonFactory
) -> None:
    """A stuck unknown renewal settled as succeeded: the attempt succeeds, the subscription's cycle is
    paid and the subscription returns to active, payment.succeeded and subscription.recovered go into
    the outbox in the same commit, and attempt_audit names who, via what, and why; ``attempts show``
    tells all of it (text and JSON)."""
    await add_subscription(db, 7, status="past_due", pending="renew:7:1:0")
    await add_attempt(db, "renew:7:1:0", subscription=(7, 1))
    _, config_path, _ = daemons.config(subscriptions__dunning={"failed_retry_s": FAILED_RETRY_S})

    code, out, err = await payd(
        "attempts", "settle", "renew:7:1:0", "--as", "succeeded", "--reason", "dashboard: captured ch_1",
        "--operator", "alice", "--provider-ref", "ch_1", "--config", str(config_path),
    )  # fmt: skip
    assert code == 0, err
    assert "settled renew:7:1:0 as succeeded" in out

    assert await query(
        db, "SELECT state, outcome, provider_ref, recheck_at, finished_at IS NOT NULL FROM attempts"
    ) == [("succeeded", "approved", "ch_1", None, 1)]
    ((status, paid_cycle, pending, next_at),) = await query(
        db, "SELECT status, paid_cycle, pending_key, next_attempt_at FROM subscriptions WHERE id = 7"
    )
    assert (status, paid_cycle, pending) == ("active", 1, None) and next_at is not None
    assert await outbox_types(db) == ["subscription.recovered", "payment.succeeded"]
    ((operator, via, reason, before, after),) = await query(
        db, "SELECT operator, via, reason, state_before, state_after FROM attempt_audit"
    )
    assert (operator, reason, before, after) == ("alice", "dashboard: captured ch_1", "unknown", "succeeded")
    assert via.startswith("cli@")

    code, out, _ = await payd("attempts", "show", "renew:7:1:0", "--config", str(config_path))
    assert code == 0
    assert "settle unknown -> succeeded by alice" in out and "dashboard: captured ch_1" in out
    code, out, _ = await payd("attempts", "show", "renew:7:1:0", "--json", "--config", str(config_path))
    story = json.loads(out)
    assert story["attempt"]["state"] == "succeeded"
    assert story["operator_actions"][0]["operator"] == "alice"
    assert story["subscription"]["paid_cycle"] == 1
    assert [(e["type"], e["published"]) for e in story["events"]] == [
        ("payment.unknown", True),
        ("payment.succeeded", False),
        ("subscription.recovered", False),
    ]


async def test_settle_as_failed_schedules_a_new_try_like_a_failure_that_charged_nothing(
    db: aiomysql.Pool, pool: aiomysql.Pool
) -> None:
    """Settled as failed: the attempt fails with decline code operator_settled, the subscription no
    longer waits on it and its next try is scheduled after failed_retry_s (not a dunning step)."""
    await add_subscription(db, 8, pending="renew:8:1:0")
    await add_attempt(db, "renew:8:1:0", subscription=(8, 1))

    settled = await settle_attempt(pool, order("renew:8:1:0", SettleAs.FAILED), policy=POLICY)

    assert settled.state.value == "failed"
    assert await query(db, "SELECT state, decline_code FROM attempts") == [("failed", "operator_settled")]
    ((pending, dunning, wait),) = await query(
        db,
        "SELECT pending_key, dunning_step, TIMESTAMPDIFF(SECOND, NOW(6), next_attempt_at) "
        "FROM subscriptions WHERE id = 8",
    )
    assert pending is None and dunning == 0
    assert FAILED_RETRY_S - 60 < wait <= FAILED_RETRY_S
    assert await outbox_types(db) == ["subscription.retry_scheduled", "payment.failed"]


async def test_settle_refuses_anything_not_unknown_and_changes_nothing(
    db: aiomysql.Pool, pool: aiomysql.Pool, daemons: DaemonFactory
) -> None:
    """A succeeded, an in-flight and a missing attempt are refused (exit 1, the reason on stderr); an
    order without an operator or a reason is refused too; nothing is written anywhere."""
    await add_attempt(db, "done-1", state="succeeded")
    await add_attempt(db, "flying-1", state="in_flight")
    await add_attempt(db, "stuck-1")
    _, config_path, _ = daemons.config()
    settle = ("attempts", "settle", "--as", "failed", "--reason", "checked", "--config", str(config_path))

    code, _, err = await payd(*settle, "done-1", "--operator", "bob")
    assert code == 1 and "attempt done-1 is succeeded; only an unknown attempt can be settled" in err
    code, _, err = await payd(*settle, "flying-1", "--operator", "bob")
    assert code == 1 and "is in_flight" in err
    code, _, err = await payd(*settle, "nope-1", "--operator", "bob")
    assert code == 1 and "no attempt with key nope-1" in err
    anonymous = {k: v for k, v in os.environ.items() if k not in ("USER", "SUDO_USER")}
    code, _, err = await payd(*settle, "stuck-1", env=anonymous)
    assert code == 2 and "--operator" in err
    with pytest.raises(SettleRefused, match="a reason is required"):
        await settle_attempt(
            pool, msgspec.structs.replace(order("stuck-1", SettleAs.FAILED), reason=" "), policy=POLICY
        )

    assert await query(db, "SELECT idempotency_key, state FROM attempts ORDER BY id") == [
        ("done-1", "succeeded"),
        ("flying-1", "in_flight"),
        ("stuck-1", "unknown"),
    ]
    assert await query(db, "SELECT COUNT(*) FROM attempt_audit") == [(0,)]
    assert await outbox_types(db) == []


async def test_settle_racing_the_reconciler_or_another_settle_makes_exactly_one_transition(
    db: aiomysql.Pool, pool: aiomysql.Pool
) -> None:
    """For each of 20 stuck attempts, an operator's settle (as failed) and the reconciler's record of
    an approval run at the same moment on separate connections; for 10 more, two operators settle at
    once with opposite verdicts. Each attempt ends in exactly one terminal state with exactly one
    terminal payment event, an audit row exactly when the settle won, and the loser changed nothing."""
    await add_subscription(db, 1, pending=None)
    racing = [f"race-{i}" for i in range(20)]
    doubled = [f"twice-{i}" for i in range(10)]
    ids = {key: await add_attempt(db, key) for key in racing + doubled}
    rows = await query(
        db,
        "SELECT idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, customer_ref, metadata FROM attempts",
    )
    requests = {row[0]: request_from_row(row) for row in rows}

    async def reconciler(key: str) -> bool:
        record = Record(
            attempt_id=ids[key], request=requests[key], result=ChargeResult(outcome=Outcome.APPROVED)
        )
        return bool((await record_outcomes(pool, [record], unknown_recheck_s=0, policy=POLICY)).applied)

    async def operator(key: str, settle_as: SettleAs, who: str) -> bool:
        try:
            await settle_attempt(pool, order(key, settle_as, operator=who), policy=POLICY)
        except SettleRefused:
            return False
        return True

    for key in racing:
        recorded, settled = await asyncio.gather(reconciler(key), operator(key, SettleAs.FAILED, "alice"))
        assert recorded != settled, f"{key}: exactly one of the two wins"
    for key in doubled:
        first, second = await asyncio.gather(
            operator(key, SettleAs.SUCCEEDED, "alice"), operator(key, SettleAs.FAILED, "bob")
        )
        assert first != second, f"{key}: exactly one settle wins"

    states = dict(await query(db, "SELECT idempotency_key, state FROM attempts"))
    audited = dict(await query(db, "SELECT idempotency_key, state_after FROM attempt_audit"))
    assert len(await query(db, "SELECT idempotency_key FROM attempt_audit")) == len(audited)
    for key in racing:
        assert states[key] in ("succeeded", "failed")
        assert (key in audited) == (states[key] == "failed"), key
    for key in doubled:
        assert audited[key] == states[key]
    events = await query(db, "SELECT routing_key, payload FROM outbox WHERE routing_key LIKE 'payment.%%'")
    keys = [json.loads(payload)["idempotency_key"] for _, payload in events]
    assert sorted(keys) == sorted(racing + doubled), "one terminal payment event per attempt"


# -- show and list ----------------------------------------------------------------


async def test_show_names_a_deferred_renewal_try_that_has_no_attempt_row(
    db: aiomysql.Pool, daemons: DaemonFactory
) -> None:
    """``renew:SID:CYCLE:TRY`` without an attempt row: the story is the subscription's, with the card
    network rule that holds the try back and until when; a key nobody knows exits 1; a parked
    attempt's story says why reconciliation left it."""
    await add_subscription(db, 9, status="past_due", pending=None)
    await query(
        db,
        "UPDATE subscriptions SET deferred_by = 'visa_reattempts_30d', "
        "deferred_until = '2026-12-24 10:00:00' WHERE id = 9",
    )
    _, config_path, _ = daemons.config()

    code, out, _ = await payd("attempts", "show", "renew:9:1:3", "--json", "--config", str(config_path))
    assert code == 0
    story = json.loads(out)
    assert story["found"] is False
    assert story["subscription"]["deferred_by"] == "visa_reattempts_30d"
    assert story["subscription"]["deferred_until"].startswith("2026-12-24T10:00:00")
    code, out, _ = await payd("attempts", "show", "renew:9:1:3", "--config", str(config_path))
    assert "has not been dispatched" in out and "visa_reattempts_30d" in out
    code, _, err = await payd("attempts", "show", "never-seen", "--config", str(config_path))
    assert code == 1 and "no attempt with key never-seen" in err

    await add_attempt(db, "parked-1")
    await query(
        db,
        "UPDATE attempts SET parked_at = NOW(6), reconcile_error = 'KeyError: id' "
        "WHERE idempotency_key = 'parked-1'",
    )
    code, out, _ = await payd("attempts", "show", "parked-1", "--config", str(config_path))
    assert code == 0 and "KeyError: id (payd attempts unpark)" in out


async def test_list_filters_by_state_provider_and_age(db: aiomysql.Pool, daemons: DaemonFactory) -> None:
    """``attempts list`` shows unknown attempts by default, filtered by provider (requested or routed)
    and by age; a duration it cannot read is a usage error (exit 2)."""
    await add_attempt(db, "old-sandbox", hours_ago=3)
    await add_attempt(db, "new-sandbox")
    await add_attempt(db, "old-other", provider="other", hours_ago=3)
    await add_attempt(db, "old-routed", provider="other", hours_ago=5)
    await query(db, "UPDATE attempts SET routed_provider = 'sandbox' WHERE idempotency_key = 'old-routed'")
    await add_attempt(db, "old-done", state="succeeded", hours_ago=3)
    _, config_path, _ = daemons.config()
    listing = ("attempts", "list", "--json", "--config", str(config_path))

    code, out, _ = await payd(*listing, "--older-than", "2h", "--provider", "sandbox")
    assert code == 0
    assert [a["idempotency_key"] for a in json.loads(out)["attempts"]] == ["old-sandbox", "old-routed"]
    code, out, _ = await payd(*listing)
    assert len(json.loads(out)["attempts"]) == 4
    code, out, _ = await payd(*listing, "--state", "succeeded", "--older-than", "90m")
    assert [a["idempotency_key"] for a in json.loads(out)["attempts"]] == ["old-done"]
    code, out, _ = await payd(*listing[:-3], "--limit", "1", "--config", str(config_path))
    assert "old-sandbox" in out and "more match" in out
    code, _, err = await payd(*listing, "--older-than", "2 hours")
    assert code == 2 and "not a duration" in err
    assert [parse_duration(text) for text in ("15m", "2h", "3d", "1h30m", "45s")] == [
        900,
        7200,
        259200,
        5400,
        45,
    ]


# -- the dead-letter queue ------------------------------------------------------------


async def dead_depth(broker: Broker) -> int:
    queue = await broker.channel.declare_queue(DEAD_QUEUE, passive=True)
    assert queue.declaration_result is not None
    return int(queue.declaration_result.message_count or 0)


async def test_dead_list_shows_each_reason_and_never_loses_a_message(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """Dead letters from intake are listed with their reason, key (when the body has one), age and
    size. Listing them more than REFRESH_AT times in a row loses none, keeps their ids, and never lets
    a count of returns pass REFRESH_AT (a quorum queue drops what passes its delivery limit)."""
    async with daemons.in_process() as daemon:
        await broker.publish([request("dl-provider", provider="sandbox_b"), b"{not json"])
        await eventually(lambda: _depth_is(broker, 2), timeout=30, what="two dead letters")
    config: Config = daemon.config

    first = await list_dead(config, limit=100)
    by_key = {letter.idempotency_key: letter for letter in first.messages}
    assert set(by_key) == {"dl-provider", None}
    assert "unknown provider 'sandbox_b'" in by_key["dl-provider"].reason
    assert "not a JSON object" in by_key[None].reason
    assert all(letter.age_s is not None and letter.size > 0 for letter in first.messages)
    assert not by_key["dl-provider"].valid_now

    for _ in range(REFRESH_AT + 3):
        again = await list_dead(config, limit=100)
        assert sorted(letter.id for letter in again.messages) == sorted(
            letter.id for letter in first.messages
        )
        # RabbitMQ before 4.3 counts each return (3.10 here does); 4.3+ counts none.
        assert all(letter.delivery_count <= REFRESH_AT for letter in again.messages)
    await eventually(lambda: _depth_is(broker, 2), timeout=10, what="both back in the queue")

    code, out, _ = await payd("dead", "list", "--config", str(daemons.config()[1]))
    assert code == 0 and "2 dead letters" in out and "none was removed" in out


async def _depth_is(broker: Broker, count: int) -> bool:
    return await dead_depth(broker) == count


async def test_replay_after_a_fix_charges_once_however_often_a_key_is_replayed(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Two copies of a request for a provider not yet configured are dead-lettered, and so is a copy
    of a request that already succeeded, and one for a provider that stays unknown. After the
    provider is added, ``dead replay --all`` sends all four through intake again: the sandbox's
    ledger shows exactly one charge per key, only the still-invalid one is back in the dead-letter
    queue (with its new reason and who replayed it), and replaying an id that is gone reports it
    and charges nothing."""
    async with daemons.in_process():
        await broker.publish(
            [request("fixed-1", provider="sandbox_b")] * 2
            + [request("paid-1"), request("still-bad", provider="nowhere")]
        )
        await wait_settled(db, ["paid-1"])
        await eventually(lambda: _depth_is(broker, 3), timeout=30, what="three dead letters")
    await broker.channel.default_exchange.publish(
        aio_pika.Message(json.dumps(request("paid-1")).encode(), headers={ERROR_HEADER: "replayed by hand"}),
        routing_key=DEAD_QUEUE,
    )
    fixed: dict[str, Any] = {"kind": "sandbox", "base_url": sandbox.url, "max_in_flight": 5, "timeout_s": 2}
    _, config_path, _ = daemons.config(providers__sandbox_b=fixed)

    code, _, err = await payd("dead", "replay", "--config", str(config_path))
    assert code == 2 and "--all" in err
    async with daemons.in_process(providers__sandbox_b=fixed):
        code, out, err = await payd(
            "dead", "replay", "--all", "--operator", "carol", "--config", str(config_path)
        )
        assert code == 0, err
        assert "replayed 4 dead letters" in out
        assert await wait_settled(db, ["fixed-1"]) == {"fixed-1": "succeeded"}
        code, out, _ = await payd("dead", "replay", "sha256:0000000000000000", "--operator", "carol",
                                  "--config", str(config_path))  # fmt: skip
        assert code == 1 and "not found: sha256:0000000000000000" in out
        await asyncio.sleep(1)  # let any stray duplicate reach the gateway before counting
    approved = await sandbox.assert_no_double_charge()
    assert sorted(charge["idempotency_key"] for charge in approved) == ["fixed-1", "paid-1"]
    await eventually(lambda: _depth_is(broker, 1), timeout=10, what="only the one still refused")
    ((body, headers),) = await broker.dead_letters()
    assert json.loads(body)["idempotency_key"] == "still-bad"
    assert "unknown provider 'nowhere'" in headers[ERROR_HEADER]
    assert headers["x-payd-replayed-by"].startswith("carol")


# -- the same actions over HTTP ------------------------------------------------------------


async def test_admin_routes_need_the_token_and_a_named_operator(
    db: aiomysql.Pool, pool: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """Under /admin/ the settle needs the bearer token (401) and an operator's name (400); a settle
    is then recorded with that name and published as payment.succeeded by the daemon's relay; a
    second settle is refused (409); show, list and the dead-letter listing answer in JSON."""
    await add_attempt(db, "http-1")
    token = load_secret("control_token")
    assert token is not None
    await broker.follow_events()
    async with daemons.in_process() as daemon, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{daemon.port}/admin"
        auth = {"Authorization": f"Bearer {token.reveal()}"}
        body = {"as": "succeeded", "reason": "dashboard shows it captured"}

        async with session.post(f"{base}/attempts/http-1/settle", json=body) as response:
            assert response.status == 401
        async with session.post(f"{base}/attempts/http-1/settle", json=body, headers=auth) as response:
            assert response.status == 400 and "X-Payd-Operator" in (await response.json())["error"]
        named = {**auth, "X-Payd-Operator": "dave"}
        async with session.post(f"{base}/attempts/http-1/settle", json=body, headers=named) as response:
            assert response.status == 200, await response.text()
        async with session.post(f"{base}/attempts/http-1/settle", json=body, headers=named) as response:
            assert response.status == 409
        async with session.get(f"{base}/attempts/http-1", headers=auth) as response:
            story = await response.json()
        assert story["operator_actions"][0]["operator"] == "dave"
        assert story["operator_actions"][0]["via"].startswith("control:")
        async with session.get(f"{base}/attempts", params={"state": "succeeded"}, headers=auth) as response:
            assert [a["idempotency_key"] for a in (await response.json())["attempts"]] == ["http-1"]
        async with session.get(f"{base}/dead", headers=auth) as response:
            assert response.status == 200 and (await response.json())["messages"] == []

        async def published() -> bool:
            return any(e["type"] == "payment.succeeded" for e in broker.events)

        await eventually(published, timeout=30, what="payment.succeeded from the relay")
    (event,) = [e for e in broker.events if e["type"] == "payment.succeeded"]
    assert event["idempotency_key"] == "http-1" and "settled by dave" in event["reason"]


async def test_operator_input_out_of_range_is_a_clear_refusal_never_a_500(
    db: aiomysql.Pool, pool: aiomysql.Pool, daemons: DaemonFactory
) -> None:
    """A listing limit below 1 (or not a number): 400 / exit 2 naming it, never SQL's error; a
    key outside the idempotency-key alphabet (a MySQL collation error against the ascii_bin key
    columns if it reached a query): 404 for show, settle and refund; a provider_ref longer than
    its column or an empty reason: 400, and the attempt stays unknown. The CLI's --amount-minor
    refuses ``..`` (it would select every charge), negatives and MIN over MAX (exit 2)."""
    await add_attempt(db, "bounds-1")
    token = load_secret("control_token")
    assert token is not None
    auth = {"Authorization": f"Bearer {token.reveal()}", "X-Payd-Operator": "erin"}
    async with daemons.in_process() as daemon, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{daemon.port}/admin"

        async def status_of(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
            async with session.request(method, f"{base}{path}", headers=auth, **kwargs) as response:
                return response.status, await response.json()

        for bad in ("-5", "0", "many"):
            status, answer = await status_of("GET", "/attempts", params={"limit": bad})
            assert status == 400 and bad in answer["error"], (bad, answer)
        status, answer = await status_of("GET", "/attempts", params={"limit": "5000"})
        assert status == 200 and [a["idempotency_key"] for a in answer["attempts"]] == ["bounds-1"]
        status, answer = await status_of("GET", "/dead", params={"limit": "-1"})
        assert status == 400 and "limit -1" in answer["error"]

        settle = {"as": "failed", "reason": "not on the dashboard"}
        for key in ("%C3%A5sa", "x" * 129):
            status, _ = await status_of("GET", f"/attempts/{key}")
            assert status == 404, key
            status, answer = await status_of("POST", f"/attempts/{key}/settle", json=settle)
            assert status == 404 and "not an idempotency key" in answer["error"], answer
            status, answer = await status_of("POST", f"/attempts/{key}/refund", json={})
            assert status == 404 and "not an idempotency key" in answer["error"], answer

        status, answer = await status_of(
            "POST", "/attempts/bounds-1/settle", json={**settle, "provider_ref": "r" * 129}
        )
        assert status == 400 and "$.provider_ref" in answer["error"], answer
        status, answer = await status_of("POST", "/attempts/bounds-1/settle", json={**settle, "reason": " "})
        assert status == 400 and "a reason is required" in answer["error"], answer
    assert await query(db, "SELECT state FROM attempts WHERE idempotency_key = 'bounds-1'") == [("unknown",)]

    _, config_path, _ = daemons.config()
    config = ("--config", str(config_path))
    code, _, err = await payd("attempts", "list", "--limit", "-5", *config)
    assert code == 2 and "--limit -5: at least 1" in err, err
    code, _, err = await payd("dead", "list", "--limit", "0", *config)
    assert code == 2 and "--limit 0: at least 1" in err, err
    code, _, err = await payd(
        "attempts",
        "settle",
        "bounds-1",
        "--as",
        "failed",
        "--reason",
        "r",
        "--provider-ref",
        "r" * 129,
        "--operator",
        "erin",
        *config,
    )
    assert code == 2 and "provider_ref is 129 characters: at most 128" in err, err
    for amount, why in (("..", "give MIN, MAX or both"), ("-5..10", "0 or more"), ("10..5", "MIN is more")):
        code, _, err = await payd("rollback", "--dry-run", f"--amount-minor={amount}", *config)
        assert code == 2 and why in err, (amount, err)
    assert await query(db, "SELECT state FROM attempts WHERE idempotency_key = 'bounds-1'") == [("unknown",)]
