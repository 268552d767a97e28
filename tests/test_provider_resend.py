"""Reconciliation re-sends an unknown attempt only inside the provider's idempotency guarantee.

Each test runs a real daemon against the sandbox's face of one provider, makes an
attempt unknown in a way where the provider may have processed it, then moves the
attempt's claim time back (the only clock the reconciler reads) to put it inside or
outside the provider's key retention, and counts the requests the gateway saw:

- Stripe prunes keys "once they are at least 24 hours old" (docs.stripe.com/api/
  idempotent_requests): re-sent within a day, never after.
- Adyen keeps keys "for a minimum period of 7 days after first submission"
  (docs.adyen.com/development-resources/api-idempotency): re-sent within a week, never after.
- Checkout.com caches a key only after a 2xx (tests/test_provider_checkout.py) and iyzico
  keeps none (tests/test_provider_iyzico.py): never re-sent.

The reconciler stops at 90 % of a retention, so "inside" is well inside and "outside" past it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import aiomysql
import pytest

from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_STRIPE_API_KEY", "sk_test_payd4sandbox")
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", "test_adyen_key_not_a_real_one")


def _connection(sandbox: Sandbox, kind: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"merchant_account": "PaydTestMerchant"} if kind == "adyen" else {}
    return {
        "kind": kind,
        "base_url": f"{sandbox.url}/{kind}",
        "max_in_flight": 5,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
        **extra,
    }


# kind, token that leaves the attempt unknown, gateway account, hours back, re-sent?
CASES = [
    pytest.param("stripe", "pm_error", "stripe", 2, True, id="stripe-within-24h"),
    pytest.param("stripe", "pm_error", "stripe", 23, False, id="stripe-past-90%-of-24h"),
    pytest.param("adyen", "pm_adyen_server_error", "PaydTestMerchant", 24, True, id="adyen-within-7d"),
    pytest.param("adyen", "pm_adyen_server_error", "PaydTestMerchant", 8 * 24, False, id="adyen-after-7d"),
]


@pytest.mark.parametrize(("kind", "token", "account", "hours_ago", "resent"), CASES)
async def test_an_unknown_attempt_is_resent_only_while_the_provider_keeps_its_key(
    db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    kind: str,
    token: str,
    account: str,
    hours_ago: int,
    resent: bool,
) -> None:
    """An attempt left unknown by a 500 is re-sent under its key while the provider still
    keeps that key, and never once the key may be gone; then it is parked for an operator
    with the reason (it used to stay unknown, asked about for ever). At most one charge."""
    key = f"resend-{kind}-{hours_ago}"
    body = request(key, payment_method=token, subscription_id=6100 + hours_ago, customer_ref="cus_payd")
    body |= {"provider": kind}
    # resend_after_s holds re-sends back until the claim time has been moved.
    pipeline = {"resend_after_s": 3600, "reconcile_backoff_s": [0.3]}
    async with daemons.in_process(**{f"providers__{kind}": _connection(sandbox, kind)}, pipeline=pipeline):
        await broker.publish([body])

        async def tries() -> int:
            rows = await query(
                db, "SELECT state, reconcile_tries FROM attempts WHERE idempotency_key = %s", key
            )
            return int(rows[0][1]) if rows and rows[0][0] == "unknown" else -1

        async def unknown_and_asked() -> bool:
            return await tries() >= 1

        await eventually(unknown_and_asked, timeout=30, what="the attempt unknown and looked at once")
        await query(
            db,
            "UPDATE attempts SET claimed_at = claimed_at - INTERVAL %s HOUR WHERE idempotency_key = %s",
            hours_ago,
            key,
        )
        before = await tries()

        async def parked() -> str | None:
            rows = await query(
                db,
                "SELECT reconcile_error FROM attempts WHERE idempotency_key = %s AND parked_at IS NOT NULL",
                key,
            )
            return str(rows[0][0]) if rows else None

        async def decided() -> bool:
            requests = (await sandbox.stats())["accounts"][account]["requests"]
            return requests >= 2 or await parked() is not None or await tries() >= before + 3

        await eventually(decided, timeout=30, what="a re-send, a parked attempt or three more passes")
    requests = (await sandbox.stats())["accounts"][account]["requests"]
    assert (requests >= 2) is resent, f"{requests} requests at the gateway"
    if not resent:
        # No unknown without an exit: past the key's lifetime nothing the provider says can
        # settle it, so it waits for an operator with the reason, not for ever in silence.
        reason = await parked()
        assert reason is not None and "settle by hand" in reason, reason
    await sandbox.assert_no_double_charge()


async def test_a_replayed_answer_that_cannot_settle_is_parked_for_an_operator(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Adyen ``Pending`` is not final, but Adyen reports the outcome by webhook only and a resend
    under the same key replays ``Pending`` (docs.adyen.com/development-resources/api-idempotency:
    "the response to the first attempt will be returned"). The attempt is parked after the
    first resend, with the reason and ``payd_reconciled_total{result="needs_operator"}``,
    instead of being re-sent for a week; one charge at the gateway."""
    key = "resend-adyen-pending"
    body = request(key, payment_method="pm_adyen_pending", subscription_id=6301, customer_ref="cus_payd")
    body |= {"provider": "adyen"}
    pipeline = {"resend_after_s": 0, "reconcile_backoff_s": [0.2]}
    async with daemons.in_process(
        providers__adyen=_connection(sandbox, "adyen"), pipeline=pipeline
    ) as daemon:
        await broker.publish([body])

        async def parked() -> bool:
            rows = await query(db, "SELECT parked_at FROM attempts WHERE idempotency_key = %s", key)
            return bool(rows) and rows[0][0] is not None

        await eventually(parked, timeout=30, what="the attempt parked for an operator")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
        ):
            metrics = await response.text()
    [(state, reason)] = await query(
        db, "SELECT state, reconcile_error FROM attempts WHERE idempotency_key = %s", key
    )
    assert state == "unknown" and reason.startswith("Pending")
    assert 'payd_reconciled_total{result="needs_operator"} 1.0' in metrics
    assert [c["status"] for c in await sandbox.ledger()] == ["approved"]
