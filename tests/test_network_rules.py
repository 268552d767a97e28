"""Card-network retry rules as the networks publish them, against real MariaDB (and the daemon).

The expectations come from the rules' own wording, as cited in
``daemon/subscriptions/networks.py``:

- Visa excessive reattempts: a declined transaction may be reattempted at
  most 15 times in 30 days (20 under the 2025 revision), per card, amount and
  currency; never after a category-1 decline (Payvision, "New Visa fees for
  declined transactions reattempts", 2021; Checkout.com support, "When can I
  retry a declined transaction").
- Mastercard excessive authorization attempts: at most 10 declines in 24 hours
  and 35 in 30 days on the same card; never after MAC 03 or 21 (Checkout.com,
  same article; Braintree, "Mastercard Networks", 2023 updates).

Time is not waited for: history is written with ``created_at`` in the past,
and "the window moves on" is an UPDATE of those timestamps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import aiomysql
import msgspec
import pytest

from daemon.config import ConfigError, parse_config
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.storage.attempts import Record, claim_attempts, record_outcomes
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.scheduler import BatchResult, RenewalScheduler
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query
from tests.test_subscriptions import (
    DUNNING,
    SUBSCRIPTIONS,
    add_subscriptions,
    sched_pool,  # noqa: F401 (a fixture, used by name)
    sections,
    settings,
    subscription_events,
)

DAY = 86400
VISA_2026 = '[subscriptions.retry_budget]\nvisa_rule = "2026"\n'
PROVIDER = '[providers.sandbox]\nkind = "sandbox"\nbase_url = "http://127.0.0.1:1"\nmax_in_flight = 1\n'
_STATE = {
    "approved": "succeeded",
    "soft_decline": "declined",
    "hard_decline": "declined",
    "provider_error": "failed",
    "rate_limited": "failed",
    "unknown": "unknown",
    None: "queued",
}
_keys = itertools.count()


async def add_attempts(
    pool: aiomysql.Pool, method: str, outcome: str | None, ago_s: Sequence[float], *, amount: int
) -> None:
    """Attempts on ``method`` elsewhere (another PSP, one-off charges), ``ago_s`` seconds ago each."""
    values: list[Any] = []
    for seconds in ago_s:
        values += [f"hist-{next(_keys)}", amount, method, _STATE[outcome], outcome, int(seconds * 1e6)]
    row = "(%s, 'other_psp', %s, 'EUR', %s, %s, %s, NOW(6) - INTERVAL %s MICROSECOND)"
    await query(
        pool,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, state, "
        "outcome, created_at) VALUES " + ", ".join([row] * len(ago_s)),
        *values,
    )


async def rows(pool: aiomysql.Pool) -> dict[int, dict[str, Any]]:
    columns = ("id", "status", "next_attempt_at", "deferred_by", "deferred_until", "pending_key", "now")
    found = await query(
        pool,
        f"SELECT {', '.join(columns[:-1])}, NOW(6) FROM subscriptions",
    )
    return {row[0]: dict(zip(columns, row, strict=True)) for row in found}


async def outbox_events(pool: aiomysql.Pool, event_type: str) -> dict[int, list[dict[str, Any]]]:
    found = await query(pool, "SELECT payload FROM outbox WHERE routing_key = %s ORDER BY id", event_type)
    events: dict[int, list[dict[str, Any]]] = {}
    for (payload,) in found:
        event = msgspec.json.decode(payload)
        events.setdefault(event["subscription_id"], []).append(event)
    return events


async def one_pass(pool: aiomysql.Pool, **budget: Any) -> BatchResult:
    config = settings(retry_budget={"pending_recheck_s": 30, **budget})
    scheduler = RenewalScheduler(
        pool=pool, settings=config, policy=SubscriptionPolicy(config), providers={"sandbox"}
    )
    return await scheduler.run_pass()


def near(moment: Any, expected: Any) -> bool:
    return bool(abs(moment - expected) < timedelta(minutes=1))


@pytest.mark.parametrize(("visa_rule", "limit"), [("2021", 15), ("2026", 20)])
async def test_visa_refuses_the_reattempt_after_the_limit_and_nothing_else(
    db: aiomysql.Pool,
    sched_pool: aiomysql.Pool,  # noqa: F811 (the fixture imported above)
    visa_rule: str,
    limit: int,
) -> None:
    """Visa: a transaction declined once and reattempted ``limit`` times, all declined, within
    30 days: the next reattempt is deferred (not dropped) to when the oldest decline leaves the
    window, the subscription stays past due, the event and the row say by which rule and until
    when; an approval in between resets nothing. With one reattempt fewer, the last allowed one
    goes. Declines of another amount on the same card, and attempts that never reached the issuer,
    are not reattempts of this transaction. When the window has moved on, the deferred try goes."""
    specs = [(1, "pm_v1", "visa"), (2, "pm_v2", "visa"), (3, "pm_v3", "visa"), (4, "pm_v4", "visa")]
    await add_subscriptions(db, specs, status="past_due")
    # Subscription n bills 1000 + n EUR (add_subscriptions): the same amount is the same transaction.
    reattempts = [(19 - i * 18 / limit) * DAY for i in range(limit)]
    await add_attempts(db, "pm_v1", "soft_decline", [20 * DAY, *reattempts], amount=1001)
    await add_attempts(db, "pm_v1", "approved", [5 * DAY], amount=1001)
    await add_attempts(db, "pm_v2", "soft_decline", [20 * DAY, *reattempts[1:]], amount=1002)
    await add_attempts(db, "pm_v3", "soft_decline", [20 * DAY, *reattempts], amount=500)
    await add_attempts(db, "pm_v4", "soft_decline", [20 * DAY], amount=1004)
    await add_attempts(db, "pm_v4", "provider_error", [DAY] * 20, amount=1004)
    await add_attempts(db, "pm_v4", "rate_limited", [DAY] * 20, amount=1004)

    result = await one_pass(sched_pool, visa_rule=visa_rule)
    assert (result.dispatched, result.deferred) == (3, 1)
    assert result.deferred_by == {"visa_reattempts_30d": 1}
    subs = await rows(db)
    first = subs[1]
    assert (first["status"], first["deferred_by"], first["pending_key"]) == (
        "past_due",
        "visa_reattempts_30d",
        None,
    )
    assert first["next_attempt_at"] == first["deferred_until"]
    assert near(first["deferred_until"], first["now"] + timedelta(days=10)), "the oldest decline + 30 days"
    assert await query(db, "SELECT COUNT(*) FROM attempts WHERE subscription_id = 1") == [(0,)]
    (event,) = (await outbox_events(db, "subscription.retry_deferred"))[1]
    assert event["deferred_by"] == "visa_reattempts_30d"
    assert event["idempotency_key"] == "renew:1:1:0"
    assert event["retry_at"] == first["deferred_until"].isoformat(timespec="microseconds") + "Z"
    assert f"{limit} declined reattempts" in event["reason"]
    for sid in (2, 3, 4):
        assert subs[sid]["pending_key"] == f"renew:{sid}:1:0" and subs[sid]["deferred_by"] is None

    # Eleven days on: the first decline and the first reattempt have left the window.
    await query(
        db, "UPDATE attempts SET created_at = created_at - INTERVAL 11 DAY WHERE payment_method = 'pm_v1'"
    )
    await query(db, "UPDATE subscriptions SET next_attempt_at = NOW(6) - INTERVAL 1 SECOND WHERE id = 1")
    assert (await one_pass(sched_pool, visa_rule=visa_rule)).dispatched == 1
    first = (await rows(db))[1]
    assert (first["pending_key"], first["deferred_by"], first["deferred_until"]) == (
        "renew:1:1:0",
        None,
        None,
    )


async def test_mastercard_defers_the_11th_decline_in_a_day_and_the_36th_in_30_days(
    db: aiomysql.Pool,
    sched_pool: aiomysql.Pool,  # noqa: F811 (the fixture imported above)
) -> None:
    """Mastercard counts every decline on the card, whatever the amount: after 10 in 24 hours the
    next try waits until the oldest is a day old; after 35 in 30 days, until it is 30 days old.
    Nine (or 34) leave room for one more, approvals never count. A card of unknown brand is held
    to Mastercard's rules too. Tries still under way count as the declines they may become: with
    nine in flight, one more goes and the next waits for them to settle."""
    specs = [
        (1, "pm_m1", "mastercard"),
        (2, "pm_m2", "mastercard"),
        (3, "pm_m3", "mastercard"),
        (4, "pm_m4", "mastercard"),
        (5, "pm_u1", None),
        (6, "pm_m5", "mastercard"),
        (7, "pm_m5", "mastercard"),
    ]
    await add_subscriptions(db, specs)
    day = [3600 * (23 - i * 2) for i in range(10)]  # 23 h ago down to 5 h ago
    month = [DAY * (29 - i * 27 / 35) for i in range(35)]  # 29 days ago down to 2 days ago
    await add_attempts(db, "pm_m1", "soft_decline", day, amount=700)
    await add_attempts(db, "pm_m2", "soft_decline", day[1:], amount=700)
    await add_attempts(db, "pm_m2", "approved", [3600] * 20, amount=700)
    await add_attempts(db, "pm_m3", "hard_decline", month, amount=900)
    await add_attempts(db, "pm_m4", "hard_decline", month[1:], amount=900)
    await add_attempts(db, "pm_u1", "soft_decline", day, amount=1005)
    await add_attempts(db, "pm_m5", None, [60] * 9, amount=800)

    result = await one_pass(sched_pool)
    assert result.deferred_by == {"mastercard_declines_24h": 3, "mastercard_declines_30d": 1}
    assert result.dispatched == 3
    subs = await rows(db)
    now = subs[1]["now"]
    assert subs[1]["deferred_by"] == "mastercard_declines_24h"
    assert near(subs[1]["deferred_until"], now + timedelta(hours=1)), "23 h old: leaves the day in 1 h"
    assert subs[3]["deferred_by"] == "mastercard_declines_30d"
    assert near(subs[3]["deferred_until"], now + timedelta(days=1)), "29 days old: leaves in 1 day"
    assert subs[5]["deferred_by"] == "mastercard_declines_24h"
    assert near(subs[7]["deferred_until"], now + timedelta(seconds=30)), "pending_recheck_s"
    for sid in (2, 4, 6):
        assert subs[sid]["pending_key"] == f"renew:{sid}:1:0"
    assert subs[7]["deferred_by"] == "mastercard_declines_24h"


async def test_category_1_and_mac_03_21_are_never_retried(
    db: aiomysql.Pool,
    sched_pool: aiomysql.Pool,  # noqa: F811 (the fixture imported above)
) -> None:
    """Declines that Visa puts in category 1 (04 pick up, 14 invalid account, 46 closed) and
    Mastercard's merchant advice codes 03 (do not try again) and 21 (payment cancelled) end
    dunning at once, even as soft declines and with retries left in the schedule; kept past
    due rather than canceled, no later pass dispatches them again. A plain soft decline on the
    same schedule is retried."""
    policy_settings = settings(dunning={**DUNNING, "on_hard_decline": "past_due"})
    codes = {
        1: "visa:04",
        2: "visa:14",
        3: "VISA:46",
        4: "mastercard:mac_03",
        5: "mastercard:mac_21",
        6: None,
    }
    brands = {1: "visa", 2: "visa", 3: "visa", 4: "mastercard", 5: "mastercard", 6: "mastercard"}
    await add_subscriptions(db, [(sid, f"pm_code_{sid}", brand) for sid, brand in brands.items()])
    scheduler = RenewalScheduler(
        pool=sched_pool,
        settings=policy_settings,
        policy=SubscriptionPolicy(policy_settings),
        providers={"sandbox"},
    )
    await scheduler.run_pass()
    payloads = await query(db, "SELECT payload FROM outbox WHERE target = 'attempts'")
    requests = [msgspec.json.decode(payload, type=AttemptRequest) for (payload,) in payloads]
    claim = await claim_attempts(sched_pool, requests, claimed_by="test", lease_s=30)
    await record_outcomes(
        sched_pool,
        [
            Record(
                attempt_id=claim.claimed[r.idempotency_key],
                request=r,
                result=ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code=codes[r.subscription_id or 0]),
                tries=1,
            )
            for r in requests
        ],
        unknown_recheck_s=1,
        policy=SubscriptionPolicy(policy_settings),
    )
    await query(db, "UPDATE subscriptions SET next_attempt_at = NOW(6) WHERE next_attempt_at IS NOT NULL")
    again = await scheduler.run_pass()
    assert again.dispatched == 1
    history = dict(await query(db, "SELECT subscription_id, COUNT(*) FROM attempts GROUP BY subscription_id"))
    assert history == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2}
    subs = await rows(db)
    for sid in range(1, 6):
        assert (subs[sid]["status"], subs[sid]["next_attempt_at"]) == ("past_due", None)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            f"[subscriptions.dunning]\nschedule_s = {[DAY] * 16}\n",
            "subscriptions.dunning.schedule_s: 16 retries within 30 days exceed 15, "
            "the most retry_budget.visa allows",
        ),
        (
            VISA_2026 + f"[subscriptions.dunning]\nschedule_s = {[DAY] * 21}\n",
            "subscriptions.dunning.schedule_s: 21 retries within 30 days exceed 20",
        ),
        (
            f"[subscriptions.dunning]\nschedule_s = {[600] * 10}\n",
            "subscriptions.dunning.schedule_s: 11 declined tries within 24 hours exceed 10, "
            "the most retry_budget.mastercard_daily allows",
        ),
        (
            f"[subscriptions.dunning.plans.gold]\nschedule_s = {[7200] * 12}\n",
            "subscriptions.dunning.plans.gold.schedule_s: 12 declined tries within 24 hours exceed 10",
        ),
        (
            "[subscriptions.retry_budget]\nmastercard = 5\n"
            f"[subscriptions.dunning]\nschedule_s = {[DAY] * 5}\n",
            "subscriptions.dunning.schedule_s: 6 declined tries within 30 days exceed 5, "
            "the most retry_budget.mastercard allows",
        ),
    ],
)
def test_a_schedule_over_a_network_limit_is_a_configuration_error(toml: str, message: str) -> None:
    """A dunning schedule that by itself would make more declined tries than a rule allows is
    refused at load, naming the schedule's key and the limit's key."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(PROVIDER + toml)


def test_schedules_at_the_limits_are_accepted() -> None:
    """Exactly at a limit is allowed: 15 daily retries (Visa 2021), 20 under the 2026 rule, nine
    retries in a day (ten declines, Mastercard), and the default schedule."""
    parse_config(PROVIDER + f"[subscriptions.dunning]\nschedule_s = {[DAY] * 15}\n")
    parse_config(PROVIDER + VISA_2026 + f"[subscriptions.dunning]\nschedule_s = {[DAY] * 20}\n")
    parse_config(PROVIDER + f"[subscriptions.dunning]\nschedule_s = {[600] * 9}\n")
    parse_config(PROVIDER)


async def test_one_card_paying_forty_subscriptions_renews_them_all(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A business card paying 40 subscriptions (Visa, after 20 approved charges this month), and a
    family Mastercard paying 40 more, all due at once: every renewal is dispatched and charged,
    none refused by payd. Approvals are not what the networks count. The Mastercard renewals go
    at most ten under way at a time (they could all be declines), the rest deferred until those
    settle, then charged."""
    await sandbox.behave(mix={"approve": 1})
    await add_attempts(db, "pm_ok", "approved", [DAY * (i + 1) for i in range(20)], amount=999)
    await add_subscriptions(db, [(sid, "pm_ok", "visa") for sid in range(1, 41)])
    await add_subscriptions(db, [(sid, "pm_family_card", "mastercard") for sid in range(41, 81)])
    await broker.follow_events()
    config = sections(
        subscriptions={**SUBSCRIPTIONS, "batch_size": 100},
        subscriptions__retry_budget={"pending_recheck_s": 0.2},
    )
    async with daemons.in_process(**config):

        async def all_paid() -> bool:
            paid = await query(db, "SELECT COUNT(*) FROM subscriptions WHERE paid_cycle = 1")
            return paid == [(80,)]

        await eventually(all_paid, timeout=90, what="all 80 renewals paid")

        async def all_announced() -> bool:
            renewed = [e for e in broker.events if e["type"] == "subscription.renewed"]
            return len({e["subscription_id"] for e in renewed}) == 80

        await eventually(all_announced, timeout=60, what="the 80 subscription.renewed events")
    charged = {c["merchant_reference"] for c in await sandbox.assert_no_double_charge()}
    assert charged == {f"{sid}:1" for sid in range(1, 81)}
    events = subscription_events(broker)
    assert all(
        not any(e["type"] == "subscription.retry_deferred" for e in events[sid]) for sid in range(1, 41)
    )
    deferred = await query(db, "SELECT COUNT(*) FROM subscriptions WHERE deferred_by IS NOT NULL")
    assert deferred == [(0,)], "a paid cycle clears its deferral"
    held = [
        sid for sid in range(41, 81) if any(e["type"] == "subscription.retry_deferred" for e in events[sid])
    ]
    assert len(held) >= 30, "the first batch sent ten family-card renewals and deferred the rest"
    spans = await query(
        db, "SELECT created_at, finished_at FROM attempts WHERE payment_method = 'pm_family_card'"
    )
    most = max(sum(1 for c, f in spans if c <= start < f) for start, _ in spans)
    assert most <= 10, "never more family-card tries under way than Mastercard's daily decline limit"
