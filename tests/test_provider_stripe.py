"""The Stripe adapter over real HTTP against the sandbox's Stripe dialect (``/stripe``).

Each test starts a sandbox gateway, points a ``StripeProvider`` at ``{sandbox.url}/stripe``
and checks payd's verdict together with what the gateway's ledger says was charged. The
dialect refuses requests off Stripe's documented shape, so an accepted charge is also a
check of the request the adapter sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from daemon.config import ConfigError
from daemon.models import AttemptRequest, Outcome
from daemon.providers.base import Provider
from daemon.providers.stripe import transform
from daemon.providers.stripe.client import StripeProvider, StripeProviderConfig
from tests.support import Sandbox, free_port

API_KEY = "sk_test_payd4sandbox"
SOFT, HARD, UNKNOWN = Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE, Outcome.UNKNOWN
DAY = 24 * 3600.0
# What stripe-python says of API versions and rate-limit answers (source recorded inside).
SDK = json.loads((Path(__file__).parent / "fixtures/providers/stripe_api_version.json").read_text())


@pytest.fixture(autouse=True)
def stripe_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_STRIPE_API_KEY", API_KEY)


def stripe_config(base_url: str, **overrides: Any) -> StripeProviderConfig:
    settings: dict[str, Any] = {
        "kind": "stripe",
        "base_url": base_url,
        "max_in_flight": 20,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "api_version": "2024-12-18.acacia",
    }
    return msgspec.convert(settings | overrides, StripeProviderConfig)


@contextlib.asynccontextmanager
async def open_stripe(sandbox: Sandbox, **overrides: Any) -> AsyncIterator[StripeProvider]:
    provider = StripeProvider("stripe", stripe_config(f"{sandbox.url}/stripe", **overrides))
    try:
        yield provider
    finally:
        await provider.close()


@pytest.fixture
async def stripe(sandbox: Sandbox) -> AsyncIterator[StripeProvider]:
    async with open_stripe(sandbox) as provider:
        yield provider


def attempt(payment_method: str = "pm_ok", *, key: str | None = None, **fields: Any) -> AttemptRequest:
    body: dict[str, Any] = {
        "idempotency_key": key or f"renewal-{uuid.uuid4().hex}",
        "subscription_id": 7,
        "cycle": 3,
        "amount_minor": 1999,
        "currency": "EUR",
        "provider": "stripe",
        "payment_method": payment_method,
        "customer_ref": "cus_payd",
        "metadata": {"plan": "monthly"},
    }
    return msgspec.convert(body | fields, AttemptRequest)


async def stripe_get(sandbox: Sandbox, path: str, **params: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{sandbox.url}/stripe/{path}",
            params=params,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        return response.status, dict(await response.json())


async def stripe_post(
    sandbox: Sandbox, form: Mapping[str, str] | str, headers: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sandbox.url}/stripe/v1/payment_intents", data=form, headers=headers) as response,
    ):
        return response.status, dict(await response.json())


async def test_the_adapter_satisfies_the_provider_protocol() -> None:
    """The class is a ``payd.providers`` factory: a ``Provider`` with its own config type."""
    provider = StripeProvider("stripe", stripe_config("http://127.0.0.1:1/stripe"))
    assert isinstance(provider, Provider)
    assert StripeProvider.config_type is StripeProviderConfig
    await provider.close()


async def test_approved_renewal_is_one_off_session_payment_intent_with_payds_reference(
    sandbox: Sandbox, stripe: StripeProvider
) -> None:
    """A renewal becomes exactly one charge, and the PaymentIntent carries what reconciliation
    and operators need: amount, lower-case currency, customer, payd's key and reference in
    the metadata (with the caller's), a description, the card payment method type."""
    request = attempt()
    result = await stripe.charge(request)
    assert result.outcome is Outcome.APPROVED, result
    assert result.provider_ref is not None and result.provider_ref.startswith("pi_")

    status, intent = await stripe_get(sandbox, f"v1/payment_intents/{result.provider_ref}")
    assert status == 200, intent
    assert intent["status"] == "succeeded"
    assert (intent["amount"], intent["currency"], intent["customer"]) == (1999, "eur", "cus_payd")
    assert intent["payment_method"] == "pm_ok"
    assert intent["metadata"] == {
        "payd_key": request.idempotency_key,
        "payd_reference": "7:3",
        "plan": "monthly",
    }
    assert intent["description"] == "payd 7:3"
    assert intent["payment_method_types"] == ["card"]

    [charge] = await sandbox.ledger()
    assert charge["status"] == "approved"
    assert charge["idempotency_key"] == request.idempotency_key
    assert charge["merchant_reference"] == "7:3"
    assert (charge["amount_minor"], charge["currency"]) == (1999, "EUR")


async def test_the_charge_is_sent_off_session(sandbox: Sandbox, stripe: StripeProvider) -> None:
    """``off_session=true`` reaches Stripe: a card that needs 3-D Secure fails with the
    off-session 402 ``authentication_required``; the same request sent on-session would
    leave the PaymentIntent waiting in ``requires_action`` (checked directly)."""
    result = await stripe.charge(attempt("pm_stripe_authentication_required"))
    assert (result.outcome, result.decline_code) == (HARD, "authentication_required"), result

    on_session = {
        "amount": "1999",
        "currency": "eur",
        "customer": "cus_payd",
        "payment_method": "pm_stripe_authentication_required",
        "confirm": "true",
    }
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "on-session-1"}
    status, intent = await stripe_post(sandbox, on_session, headers)
    assert (status, intent["status"]) == (200, "requires_action"), intent


GOOD_FORM = {
    "amount": "1999",
    "currency": "eur",
    "customer": "cus_payd",
    "payment_method": "pm_ok",
    "confirm": "true",
    "off_session": "true",
    "metadata[payd_key]": "direct",
}
GOOD_HEADERS = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "direct-1"}


@pytest.mark.parametrize(
    ("form", "headers", "status", "param"),
    [
        (GOOD_FORM, {"Idempotency-Key": "k"}, 401, None),
        (GOOD_FORM, {"Authorization": "Bearer not_a_key", "Idempotency-Key": "k"}, 401, None),
        (GOOD_FORM, {"Authorization": "Bearer rk_test_readonly_9", "Idempotency-Key": "k"}, 403, None),
        (GOOD_FORM, {"Authorization": f"Bearer {API_KEY}"}, 400, None),
        (GOOD_FORM, GOOD_HEADERS | {"Stripe-Version": "latest"}, 400, None),
        ('{"amount": 1999}', GOOD_HEADERS | {"Content-Type": "application/json"}, 400, None),
        ({k: v for k, v in GOOD_FORM.items() if k != "amount"}, GOOD_HEADERS, 400, "amount"),
        (GOOD_FORM | {"amount": "19.99"}, GOOD_HEADERS, 400, "amount"),
        (GOOD_FORM | {"currency": "EUR"}, GOOD_HEADERS, 400, "currency"),
        ({k: v for k, v in GOOD_FORM.items() if k != "confirm"}, GOOD_HEADERS, 400, "confirm"),
        (GOOD_FORM | {"off_session": "sometimes"}, GOOD_HEADERS, 400, "off_session"),
        ({k: v for k, v in GOOD_FORM.items() if k != "customer"}, GOOD_HEADERS, 400, "customer"),
        (GOOD_FORM | {"amount_minor": "1999"}, GOOD_HEADERS, 400, "amount_minor"),
        (GOOD_FORM | {"payment_method_types[0]": "sepa_debit"}, GOOD_HEADERS, 400, "payment_method"),
    ],
)
async def test_the_dialect_refuses_requests_off_stripes_documented_shape(
    sandbox: Sandbox,
    form: Mapping[str, str] | str,
    headers: Mapping[str, str],
    status: int,
    param: str | None,
) -> None:
    """The dialect checks what Stripe checks (API key, permissions, form encoding, the
    documented parameters, Stripe-Version) plus the sandbox's needs (idempotency key,
    confirm, customer), and charges nothing when it refuses; the well-formed request is
    accepted, so the adapter's accepted charges above passed the same checks."""
    ok_status, ok_body = await stripe_post(sandbox, GOOD_FORM, GOOD_HEADERS)
    assert ok_status == 200, ok_body
    answer_status, body = await stripe_post(sandbox, form, headers)
    assert answer_status == status, body
    assert body["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert body["error"]["param"] == param
    assert len(await sandbox.ledger()) == 1  # only the well-formed request


# token, outcome, decline_code, retry_after_s
DECLINES = [
    ("pm_insufficient_funds", SOFT, "insufficient_funds", None),
    ("pm_stolen", HARD, "stolen_card", None),
    ("pm_stripe_do_not_honor", SOFT, "do_not_honor", None),
    ("pm_stripe_generic_decline", SOFT, "generic_decline", None),
    ("pm_stripe_lost_card", HARD, "lost_card", None),
    ("pm_stripe_pickup_card", HARD, "pickup_card", None),
    ("pm_stripe_fraudulent", HARD, "fraudulent", None),
    ("pm_stripe_expired_card", HARD, "expired_card", None),
    ("pm_stripe_processing_error", SOFT, "processing_error", None),
    ("pm_stripe_decline_rate_limited", SOFT, "card_decline_rate_limit_exceeded", DAY),
    ("pm_stripe_duplicate_transaction", HARD, "duplicate_transaction", None),
    ("pm_stripe_unknown_decline", SOFT, "a_code_stripe_adds_tomorrow", None),
    ("pm_stripe_try_again_later", SOFT, "generic_decline", None),
    ("pm_stripe_do_not_try_again", HARD, "insufficient_funds", None),
    ("pm_stripe_confirm_card_data", HARD, "generic_decline", None),
    ("pm_stripe_mac_01", SOFT, "do_not_honor", None),
    ("pm_stripe_mac_02", SOFT, "insufficient_funds", None),
    ("pm_stripe_mac_03", HARD, "insufficient_funds", None),
    ("pm_stripe_mac_03_visa", SOFT, "insufficient_funds", None),
    # Mastercard MAC 04, "Token requirements not fulfilled for this token type": hard in every
    # adapter (tests/test_provider_advice.py).
    ("pm_stripe_mac_04", HARD, "do_not_honor", None),
    ("pm_stripe_mac_21", HARD, "do_not_honor", None),
    ("pm_stripe_mac_24", SOFT, "insufficient_funds", 3600.0),
    ("pm_stripe_mac_30", SOFT, "insufficient_funds", 10 * DAY),
    ("pm_stripe_authentication_required", HARD, "authentication_required", None),
    ("pm_stripe_requires_action", HARD, "requires_action", None),
]


@pytest.mark.parametrize(("token", "outcome", "decline_code", "retry_after_s"), DECLINES)
async def test_declines_map_by_code_then_advice(
    sandbox: Sandbox,
    stripe: StripeProvider,
    token: str,
    outcome: Outcome,
    decline_code: str,
    retry_after_s: float | None,
) -> None:
    """Each retry-relevant row of the decline table: the decline code sets soft or hard,
    Stripe's advice_code and Mastercard's advice code (network_advice_code, only on a
    Mastercard) turn it hard when they say do not retry and add the earliest retry time
    they document; the decline charged nothing and names its PaymentIntent."""
    result = await stripe.charge(attempt(token))
    assert (result.outcome, result.decline_code, result.retry_after_s) == (
        outcome,
        decline_code,
        retry_after_s,
    ), result
    assert result.retryable is (outcome is SOFT)
    assert result.provider_ref is not None and result.provider_ref.startswith("pi_")
    assert [c["status"] for c in await sandbox.ledger()] == ["declined"]


async def test_rate_limit_is_rate_limited_honouring_retry_after(
    sandbox: Sandbox, stripe: StripeProvider
) -> None:
    """A 429 (rate limiters run before Stripe's idempotency layer) charged nothing: it is
    RATE_LIMITED with the answer's Retry-After, and the key stays free for the retry."""
    await sandbox.behave(retry_after_s=7)
    request = attempt("pm_rate_limited")
    result = await stripe.charge(request)
    assert (result.outcome, result.retry_after_s, result.retryable) == (Outcome.RATE_LIMITED, 7.0, True)
    assert await sandbox.ledger() == []
    found = await stripe.lookup(request)
    assert found is not None and not found.found


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("pm_error", "500 api_error"),
        ("pm_stripe_lock_timeout", "lock_timeout"),
        ("pm_stripe_processing", "processing"),
    ],
)
async def test_answers_that_may_have_charged_are_unknown(
    stripe: StripeProvider, token: str, why: str
) -> None:
    """A 500 (Stripe: "treat the result of a 500 as indeterminate"), a lock timeout raised
    while the request executed, and a PaymentIntent still processing are UNKNOWN, never a
    retryable error: only a lookup may settle them."""
    result = await stripe.charge(attempt(token))
    assert result.outcome is UNKNOWN, result
    assert result.reason is not None and why in result.reason


@pytest.mark.parametrize(("key", "status"), [("not_a_key", 401), ("rk_test_readonly_9", 403)])
async def test_auth_failures_are_provider_errors_not_retried(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, key: str, status: int
) -> None:
    """A 401 (no valid key) or 403 (a restricted key without the permission) is the
    configuration's fault: nothing was charged and trying again cannot help."""
    monkeypatch.setenv("PAYD_STRIPE_API_KEY", key)
    async with open_stripe(sandbox) as provider:
        result = await provider.charge(attempt())
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False), result
    assert result.reason is not None and result.reason.startswith(str(status))
    assert await sandbox.ledger() == []


async def test_replay_under_the_same_key_charges_once(sandbox: Sandbox, stripe: StripeProvider) -> None:
    """Sent again under its key, a charge is answered from Stripe's idempotency store (same
    PaymentIntent, nothing new charged); requests racing the first one get 409
    ``idempotency_key_in_use``, which is UNKNOWN, never a second charge."""
    request = attempt()
    first = await stripe.charge(request)
    again = await stripe.charge(request)
    assert first.outcome is again.outcome is Outcome.APPROVED
    assert again.provider_ref == first.provider_ref

    await sandbox.behave(latency_ms=300)
    racing = attempt(subscription_id=8)
    results = await asyncio.gather(*(stripe.charge(racing) for _ in range(4)))
    approved = {r.provider_ref for r in results if r.outcome is Outcome.APPROVED}
    assert len(approved) == 1, results
    assert all(r.outcome in (Outcome.APPROVED, UNKNOWN) for r in results), results
    assert any(r.outcome is UNKNOWN and "idempotency_key_in_use" in (r.reason or "") for r in results)

    settled = await stripe.charge(racing)
    assert (settled.outcome, settled.provider_ref) == (Outcome.APPROVED, approved.pop())
    approvals = await sandbox.assert_no_double_charge()
    assert sorted(c["idempotency_key"] for c in approvals) == sorted(
        [request.idempotency_key, racing.idempotency_key]
    )


@pytest.mark.parametrize("change", [{"amount_minor": 2999}, {"metadata": {"plan": "yearly"}}])
async def test_a_key_reused_with_other_parameters_is_unknown(
    sandbox: Sandbox, stripe: StripeProvider, change: dict[str, Any]
) -> None:
    """Stripe compares a retry's parameters with the first request's and answers 400
    ``idempotency_error`` on any difference; whatever the first request did stands, so
    the verdict is UNKNOWN and nothing more is charged."""
    request = attempt()
    assert (await stripe.charge(request)).outcome is Outcome.APPROVED
    changed = msgspec.structs.replace(request, **change)
    result = await stripe.charge(changed)
    assert result.outcome is UNKNOWN, result
    assert result.reason is not None and "idempotency_error" in result.reason
    assert len(await sandbox.ledger()) == 1


async def test_lookup_finds_earlier_charges_and_not_unsent_ones(
    sandbox: Sandbox, stripe: StripeProvider
) -> None:
    """Reconciliation's question: a lookup by idempotency key (the customer's PaymentIntents,
    matched on ``metadata[payd_key]``) returns the outcome the charge got; a key that never
    reached Stripe is not found. Stripe remembers keys 24 h, which payd is told."""
    assert stripe.capabilities.honours_idempotency_key
    assert stripe.capabilities.lookup_by_key
    assert stripe.capabilities.idempotency_key_ttl_s == DAY
    approved, declined = attempt(), attempt("pm_stripe_mac_24", subscription_id=8)
    charged = [await stripe.charge(approved), await stripe.charge(declined)]
    for request, result in zip((approved, declined), charged, strict=True):
        found = await stripe.lookup(request)
        assert found is not None and found.found and found.result == result, (found, result)

    never_sent = await stripe.lookup(attempt())
    assert never_sent is not None and not never_sent.found


async def test_lookup_beyond_the_pages_it_lists_asks_the_search_api(sandbox: Sandbox) -> None:
    """When the attempt is older than the list pages a lookup reads, the lookup falls back to
    Stripe's Search API on ``metadata["payd_key"]`` and still finds it; an unknown key is
    not found there either."""
    async with open_stripe(sandbox, lookup_page_size=2, lookup_max_pages=1) as provider:
        requests = [attempt(subscription_id=100 + i) for i in range(3)]
        results = [await provider.charge(request) for request in requests]
        found = await provider.lookup(requests[0])
        assert found is not None and found.found and found.result == results[0], found
        missing = await provider.lookup(attempt())
        assert missing is not None and not missing.found
    status, page = await stripe_get(sandbox, "v1/payment_intents", customer="cus_payd", limit="2")
    assert (status, page["has_more"], len(page["data"])) == (200, True, 2)


async def test_timeout_after_sending_is_unknown_then_lookup_settles_it(sandbox: Sandbox) -> None:
    """A request that times out after it was sent may have charged: UNKNOWN. The lookup
    then finds the charge, and a resend under the same key answers the same PaymentIntent
    without charging again."""
    await sandbox.behave(hang_s=5)
    async with open_stripe(sandbox, timeout_s=0.5) as provider:
        request = attempt("pm_timeout")
        result = await provider.charge(request)
        assert result.outcome is UNKNOWN and result.reason == "timed out after the request was sent", result
        found = await provider.lookup(request)
        assert found is not None and found.found and found.result is not None, found
        assert found.result.outcome is Outcome.APPROVED
        resent = await provider.charge(request)
        assert (resent.outcome, resent.provider_ref) == (Outcome.APPROVED, found.result.provider_ref)
    assert [c["status"] for c in await sandbox.ledger()] == ["approved"]


async def test_connect_failure_is_a_clean_provider_error() -> None:
    """Nothing listens: the request never left, so it is PROVIDER_ERROR (safe to retry)."""
    provider = StripeProvider("stripe", stripe_config(f"http://127.0.0.1:{free_port()}/stripe"))
    try:
        result = await provider.charge(attempt())
    finally:
        await provider.close()
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, True), result
    assert result.reason is not None and result.reason.startswith("not sent")


@pytest.mark.parametrize(
    "fields",
    [{"customer_ref": None}, {"metadata": {"payd_key": "mine"}}, {"metadata": {"a[b]": "c"}}],
)
async def test_requests_stripe_would_refuse_are_not_sent(
    sandbox: Sandbox, stripe: StripeProvider, fields: dict[str, Any]
) -> None:
    """Without the customer the saved card belongs to, or with metadata Stripe refuses or
    payd reserves, the request is refused before sending: a non-retryable provider error
    that never reached the gateway."""
    result = await stripe.charge(attempt(**fields))
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False), result
    assert (await sandbox.stats())["requests"] == 0


async def test_the_api_key_is_required_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes from the ``stripe_api_key`` secret; missing, the provider refuses to
    start naming where to put it; present, it appears in no repr of the provider's state."""
    config = stripe_config("http://127.0.0.1:1/stripe")
    monkeypatch.delenv("PAYD_STRIPE_API_KEY")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="PAYD_STRIPE_API_KEY"):
        StripeProvider("stripe", config)
    monkeypatch.setenv("PAYD_STRIPE_API_KEY", API_KEY)
    provider = StripeProvider("stripe", config)
    try:
        assert API_KEY not in repr(provider)
        assert API_KEY not in repr(vars(provider))
    finally:
        await provider.close()


@pytest.mark.parametrize(
    ("overrides", "bad_key"),
    [({"api_version": "latest"}, "api_version"), ({"secret_key": "sk_live_x"}, "secret_key")],
)
def test_config_rejects_bad_and_unknown_keys(overrides: dict[str, Any], bad_key: str) -> None:
    """A malformed ``api_version`` or an unknown key (a secret pasted into config.toml) is
    refused, naming the key."""
    with pytest.raises(msgspec.ValidationError, match=bad_key):
        stripe_config("http://127.0.0.1:1/stripe", **overrides)


def _intent(status: str) -> bytes:
    return msgspec.json.encode({"id": "pi_1", "object": "payment_intent", "status": status})


def _error(kind: str, code: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"type": kind, "code": code, "message": "m"}})


@pytest.mark.parametrize(
    ("status", "headers", "body", "outcome", "retryable"),
    [
        (200, {}, _intent("canceled"), Outcome.PROVIDER_ERROR, False),
        (200, {}, _intent("requires_capture"), UNKNOWN, True),
        (200, {}, _intent("a_status_from_the_future"), UNKNOWN, True),
        (200, {}, b'{"id": "ch_1", "object": "charge", "status": "succeeded"}', UNKNOWN, True),
        (402, {}, _error("invalid_request_error"), UNKNOWN, True),
        (404, {}, _error("invalid_request_error", "resource_missing"), Outcome.PROVIDER_ERROR, False),
        (409, {}, _error("invalid_request_error", "lock_timeout"), UNKNOWN, True),
        (424, {}, _error("api_error"), UNKNOWN, True),
        (429, {}, _error("invalid_request_error", "rate_limit"), Outcome.RATE_LIMITED, True),
        # stripe-python, _api_requestor.specific_v1_api_error: "Rate limits were previously
        # coded as 400's with code 'rate_limit'" (the same RateLimitError as a 429).
        (400, {}, _error("invalid_request_error", "rate_limit"), Outcome.RATE_LIMITED, True),
        (500, {"Stripe-Should-Retry": "false"}, _error("api_error"), UNKNOWN, True),
        (502, {}, b"<html>bad gateway</html>", UNKNOWN, True),
        (504, {}, _error("api_error"), UNKNOWN, True),
        (418, {}, _error("api_error"), UNKNOWN, True),
    ],
)
def test_answers_the_dialect_does_not_produce(
    status: int, headers: dict[str, str], body: bytes, outcome: Outcome, retryable: bool
) -> None:
    """Rows of the mapping the sandbox cannot make Stripe answer, checked on the transform:
    a canceled intent charged nothing; an authorised-not-captured or unknown status, a 402
    that is not a card error, 424, 5xx (even with ``Stripe-Should-Retry: false``), a body
    that does not parse and an unknown status code are UNKNOWN; a 429 without Retry-After
    waits one second (Stripe's limits are per second)."""
    result = transform.charge_result(status, headers, body)
    assert (result.outcome, result.retryable) == (outcome, retryable), result
    if outcome is Outcome.RATE_LIMITED:
        assert result.retry_after_s == 1.0


async def test_the_api_version_is_pinned_when_the_config_names_none(sandbox: Sandbox) -> None:
    """Without a ``Stripe-Version`` header Stripe answers in the account's default version, and
    error objects before 2024-12-18.acacia carry no ``advice_code`` (Stripe changelog, "Network
    advice and decline codes", 2024-12-18.acacia; docs.stripe.com/api/versioning). payd pins a
    version by default, so Stripe's "do not try again" advice still makes the decline hard
    instead of a soft decline that dunning would retry."""
    settings = {"kind": "stripe", "base_url": f"{sandbox.url}/stripe", "max_in_flight": 2, "timeout_s": 2}
    config = msgspec.convert(settings, StripeProviderConfig)
    assert config.api_version == transform.DEFAULT_API_VERSION
    provider = StripeProvider("stripe", config)
    try:
        result = await provider.charge(attempt("pm_stripe_do_not_try_again"))
    finally:
        await provider.close()
    assert (result.outcome, result.retryable) == (HARD, False), result


async def test_a_lookup_never_settles_a_payment_intent_of_another_amount(
    sandbox: Sandbox, stripe: StripeProvider
) -> None:
    """A PaymentIntent found under the attempt's key but for another amount (or currency) is
    not the attempt's payment: the lookup reports an anomaly and settles nothing, where it
    used to report the other payment's approval as this attempt's."""
    key = f"renewal-{uuid.uuid4().hex}"
    assert (await stripe.charge(attempt(key=key, amount_minor=1999))).outcome is Outcome.APPROVED
    for other in (attempt(key=key, amount_minor=2500), attempt(key=key, currency="USD")):
        found = await stripe.lookup(other)
        assert found is not None and found.found and found.result is None, found
        assert found.anomaly is not None and found.anomaly.startswith("payment intent pi_")
    same = await stripe.lookup(attempt(key=key, amount_minor=1999))
    assert same is not None and same.anomaly is None and same.result is not None
    assert same.result.outcome is Outcome.APPROVED


def test_a_search_answering_with_another_key_is_an_anomaly() -> None:
    """Stripe's search is matched on ``metadata["payd_key"]``; a result page that holds only
    PaymentIntents under other keys (a query the HTTP stack altered, a key that lost a
    character) is an anomaly, never "not found" (which would let payd re-send) nor a result."""
    page = transform.PaymentIntentPage(
        object="search_result",
        data=[
            transform.PaymentIntent(
                id="pi_other",
                object="payment_intent",
                status="succeeded",
                amount=1999,
                currency="eur",
                metadata={transform.KEY_METADATA: "renewal-1"},
            )
        ],
    )
    found = transform.search_lookup_result(page, attempt(key="renewal-1x"))
    assert found.found and found.result is None and found.anomaly is not None
    assert "renewal-1" in found.anomaly
    assert transform.search_lookup_result(page, attempt(key="renewal-1")).result is not None


def test_the_pinned_version_carries_network_advice_and_legacy_rate_limits_are_rate_limits() -> None:
    """The default ``Stripe-Version`` is no older than the first version with
    ``network_advice_code`` (stripe-python 11.4.0 changelog), and every answer stripe-python
    raises as ``RateLimitError`` (429, and the legacy 400 ``rate_limit``) is RATE_LIMITED."""
    assert transform.DEFAULT_API_VERSION[:10] >= SDK["network_advice_code_since"][:10]
    for answer in SDK["rate_limit_answers"]:
        body = _error("invalid_request_error", answer["code"])
        result = transform.charge_result(answer["status"], {}, body)
        assert (result.outcome, result.retryable) == (Outcome.RATE_LIMITED, True), answer
