"""The Checkout.com adapter over real HTTP against the sandbox's Checkout.com dialect.

Each test starts a sandbox gateway (``/checkout`` routes on the shared core) and
talks to it through ``CheckoutProvider``, the way the pipeline does. What was
charged is read from the gateway's ledger, what was sent from the dialect's record
of the request. A few mapping rows the dialect cannot produce (answers Checkout.com
documents but the sandbox has no reason to give) are checked on the mapping itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.config import ConfigError
from daemon.models import CHARGED_NOTHING, AttemptRequest, ChargeResult, Outcome
from daemon.providers import registry
from daemon.providers.base import Provider
from daemon.providers.checkout import transform
from daemon.providers.checkout.client import CheckoutProvider, CheckoutProviderConfig
from tests.support import Broker, DaemonFactory, Sandbox, eventually, free_port, query, request

SECRET_KEY = "sk_sbox_paydtestkey0001"
CHANNEL = "pc_paydtest0001"
# Checkout.com's response code ranges and idempotency rule (source recorded inside).
SPEC = json.loads((Path(__file__).parent / "fixtures/providers/checkout_response_codes.json").read_text())
DAY = 86400.0


@pytest.fixture(autouse=True)
def secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_CHECKOUT_API_KEY", SECRET_KEY)


def provider_config(base_url: str, **overrides: Any) -> CheckoutProviderConfig:
    table = {
        "kind": "checkout",
        "base_url": base_url,
        "max_in_flight": 20,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "processing_channel_id": CHANNEL,
    } | overrides
    return msgspec.convert(table, CheckoutProviderConfig)


@contextlib.asynccontextmanager
async def checkout(sandbox: Sandbox, **overrides: Any) -> AsyncIterator[CheckoutProvider]:
    provider = CheckoutProvider("checkout", provider_config(f"{sandbox.url}/checkout", **overrides))
    try:
        yield provider
    finally:
        await provider.close()


def attempt(
    payment_method: str = "pm_ok",
    *,
    key: str | None = None,
    subscription_id: int | None = 42,
    cycle: int | None = 7,
    amount_minor: int = 1999,
    **extra: Any,
) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=key or f"cko-{uuid.uuid4().hex}",
        subscription_id=subscription_id,
        cycle=cycle if subscription_id is not None else None,
        amount_minor=amount_minor,
        currency="EUR",
        provider="checkout",
        payment_method=payment_method,
        **extra,
    )


async def received(sandbox: Sandbox, key: str) -> dict[str, Any]:
    """What the dialect received for ``key`` (body and header names)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sandbox.url}/checkout/_sandbox/requests/{key}") as response,
    ):
        assert response.status == 200, f"the dialect received no charge request with key {key}"
        return dict(await response.json())


# --- the request ------------------------------------------------------------------------


async def test_charge_sends_the_documented_request_and_is_approved(sandbox: Sandbox) -> None:
    """An approved charge is APPROVED with the payment id, charged once under our key, and
    the request is a merchant-initiated recurring payment of the stored source, with the
    reference, channel, idempotency key and bearer key Checkout.com expects."""
    request = attempt(customer_ref="crm-77", metadata={"plan": "monthly"})
    async with checkout(sandbox) as provider:
        result = await provider.charge(request)

    assert result.outcome is Outcome.APPROVED
    assert result.provider_ref is not None and result.provider_ref.startswith("pay_")
    [charge] = await sandbox.ledger()
    assert (charge["idempotency_key"], charge["merchant_reference"], charge["status"]) == (
        request.idempotency_key,
        "42:7",
        "approved",
    )
    assert charge["amount_minor"] == 1999 and charge["account"] == CHANNEL

    sent = await received(sandbox, request.idempotency_key)
    assert sent["body"] == {
        "source": {"type": "id", "id": "pm_ok"},
        "amount": 1999,
        "currency": "EUR",
        "reference": "42:7",
        "payment_type": "Recurring",
        "merchant_initiated": True,
        "capture": True,
        "processing_channel_id": CHANNEL,
        "metadata": {
            "plan": "monthly",
            transform.IDEMPOTENCY_KEY_METADATA: request.idempotency_key,
            transform.CUSTOMER_REF_METADATA: "crm-77",
        },
    }, "a customer reference that is not a Checkout.com customer id travels in metadata"
    assert sent["authorization_scheme"] == "Bearer"
    assert {"Authorization", "Cko-Idempotency-Key", "Content-Type"} <= set(sent["header_names"])


async def test_a_checkout_customer_id_is_sent_as_the_customer(sandbox: Sandbox) -> None:
    """A ``cus_`` customer reference is sent as ``customer.id``, where Checkout.com links it."""
    request = attempt(customer_ref="cus_abcdefghijklmnopqrstuvwxyz", subscription_id=None)
    async with checkout(sandbox) as provider:
        assert (await provider.charge(request)).outcome is Outcome.APPROVED
    body = (await received(sandbox, request.idempotency_key))["body"]
    assert body["customer"] == {"id": "cus_abcdefghijklmnopqrstuvwxyz"}
    assert body["reference"] == request.idempotency_key, "a one-off charge's reference is its key"


async def test_the_dialect_refuses_what_checkout_would_refuse(sandbox: Sandbox) -> None:
    """The sandbox checks the documented shape (so an accepted request means something):
    no processing channel or no source is 422 ``request_invalid``, a missing key is 401,
    and neither charges anything."""
    base = {"source": {"type": "id", "id": "pm_ok"}, "amount": 100, "currency": "EUR"}
    async with aiohttp.ClientSession() as http:
        for body, headers, status, code in [
            (base, {"Authorization": f"Bearer {SECRET_KEY}"}, 422, "processing_channel_id_required"),
            (
                {"amount": 100, "currency": "EUR", "processing_channel_id": CHANNEL},
                {"Authorization": f"Bearer {SECRET_KEY}"},
                422,
                "payment_source_required",
            ),
            (base | {"processing_channel_id": CHANNEL}, {}, 401, None),
        ]:
            async with http.post(f"{sandbox.url}/checkout/payments", json=body, headers=headers) as response:
                assert response.status == status
                if code is not None:
                    error = await response.json()
                    assert error["error_type"] == "request_invalid" and code in error["error_codes"]
    assert await sandbox.ledger() == []


# --- the mapping, over HTTP ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "outcome", "decline_code", "retry_after_s"),
    [
        ("pm_insufficient_funds", Outcome.SOFT_DECLINE, "insufficient_funds", None),
        ("pm_cko_do_not_honour", Outcome.SOFT_DECLINE, "do_not_honour", None),
        ("pm_stolen", Outcome.HARD_DECLINE, "stolen_card", None),
        ("pm_cko_expired", Outcome.HARD_DECLINE, "expired_card", None),
        ("pm_cko_restricted", Outcome.HARD_DECLINE, "restricted_card", None),
        ("pm_cko_security", Outcome.HARD_DECLINE, "security_violation", None),
        ("pm_cko_pickup", Outcome.HARD_DECLINE, "pick_up_card", None),
        ("pm_cko_lost", Outcome.HARD_DECLINE, "lost_card", None),
        ("pm_cko_revoked", Outcome.HARD_DECLINE, "stop_payment_order", None),
        ("pm_cko_risk", Outcome.HARD_DECLINE, "cko_41101", None),
        # "4xxxx: the request triggered a risk response" (checkout.com/docs/resources/codes/
        # api-response-codes); 40101 "Risk Blocked Transaction" used to stay unknown forever.
        ("pm_cko_risk_40101", Outcome.HARD_DECLINE, "risk_blocked", None),
        ("pm_cko_mac_03", Outcome.HARD_DECLINE, "do_not_try_again", None),
        ("pm_cko_mac_21", Outcome.HARD_DECLINE, "recurring_payment_cancelled", None),
        ("pm_cko_mac_24", Outcome.SOFT_DECLINE, "insufficient_funds", 3600.0),
        ("pm_cko_mac_25", Outcome.SOFT_DECLINE, "insufficient_funds", DAY),
        ("pm_cko_mac_26", Outcome.SOFT_DECLINE, "insufficient_funds", 2 * DAY),
        ("pm_cko_mac_27", Outcome.SOFT_DECLINE, "insufficient_funds", 4 * DAY),
        ("pm_cko_mac_28", Outcome.SOFT_DECLINE, "insufficient_funds", 6 * DAY),
        ("pm_cko_mac_29", Outcome.SOFT_DECLINE, "insufficient_funds", 8 * DAY),
        ("pm_cko_mac_30", Outcome.SOFT_DECLINE, "insufficient_funds", 10 * DAY),
    ],
)
async def test_declines_map_by_response_code_and_merchant_advice(
    sandbox: Sandbox, token: str, outcome: Outcome, decline_code: str, retry_after_s: float | None
) -> None:
    """Each decline row: soft ones may be retried (after the MAC's wait, when it gives one),
    hard ones (hard codes, MAC 03/21) never; the lookup agrees with the charge; one
    declined charge, nothing approved."""
    request = attempt(token)
    async with checkout(sandbox) as provider:
        result = await provider.charge(request)
        looked_up = await provider.lookup(request)

    assert (result.outcome, result.decline_code, result.retry_after_s) == (
        outcome,
        decline_code,
        retry_after_s,
    )
    assert result.retryable is (outcome is Outcome.SOFT_DECLINE)
    assert result.provider_ref is not None and result.provider_ref.startswith("pay_")
    assert looked_up is not None and looked_up.found and looked_up.result == result
    assert [c["status"] for c in await sandbox.ledger()] == ["declined"]


async def test_a_decline_caused_by_our_account_is_a_provider_error(sandbox: Sandbox) -> None:
    """20157 (invalid merchant configuration) blames our set-up, not the card: a provider
    error that is not retried (the key now replays the decline), not a customer decline."""
    async with checkout(sandbox) as provider:
        result = await provider.charge(attempt("pm_cko_merchant_config"))
    assert (result.outcome, result.decline_code, result.retryable) == (
        Outcome.PROVIDER_ERROR,
        "merchant_configuration",
        False,
    )


async def test_an_unrecognised_response_code_is_unknown(sandbox: Sandbox) -> None:
    """A response code in no documented range is UNKNOWN, never guessed to be a decline."""
    async with checkout(sandbox) as provider:
        result = await provider.charge(attempt("pm_cko_unrecognised"))
    assert result.outcome is Outcome.UNKNOWN and "60000" in (result.reason or "")


async def test_rate_limited_honours_retry_after_and_charges_nothing(sandbox: Sandbox) -> None:
    """429 is RATE_LIMITED (charged nothing, may be sent again) after ``Retry-After``."""
    await sandbox.behave(retry_after_s=7)
    async with checkout(sandbox) as provider:
        result = await provider.charge(attempt("pm_rate_limited"))
    assert (result.outcome, result.retry_after_s, result.retryable) == (Outcome.RATE_LIMITED, 7.0, True)
    assert await sandbox.ledger() == []


async def test_invalid_request_is_a_provider_error_that_is_not_retried(sandbox: Sandbox) -> None:
    """422 ``request_invalid`` is a provider error that sending again cannot fix, with the
    error codes in the reason, and nothing charged."""
    async with checkout(sandbox) as provider:
        result = await provider.charge(attempt("pm_cko_invalid"))
    assert (result.outcome, result.retryable, result.decline_code) == (
        Outcome.PROVIDER_ERROR,
        False,
        "request_invalid",
    )
    assert "source_id_invalid" in (result.reason or "")
    assert await sandbox.ledger() == []


async def test_refused_secret_key_is_a_provider_error_that_is_not_retried(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """401 is a provider error payd must not retry (the key is wrong for every attempt);
    the key itself appears nowhere in the result."""
    monkeypatch.setenv("PAYD_CHECKOUT_API_KEY", "not-a-checkout-key")
    async with checkout(sandbox) as provider:
        result = await provider.charge(attempt())
        looked_up = await provider.lookup(attempt())
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False)
    assert "not-a-checkout-key" not in repr(result)
    assert looked_up is None, "a lookup that was refused says nothing"
    assert await sandbox.ledger() == []


async def test_server_error_is_unknown_and_the_lookup_finds_nothing(sandbox: Sandbox) -> None:
    """502 is not documented as "nothing processed", so it is UNKNOWN; reconciliation's
    lookup then finds no payment under the attempt's key (the sandbox charged nothing)."""
    request = attempt("pm_error")
    async with checkout(sandbox) as provider:
        result = await provider.charge(request)
        looked_up = await provider.lookup(request)
    assert result.outcome is Outcome.UNKNOWN
    assert looked_up is not None and looked_up.found is False
    assert await sandbox.ledger() == []


# --- idempotency, pending, timeouts, lookups -----------------------------------------------


async def test_same_key_replays_and_charges_once(sandbox: Sandbox) -> None:
    """A second request with the same key (a retry, a reconciliation resend) gets the first
    one's payment back; the gateway charged once."""
    request = attempt()
    async with checkout(sandbox) as provider:
        first = await provider.charge(request)
        again = await provider.charge(request)
    assert first.outcome is again.outcome is Outcome.APPROVED
    assert again.provider_ref == first.provider_ref
    assert len(await sandbox.ledger()) == 1
    await sandbox.assert_no_double_charge()


async def test_concurrent_same_key_charges_once(sandbox: Sandbox) -> None:
    """Two requests with one key at the same time: Checkout.com processes one and answers the
    other 409, which is UNKNOWN (it may yet charge), never a second charge or a clean failure."""
    await sandbox.behave(latency_ms=300)
    request = attempt()
    async with checkout(sandbox) as provider:
        results = await asyncio.gather(provider.charge(request), provider.charge(request))
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == ["approved", "unknown"]
    assert "409" in (next(r for r in results if r.outcome is Outcome.UNKNOWN).reason or "")
    assert len(await sandbox.ledger()) == 1


async def test_same_key_with_another_amount_is_not_taken_for_this_charge(sandbox: Sandbox) -> None:
    """Checkout.com answers a reused key with the original response whatever the body; an
    approval for another amount is UNKNOWN, not this attempt's approval."""
    key = f"cko-{uuid.uuid4().hex}"
    async with checkout(sandbox) as provider:
        assert (await provider.charge(attempt(key=key, amount_minor=1000))).outcome is Outcome.APPROVED
        other = await provider.charge(attempt(key=key, amount_minor=2500))
    assert other.outcome is Outcome.UNKNOWN and "another amount" in (other.reason or "")
    assert len(await sandbox.ledger()) == 1


async def test_pending_is_unknown_until_a_lookup_settles_it(sandbox: Sandbox) -> None:
    """202 Pending is UNKNOWN with the payment id (processing continues at Checkout.com); a
    replay is pending too, and the lookup later reports the settled approval."""
    request = attempt("pm_cko_pending")
    async with checkout(sandbox) as provider:
        result = await provider.charge(request)
        replay = await provider.charge(request)
        looked_up = await provider.lookup(request)
    assert result.outcome is Outcome.UNKNOWN and result.outcome not in CHARGED_NOTHING
    assert result.provider_ref is not None and replay == result
    assert looked_up is not None and looked_up.found
    assert looked_up.result == ChargeResult(outcome=Outcome.APPROVED, provider_ref=result.provider_ref)
    assert len(await sandbox.ledger()) == 1


async def test_timeout_after_sending_is_unknown_then_found_and_never_charged_twice(sandbox: Sandbox) -> None:
    """A request that charged but answered after our timeout is UNKNOWN (not a clean
    failure); the lookup by reference finds the approval, and a resend under the same key
    replays it: one charge."""
    await sandbox.behave(hang_s=3)
    request = attempt("pm_timeout")
    async with checkout(sandbox, timeout_s=0.5) as provider:
        result = await provider.charge(request)
        looked_up = await provider.lookup(request)
        resent = await provider.charge(request)
    assert result.outcome is Outcome.UNKNOWN
    assert looked_up is not None and looked_up.found and looked_up.result is not None
    assert looked_up.result.outcome is Outcome.APPROVED
    assert resent.outcome is Outcome.APPROVED and resent.provider_ref == looked_up.result.provider_ref
    assert len(await sandbox.ledger()) == 1


async def test_lookup_finds_this_attempt_among_others_under_the_same_reference(sandbox: Sandbox) -> None:
    """Dunning makes several attempts per subscription cycle under one reference: the lookup
    returns each attempt's own payment (a declined first try stays declined, the approved
    retry approved) and says "not found" for an attempt that never reached Checkout.com."""
    declined = attempt("pm_insufficient_funds", subscription_id=9, cycle=3)
    approved = attempt("pm_ok", subscription_id=9, cycle=3)
    never_sent = attempt("pm_ok", subscription_id=9, cycle=3)
    async with checkout(sandbox) as provider:
        first = await provider.charge(declined)
        second = await provider.charge(approved)
        found_declined = await provider.lookup(declined)
        found_approved = await provider.lookup(approved)
        found_nothing = await provider.lookup(never_sent)
    assert found_declined is not None and found_declined.result == first
    assert first.outcome is Outcome.SOFT_DECLINE, "the list gave no code: the details endpoint did"
    assert found_approved is not None and found_approved.result == second
    assert second.outcome is Outcome.APPROVED
    assert found_nothing is not None and found_nothing.found is False


async def test_lookup_pages_through_a_busy_reference(sandbox: Sandbox) -> None:
    """More payments under one reference than one page holds: the lookup pages on and still
    finds the oldest attempt's payment."""
    attempts = [attempt("pm_insufficient_funds", subscription_id=5, cycle=1) for _ in range(23)]
    async with checkout(sandbox) as provider:
        results = [await provider.charge(request) for request in attempts]
        oldest = await provider.lookup(attempts[0])
    assert oldest is not None and oldest.found and oldest.result == results[0]


async def test_connection_refused_is_not_sent(sandbox: Sandbox) -> None:
    """Nothing listening: the request never left, so it is a provider error safe to retry,
    and a lookup that could not be made says nothing."""
    provider = CheckoutProvider("checkout", provider_config(f"http://127.0.0.1:{free_port()}/checkout"))
    try:
        result = await provider.charge(attempt())
        looked_up = await provider.lookup(attempt())
    finally:
        await provider.close()
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, True)
    assert looked_up is None


# --- configuration and capabilities --------------------------------------------------------


async def test_capabilities_and_the_secret(sandbox: Sandbox) -> None:
    """Keys are honoured for a day by default (configurable to the account's window), lookups
    go by reference, and the secret key is in no attribute's repr."""
    async with checkout(sandbox) as provider, checkout(sandbox, idempotency_key_ttl_s=3600) as short:
        assert isinstance(provider, Provider)
        capabilities = provider.capabilities
        assert capabilities.honours_idempotency_key and capabilities.lookup_by_reference
        assert not capabilities.lookup_by_key
        assert capabilities.idempotency_key_ttl_s == DAY
        # "This key is cached in our system if the request returns a 2xx response code" and
        # "If the original request returns a 4xx or 5xxx response code, no idempotent result is
        # saved and the payment is reattempted" (checkout.com/docs/payments/manage-payments/
        # idempotency): an unknown attempt (5xx, timeout) is never re-sent under its key.
        assert capabilities.resend_only_after_2xx
        assert short.capabilities.idempotency_key_ttl_s == 3600
        assert SECRET_KEY not in repr(vars(provider))


async def test_missing_secret_refuses_to_start(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the secret key the provider is not created, and the message says where payd looks."""
    monkeypatch.delenv("PAYD_CHECKOUT_API_KEY")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match="PAYD_CHECKOUT_API_KEY"):
        CheckoutProvider("checkout", provider_config(f"{sandbox.url}/checkout"))
    (tmp_path / "checkout_eu_key").write_text("sk_sbox_fromcredentialfile\n")
    async with checkout(sandbox, api_key_secret="checkout_eu_key") as provider:
        assert (await provider.charge(attempt())).outcome is Outcome.APPROVED


def test_configuration_keys() -> None:
    """The processing channel is required and must look like one; unknown keys are errors."""
    with pytest.raises(msgspec.ValidationError, match="processing_channel_id"):
        provider_config("http://x", processing_channel_id="channel-1")
    with pytest.raises(msgspec.ValidationError, match="api_key"):
        provider_config("http://x", api_key="sk_sbox_inline")  # secrets never live in config


# --- rows the sandbox has no reason to produce ----------------------------------------------


def _payment(**fields: Any) -> bytes:
    return json.dumps({"id": "pay_x", "amount": 1999, "currency": "EUR"} | fields).encode()


@pytest.mark.parametrize(
    ("status", "body", "outcome", "retryable"),
    [
        (201, _payment(approved=True, status="Captured"), Outcome.APPROVED, True),
        (201, _payment(approved=True, status="Declined"), Outcome.UNKNOWN, True),
        (201, _payment(approved=True, status="Card Verified"), Outcome.UNKNOWN, True),
        (201, _payment(approved=False, status="Declined", response_code="20099"), Outcome.SOFT_DECLINE, True),
        (
            201,
            _payment(approved=False, status="Declined", response_code="30099"),
            Outcome.HARD_DECLINE,
            False,
        ),
        (201, _payment(approved=False, status="Declined", response_code="10000"), Outcome.UNKNOWN, True),
        (201, b"<html>oops</html>", Outcome.UNKNOWN, True),
        (403, b"", Outcome.PROVIDER_ERROR, False),
        (404, b"", Outcome.PROVIDER_ERROR, False),
        (500, b"", Outcome.UNKNOWN, True),
        (503, b"", Outcome.UNKNOWN, True),
        (504, b"", Outcome.UNKNOWN, True),
        (418, b"", Outcome.UNKNOWN, True),
    ],
)
def test_answers_the_sandbox_does_not_give(
    status: int, body: bytes, outcome: Outcome, retryable: bool
) -> None:
    """Documented ranges decide codes without a row (20xxx soft, 30xxx hard); contradictions
    (approved yet declined, an approval code on a decline), verification-only payments,
    unparseable bodies and undocumented statuses are UNKNOWN; 403/404 charged nothing."""
    result = transform.charge_result(status, {}, body, attempt())
    assert (result.outcome, result.retryable) == (outcome, retryable)


def test_advice_never_softens_a_hard_decline() -> None:
    """A retry-later MAC on a hard decline leaves it hard, with no retry time."""
    body = _payment(
        approved=False,
        status="Declined",
        response_code="30043",
        processing={"partner_merchant_advice_code": "24"},
    )
    result = transform.charge_result(201, {}, body, attempt())
    assert (result.outcome, result.decline_code, result.retry_after_s) == (
        Outcome.HARD_DECLINE,
        "stolen_card",
        None,
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("Refunded", Outcome.APPROVED),
        ("Voided", Outcome.UNKNOWN),
        ("Expired", Outcome.UNKNOWN),
        ("Retry Scheduled", Outcome.UNKNOWN),
        ("Something New", Outcome.UNKNOWN),
    ],
)
def test_looked_up_statuses(status: str, outcome: Outcome) -> None:
    """A refunded payment was approved; voided, expired, scheduled-for-retry and unknown
    statuses need a person (or another look later), so they stay UNKNOWN."""
    payment = transform.decode_payment(_payment(status=status))
    assert payment is not None
    assert transform.payment_result(payment, attempt()).outcome is outcome


# --- what a lookup may settle, and when a key protects a resend ----------------------------


@pytest.mark.parametrize("token", ["pm_ok", "pm_insufficient_funds"])
async def test_a_lookup_never_settles_another_amounts_payment(sandbox: Sandbox, token: str) -> None:
    """A payment found under the attempt's reference and key but for another amount is not
    the attempt's: the lookup reports an anomaly and no result, for a decline as much as for
    an approval (a decline settled this way would let dunning charge again)."""
    key = f"cko-{uuid.uuid4().hex}"
    async with checkout(sandbox) as provider:
        await provider.charge(attempt(token, key=key, amount_minor=1000))
        other = await provider.lookup(attempt(token, key=key, amount_minor=2500))
        same = await provider.lookup(attempt(token, key=key, amount_minor=1000))
    assert other is not None and other.found and other.result is None
    assert other.anomaly is not None and "another amount" in other.anomaly
    assert same is not None and same.anomaly is None and same.result is not None


def test_a_looked_up_payment_must_carry_the_attempts_key_and_reference() -> None:
    """Metadata without the attempt's key, or another reference, is an anomaly."""
    request = attempt()
    base = {"id": "pay_x", "status": "Captured", "approved": True, "amount": 1999, "currency": "EUR"}
    ours = {"reference": "42:7", "metadata": {transform.IDEMPOTENCY_KEY_METADATA: request.idempotency_key}}
    for changes in ({"metadata": {}}, {"reference": "42:8"}, {"currency": "USD"}):
        payment = transform.decode_payment(json.dumps(base | ours | changes).encode())
        assert payment is not None
        assert transform.lookup_result(payment, request).anomaly is not None, changes
    payment = transform.decode_payment(json.dumps(base | ours).encode())
    assert payment is not None and transform.lookup_result(payment, request).result is not None


async def test_the_dialect_processes_a_key_again_after_a_5xx(sandbox: Sandbox) -> None:
    """Checkout.com caches a key only after a 2xx (checkout.com/docs/payments/manage-payments/
    idempotency): a request repeated after a 500 is charged again. The dialect does the same,
    so a resend after a 5xx shows up in the ledger as a second charge."""
    request = attempt("pm_cko_server_error")
    async with checkout(sandbox) as provider:
        first = await provider.charge(request)
        again = await provider.charge(request)
    assert first.outcome is again.outcome is Outcome.UNKNOWN
    ledger = await sandbox.ledger()
    assert [(c["merchant_reference"], c["status"]) for c in ledger] == [("42:7", "approved")] * 2


@pytest.fixture
def checkout_kind() -> None:
    """Kind "checkout" is installed through the payd.providers entry point."""
    assert registry.factory("checkout") is CheckoutProvider


@pytest.mark.usefixtures("checkout_kind")
async def test_daemon_never_resends_a_checkout_attempt_after_a_5xx(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """End to end: a 500 after Checkout.com charged leaves the attempt unknown, and the payment
    list does not show the payment yet. Checkout.com kept no answer under the key, so a resend
    would charge again: payd asks, never re-sends, and once ``not_found_grace_s`` has passed
    the attempt is parked for an operator (unknown, with the reason), with one request and one
    charge at the gateway. Before, it was looked up for ever without an exit."""
    body = request("cko-5xx", payment_method="pm_cko_server_error_unlisted", subscription_id=5151)
    body |= {"provider": "checkout"}
    provider = {
        "kind": "checkout",
        "base_url": f"{sandbox.url}/checkout",
        "max_in_flight": 5,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
        "processing_channel_id": CHANNEL,
    }
    async with daemons.in_process(providers__checkout=provider, pipeline={"not_found_grace_s": 1}):
        await broker.publish([body])

        async def parked() -> bool:
            rows = await query(db, "SELECT parked_at FROM attempts WHERE idempotency_key = 'cko-5xx'")
            return bool(rows) and rows[0][0] is not None

        await eventually(parked, timeout=30, what="the attempt parked for an operator")
    rows = await query(db, "SELECT state, reconcile_error FROM attempts WHERE idempotency_key = 'cko-5xx'")
    state, reason = rows[0]
    assert state == "unknown"
    assert "no record" in reason and "settle by hand" in reason
    assert [c["status"] for c in await sandbox.ledger()] == ["approved"], "charged once, never re-sent"
    assert (await sandbox.stats())["accounts"][CHANNEL]["requests"] == 1


@pytest.mark.parametrize("prefix", sorted(SPEC["ranges"]))
def test_every_documented_response_code_range_has_a_verdict(prefix: str) -> None:
    """Each range of Checkout.com's "API response codes" page: on a declined payment 20xxx
    is soft, 30xxx and every 4xxxx risk response hard (40xxx used to be UNKNOWN, so a risk
    decline never settled); 10xxx (an approval code on a decline) and 50xxx (payouts)
    contradict a card decline and stay UNKNOWN."""
    wanted = {
        "10": Outcome.UNKNOWN,
        "20": Outcome.SOFT_DECLINE,
        "30": Outcome.HARD_DECLINE,
        "4": Outcome.HARD_DECLINE,
        "50": Outcome.UNKNOWN,
    }[prefix]
    for code in (prefix.ljust(5, "9"), prefix.ljust(4, "0") + "1"):
        body = _payment(approved=False, status="Declined", response_code=code, reference="42:7")
        assert transform.charge_result(201, {}, body, attempt()).outcome is wanted, code
    for code in SPEC["codes"]:
        body = _payment(approved=False, status="Declined", response_code=code, reference="42:7")
        assert transform.charge_result(201, {}, body, attempt()).outcome is Outcome.HARD_DECLINE
