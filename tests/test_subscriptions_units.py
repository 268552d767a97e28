"""The subscription rules as pure functions: periods, transitions, policy, config, pacing, rows."""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import pytest

from daemon.config import ConfigError, SubscriptionSettings, parse_config
from daemon.models import AttemptRequest, AttemptState, ChargeResult, Outcome
from daemon.subscriptions.importer import FileProblem, ImportRow, read_csv, read_json_lines
from daemon.subscriptions.lifecycle import settle_outcome, stop
from daemon.subscriptions.model import ChangeKind, Subscription, SubscriptionStatus
from daemon.subscriptions.periods import IntervalUnit, add_months, period_end, spread
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.tokenbucket import TokenBucket

NOW = datetime(2026, 3, 10, 12, 0, 0)
PROVIDER = '[providers.sandbox]\nkind = "sandbox"\nbase_url = "http://127.0.0.1:1"\nmax_in_flight = 1\n'


def policy(**dunning: object) -> SubscriptionPolicy:
    import msgspec  # noqa: PLC0415

    settings = msgspec.convert(
        {"renewal_jitter_s": 0, "dunning": {"schedule_s": [60, 120], "retry_jitter_s": 0, **dunning}},
        SubscriptionSettings,
    )
    return SubscriptionPolicy(settings)


def subscription(**changes: object) -> Subscription:
    values: dict[str, object] = {
        "id": 7,
        "status": SubscriptionStatus.ACTIVE,
        "plan": None,
        "provider": "sandbox",
        "payment_method": "pm_x",
        "card_brand": "visa",
        "customer_ref": None,
        "amount_minor": 999,
        "currency": "EUR",
        "interval_unit": IntervalUnit.MONTH,
        "interval_count": 1,
        "paid_cycle": 2,
        "billing_anchor": datetime(2026, 1, 31),
        "anchor_cycle": 0,
        "current_period_end": datetime(2026, 3, 31),
        "next_attempt_at": datetime(2026, 3, 31),
        "pending_key": "renew:7:3:0",
        "next_try": 1,
        "dunning_step": 0,
        "status_reason": None,
    }
    values.update(changes)
    return Subscription(**values)  # type: ignore[arg-type]


def request(key: str = "renew:7:3:0", cycle: int = 3) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=key,
        subscription_id=7,
        cycle=cycle,
        amount_minor=999,
        currency="EUR",
        provider="sandbox",
        payment_method="pm_x",
    )


SOFT = ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="insufficient_funds")
HARD = ChargeResult(outcome=Outcome.HARD_DECLINE, decline_code="stolen_card")
APPROVED = ChargeResult(outcome=Outcome.APPROVED, provider_ref="ch_1")


# -- periods ---------------------------------------------------------------------


def test_month_end_anchors_keep_their_day() -> None:
    """Counting from the anchor: Jan 31 renews Feb 28, Mar 31, Apr 30, not drifting to the 28th."""
    anchor = datetime(2026, 1, 31, 9, 30)
    ends = [period_end(anchor, 0, c, IntervalUnit.MONTH, 1) for c in range(1, 5)]
    assert [e.date().isoformat() for e in ends] == ["2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]
    assert add_months(datetime(2024, 1, 31), 1) == datetime(2024, 2, 29)
    assert period_end(anchor, 0, 2, IntervalUnit.WEEK, 2) == anchor + timedelta(weeks=4)
    assert period_end(anchor, 0, 1, IntervalUnit.YEAR, 1) == datetime(2027, 1, 31, 9, 30)


def test_spread_is_stable_bounded_and_spreads() -> None:
    """The jitter of a due time is the same on every computation, below the window, and spread."""
    offsets = [spread(i, 1, "renewal", 3600).total_seconds() for i in range(2000)]
    assert all(0 <= o < 3600 for o in offsets)
    assert spread(5, 1, "renewal", 3600) == spread(5, 1, "renewal", 3600)
    buckets = {int(o // 360) for o in offsets}
    assert buckets == set(range(10)), "2000 subscriptions fill every tenth of the window"
    assert spread(5, 1, "renewal", 0) == timedelta(0)


# -- lifecycle -------------------------------------------------------------------


def test_success_advances_the_period_and_schedules_the_next_renewal() -> None:
    sub = subscription()
    change = settle_outcome(sub, request(), AttemptState.SUCCEEDED, APPROVED, now=NOW, policy=policy())
    assert change is not None and change.kind is ChangeKind.RENEWED
    assert (sub.paid_cycle, sub.status) == (3, SubscriptionStatus.ACTIVE)
    assert sub.current_period_end == datetime(2026, 4, 30)
    assert sub.next_attempt_at == datetime(2026, 4, 30)
    assert (sub.pending_key, sub.next_try, sub.dunning_step) == (None, 0, 0)


def test_a_late_recovery_restarts_the_period_instead_of_charging_missed_ones() -> None:
    """Paid after its period ended: the paid cycle starts now, so no burst of catch-up renewals."""
    sub = subscription(status=SubscriptionStatus.PAST_DUE, dunning_step=2)
    late = datetime(2026, 5, 2)
    change = settle_outcome(sub, request(), AttemptState.SUCCEEDED, APPROVED, now=late, policy=policy())
    assert change is not None and change.kind is ChangeKind.RECOVERED
    assert sub.status is SubscriptionStatus.ACTIVE
    assert sub.current_period_end == datetime(2026, 6, 2)
    assert sub.next_attempt_at == datetime(2026, 6, 2)


def test_soft_declines_follow_the_schedule_then_stop() -> None:
    rules = policy(on_exhausted="past_due")
    sub = subscription()
    first = settle_outcome(sub, request(), AttemptState.DECLINED, SOFT, now=NOW, policy=rules)
    assert first is not None and first.kind is ChangeKind.PAST_DUE
    assert sub.next_attempt_at == NOW + timedelta(seconds=60)
    sub.pending_key = "renew:7:3:1"
    second = settle_outcome(sub, request("renew:7:3:1"), AttemptState.DECLINED, SOFT, now=NOW, policy=rules)
    assert second is not None and second.kind is ChangeKind.RETRY_SCHEDULED
    assert sub.next_attempt_at == NOW + timedelta(seconds=120)
    sub.pending_key = "renew:7:3:2"
    last = settle_outcome(sub, request("renew:7:3:2"), AttemptState.DECLINED, SOFT, now=NOW, policy=rules)
    assert last is not None and last.kind is ChangeKind.DUNNING_EXHAUSTED
    assert sub.status is SubscriptionStatus.PAST_DUE
    assert sub.next_attempt_at is None


def test_provider_advice_on_the_earliest_retry_is_honoured() -> None:
    sub = subscription()
    advice = ChargeResult(outcome=Outcome.SOFT_DECLINE, retry_after_s=86400)
    settle_outcome(sub, request(), AttemptState.DECLINED, advice, now=NOW, policy=policy())
    assert sub.next_attempt_at == NOW + timedelta(days=1)


@pytest.mark.parametrize(
    "result",
    [
        HARD,
        ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="visa:43"),
        ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="MASTERCARD:MAC_03"),
        ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="mastercard:mac_21"),
        ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="custom_never", retryable=True),
        ChargeResult(outcome=Outcome.SOFT_DECLINE, retryable=False),
    ],
)
def test_hard_declines_and_never_retry_codes_stop_at_once(result: ChargeResult) -> None:
    sub = subscription()
    rules = policy(do_not_retry_codes=["custom_never"])
    change = settle_outcome(sub, request(), AttemptState.DECLINED, result, now=NOW, policy=rules)
    assert change is not None and change.kind is ChangeKind.CANCELED
    assert (sub.status, sub.next_attempt_at, sub.dunning_step) == (SubscriptionStatus.CANCELED, None, 0)


def test_only_the_awaited_try_moves_a_subscription_but_any_payment_does() -> None:
    """A stale try's decline, or an unknown outcome, changes nothing; a checkout approval pays."""
    sub, rules = subscription(), policy()
    assert settle_outcome(sub, request("other"), AttemptState.DECLINED, SOFT, now=NOW, policy=rules) is None
    assert settle_outcome(sub, request(), AttemptState.UNKNOWN, SOFT, now=NOW, policy=rules) is None
    assert sub.pending_key == "renew:7:3:0" and sub.status is SubscriptionStatus.ACTIVE
    checkout = request("checkout-1")
    change = settle_outcome(sub, checkout, AttemptState.SUCCEEDED, APPROVED, now=NOW, policy=rules)
    assert change is not None and sub.paid_cycle == 3 and sub.pending_key is None


def test_nothing_charged_means_try_again_later_without_spending_a_dunning_step() -> None:
    sub = subscription()
    failed = ChargeResult(outcome=Outcome.PROVIDER_ERROR, reason="500")
    change = settle_outcome(sub, request(), AttemptState.FAILED, failed, now=NOW, policy=policy())
    assert change is not None and change.kind is ChangeKind.RETRY_SCHEDULED
    assert sub.dunning_step == 0 and sub.status is SubscriptionStatus.ACTIVE
    assert sub.next_attempt_at == NOW + timedelta(seconds=900)


def test_payments_for_paused_or_canceled_subscriptions_record_but_do_not_reactivate() -> None:
    paused = subscription(status=SubscriptionStatus.PAUSED)
    change = settle_outcome(paused, request(), AttemptState.SUCCEEDED, APPROVED, now=NOW, policy=policy())
    assert change is not None and change.kind is ChangeKind.RENEWED
    assert (paused.status, paused.paid_cycle, paused.next_attempt_at) == (SubscriptionStatus.PAUSED, 3, None)
    canceled = subscription(status=SubscriptionStatus.CANCELED)
    change = settle_outcome(canceled, request(), AttemptState.SUCCEEDED, APPROVED, now=NOW, policy=policy())
    assert change is not None and change.kind is ChangeKind.PAID_WHILE_CANCELED
    assert canceled.status is SubscriptionStatus.CANCELED


def test_stop_names_the_transition() -> None:
    assert stop(subscription(), SubscriptionStatus.PAST_DUE, key="k", reason="r").kind is ChangeKind.PAST_DUE
    past_due = subscription(status=SubscriptionStatus.PAST_DUE)
    exhausted = stop(past_due, SubscriptionStatus.PAST_DUE, key="k", reason="r")
    assert exhausted.kind is ChangeKind.DUNNING_EXHAUSTED


# -- policy and configuration ------------------------------------------------------


def test_plan_overrides_provider_overrides_default() -> None:
    config = parse_config(
        PROVIDER
        + "[subscriptions.dunning]\nschedule_s = [1, 2, 3]\n"
        + '[subscriptions.dunning.providers.sandbox]\nschedule_s = [5]\non_exhausted = "past_due"\n'
        + '[subscriptions.dunning.plans."gold-yearly"]\nschedule_s = [9, 9]\n'
    )
    rules = SubscriptionPolicy(config.subscriptions)
    assert rules.dunning_for(None, "other").schedule_s == (1, 2, 3)
    assert rules.dunning_for(None, "sandbox").schedule_s == (5,)
    gold = rules.dunning_for("gold-yearly", "sandbox")
    assert gold.schedule_s == (9, 9) and gold.on_exhausted is SubscriptionStatus.PAST_DUE


def test_network_limits_default_to_the_published_ones() -> None:
    """Visa 15 (20 under the 2026 rule), Mastercard 10 a day and 35 in 30 days; an unknown or
    other brand is held to every rule, since it may be either card."""
    rules = SubscriptionPolicy(SubscriptionSettings())

    def limits(brand: str | None) -> dict[str, int]:
        return {rule.name: rule.limit for rule in rules.rules_for(brand)}

    assert limits("visa") == {"visa_reattempts_30d": 15}
    assert limits("mastercard") == {"mastercard_declines_24h": 10, "mastercard_declines_30d": 35}
    assert limits(None) == limits("amex") == {**limits("visa"), **limits("mastercard")}
    config = parse_config(PROVIDER + '[subscriptions.retry_budget]\nvisa_rule = "2026"\nmastercard = 20\n')
    rules = SubscriptionPolicy(config.subscriptions)
    assert limits("visa") == {"visa_reattempts_30d": 20}
    assert limits("mastercard")["mastercard_declines_30d"] == 20


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[subscriptions.retry_budget]\nvisa = 16\n", "subscriptions.retry_budget.visa: 16 exceeds 15"),
        ('[subscriptions.retry_budget]\nvisa_rule = "2026"\nvisa = 21\n', "retry_budget.visa: 21 exceeds 20"),
        ("[subscriptions.retry_budget]\nmastercard = 36\n", "subscriptions.retry_budget.mastercard: 36"),
        ("[subscriptions.retry_budget]\nmastercard_daily = 11\n", "mastercard_daily: 11 exceeds 10"),
        ("[subscriptions.retry_budget]\nother = 15\n", "retry_budget: Object contains unknown field `other`"),
        ("[subscriptions.dunning.plans.gold]\nschedule_s = [1, -2]\n", "dunning.plans.gold.schedule_s"),
        ("[subscriptions.dunning.plans.gold]\nretries = 3\n", "subscriptions.dunning.plans.gold"),
        ("[subscriptions.dunning.providers.nope]\nschedule_s = [1]\n", "dunning.providers.nope: no provider"),
        ('[subscriptions.dunning]\non_exhausted = "paused"\n', "subscriptions.dunning.on_exhausted"),
        ("[subscriptions]\nbatch_size = 0\n", "subscriptions.batch_size"),
    ],
)
def test_configuration_errors_name_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        parse_config(PROVIDER + toml)


# -- pacing ----------------------------------------------------------------------


async def test_token_bucket_paces_to_the_rate() -> None:
    """Driven by a fake clock: a burst of one second's worth, then the rate."""
    clock = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    bucket = TokenBucket(100, clock=lambda: clock[0], sleep=sleep)
    assert await bucket.take(60) == 60
    assert await bucket.take(60) == 40
    assert await bucket.take(60) == 1 and slept == [pytest.approx(0.01)]
    bucket.give_back(1)
    clock[0] += 0.5
    assert await bucket.take(500) == 51
    taken = 0
    while clock[0] < 10.5:
        taken += await bucket.take(25)
    assert taken == pytest.approx(1000, abs=25), "about rate x elapsed"


# -- import rows -------------------------------------------------------------------

CSV = """id,provider,payment_method,amount_minor,currency,billing_anchor,interval_unit,card_brand,paid_cycle
1,sandbox,pm_ok,999,EUR,2026-01-31T00:00:00Z,month,visa,2
2,sandbox,pm_ok,-5,EUR,2026-01-31T00:00:00Z,month,visa,0
3,sandbox,4111 1111 1111 1111,999,EUR,2026-01-31,month,,0
4,sandbox,pm_ok,999,eur,2026-01-31,fortnight,,0
5,sandbox,pm_ok,999,EUR,2026-02-30,month,,0
6,sandbox,pm_ok,999,EUR,2026-01-31,month,,0,extra
"""


def test_csv_rows_are_validated_one_by_one_with_line_numbers() -> None:
    rows = dict(read_csv(io.StringIO(CSV)))
    assert isinstance(rows[2], ImportRow) and rows[2].paid_cycle == 2 and rows[2].card_brand == "visa"
    reasons = {line: row for line, row in rows.items() if isinstance(row, str)}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert reasons[3].startswith("amount_minor")
    assert "card number" in reasons[4] and "4111" not in reasons[4]
    assert reasons[5].startswith("currency")
    assert reasons[6].startswith("billing_anchor")
    assert "more fields" in reasons[7]


def test_csv_with_unknown_columns_is_refused_as_a_whole() -> None:
    with pytest.raises(FileProblem, match="ammount"):
        list(read_csv(io.StringIO("id,provider,ammount\n1,sandbox,5\n")))
    with pytest.raises(FileProblem, match="missing column"):
        list(read_csv(io.StringIO("id,provider\n1,sandbox\n")))


def test_json_lines_are_validated_one_by_one() -> None:
    text = (
        '{"id": 1, "provider": "sandbox", "payment_method": "pm_ok", "amount_minor": 5, "currency": "EUR",'
        ' "billing_anchor": "2026-01-01T00:00:00Z"}\n'
        "\n"
        "{not json\n"
        '{"id": "2", "provider": "sandbox"}\n'
        '{"id": 3, "provider": "sandbox", "payment_method": "pm_ok", "amount_minor": 5, "currency": "EUR",'
        ' "billing_anchor": "2026-01-01", "status": "canceled", "next_attempt_at": "2026-02-01"}\n'
    )
    rows = dict(read_json_lines(io.StringIO(text)))
    assert isinstance(rows[1], ImportRow)
    assert 2 not in rows
    assert str(rows[3]).startswith("not a JSON object")
    assert str(rows[4]).startswith("id: Expected `int`")
    assert "canceled subscription is not scheduled" in str(rows[5])
