"""The Adyen adapter against the sandbox's Adyen face, over real HTTP.

Each test starts its own sandbox gateway and an ``AdyenProvider`` whose
``base_url`` is ``{sandbox}/adyen``. What the adapter concludes is checked
against what the gateway's ledger says really happened, so "approved",
"declined" and "unknown" are proved from both sides. A few answers the sandbox
cannot produce (a foreign stored answer, an unparseable body) are fed to the
mapping directly at the end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from daemon.config import ConfigError
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.providers.adyen import transform
from daemon.providers.adyen.client import AdyenProvider, AdyenProviderConfig
from daemon.providers.base import Capabilities, Provider
from tests.support import Sandbox, free_port, running_sandbox

API_KEY = "test_adyen_key_not_a_real_one"
MERCHANT = "PaydTestMerchant"

ProviderFactory = Callable[..., AdyenProvider]


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", API_KEY)
    return API_KEY


@pytest.fixture
async def gateway() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as sandbox:
        yield sandbox


@pytest.fixture
async def make_provider(gateway: Sandbox, api_key: str) -> AsyncIterator[ProviderFactory]:
    """Providers on the sandbox's Adyen face; ``base_url`` and other keys can be overridden."""
    del api_key
    made: list[AdyenProvider] = []

    def make(**overrides: Any) -> AdyenProvider:
        table = {
            "kind": "adyen",
            "base_url": f"{gateway.url}/adyen",
            "max_in_flight": 10,
            "timeout_s": 2,
            "connect_timeout_s": 1,
            "merchant_account": MERCHANT,
        } | overrides
        provider = AdyenProvider("adyen", msgspec.convert(table, AdyenProviderConfig))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
async def adyen(make_provider: ProviderFactory) -> AdyenProvider:
    return make_provider()  # in the loop: the session's connector needs it


def attempt(
    key: str = "att-1",
    payment_method: str = "pm_ok",
    *,
    subscription_id: int | None = 42,
    cycle: int | None = 3,
    customer_ref: str | None = "shopper-17",
    amount_minor: int = 1999,
) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=key,
        subscription_id=subscription_id,
        cycle=cycle if subscription_id is not None else None,
        amount_minor=amount_minor,
        currency="EUR",
        provider="adyen",
        payment_method=payment_method,
        customer_ref=customer_ref,
    )


# -- the request ---------------------------------------------------------------------------


async def test_payment_request_has_the_documented_shape(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """The adapter's request passes the face's strict ContAuth/Subscription check and reaches
    the ledger with payd's reference, amount, merchant account and the derived 64-character key."""
    result = await adyen.charge(attempt("shape-1"))

    assert result.outcome is Outcome.APPROVED, result
    assert result.provider_ref is not None and len(result.provider_ref) == 16
    [charge] = await gateway.ledger()
    assert charge["merchant_reference"] == "42:3"
    assert (charge["amount_minor"], charge["currency"]) == (1999, "EUR")
    assert charge["account"] == MERCHANT
    assert charge["idempotency_key"] == transform.idempotency_key(MERCHANT, "shape-1")
    assert len(charge["idempotency_key"]) == 64


def _adyen_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": {"value": 500, "currency": "EUR"},
        "reference": "1:1",
        "merchantAccount": MERCHANT,
        "paymentMethod": {"type": "scheme", "storedPaymentMethodId": "pm_ok"},
        "shopperReference": "shopper-17",
        "shopperInteraction": "ContAuth",
        "recurringProcessingModel": "Subscription",
        "returnUrl": "https://shop.example/return",
    }
    for name, value in changes.items():
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    return body


KEYED = {"X-API-Key": "k"}


@pytest.mark.parametrize(
    ("headers", "changes", "status", "error_code"),
    [
        pytest.param({}, {}, 401, "000", id="no-api-key"),
        pytest.param(KEYED, {"shopperInteraction": "Ecommerce"}, 422, "000", id="ecommerce"),
        pytest.param(KEYED, {"recurringProcessingModel": "CardOnFile"}, 422, "000", id="not-subscription"),
        pytest.param(KEYED, {"shopperReference": None}, 422, "000", id="no-shopper"),
        pytest.param(KEYED, {"amount": None}, 422, "100", id="no-amount"),
        pytest.param(KEYED, {"merchantAccount": None}, 422, "901", id="no-merchant"),
        pytest.param(KEYED, {"paymentMethod": {"type": "scheme"}}, 422, "000", id="no-stored-id"),
        # returnUrl is in PaymentRequest.required (Checkout API v71 OpenAPI); live Adyen 14_030.
        pytest.param(KEYED, {"returnUrl": None}, 422, "14_030", id="no-return-url"),
        pytest.param(KEYED | {"Idempotency-Key": "k" * 65}, {}, 422, "000", id="key-too-long"),
    ],
)
async def test_face_rejects_requests_off_the_documented_shape(
    gateway: Sandbox, headers: dict[str, str], changes: dict[str, Any], status: int, error_code: str
) -> None:
    """The shape check that the adapter's request passes can fail: each deviation gets
    Adyen's error object and charges nothing."""
    url = f"{gateway.url}/adyen/v71/payments"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=_adyen_body(**changes), headers=headers) as answer,
    ):
        body = await answer.json()
    assert answer.status == status
    assert body["status"] == status and body["errorCode"] == error_code and body["message"]
    assert await gateway.ledger() == []


async def test_without_customer_ref_nothing_is_sent(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """A stored card belongs to a shopperReference: without one the charge is refused here,
    as a clean provider error, and never reaches Adyen."""
    result = await adyen.charge(attempt("no-shopper", customer_ref=None))

    assert result.outcome is Outcome.PROVIDER_ERROR and not result.retryable
    assert (await gateway.stats())["requests"] == 0


async def test_long_keys_and_references_fit_adyen_limits(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """A 128-character payd key (the merchant reference of a one-off charge) still charges,
    once per key, within Adyen's 64-character key and 80-character reference."""
    key = "k" * 128
    request = attempt(key, subscription_id=None)

    first = await adyen.charge(request)
    second = await adyen.charge(request)

    assert first.outcome is second.outcome is Outcome.APPROVED
    assert first.provider_ref == second.provider_ref
    [charge] = await gateway.ledger()
    assert len(charge["idempotency_key"]) == 64
    assert len(charge["merchant_reference"]) <= 80


# -- the mapping, row by row ------------------------------------------------------------------

SOFT, HARD = Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE
DAY = 86400.0

# token -> (outcome, decline_code, retry_after_s, what the ledger holds for it)
DECLINES: dict[str, tuple[Outcome, str, float | None]] = {
    "pm_insufficient_funds": (SOFT, "insufficient_funds", None),
    "pm_stolen": (HARD, "blocked_card", None),
    "pm_adyen_expired": (HARD, "expired_card", None),
    "pm_adyen_refused_2": (SOFT, "refused", None),
    "pm_adyen_refused_9": (SOFT, "issuer_unavailable", None),
    "pm_adyen_refused_29": (SOFT, "withdrawal_count_exceeded", None),
    "pm_adyen_refused_20": (HARD, "fraud", None),
    "pm_adyen_refused_26": (HARD, "revocation_of_auth", None),
    "pm_adyen_refused_999": (HARD, "refused_unrecognised", None),
    "pm_adyen_mac_01": (SOFT, "insufficient_funds", None),
    "pm_adyen_mac_02": (SOFT, "insufficient_funds", None),
    "pm_adyen_mac_03": (HARD, "do_not_try_again", None),
    "pm_adyen_mac_21": (HARD, "payment_cancellation", None),
    "pm_adyen_mac_24": (SOFT, "insufficient_funds", 3600.0),
    "pm_adyen_mac_25": (SOFT, "insufficient_funds", DAY),
    "pm_adyen_mac_30": (SOFT, "insufficient_funds", 10 * DAY),
    "pm_adyen_mac_40": (SOFT, "insufficient_funds", None),
    "pm_adyen_result_Cancelled": (HARD, "cancelled", None),
    "pm_adyen_result_RedirectShopper": (HARD, "shopper_action_required", None),
    "pm_adyen_result_ChallengeShopper": (HARD, "shopper_action_required", None),
    "pm_adyen_result_IdentifyShopper": (HARD, "shopper_action_required", None),
}


@pytest.mark.parametrize("token", list(DECLINES))
async def test_declines_follow_the_refusal_and_advice_tables(
    adyen: AdyenProvider, gateway: Sandbox, token: str
) -> None:
    """Each refusal reason / merchant advice / shopper-action row gives the decline payd's
    dunning needs: soft (with Mastercard's earliest retry where it names one) or hard,
    advice overruling a soft reason when it says do not try again; and the gateway
    agrees that nothing was approved."""
    outcome, decline_code, retry_after = DECLINES[token]

    result = await adyen.charge(attempt(f"decline-{token}", token))

    assert (result.outcome, result.decline_code, result.retry_after_s) == (outcome, decline_code, retry_after)
    assert result.provider_ref is not None
    [charge] = await gateway.ledger()
    assert charge["status"] == "declined"


# token -> (outcome, retryable, charged at the gateway)
NOT_DECLINES: dict[str, tuple[Outcome, bool, bool]] = {
    "pm_rate_limited": (Outcome.RATE_LIMITED, True, False),
    "pm_error": (Outcome.PROVIDER_ERROR, True, False),  # 500 with transient-error: true
    "pm_adyen_store_unavailable": (Outcome.PROVIDER_ERROR, True, False),  # 503 / 703
    "pm_adyen_unauthorised": (Outcome.PROVIDER_ERROR, False, False),
    "pm_adyen_forbidden": (Outcome.PROVIDER_ERROR, False, False),
    "pm_adyen_invalid": (Outcome.PROVIDER_ERROR, False, False),
    "pm_adyen_result_Error": (Outcome.PROVIDER_ERROR, False, False),
    "pm_adyen_server_error": (Outcome.UNKNOWN, True, True),  # 500 without transient-error
    "pm_adyen_pending": (Outcome.UNKNOWN, True, True),
    "pm_adyen_result_Received": (Outcome.UNKNOWN, True, True),
    "pm_adyen_result_PartiallyAuthorised": (Outcome.UNKNOWN, True, True),
}


@pytest.mark.parametrize("token", list(NOT_DECLINES))
async def test_errors_and_unfinished_results_keep_never_sent_apart_from_may_have_charged(
    adyen: AdyenProvider, gateway: Sandbox, token: str
) -> None:
    """Errors Adyen documents as unprocessed (429, transient-error, 401/403/422, resultCode
    Error) charge nothing; a 500 without transient-error and the not-final results
    (Pending, Received, PartiallyAuthorised) are UNKNOWN. The ledger shows the adapter
    said "charged nothing" only where nothing was approved."""
    outcome, retryable, charged = NOT_DECLINES[token]

    result = await adyen.charge(attempt(f"other-{token}", token))

    assert (result.outcome, result.retryable) == (outcome, retryable), result
    approved = [c for c in await gateway.ledger() if c["status"] == "approved"]
    assert bool(approved) is charged
    if outcome is Outcome.RATE_LIMITED:
        assert result.retry_after_s == 1.0


# -- idempotency and unknown outcomes --------------------------------------------------------


async def test_replay_under_the_same_key_charges_once(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """Sending the same attempt three times gets Adyen's stored answer back: one charge,
    one pspReference."""
    results = [await adyen.charge(attempt("replay-1")) for _ in range(3)]

    assert {r.outcome for r in results} == {Outcome.APPROVED}
    assert len({r.provider_ref for r in results}) == 1
    approved = await gateway.assert_no_double_charge()
    assert len(approved) == 1


async def test_replay_repeats_the_first_decline_answer(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """A resend of a declined attempt replays the original refusal (6 Expired Card), not a new
    decision, and does not reach the issuer again."""
    first = await adyen.charge(attempt("replay-decline", "pm_adyen_expired"))
    again = await adyen.charge(attempt("replay-decline", "pm_adyen_expired"))

    assert first == again
    assert first.decline_code == "expired_card"
    assert len(await gateway.ledger()) == 1


async def test_unknown_after_a_server_error_is_settled_by_a_same_key_resend(
    adyen: AdyenProvider, gateway: Sandbox
) -> None:
    """Adyen charged but answered 500 (no transient-error): UNKNOWN, not a clean error. The
    resend under the same key (what reconciliation does) returns the stored Authorised
    answer, and the card was charged once."""
    request = attempt("server-error-1", "pm_adyen_server_error")

    first = await adyen.charge(request)
    resent = await adyen.charge(request)

    assert first.outcome is Outcome.UNKNOWN
    assert resent.outcome is Outcome.APPROVED and resent.provider_ref is not None
    assert len(await gateway.assert_no_double_charge()) == 1


async def test_pending_stays_unknown_on_replay(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """Pending is not final (Adyen may still authorise it): UNKNOWN with its pspReference,
    and a same-key resend only replays Pending, never charging a second time."""
    first = await adyen.charge(attempt("pending-1", "pm_adyen_pending"))
    again = await adyen.charge(attempt("pending-1", "pm_adyen_pending"))

    assert first.outcome is again.outcome is Outcome.UNKNOWN
    assert first.provider_ref is not None and first.provider_ref == again.provider_ref
    assert len(await gateway.ledger()) == 1


async def test_timeout_after_sending_is_unknown(make_provider: ProviderFactory, gateway: Sandbox) -> None:
    """The gateway charges, then answers only after the client gave up: the adapter says
    UNKNOWN (may have charged), and the ledger proves it had. A resend under the same key
    finds that charge instead of making another."""
    await gateway.behave(hang_s=3)
    adyen = make_provider(timeout_s=0.5)

    result = await adyen.charge(attempt("timeout-1", "pm_timeout"))
    assert result.outcome is Outcome.UNKNOWN, result
    [charge] = await gateway.ledger()
    assert charge["status"] == "approved"

    resent = await make_provider(timeout_s=5).charge(attempt("timeout-1", "pm_timeout"))
    assert resent.outcome is Outcome.APPROVED
    assert len(await gateway.assert_no_double_charge()) == 1


async def test_a_key_still_in_progress_is_unknown(adyen: AdyenProvider, gateway: Sandbox) -> None:
    """Two requests with one key at once: one is processed, the other gets Adyen's 704
    (in progress), which must be UNKNOWN: the first may be charging."""
    await gateway.behave(latency_ms=300)

    results = await asyncio.gather(*(adyen.charge(attempt("race-1")) for _ in range(2)))

    assert sorted(r.outcome.value for r in results) == ["approved", "unknown"]
    assert len(await gateway.assert_no_double_charge()) == 1


async def test_connection_refused_is_not_sent(make_provider: ProviderFactory) -> None:
    """Nothing listening: the request never left, a clean provider error (not UNKNOWN)."""
    adyen = make_provider(base_url=f"http://127.0.0.1:{free_port()}/adyen")

    result = await adyen.charge(attempt("refused-1"))

    assert result.outcome is Outcome.PROVIDER_ERROR and result.retryable


# -- capabilities, configuration, secrets -----------------------------------------------------


async def test_capabilities_say_resend_not_lookup(adyen: AdyenProvider) -> None:
    """Adyen cannot be asked about a payment: no lookup (it answers None, "could not ask"),
    but keys are honoured for Adyen's documented minimum of 7 days; it refunds and cancels."""
    assert isinstance(adyen, Provider)
    assert adyen.capabilities == Capabilities(
        honours_idempotency_key=True,
        lookup_by_key=False,
        lookup_by_reference=False,
        idempotency_key_ttl_s=7 * DAY,
        refunds=True,
        refund_lookup=False,
    )
    assert await adyen.lookup(attempt()) is None


async def test_missing_api_key_fails_at_start_naming_the_secret(
    monkeypatch: pytest.MonkeyPatch, gateway: Sandbox
) -> None:
    """Without its secret the provider is not built; the error names where to put it."""
    monkeypatch.delenv("PAYD_ADYEN_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = msgspec.convert(
        {"kind": "adyen", "base_url": gateway.url, "max_in_flight": 1, "merchant_account": MERCHANT},
        AdyenProviderConfig,
    )
    with pytest.raises(ConfigError, match="PAYD_ADYEN_API_KEY"):
        AdyenProvider("adyen", config)


async def test_api_key_never_appears_in_results(adyen: AdyenProvider) -> None:
    """The API key travels only in its header: not in the provider's repr, nor in any result."""
    results = [await adyen.charge(attempt(f"leak-{t}", t)) for t in ("pm_ok", "pm_adyen_unauthorised")]

    assert API_KEY not in repr(adyen)
    assert all(API_KEY not in repr(r) for r in results)


# -- Adyen's own specification ----------------------------------------------------------------

# Adyen's Checkout API v71 OpenAPI specification, the fragment payd uses (source recorded inside).
SPEC = json.loads((Path(__file__).parent / "fixtures/providers/adyen_checkout_v71.json").read_text())[
    "schemas"
]


def test_the_request_has_every_field_the_v71_specification_requires() -> None:
    """Every field ``PaymentRequest`` lists as required (amount, merchantAccount,
    paymentMethod, reference, returnUrl) is sent, within the specification's lengths and
    enumerations; without ``returnUrl`` live Adyen refuses every charge (422, 14_030)."""
    body = json.loads(transform.payment_body(attempt("spec-1"), MERCHANT))
    request_schema = SPEC["PaymentRequest"]
    assert set(request_schema["required"]) <= body.keys(), set(request_schema["required"]) - body.keys()
    assert set(SPEC["Amount"]["required"]) <= body["amount"].keys()
    for name, rules in request_schema["properties"].items():
        if name not in body or rules.get("type") != "string":
            continue
        value = body[name]
        assert rules.get("minLength", 0) <= len(value) <= rules.get("maxLength", len(value)), name
        assert value in rules.get("enum", [value]), name
    card = SPEC["CardDetails"]["properties"]
    assert body["paymentMethod"]["type"] in card["type"]["enum"]
    assert len(body["paymentMethod"]["storedPaymentMethodId"]) <= card["storedPaymentMethodId"]["maxLength"]


async def test_a_configured_return_url_is_sent(make_provider: ProviderFactory, gateway: Sandbox) -> None:
    """``return_url`` from the configuration reaches Adyen's ``returnUrl``; the face, which
    enforces the field, approves the charge."""
    provider = make_provider(return_url="https://shop.example/adyen-return")
    assert (await provider.charge(attempt("return-1"))).outcome is Outcome.APPROVED
    body = json.loads(transform.payment_body(attempt("return-1"), MERCHANT, "https://shop.example/r"))
    assert body["returnUrl"] == "https://shop.example/r"
    with pytest.raises(msgspec.ValidationError, match="return_url"):
        make_provider(return_url="shop.example/no-scheme")


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"amount": {"value": 1999, "currency": "EUR"}}, Outcome.APPROVED),
        ({"amount": {"value": 2500, "currency": "EUR"}}, Outcome.UNKNOWN),
        ({"amount": {"value": 1999, "currency": "USD"}}, Outcome.UNKNOWN),
        ({"merchantReference": "7:7", "amount": {"value": 1999, "currency": "EUR"}}, Outcome.UNKNOWN),
    ],
)
def test_a_stored_answer_for_another_payment_settles_nothing(
    answer: dict[str, Any], outcome: Outcome
) -> None:
    """A resend is Adyen's only lookup: the stored answer it replays must be this attempt's.
    ``PaymentResponse`` echoes ``merchantReference`` and the authorised ``amount`` (v71
    specification); an Authorised answer for another amount or currency is UNKNOWN
    (identity mismatch), never this attempt's approval."""
    body = {"resultCode": "Authorised", "pspReference": "P1", "merchantReference": "42:3"} | answer
    result = transform.charge_result(
        200,
        {},
        msgspec.json.encode(body),
        reference="42:3",
        amount=transform.Amount(value=1999, currency="EUR"),
    )
    assert result.outcome is outcome, result
    if outcome is Outcome.UNKNOWN:
        assert result.reason is not None and result.reason.startswith("identity mismatch")


# -- answers the sandbox does not give ------------------------------------------------------


def _mapped(status: int, body: object, headers: dict[str, str] | None = None) -> ChargeResult:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return transform.charge_result(status, headers or {}, raw, reference="42:3")


TRANSIENT = {"transient-error": "true"}
IN_PROGRESS = {"status": 422, "errorCode": "704", "message": "request already processed or in progress"}


@pytest.mark.parametrize(
    ("status", "body", "headers", "outcome"),
    [
        pytest.param(
            200,
            {"resultCode": "Authorised", "merchantReference": "7:7"},
            None,
            Outcome.UNKNOWN,
            id="foreign-reference",
        ),
        pytest.param(200, {"resultCode": "SomethingNew"}, None, Outcome.UNKNOWN, id="unknown-result"),
        pytest.param(200, {"resultCode": "Success"}, None, Outcome.UNKNOWN, id="success"),
        pytest.param(200, b"<html>", None, Outcome.UNKNOWN, id="html"),
        pytest.param(202, {"resultCode": "Received"}, None, Outcome.UNKNOWN, id="202"),
        pytest.param(422, b"not json", None, Outcome.UNKNOWN, id="422-unparseable"),
        pytest.param(422, IN_PROGRESS, TRANSIENT, Outcome.UNKNOWN, id="704-transient"),
        pytest.param(500, {"errorCode": "000"}, TRANSIENT, Outcome.PROVIDER_ERROR, id="500-transient"),
        pytest.param(502, b"", None, Outcome.UNKNOWN, id="502-empty"),
        pytest.param(
            200,
            {"resultCode": "Refused", "refusalReason": "Expired Card"},
            None,
            Outcome.HARD_DECLINE,
            id="reason-text-only",
        ),
        pytest.param(
            200,
            {"resultCode": "Refused", "refusalReasonCode": 12},
            None,
            Outcome.SOFT_DECLINE,
            id="numeric-reason-code",
        ),
    ],
)
def test_mapping_of_answers_the_sandbox_does_not_give(
    status: int, body: object, headers: dict[str, str] | None, outcome: Outcome
) -> None:
    """Anything not recognised, or a stored answer for another payment, is UNKNOWN; a key in
    progress stays UNKNOWN even when marked transient; only a transient 5xx is a clean
    error; a refusal is read by its text when it comes without a code."""
    assert _mapped(status, body, headers).outcome is outcome
