"""Stored-credential chains: a renewal references the approved payment its chain continues.

Checkout.com asks every merchant-initiated payment after the first of a stored-credential
chain to name the previous one in ``previous_payment_id`` (checkout-sdk-python
``PaymentRequest.previous_payment_id``; Checkout.com docs, "Merchant-initiated
transactions" / stored credentials, Visa in particular). The sandbox's Checkout.com dialect
enforces it (422 ``previous_payment_id_required`` / ``_invalid``), so these tests fail the way
Checkout.com would if payd did not keep and send the chain.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiomysql
import pytest

from daemon.models import AttemptRequest, Outcome
from daemon.providers.checkout import transform
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query
from tests.test_provider_checkout import CHANNEL, SECRET_KEY, checkout, received
from tests.test_subscriptions_units import subscription


@pytest.fixture(autouse=True)
def secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_CHECKOUT_API_KEY", SECRET_KEY)


def renewal(cycle: int, previous: str | None = None, *, subscription_id: int = 8801) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=f"chain-{uuid.uuid4().hex}",
        subscription_id=subscription_id,
        cycle=cycle,
        amount_minor=1500,
        currency="EUR",
        provider="checkout",
        payment_method="pm_ok",
        previous_payment_ref=previous,
    )


def test_the_request_carries_previous_payment_id_only_when_known() -> None:
    """``previous_payment_ref`` becomes ``previous_payment_id``; without one the field is left out
    (the first payment of a chain has none)."""
    with_chain = transform.payment_request_body(renewal(2, "pay_first"), processing_channel_id=CHANNEL)
    without = transform.payment_request_body(renewal(1), processing_channel_id=CHANNEL)
    assert b'"previous_payment_id":"pay_first"' in with_chain
    assert b"previous_payment_id" not in without


async def test_the_sandbox_refuses_a_renewal_that_breaks_the_chain(sandbox: Sandbox) -> None:
    """After an approved first cycle, the next merchant-initiated recurring payment of the same
    source is refused (422, nothing charged) without ``previous_payment_id`` or with one that
    names no approved payment of that source, and approved when it names the first payment."""
    async with checkout(sandbox) as provider:
        first = await provider.charge(renewal(1))
        assert first.outcome is Outcome.APPROVED and first.provider_ref
        missing = await provider.charge(renewal(2))
        wrong = await provider.charge(renewal(2, "pay_nothing"))
        chained_request = renewal(2, first.provider_ref)
        chained = await provider.charge(chained_request)

    for refused, code in ((missing, "previous_payment_id_required"), (wrong, "previous_payment_id_invalid")):
        assert refused.outcome is Outcome.PROVIDER_ERROR and not refused.retryable
        assert refused.reason is not None and code in refused.reason
    assert chained.outcome is Outcome.APPROVED
    sent = await received(sandbox, chained_request.idempotency_key)
    assert sent["body"]["previous_payment_id"] == first.provider_ref
    assert [c["status"] for c in await sandbox.ledger()] == ["approved", "approved"]


@pytest.mark.parametrize(
    ("chain", "sent"),
    [
        ({"chain_ref": "pay_1"}, "pay_1"),
        ({"chain_ref": "pay_1", "chain_provider": "other"}, None),  # another provider's chain
        ({"chain_ref": "pay_1", "chain_payment_method": "pm_old"}, None),  # a new card: a new chain
        ({"chain_ref": "4242424242424242"}, None),  # would be refused as a card number
        ({}, None),
    ],
)
def test_a_renewal_carries_the_chain_only_while_it_holds(chain: dict[str, str], sent: str | None) -> None:
    """The chain belongs to one provider connection and one payment method; a reference that
    intake would take for a card number (an all-digit pspReference passing Luhn) is left out
    rather than getting the whole renewal refused."""
    sub = subscription(**({"chain_provider": "sandbox", "chain_payment_method": "pm_x"} | chain))
    assert sub.previous_payment_ref == sent


SUBSCRIPTION = 8802


async def _add_subscription(db: aiomysql.Pool) -> None:
    await query(
        db,
        "INSERT INTO subscriptions (id, status, provider, payment_method, amount_minor, currency, "
        "billing_anchor, next_attempt_at) VALUES (%s, 'active', 'checkout', 'pm_ok', 2500, 'EUR', "
        "NOW(6) - INTERVAL 1 MINUTE, NOW(6) - INTERVAL 1 MINUTE)",
        SUBSCRIPTION,
    )


async def _paid_cycle(db: aiomysql.Pool) -> int:
    rows = await query(db, "SELECT paid_cycle FROM subscriptions WHERE id = %s", SUBSCRIPTION)
    return int(rows[0][0])


async def test_renewals_through_a_real_daemon_continue_the_chain(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """End to end: the scheduler renews a Checkout.com subscription twice. The first approval's
    payment id is kept on the subscription, the second renewal sends it as
    ``previous_payment_id``, and both cycles are paid with one charge each. Without the chain
    the dialect (like Checkout.com) refuses the second renewal and the cycle goes unpaid."""
    await _add_subscription(db)
    provider: dict[str, Any] = {
        "kind": "checkout",
        "base_url": f"{sandbox.url}/checkout",
        "max_in_flight": 5,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "processing_channel_id": CHANNEL,
    }
    fast = {"batch_size": 50, "dispatch_rate_per_s": 1000, "poll_interval_s": 0.05, "renewal_jitter_s": 0}
    dunning = {"schedule_s": [3600], "failed_retry_s": 3600, "retry_jitter_s": 0}
    async with daemons.in_process(
        providers__checkout=provider, subscriptions=fast, subscriptions__dunning=dunning
    ):

        async def paid(cycle: int) -> bool:
            return await _paid_cycle(db) >= cycle

        await eventually(lambda: paid(1), timeout=60, what="cycle 1 paid")
        (chain_ref,) = (await query(db, "SELECT chain_ref FROM subscriptions WHERE id = %s", SUBSCRIPTION))[0]
        [(first_ref,)] = await query(
            db, "SELECT provider_ref FROM attempts WHERE subscription_id = %s AND cycle = 1", SUBSCRIPTION
        )
        assert chain_ref == first_ref and first_ref.startswith("pay_")
        # A month passes.
        await query(
            db,
            "UPDATE subscriptions SET next_attempt_at = NOW(6) - INTERVAL 1 SECOND WHERE id = %s",
            SUBSCRIPTION,
        )
        await eventually(lambda: paid(2), timeout=60, what="cycle 2 paid")

    [(second_key, second_ref)] = await query(
        db,
        "SELECT idempotency_key, provider_ref FROM attempts WHERE subscription_id = %s AND cycle = 2",
        SUBSCRIPTION,
    )
    sent = await received(sandbox, second_key)
    assert sent["body"]["previous_payment_id"] == first_ref
    (chain_ref,) = (await query(db, "SELECT chain_ref FROM subscriptions WHERE id = %s", SUBSCRIPTION))[0]
    assert chain_ref == second_ref, "the chain moves on to the latest approved payment"
    assert [c["status"] for c in await sandbox.ledger()] == ["approved", "approved"]
