"""No refund unknown without an exit: every official refund value of Stripe and Checkout.com has one.

The values come from the providers' own material (``stripe_refund.json``: stripe-python's
``Refund.status`` and the error codes refusing a refund; ``checkout_refund.json``:
the API reference's answers to ``POST /payments/{id}/refunds`` and the ``approved`` verdict of
a payment action). For each the adapter's own mapping is run, and the exit is classified:
``terminal`` (the answer settles the refund), ``lookup`` (unknown now; the provider moves it
on and the refund lookup reads the verdict), ``operator`` (nothing the provider will say
settles it). The tables between ``<!-- refund-exits -->`` markers in
``docs/providers/{stripe,checkout}.md`` must state exactly the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest

from daemon.models import ChargeResult, Outcome, ReversalRequest
from daemon.providers.checkout import transform as checkout
from daemon.providers.stripe import transform as stripe

FIXTURES: Final = Path(__file__).parent / "fixtures/providers"
DOCS: Final = Path(__file__).parent.parent / "docs/providers"
STRIPE: Final = json.loads((FIXTURES / "stripe_refund.json").read_text())
CHECKOUT: Final = json.loads((FIXTURES / "checkout_refund.json").read_text())


def _request(provider: str, ref: str) -> ReversalRequest:
    fields: dict[str, Any] = {
        "reversal_id": 1,
        "idempotency_key": "rf-x",
        "original_idempotency_key": "ch-x",
        "original_provider_ref": ref,
        "original_merchant_reference": "ch-x",
        "provider": provider,
        "amount_minor": 500,
        "currency": "EUR",
    }
    return msgspec.convert(fields, ReversalRequest)


STRIPE_REQUEST: Final = _request("stripe", "pi_x")
CHECKOUT_REQUEST: Final = _request("checkout", "pay_x")


def _stripe_status(status: str) -> ChargeResult:
    body = {
        "id": "re_x",
        "object": "refund",
        "status": status,
        "amount": 500,
        "currency": "eur",
        "payment_intent": "pi_x",
        "metadata": {stripe.REFUND_KEY_METADATA: "rf-x"},
    }
    return stripe.refund_result(STRIPE_REQUEST, 200, {}, json.dumps(body).encode())


def _stripe_code(code: str) -> ChargeResult:
    body = {"error": {"type": "invalid_request_error", "code": code}}
    status = 404 if code == "resource_missing" else 400
    return stripe.refund_result(STRIPE_REQUEST, status, {}, json.dumps(body).encode())


def _checkout_http(status: str) -> ChargeResult:
    body = {"202": {"action_id": "act_x", "reference": "rf-x"}, "422": {"error_codes": ["x"]}}.get(status, {})
    return checkout.refund_result(CHECKOUT_REQUEST, int(status), {}, json.dumps(body).encode())


def _checkout_action(approved: bool | None) -> ChargeResult:
    action = checkout.PaymentAction(
        id="act_x", type="Refund", amount=500, approved=approved, reference="rf-x"
    )
    found = checkout.refund_lookup_result([action], CHECKOUT_REQUEST)
    assert found.result is not None
    return found.result


def _samples() -> dict[str, dict[tuple[str, str], ChargeResult]]:
    return {
        "stripe": {
            **{("status", s): _stripe_status(s) for s in STRIPE["status"]},
            **{("error.code", c): _stripe_code(c) for c in STRIPE["refund_error_codes"]},
        },
        "checkout": {
            **{("HTTP", s): _checkout_http(s) for s in CHECKOUT["refund_statuses"]},
            **{
                ("action.approved", json.dumps(a)): _checkout_action(a)
                for a in [*CHECKOUT["action_approved"], None]
            },
        },
    }


def outcome_of(result: ChargeResult) -> str:
    """The outcome column: ``pending`` for an answer the provider accepted to decide later."""
    return "pending" if result.accepted else result.outcome.value


def exit_of(result: ChargeResult) -> str:
    if result.outcome is not Outcome.UNKNOWN:
        return "terminal"
    return "operator" if result.needs_operator else "lookup"


_TABLE: Final = re.compile(r"<!-- refund-exits -->\n(.*?)<!-- /refund-exits -->", re.S)
_ROW: Final = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|\s*`([a-z_]+)`\s*\|\s*([a-z]+)\s*\|")


def documented(provider: str) -> dict[tuple[str, str], tuple[str, str]]:
    text = (DOCS / f"{provider}.md").read_text()
    match = _TABLE.search(text)
    assert match is not None, f"docs/providers/{provider}.md has no <!-- refund-exits --> table"
    rows = {}
    for line in match.group(1).splitlines()[2:]:
        row = _ROW.match(line)
        assert row is not None, f"unreadable row in docs/providers/{provider}.md: {line!r}"
        field, value, outcome, exit_ = row.groups()
        rows[(field, value)] = (outcome, exit_)
    return rows


@pytest.mark.parametrize("provider", ["stripe", "checkout"])
def test_every_official_refund_value_has_an_exit_and_the_page_says_which(provider: str) -> None:
    """Each value maps to an outcome and an exit (in progress ones only where the provider
    documents them so: Stripe's pending and requires_action, Checkout.com's 202 and an action
    without a verdict; 5xx answers: the refund's action or listing tells), and the provider's
    page lists exactly these rows."""
    computed = {key: (outcome_of(result), exit_of(result)) for key, result in _samples()[provider].items()}
    in_progress = {
        "stripe": {("status", "pending"), ("status", "requires_action")},
        "checkout": {("HTTP", "202"), ("HTTP", "502"), ("action.approved", "null")},
    }[provider]
    assert {key for key, (_, exit_) in computed.items() if exit_ == "lookup"} == in_progress
    assert all(exit_ != "operator" for _, exit_ in computed.values())
    assert documented(provider) == computed
