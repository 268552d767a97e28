"""Mastercard's Merchant Advice Codes mean the same whichever provider passes them on.

Stripe (``network_advice_code`` on a Mastercard), Adyen
(``additionalData.merchantAdviceCode``) and Checkout.com
(``processing.partner_merchant_advice_code``) each relay Mastercard's MAC on a
decline. The code is Mastercard's, so payd's verdict on the same soft decline
must not depend on the adapter: retried or not, and after how long.
Mastercard's codes as processors republish them, e.g.
https://developer.paypal.com/braintree/docs/reference/general/merchant-responses/merchant-advice-codes
"""

from __future__ import annotations

import json

import pytest

from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.providers.adyen import transform as adyen
from daemon.providers.checkout import transform as checkout
from daemon.providers.stripe import transform as stripe

# Every code on Mastercard's list (01-04, 21, 22, 24-30, 40, 41, 43).
MERCHANT_ADVICE_CODES = ["01", "02", "03", "04", "21", "22", *map(str, range(24, 31)), "40", "41", "43"]

REQUEST = AttemptRequest(
    idempotency_key="mac-1",
    subscription_id=1,
    cycle=1,
    amount_minor=1000,
    currency="EUR",
    provider="any",
    payment_method="pm",
)


def _stripe(mac: str) -> ChargeResult:
    error = stripe.StripeError(
        type="card_error",
        code="card_declined",
        decline_code="insufficient_funds",
        network_advice_code=mac,
        payment_method=stripe.PaymentMethod(card=stripe.Card(brand="mastercard")),
    )
    return stripe.card_decline(error, provider_ref="pi_1")


def _adyen(mac: str) -> ChargeResult:
    body = {
        "resultCode": "Refused",
        "refusalReasonCode": "12",
        "refusalReason": "Not enough balance",
        "pspReference": "P1",
        "additionalData": {"merchantAdviceCode": f"{mac}: Mastercard advice"},
    }
    return adyen.charge_result(200, {}, json.dumps(body).encode(), reference="1:1")


def _checkout(mac: str) -> ChargeResult:
    body = {
        "id": "pay_1",
        "status": "Declined",
        "approved": False,
        "response_code": "20051",
        "processing": {"partner_merchant_advice_code": mac},
    }
    return checkout.charge_result(201, {}, json.dumps(body).encode(), REQUEST)


@pytest.mark.parametrize("mac", MERCHANT_ADVICE_CODES)
def test_the_same_advice_gets_the_same_verdict_from_every_adapter(mac: str) -> None:
    """An insufficient-funds decline (soft on its own) carrying one MAC: Stripe, Adyen and
    Checkout.com agree on soft or hard, and on the earliest retry. MAC 04 ("token
    requirements not fulfilled for this token type") was hard at Adyen and Checkout.com
    and ignored at Stripe, so the same card was retried through one and not the others."""
    verdicts = {
        name: (result.outcome, result.retry_after_s)
        for name, result in (("stripe", _stripe(mac)), ("adyen", _adyen(mac)), ("checkout", _checkout(mac)))
    }
    assert len(set(verdicts.values())) == 1, verdicts
    outcome, _ = verdicts["stripe"]
    assert outcome in (Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE)
    if mac in ("03", "04", "21"):  # the codes that say the same card must not be retried
        assert outcome is Outcome.HARD_DECLINE
