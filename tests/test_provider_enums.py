"""No unknown without an exit: every official status value of every built-in provider has one.

The values come from the providers' own material, vendored in ``tests/fixtures/providers/``
with their source and commit: Adyen's Checkout API v71 OpenAPI (``PaymentResponse.resultCode``),
stripe-python (``PaymentIntent.status`` and the error ``type``), Checkout.com's SDK payment
status enumeration and its documented response-code classes, iyzico's ``status``,
``paymentStatus`` and ``fraudStatus``. For each value the adapter's own mapping is run on an
answer carrying it, and what follows is classified as reconciliation would act on it:

- ``terminal``: the answer settles the attempt (approved, declined, failed);
- ``lookup``: unknown now, and the provider documents the value as in progress: it moves on
  by itself and reconciliation's next lookup reads the final value (each final value is
  enumerated here too);
- ``resend``: unknown now; a resend under the same key within the provider's retention reads
  the answer (Adyen, which has no lookup);
- ``operator``: nothing the provider will say settles it: reconciliation parks the attempt
  for an operator with its reason (``needs_operator``).

A value that is unknown, not in progress by the provider's word, and not for an operator
would be looked up for ever: the test fails on it. The tables in ``docs/providers/NAME.md``
(between ``<!-- exits -->`` markers) state the same, and a test keeps them true.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import pytest

from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.providers.adyen import transform as adyen
from daemon.providers.adyen.client import AdyenProvider
from daemon.providers.base import Capabilities, LookupResult
from daemon.providers.checkout import transform as checkout
from daemon.providers.conformance import Exit, NoExit, status_exit
from daemon.providers.iyzico import transform as iyzico
from daemon.providers.iyzico.client import IyzicoProvider
from daemon.providers.stripe import transform as stripe
from daemon.providers.stripe.client import StripeProvider

FIXTURES: Final = Path(__file__).parent / "fixtures/providers"
DOCS: Final = Path(__file__).parent.parent / "docs/providers"


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


ADYEN_SPEC: Final = _fixture("adyen_checkout_v71.json")["schemas"]
STRIPE_SDK: Final = _fixture("stripe_payment_intent.json")
CHECKOUT_STATUS: Final = _fixture("checkout_payment_status.json")
CHECKOUT_CODES: Final = _fixture("checkout_response_codes.json")
IYZICO_STATUS: Final = _fixture("iyzico_payment_status.json")


# The values each provider documents as "in progress": the provider moves them on by itself.
IN_PROGRESS: Final[dict[str, frozenset[tuple[str, str]]]] = {
    # Checkout.com "Payment statuses": Pending (processing continues), Retry Scheduled (a
    # scheduled retry will run), Requested (the request is being processed).
    "checkout": frozenset({("status", "Pending"), ("status", "Retry Scheduled"), ("status", "Requested")}),
    # Stripe "How PaymentIntents work": processing "ends in succeeded or requires_payment_method";
    # api_error / idempotency_error: the PaymentIntent exists or not, and a list reads it.
    "stripe": frozenset({("status", "processing"), ("type", "api_error"), ("type", "idempotency_error")}),
    # iyzico "Retrieve Payment": fraudStatus 0 "the payment is under review"; a notification and
    # the retrieve call then say 1 or -1.
    "iyzico": frozenset({("fraudStatus", "0")}),
    "adyen": frozenset(),
}


def classify(
    first: ChargeResult, later: ChargeResult | None, capabilities: Capabilities, in_progress: bool
) -> tuple[Outcome, Exit]:
    """The attempt's exit after ``first``; ``later`` is what reconciliation reads afterwards
    (a lookup, or for a provider without one, a resend's replay). The rule is the conformance
    kit's (``daemon.providers.conformance.status_exit``), which plugin adapters run too."""
    try:
        return first.outcome, status_exit(first, later, capabilities, in_progress=in_progress)
    except NoExit as error:
        pytest.fail(str(error))


# --- one sample answer per official value ----------------------------------------------------

Sample = Callable[[], tuple[ChargeResult, ChargeResult | None]]

ADYEN_REFERENCE: Final = "42:7"


def _adyen(result_code: str) -> tuple[ChargeResult, ChargeResult | None]:
    body = json.dumps(
        {"resultCode": result_code, "pspReference": "PSP1", "merchantReference": ADYEN_REFERENCE}
    ).encode()
    answer = adyen.charge_result(200, {}, body, reference=ADYEN_REFERENCE)
    # Adyen has no lookup: a resend under the same key replays this very answer.
    return answer, answer


def _checkout_request() -> AttemptRequest:
    return AttemptRequest(
        idempotency_key="cko-enum",
        subscription_id=42,
        cycle=7,
        amount_minor=1999,
        currency="EUR",
        provider="checkout",
        payment_method="src_x",
    )


def _checkout(status: str, response_code: str | None = None) -> tuple[ChargeResult, ChargeResult | None]:
    request = _checkout_request()
    fields: dict[str, Any] = {
        "id": "pay_x",
        "status": status,
        "amount": 1999,
        "currency": "EUR",
        "reference": "42:7",
        "metadata": {checkout.IDEMPOTENCY_KEY_METADATA: request.idempotency_key},
    }
    if response_code is not None:
        fields["response_code"] = response_code
    body = json.dumps(fields).encode()
    payment = checkout.decode_payment(body)
    assert payment is not None
    looked_up = checkout.lookup_result(payment, request)
    return checkout.charge_result(201, {}, body, request), looked_up.result


def _stripe_request() -> AttemptRequest:
    return AttemptRequest(
        idempotency_key="st-enum",
        amount_minor=1999,
        currency="EUR",
        provider="stripe",
        payment_method="pm_x",
        customer_ref="cus_x",
    )


def _intent(status: str) -> dict[str, Any]:
    return {
        "id": "pi_x",
        "object": "payment_intent",
        "status": status,
        "amount": 1999,
        "currency": "eur",
        "metadata": {"payd_key": "st-enum"},
    }


def _stripe_later(intent: dict[str, Any]) -> ChargeResult | None:
    decoded = stripe.decode_page(json.dumps({"object": "list", "data": [intent]}).encode())
    assert decoded is not None
    return stripe.lookup_result(decoded.data, _stripe_request()).result


def _stripe_status(status: str) -> tuple[ChargeResult, ChargeResult | None]:
    intent = _intent(status)
    return stripe.charge_result(200, {}, json.dumps(intent).encode()), _stripe_later(intent)


# The HTTP status Stripe answers each error type with (docs.stripe.com/api/errors).
STRIPE_ERROR_STATUS: Final = {"api_error": 500, "card_error": 402, "idempotency_error": 400}


def _stripe_error(kind: str) -> tuple[ChargeResult, ChargeResult | None]:
    status = STRIPE_ERROR_STATUS.get(kind, 400)
    first = stripe.charge_result(status, {}, json.dumps({"error": {"type": kind}}).encode())
    # What a lookup then finds: the PaymentIntent, if Stripe made one; a finished one settles it.
    return first, _stripe_later(_intent("succeeded"))


IYZICO_EXPECTED: Final = iyzico.Expected(
    conversation_id="k", basket_id="7:3", paid_price=Decimal("10.0"), currency="TRY"
)
_IYZICO_SUCCESS: Final[dict[str, Any]] = {
    "status": "success",
    "paymentId": "1",
    "paymentStatus": "SUCCESS",
    "fraudStatus": 1,
    "conversationId": "k",
    "basketId": "7:3",
    "paidPrice": 10.0,
    "price": 10.0,
    "currency": "TRY",
}


def _iyzico(**change: Any) -> tuple[ChargeResult, ChargeResult | None]:
    body = json.dumps(_IYZICO_SUCCESS | change).encode()
    first = iyzico.charge_result(200, {}, body, IYZICO_EXPECTED)
    later: LookupResult | None = iyzico.lookup_result(200, body, IYZICO_EXPECTED, frozenset())
    return first, None if later is None else later.result


def _iyzico_status(value: str) -> tuple[ChargeResult, ChargeResult | None]:
    if value == "failure":  # a failure body carries its errorCode: an unlisted one here
        return _iyzico(status="failure", errorCode="99999", paymentStatus=None)
    return _iyzico(status=value)


def _samples() -> list[tuple[str, str, str, Sample]]:
    """(provider, field, value, sample) for every official value."""
    rows: list[tuple[str, str, str, Sample]] = []
    for code in ADYEN_SPEC["PaymentResponse"]["properties"]["resultCode"]["enum"]:
        rows.append(("adyen", "resultCode", code, lambda code=code: _adyen(code)))
    for status in STRIPE_SDK["status"]:
        rows.append(("stripe", "status", status, lambda status=status: _stripe_status(status)))
    for kind in STRIPE_SDK["error_type"]:
        rows.append(("stripe", "type", kind, lambda kind=kind: _stripe_error(kind)))
    statuses = dict.fromkeys(
        [*CHECKOUT_STATUS["payment_status"], *CHECKOUT_STATUS["post_payments_201_status"]]
    )
    for status in statuses:
        rows.append(("checkout", "status", status, lambda status=status: _checkout(status)))
    for prefix in CHECKOUT_CODES["ranges"]:
        code = prefix.ljust(5, "9")
        rows.append(
            (
                "checkout",
                "response_code",
                prefix + "x" * (5 - len(prefix)),
                lambda c=code: _checkout("Declined", c),
            )
        )
    for value in IYZICO_STATUS["status"]:
        rows.append(("iyzico", "status", value, lambda value=value: _iyzico_status(value)))
    for value in IYZICO_STATUS["payment_status"]:
        rows.append(("iyzico", "paymentStatus", value, lambda value=value: _iyzico(paymentStatus=value)))
    for fraud in IYZICO_STATUS["fraud_status"]:
        rows.append(("iyzico", "fraudStatus", str(fraud), lambda fraud=fraud: _iyzico(fraudStatus=fraud)))
    return rows


SAMPLES: Final = _samples()

CAPABILITIES: Final[dict[str, Capabilities]] = {
    "adyen": AdyenProvider.capabilities,
    "stripe": StripeProvider.capabilities,
    "iyzico": IyzicoProvider.capabilities,
    # Set per instance (its key TTL is configurable); what matters here is fixed.
    "checkout": Capabilities(
        honours_idempotency_key=True,
        lookup_by_key=False,
        lookup_by_reference=True,
        resend_only_after_2xx=True,
    ),
}


def exit_of(provider: str, field: str, value: str, sample: Sample) -> tuple[Outcome, Exit]:
    first, later = sample()
    return classify(first, later, CAPABILITIES[provider], (field, value) in IN_PROGRESS[provider])


@pytest.mark.parametrize(
    ("provider", "field", "value", "sample"), SAMPLES, ids=[f"{p}-{f}-{v}" for p, f, v, _ in SAMPLES]
)
def test_every_official_value_has_an_exit(provider: str, field: str, value: str, sample: Sample) -> None:
    """Each value of the provider's official enumerations ends terminal, settles on a later
    lookup (only values the provider documents as in progress), on a resend, or is parked for
    an operator. Before, Adyen Pending/Received/PartiallyAuthorised, Checkout.com
    Voided/Expired/Canceled/Card Verified/Active and 10xxx/50xxx declines, Stripe
    requires_capture/requires_confirmation and iyzico's 3-D Secure paymentStatus values were
    unknown without any of these: looked up (or replayed) for ever."""
    outcome, exit_ = exit_of(provider, field, value, sample)
    if exit_ is Exit.LOOKUP and outcome is Outcome.UNKNOWN:
        capabilities = CAPABILITIES[provider]
        assert capabilities.lookup_by_key or capabilities.lookup_by_reference


def test_every_enumeration_is_taken_from_a_recorded_source() -> None:
    """The vendored fragments name where they come from (repository and commit, or the page)."""
    for name in (
        "adyen_checkout_v71.json",
        "stripe_payment_intent.json",
        "checkout_payment_status.json",
        "checkout_response_codes.json",
        "iyzico_payment_status.json",
    ):
        source = _fixture(name)["source"]
        assert source.get("commit") or source.get("documentation"), name


# --- the documentation's tables --------------------------------------------------------------

_TABLE: Final = re.compile(r"<!-- exits -->\n(.*?)<!-- /exits -->", re.S)
_ROW: Final = re.compile(
    r"^\|\s*`?([^|`]+?)`?\s*\|\s*`?([^|`]+?)`?\s*\|\s*`?([a-z_]+)`?\s*\|\s*`?([a-z]+)`?\s*\|"
)


def documented_exits(provider: str) -> dict[tuple[str, str], tuple[str, str]]:
    """``(field, value) -> (outcome, exit)`` from the exits table of ``docs/providers/NAME.md``."""
    text = (DOCS / f"{provider}.md").read_text()
    match = _TABLE.search(text)
    assert match is not None, f"docs/providers/{provider}.md has no <!-- exits --> table"
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for line in match.group(1).splitlines()[2:]:  # after the header and its rule
        row = _ROW.match(line)
        assert row is not None, f"unreadable row in docs/providers/{provider}.md: {line!r}"
        field, value, outcome, exit_ = row.groups()
        assert (field, value) not in rows, f"{field} {value} twice"
        rows[(field, value)] = (outcome, exit_)
    return rows


@pytest.mark.parametrize("provider", sorted(CAPABILITIES))
def test_each_provider_page_states_every_official_value_and_what_payd_does(provider: str) -> None:
    """The table in docs/providers/NAME.md lists exactly the official values, each with the
    outcome the adapter's mapping gives it and the exit reconciliation takes, so the page
    cannot drift from the code (or from the provider's enumerations)."""
    computed = {
        (field, value): tuple(str(part) for part in exit_of(p, field, value, sample))
        for p, field, value, sample in SAMPLES
        if p == provider
    }
    assert documented_exits(provider) == computed


# --- reversals (refunds and voids) ------------------------------------------------------------
#
# A reversal's answers have exits of their own: ``terminal``, ``notification`` (accepted by the
# provider, pending until its notification, never re-sent), ``operator`` (parked: nothing the
# provider says will settle it). Each value comes from the provider's vendored material; the
# table between ``<!-- reversal-exits -->`` markers in docs/providers/NAME.md states the same.

ADYEN_REVERSALS: Final = _fixture("adyen_checkout_v71_reversals.json")["schemas"]
ADYEN_WEBHOOKS: Final = _fixture("adyen_webhooks_v1.json")
IYZICO_REVERSALS: Final = _fixture("iyzico_reversals.json")
_REVERSAL_TABLE: Final = re.compile(r"<!-- reversal-exits -->\n(.*?)<!-- /reversal-exits -->", re.S)


def reversal_exit(result: ChargeResult) -> tuple[str, str]:
    if result.outcome is not Outcome.UNKNOWN:
        return result.outcome.value, "terminal"
    if result.accepted:
        return result.outcome.value, "notification"
    if result.needs_operator:
        return result.outcome.value, "operator"
    pytest.fail(f"a reversal answer that is unknown for ever: {result.reason!r}")


def _adyen_modification(status: str) -> ChargeResult:
    body = json.dumps({"status": status, "pspReference": "R", "paymentPspReference": "P", "reference": "rf"})
    return adyen.reversal_result(201, {}, body.encode(), reference="rf", payment_psp_reference="P")


def _adyen_notice(event_code: str, success: str) -> ChargeResult:
    item = adyen.read_item({"eventCode": event_code, "success": success, "pspReference": "R"})
    assert not isinstance(item, str)
    return adyen.notice_result(item, adyen.REVERSAL_EVENTS[event_code])


_IYZICO_REVERSAL: Final = iyzico.ExpectedReversal(
    conversation_id="rf", payment_id="9", price=Decimal("4.0"), currency="TRY"
)


def _iyzico_reversal(status: str) -> ChargeResult:
    fields: dict[str, Any] = {"status": status, "conversationId": "rf", "paymentId": "9", "price": 4.0}
    if status == "failure":  # a failure body carries its errorCode: an unlisted one here
        fields["errorCode"] = "99999"
    return iyzico.reversal_result(
        200, {}, json.dumps(fields | {"currency": "TRY"}).encode(), _IYZICO_REVERSAL
    )


def _iyzico_transport(what: str) -> ChargeResult:
    if what == "5xx":
        return iyzico.reversal_result(502, {}, b"", _IYZICO_REVERSAL)
    # What the shared exchange answers for a timeout after sending, as the adapter passes it on.
    return iyzico.operator_unknown(ChargeResult(outcome=Outcome.UNKNOWN, reason="timed out"))


def _reversal_samples() -> dict[str, dict[tuple[str, str], tuple[str, str]]]:
    rows: dict[str, dict[tuple[str, str], tuple[str, str]]] = {"adyen": {}, "iyzico": {}}
    for status in IYZICO_REVERSALS["status"]:
        rows["iyzico"][("status", status)] = reversal_exit(_iyzico_reversal(status))
    for what in ("5xx", "timeout"):
        rows["iyzico"][("http", what)] = reversal_exit(_iyzico_transport(what))
    for schema in ("PaymentRefundResponse", "PaymentCancelResponse"):
        for status in ADYEN_REVERSALS[schema]["properties"]["status"]["enum"]:
            rows["adyen"][(f"{schema}.status", status)] = reversal_exit(_adyen_modification(status))
    assert set(adyen.REVERSAL_EVENTS) <= set(
        ADYEN_WEBHOOKS["schemas"]["NotificationRequestItem"]["properties"]["eventCode"]["enum"]
    )
    for event_code in adyen.REVERSAL_EVENTS:
        for success in ("true", "false"):  # Adyen: "success": "true" or "false", a string
            rows["adyen"][(f"{event_code}.success", success)] = reversal_exit(
                _adyen_notice(event_code, success)
            )
    return rows


@pytest.mark.parametrize("provider", ["adyen", "iyzico"])
def test_each_reversal_answer_has_an_exit_and_the_page_states_it(provider: str) -> None:
    """Every documented answer to a refund or cancel ends terminal, pending until the provider's
    notification, or parked for an operator, and docs/providers/NAME.md says so row by row."""
    computed = _reversal_samples()[provider]
    text = (DOCS / f"{provider}.md").read_text()
    match = _REVERSAL_TABLE.search(text)
    assert match is not None, f"docs/providers/{provider}.md has no <!-- reversal-exits --> table"
    documented: dict[tuple[str, str], tuple[str, str]] = {}
    for line in match.group(1).splitlines()[2:]:
        row = _ROW.match(line)
        assert row is not None, f"unreadable row: {line!r}"
        field, value, outcome, exit_ = row.groups()
        documented[(field, value)] = (outcome, exit_)
    assert documented == computed
