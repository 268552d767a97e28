"""A refund's effect on its subscription, and refunds in the operator's tools, end to end.

MariaDB, RabbitMQ and the sandbox gateway over HTTP; a daemon in process. A refund that
carries ``subscription_action`` and leaves nothing of a renewal unrefunded cancels or pauses
the subscription in the commit that records it; anything less leaves it alone, and the
refund's event says which.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiomysql
import pytest

from daemon.models import RefundRequest, SubscriptionAction
from daemon.operator import refund as refund_module
from daemon.pipeline.intake import Invalid, decode_request
from daemon.subscriptions.lifecycle import refunded
from daemon.subscriptions.model import ChangeKind, Subscription, SubscriptionStatus
from daemon.subscriptions.periods import IntervalUnit
from tests.support import (
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
from tests.test_reversals import _admin_headers, charged, net_by_key, refund, wait_reversals
from tests.tls_servers import PrivateRabbitMQ


async def payd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        PAYD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def add_subscription(db: aiomysql.Pool, sid: int, *, status: str = "active") -> None:
    """A subscription with its cycle 1 unpaid and no try scheduled (the test sends the renewal)."""
    await query(
        db,
        "INSERT INTO subscriptions (id, status, provider, payment_method, amount_minor, currency, "
        "billing_anchor) VALUES (%s, %s, 'sandbox', 'pm_ok', 1000, 'EUR', NOW(6) - INTERVAL 1 MINUTE)",
        sid,
        status,
    )


async def subscription_states(db: aiomysql.Pool) -> dict[int, tuple[str, str | None, Any]]:
    rows = await query(db, "SELECT id, status, status_reason, next_attempt_at FROM subscriptions")
    return {sid: (status, reason, next_at) for sid, status, reason, next_at in rows}


def events_of(broker: Broker, prefix: str) -> dict[str, dict[str, Any]]:
    """The latest event of each key (a refund's key, or a subscription's cause) of this family."""
    return {e["idempotency_key"]: e for e in broker.events if e["type"].startswith(prefix)}


async def test_a_full_refund_of_a_renewal_cancels_or_pauses_its_subscription_and_nothing_less_does(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Subscription 501: a partial refund asking to cancel leaves it active (the event says
    "partial"), the refund of the rest asking to cancel cancels it (subscription.canceled whose
    reason names the refund). 502: ``payd refund KEY --then pause`` pauses it (subscription.paused);
    a further refund asking to cancel is refused and leaves it paused. 503: a full refund without
    an action leaves it active. A one-off charge refunded with "cancel": nothing to follow."""
    _, path, _ = daemons.config()
    await broker.follow_events()
    for sid in (501, 502, 503):
        await add_subscription(db, sid)
    async with daemons.in_process():
        await charged(
            db,
            broker,
            request("renew:501:1:0", subscription_id=501),
            request("renew:502:1:0", subscription_id=502),
            request("renew:503:1:0", subscription_id=503),
            request("ch-oneoff", amount_minor=800),
        )
        paid = await subscription_states(db)
        assert {sid: state[0] for sid, state in paid.items()} == {501: "active", 502: "active", 503: "active"}
        assert all(state[2] is not None for state in paid.values()), "renewed: the next cycle is scheduled"

        await broker.publish(
            [
                refund("rf-501-a", "renew:501:1:0", 300, subscription_action="cancel"),
                refund("rf-503", "renew:503:1:0", 1000),
                refund("rf-oneoff", "ch-oneoff", 800, subscription_action="cancel"),
            ]
        )
        await wait_reversals(db, ["rf-501-a", "rf-503", "rf-oneoff"])
        assert (await subscription_states(db))[501][0] == "active", "a partial refund cancels nothing"
        await broker.publish([refund("rf-501-b", "renew:501:1:0", 700, subscription_action="cancel")])
        code, out, err = await payd("refund", "renew:502:1:0", "--then", "pause", "--config", str(path))
        assert code == 0, err
        assert "its subscription is paused" in out
        settled = await wait_reversals(db, ["rf-501-b", "refund:renew:502:1:0:1"])
        assert set(settled.values()) == {"succeeded"}
        await broker.publish([refund("rf-502-more", "renew:502:1:0", 1, subscription_action="cancel")])
        assert await wait_reversals(db, ["rf-502-more"]) == {"rf-502-more": "failed"}
        code, shown, err = await payd("attempts", "show", "renew:501:1:0", "--config", str(path))
        assert code == 0, err
        lines = {text.split()[2]: text for text in shown.splitlines() if " refund rf-501-" in text}
        assert "300: succeeded" in lines["rf-501-a"] and "700: succeeded" in lines["rf-501-b"]
        assert all(text.endswith("[then cancel the subscription]") for text in lines.values())
        assert "status          canceled (refunded: rf-501-b refunded charge renew:501:1:0)" in shown

        async def all_events() -> bool:
            refunds = events_of(broker, "refund.")
            subs = events_of(broker, "subscription.")
            return len(refunds) >= 6 and {"rf-501-b", "refund:renew:502:1:0:1"} <= subs.keys()

        await eventually(all_events, timeout=20, what="refund and subscription events")

    after = await subscription_states(db)
    assert after[501][:2] == ("canceled", "refunded: rf-501-b refunded charge renew:501:1:0")
    assert after[502][:2] == ("paused", "refunded: refund:renew:502:1:0:1 refunded charge renew:502:1:0")
    assert after[501][2] is None and after[502][2] is None, "nothing is scheduled for them any more"
    assert after[503][0] == "active" and after[503][2] is not None
    # The first three are claimed concurrently: compared by key, not in the order of their ids.
    assert dict(await query(db, "SELECT idempotency_key, subscription_action FROM reversals")) == {
        "rf-501-a": "cancel",
        "rf-503": None,
        "rf-oneoff": "cancel",
        "rf-501-b": "cancel",
        "refund:renew:502:1:0:1": "pause",
        "rf-502-more": "cancel",
    }

    refunds = events_of(broker, "refund.")
    effects = {key: (e["subscription_action"], e["subscription_effect"]) for key, e in refunds.items()}
    assert effects == {
        "rf-501-a": (
            "cancel",
            "none: a partial refund (300 of 1000 EUR refunded); subscription 501 is left as it is",
        ),
        "rf-503": (None, None),
        "rf-oneoff": ("cancel", "none: the charge is not a subscription's renewal"),
        "rf-501-b": ("cancel", "canceled"),
        "refund:renew:502:1:0:1": ("pause", "paused"),
        "rf-502-more": ("cancel", "none: the refund was refused; the subscription is left as it is"),
    }
    subs = events_of(broker, "subscription.")
    canceled, paused = subs["rf-501-b"], subs["refund:renew:502:1:0:1"]
    assert (canceled["type"], canceled["subscription_id"]) == ("subscription.canceled", 501)
    assert (canceled["status_before"], canceled["status_after"]) == ("active", "canceled")
    assert canceled["reason"] == "refunded: rf-501-b refunded charge renew:501:1:0"
    assert (paused["type"], paused["subscription_id"]) == ("subscription.paused", 502)
    assert (paused["status_before"], paused["status_after"]) == ("active", "paused")
    assert not any(e["subscription_id"] == 503 for e in subs.values() if e["type"] != "subscription.renewed")
    assert net_by_key(await sandbox.ledger()) == {
        "renew:501:1:0": (1000, 0),
        "renew:502:1:0": (1000, 0),
        "renew:503:1:0": (1000, 0),
        "ch-oneoff": (800, 0),
    }


async def test_a_refund_of_a_canceled_subscriptions_renewal_changes_nothing_more(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A subscription canceled meanwhile stays canceled: a full refund asking to pause it emits
    no subscription event, and its event says the subscription was already canceled."""
    await broker.follow_events()
    await add_subscription(db, 601)
    async with daemons.in_process():
        await charged(db, broker, request("renew:601:1:0", subscription_id=601))
        await query(db, "UPDATE subscriptions SET status = 'canceled', status_reason = 'by the customer'")
        await broker.publish([refund("rf-601", "renew:601:1:0", 1000, subscription_action="pause")])
        assert await wait_reversals(db, ["rf-601"]) == {"rf-601": "succeeded"}
        await eventually(
            lambda: _has(broker, "refund.succeeded"), timeout=20, what="the refund.succeeded event"
        )
    assert (await subscription_states(db))[601][:2] == ("canceled", "by the customer")
    [event] = [e for e in broker.events if e["type"] == "refund.succeeded"]
    assert event["subscription_effect"] == "none: subscription 601 is already canceled"
    assert not [e for e in broker.events if e["type"] in ("subscription.paused", "subscription.canceled")]


async def _has(broker: Broker, event_type: str) -> bool:
    return any(e["type"] == event_type for e in broker.events)


def test_intake_refuses_an_unknown_subscription_action_naming_the_field() -> None:
    """``subscription_action`` is "cancel" or "pause"; anything else is invalid (the request
    is dead-lettered with this reason), and it is decoded onto the refund request."""
    good = decode_request(
        json.dumps(refund("r-1", "k-1", 5, subscription_action="pause")).encode(), {"sandbox"}
    )
    assert isinstance(good, RefundRequest) and good.subscription_action is SubscriptionAction.PAUSE
    bad = decode_request(
        json.dumps(refund("r-2", "k-1", 5, subscription_action="delete")).encode(), {"sandbox"}
    )
    assert isinstance(bad, Invalid)
    assert "$.subscription_action" in bad.reason and "delete" in bad.reason


async def test_an_invalid_subscription_action_is_dead_lettered_with_its_reason(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Through the daemon: the bad request ends in the dead-letter queue with the reason in
    ``x-payd-error``; no reversal row is written and nothing reaches the gateway."""
    async with daemons.in_process():
        await charged(db, broker, request("ch-dl"))
        await broker.publish([refund("rf-dl", "ch-dl", 10, subscription_action="suspend")])
        dead: list[tuple[bytes, dict[str, Any]]] = []

        async def dead_lettered() -> bool:
            dead.extend(await broker.dead_letters())
            return len(dead) >= 1

        await eventually(dead_lettered, timeout=20, what="the request to be dead-lettered")
    [(body, headers)] = dead
    assert json.loads(body)["idempotency_key"] == "rf-dl"
    assert "$.subscription_action" in headers["x-payd-error"]
    assert await query(db, "SELECT COUNT(*) FROM reversals") == [(0,)]
    assert (await sandbox.stats())["refund_requests"] == 0
    assert await wait_settled(db, ["ch-dl"]) == {"ch-dl": "succeeded"}


# -- POST /admin/attempts/{key}/refund ------------------------------------------------------


async def test_the_admin_refund_route_is_payd_refund_behind_the_token(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """No token: 401 and nothing published. A body that does not validate: 400 naming the field.
    No operator: 400. An amount over what remains: 409 with the reason. A charge that does not
    exist: 404. A good order: 202 with the refund's key; the daemon refunds it (ledger), the
    subscription follows, and the charge's story records who asked, from where."""
    await broker.follow_events()
    await query(db, "DELETE FROM attempt_audit WHERE idempotency_key = 'renew:701:1:0'")  # an earlier run's
    await add_subscription(db, 701)
    headers = {**await _admin_headers(), "X-Payd-Operator": "alice"}
    async with daemons.in_process() as daemon, aiohttp.ClientSession() as http:
        await charged(db, broker, request("renew:701:1:0", subscription_id=701))
        url = f"http://127.0.0.1:{daemon.port}/admin/attempts/renew:701:1:0/refund"

        async def post(body: dict[str, Any], sent: dict[str, str]) -> tuple[int, dict[str, Any]]:
            async with http.post(url, json=body, headers=sent) as answer:
                return answer.status, await answer.json()

        status, _ = await post({"amount_minor": 100}, {"X-Payd-Operator": "alice"})
        assert status == 401
        status, answer = await post({"amount_minor": "a lot"}, headers)
        assert status == 400 and "$.amount_minor" in answer["error"]
        status, answer = await post({"subscription_action": "delete"}, headers)
        assert status == 400 and "$.subscription_action" in answer["error"]
        status, answer = await post({"amount_minor": 100}, await _admin_headers())
        assert status == 400 and "operator" in answer["error"]
        # A name the audit row cannot hold as written: refused up front, never a 500.
        status, answer = await post({"amount_minor": 100, "operator": "bob\u0007"}, await _admin_headers())
        assert status == 400 and "printable ASCII" in answer["error"]
        status, answer = await post({"amount_minor": 100}, {**headers, "X-Payd-Operator": "\u00e5sa"})
        assert status == 400 and "printable ASCII" in answer["error"]
        status, answer = await post({"amount_minor": 1001}, headers)
        assert (status, answer) == (
            409,
            {"error": "1001 is not within what remains of charge renew:701:1:0: 1000 EUR"},
        )
        async with http.post(url.replace("renew:701:1:0", "no-such"), json={}, headers=headers) as missing:
            assert missing.status == 404
        assert await query(db, "SELECT COUNT(*) FROM reversals") == [(0,)], "nothing was published"

        status, answer = await post({"reason": "wrong plan", "subscription_action": "cancel"}, headers)
        assert status == 202, answer
        assert answer == {
            "idempotency_key": "refund:renew:701:1:0:1",
            "original_idempotency_key": "renew:701:1:0",
            "amount_minor": 1000,
            "currency": "EUR",
            "remaining_after_minor": 0,
            "subscription_action": "cancel",
            "operator": "alice",
        }
        assert await wait_reversals(db, ["refund:renew:701:1:0:1"]) == {"refund:renew:701:1:0:1": "succeeded"}
        async with http.get(
            f"http://127.0.0.1:{daemon.port}/admin/attempts/renew:701:1:0", headers=headers
        ) as shown:
            story = await shown.json()
    assert net_by_key(await sandbox.ledger()) == {"renew:701:1:0": (1000, 0)}
    assert (await subscription_states(db))[701][0] == "canceled"
    [action] = story["operator_actions"]
    assert (action["action"], action["operator"]) == ("refund", "alice")
    assert action["via"].startswith("control:")
    assert (
        action["reason"]
        == "refund refund:renew:701:1:0:1 of 1000 EUR, then cancel its subscription: wrong plan"
    )
    assert [(r["idempotency_key"], r["state"], r["subscription_action"]) for r in story["reversals"]] == [
        ("refund:renew:701:1:0:1", "succeeded", "cancel")
    ]


async def test_an_unconfirmed_admin_refund_names_its_key_and_asking_again_with_it_is_one_refund(
    db: aiomysql.Pool,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    private_broker: PrivateRabbitMQ,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker raises a resource alarm (it blocks publishers and confirms nothing): the route
    does not wait past its confirm bound and answers 503 with the refund's key, not a 500 after
    the admin timeout. Asked again with that ``refund_key`` once the alarm clears: 202 with the
    same key, whether or not the first publish got through; once the daemon holds it, again 202
    with the same key (nothing published); the key with another amount: 409. One refund in the
    ledger. The broker is a private node: its alarm blocks nobody else."""
    # Past the admin guard's 5 s timeout: the refund route is bounded by its own steps instead,
    # so the answer is the 503 naming the key, not the guard's 500.
    monkeypatch.setattr(refund_module, "PUBLISH_CONFIRM_S", 7.0)
    url = f"amqp://payd:{private_broker.password}@127.0.0.1:{private_broker.port}/"
    broker = await reset_broker(url)
    headers = {**await _admin_headers(), "X-Payd-Operator": "alice"}
    rabbitmq = {"url": f"amqp://payd@127.0.0.1:{private_broker.port}/", "prefetch": 100}
    try:
        async with daemons.in_process(rabbitmq=rabbitmq) as daemon, aiohttp.ClientSession() as http:
            await charged(db, broker, request("ch-unconfirmed"))
            url_ = f"http://127.0.0.1:{daemon.port}/admin/attempts/ch-unconfirmed/refund"

            async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                async with http.post(url_, json=body, headers=headers) as answer:
                    return answer.status, await answer.json()

            # https://www.rabbitmq.com/docs/memory#configuring-threshold: 0 sets the memory
            # alarm off at once, which blocks every publishing connection.
            await asyncio.to_thread(private_broker.ctl, "set_vm_memory_high_watermark", "0")
            try:
                status, answer = await post({"amount_minor": 400})
            finally:
                await asyncio.to_thread(private_broker.ctl, "set_vm_memory_high_watermark", "0.4")
            assert status == 503, answer
            assert answer["idempotency_key"] == "refund:ch-unconfirmed:1"
            assert "ask again with the same refund key" in answer["error"]

            again = {"amount_minor": 400, "refund_key": "refund:ch-unconfirmed:1"}
            status, answer = await post(again)
            assert (status, answer["idempotency_key"]) == (202, "refund:ch-unconfirmed:1"), answer
            assert await wait_reversals(db, ["refund:ch-unconfirmed:1"]) == {
                "refund:ch-unconfirmed:1": "succeeded"
            }
            status, answer = await post(again)
            assert status == 202, answer
            assert (answer["idempotency_key"], answer["amount_minor"], answer["remaining_after_minor"]) == (
                "refund:ch-unconfirmed:1",
                400,
                600,
            )
            status, answer = await post({"amount_minor": 300, "refund_key": "refund:ch-unconfirmed:1"})
            assert status == 409 and "already names a refund of 400" in answer["error"], answer
    finally:
        await broker.connection.close()
    assert net_by_key(await sandbox.ledger()) == {"ch-unconfirmed": (400, 600)}
    assert await query(db, "SELECT COUNT(*) FROM reversals") == [(1,)]


def _subscription(status: SubscriptionStatus) -> Subscription:
    return Subscription(
        id=9,
        status=status,
        plan=None,
        provider="sandbox",
        payment_method="pm_ok",
        card_brand=None,
        customer_ref=None,
        amount_minor=1000,
        currency="EUR",
        interval_unit=IntervalUnit("month"),
        interval_count=1,
        paid_cycle=3,
        billing_anchor=None,
        anchor_cycle=0,
        current_period_end=None,
        next_attempt_at=datetime(2030, 1, 1, tzinfo=UTC),
        pending_key="renew:9:4:0",
        next_try=1,
        dunning_step=1,
        status_reason=None,
        deferred_by="visa_15",
        deferred_until=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_the_lifecycle_moves_a_subscription_for_a_full_refund_from_every_status() -> None:
    """Cancel from active, past_due and paused; pause from active and past_due. Each stops all
    scheduling and says why; a canceled subscription (either action) and a paused one (pause)
    are left unchanged, with no event."""
    reason = "refunded: rf refunded charge renew:9:3:0"
    expected = {
        (SubscriptionAction.CANCEL, SubscriptionStatus.ACTIVE): ChangeKind.CANCELED,
        (SubscriptionAction.CANCEL, SubscriptionStatus.PAST_DUE): ChangeKind.CANCELED,
        (SubscriptionAction.CANCEL, SubscriptionStatus.PAUSED): ChangeKind.CANCELED,
        (SubscriptionAction.CANCEL, SubscriptionStatus.CANCELED): None,
        (SubscriptionAction.PAUSE, SubscriptionStatus.ACTIVE): ChangeKind.PAUSED,
        (SubscriptionAction.PAUSE, SubscriptionStatus.PAST_DUE): ChangeKind.PAUSED,
        (SubscriptionAction.PAUSE, SubscriptionStatus.PAUSED): None,
        (SubscriptionAction.PAUSE, SubscriptionStatus.CANCELED): None,
    }
    for (action, status), kind in expected.items():
        sub = _subscription(status)
        change = refunded(sub, action, key="rf", reason=reason)
        if kind is None:
            assert change is None and sub == _subscription(status), (action, status)
            continue
        assert change is not None, (action, status)
        assert (change.kind, change.status_before, change.idempotency_key, change.reason) == (
            kind,
            status,
            "rf",
            reason,
        )
        after = (
            SubscriptionStatus.CANCELED if action is SubscriptionAction.CANCEL else SubscriptionStatus.PAUSED
        )
        assert (sub.status, sub.status_reason) == (after, reason)
        assert (sub.next_attempt_at, sub.pending_key, sub.deferred_by, sub.deferred_until) == (None,) * 4
        assert sub.paid_cycle == 3, "a refund does not unpay the cycle"
