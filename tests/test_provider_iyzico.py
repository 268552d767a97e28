"""The iyzico adapter, over real HTTP against the sandbox's iyzico dialect, and in a real daemon.

The dialect verifies every IYZWSv2 signature and the documented body shape, and
keeps no idempotency keys, so its ledger would show it if payd ever sent an
attempt twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.config import ConfigError
from daemon.models import AttemptRequest, Outcome
from daemon.providers import registry
from daemon.providers.iyzico import transform
from daemon.providers.iyzico.client import IyzicoProvider, IyzicoProviderConfig
from payd_sandbox.dialects.iyzico import (
    NOT_FOUND_ERROR_CODE,
    SANDBOX_API_KEY,
    SANDBOX_SECRET_KEY,
)
from tests.support import Broker, DaemonFactory, Sandbox, eventually, free_port, query, request, wait_settled


@pytest.fixture(autouse=True)
def iyzico_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox merchant's key pair, as the secrets payd reads."""
    monkeypatch.setenv("PAYD_IYZICO_API_KEY", SANDBOX_API_KEY)
    monkeypatch.setenv("PAYD_IYZICO_SECRET_KEY", SANDBOX_SECRET_KEY)


@contextlib.asynccontextmanager
async def iyzico(base_url: str, **config: Any) -> AsyncIterator[IyzicoProvider]:
    settings: dict[str, Any] = {"kind": "iyzico", "base_url": base_url, "max_in_flight": 10, "timeout_s": 2}
    provider = IyzicoProvider("iyzico", IyzicoProviderConfig(**(settings | config)))
    try:
        yield provider
    finally:
        await provider.close()


def attempt(
    key: str,
    token: str = "pm_ok",
    *,
    amount_minor: int = 1000,
    currency: str = "TRY",
    subscription_id: int | None = 7,
    payment_method: str | None = None,
) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=key,
        subscription_id=subscription_id,
        cycle=3 if subscription_id is not None else None,
        amount_minor=amount_minor,
        currency=currency,
        provider="iyzico",
        payment_method=payment_method or f"cuk-{key}:{token}",
        customer_ref="cust-1",
    )


# -- pure rules ----------------------------------------------------------------------------------


def test_signature_matches_the_official_client() -> None:
    """IYZWSv2 is computed exactly as iyzico's own Node client computes it: its unit test's
    inputs (body JSON-encoded, as the client sends it) give its expected header."""
    header = transform.authorization("api_key", "secret_key", "random_string", "uri", b'"body"')
    assert header == (
        "IYZWSv2 YXBpS2V5OmFwaV9rZXkmcmFuZG9tS2V5OnJhbmRvbV9zdHJpbmcmc2lnbmF0dXJlOjAxNzUwODkyMWEyOWVlNTYw"
        "MWJjZDFmYmU4M2VmZDJlMmJlNDNhZjAyZWNlZmYzMGNmMmU5MWE1MzlhYWIzNTU="
    )


@pytest.mark.parametrize(
    ("amount_minor", "currency", "price"),
    [
        (1000, "TRY", "10.0"),
        (1050, "EUR", "10.5"),
        (1099, "USD", "10.99"),
        (1, "GBP", "0.01"),
        (10, "TRY", "0.1"),
        (123456789012, "TRY", "1234567890.12"),
        (1000, "JPY", None),
        (1000, "IRR", None),
    ],
)
def test_prices_come_from_minor_units_without_float(
    amount_minor: int, currency: str, price: str | None
) -> None:
    """Minor units become iyzico's decimal strings exactly (two decimals for every currency payd
    sends to iyzico); a currency iyzico does not take has no price and is never sent."""
    assert transform.format_price(amount_minor, currency) == price


@pytest.mark.parametrize(
    "payment_method",
    ["no-colon", "a:b:c", ":card", "user:", "user:card token", "user:ca\u0308rd"],
)
def test_malformed_stored_card_tokens_are_refused(payment_method: str) -> None:
    """Only ``CARDUSERKEY:CARDTOKEN`` names a stored card; anything else is not one."""
    assert transform.stored_card(payment_method) is None
    card = transform.stored_card("Bp/Brr+GP=:c80ba376-8250-f819-88c9-94984710e72c")
    assert card == transform.StoredCard(
        card_user_key="Bp/Brr+GP=", card_token="c80ba376-8250-f819-88c9-94984710e72c"
    )


def test_unlisted_failure_codes_never_become_unknown() -> None:
    """An explicit failure body means iyzico took nothing: an unlisted bank code is a hard
    decline and any other unlisted code a provider error, neither retried nor UNKNOWN."""
    bank = transform.error_row("10999")
    assert (bank.outcome, bank.retryable, bank.about_payment) == (Outcome.HARD_DECLINE, False, True)
    other = transform.error_row("5999")
    assert (other.outcome, other.retryable, other.about_payment) == (Outcome.PROVIDER_ERROR, False, False)
    retryable = [code for code, row in transform.ERROR_CODES.items() if row.retryable]
    assert sorted(retryable) == ["10005", "10051", "10207", "50000"], "only soft declines and the limiter"


def test_missing_secret_stops_start_up_naming_it_not_showing_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the secret key the provider cannot be built; the error names the secret and
    where it is read from, and shows no key."""
    monkeypatch.delenv("PAYD_IYZICO_SECRET_KEY")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = IyzicoProviderConfig(kind="iyzico", base_url="http://127.0.0.1:1", max_in_flight=1)
    with pytest.raises(ConfigError, match="iyzico_secret_key") as error:
        IyzicoProvider("iyzico", config)
    assert "PAYD_IYZICO_SECRET_KEY" in str(error.value)
    assert SANDBOX_API_KEY not in str(error.value)


# -- over HTTP against the dialect -----------------------------------------------------------------


async def test_approved_charge_is_signed_shaped_and_recorded_once(sandbox: Sandbox) -> None:
    """A signed, documented request is charged once: APPROVED with iyzico's paymentId, the
    amount in minor units and basketId (SUBSCRIPTION_ID:CYCLE) as the merchant reference."""
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(attempt("ok-1", amount_minor=1099))
    ledger = await sandbox.ledger()
    assert result.outcome is Outcome.APPROVED, result
    assert [(c["id"], c["amount_minor"], c["currency"], c["merchant_reference"]) for c in ledger] == [
        (result.provider_ref, 1099, "TRY", "7:3")
    ]


async def test_wrong_secret_is_rejected_and_charges_nothing(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dialect checks the signature: signed with another secret, the request is refused
    (iyzico's errorCode 1000), payd calls it a non-retryable provider error, nothing is charged."""
    monkeypatch.setenv("PAYD_IYZICO_SECRET_KEY", "not-the-secret")
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(attempt("bad-sig"))
    assert (result.outcome, result.retryable, result.decline_code) == (
        Outcome.PROVIDER_ERROR,
        False,
        "invalid_signature",
    )
    assert await sandbox.ledger() == []


def test_request_body_carries_keys_reference_and_buyer_overrides() -> None:
    """conversationId is the idempotency key (lookups find this attempt only), basketId the
    merchant reference, and a sender's metadata ``buyer_<field>`` replaces the placeholder."""
    defaults = transform.PaymentDefaults(
        locale="en",
        payment_channel="WEB",
        payment_group="SUBSCRIPTION",
        basket_item_name="Plan",
        basket_item_category="Plans",
        buyer={field: f"default-{field}" for field in transform.BUYER_FIELDS},
    )
    request = msgspec.structs.replace(attempt("key-9"), metadata={"buyer_email": "a@b.example"})
    prepared = transform.payment_body(request, defaults)
    assert not isinstance(prepared, transform.Refused)
    body = json.loads(prepared[0])
    assert (body["conversationId"], body["basketId"], body["price"], body["paidPrice"]) == (
        "key-9",
        "7:3",
        "10.0",
        "10.0",
    )
    assert (body["buyer"]["email"], body["buyer"]["ip"], body["buyer"]["id"]) == (
        "a@b.example",
        "default-ip",
        "cust-1",
    )
    assert body["paymentCard"] == {"cardUserKey": "cuk-key-9", "cardToken": "pm_ok"}


async def signed_post(sandbox: Sandbox, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    raw = json.dumps(body).encode()
    rnd = transform.random_key()
    header = transform.authorization(SANDBOX_API_KEY, SANDBOX_SECRET_KEY, rnd, path, raw)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{sandbox.url}/iyzico{path}",
            data=raw,
            headers={"Authorization": header, "x-iyzi-rnd": rnd, "Content-Type": "application/json"},
        ) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"buyer": None}, "buyer"),
        ({"price": 10.0}, "price"),
        ({"price": "10.001", "paidPrice": "10.001"}, "decimal"),
        ({"basketItems": []}, "basketItems"),
        ({"installment": 4}, "installment"),
        ({"currency": "XYZ"}, "currency"),
    ],
)
async def test_dialect_refuses_undocumented_request_shapes(
    sandbox: Sandbox, change: dict[str, Any], problem: str
) -> None:
    """The dialect holds payd to iyzico's documented body (so the approvals above prove the
    shape, not just the signature): a signed request that breaks it is refused, not charged."""
    defaults = transform.PaymentDefaults(
        locale="en",
        payment_channel="WEB",
        payment_group="SUBSCRIPTION",
        basket_item_name="Plan",
        basket_item_category="Plans",
        buyer={field: "x" for field in transform.BUYER_FIELDS},
    )
    prepared = transform.payment_body(attempt("shape-1"), defaults)
    assert not isinstance(prepared, transform.Refused)
    body = {key: value for key, value in (json.loads(prepared[0]) | change).items() if value is not None}
    status, answer = await signed_post(sandbox, "/payment/auth", body)
    assert (status, answer["status"]) == (400, "failure")
    assert problem in answer["errorMessage"]
    assert await sandbox.ledger() == []


async def test_signature_covers_the_body(sandbox: Sandbox) -> None:
    """A header signed for one body does not authorise another: the dialect recomputes the
    HMAC over the body it received."""
    signed = b'{"price":"1.0"}'
    rnd = transform.random_key()
    header = transform.authorization(SANDBOX_API_KEY, SANDBOX_SECRET_KEY, rnd, "/payment/auth", signed)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{sandbox.url}/iyzico/payment/auth",
            data=b'{"price":"9.0"}',
            headers={"Authorization": header, "x-iyzi-rnd": rnd, "Content-Type": "application/json"},
        ) as response,
    ):
        answer = await response.json()
    assert (answer["status"], answer["errorCode"]) == ("failure", "1000")


@pytest.mark.parametrize(
    ("token", "outcome", "decline_code", "retryable"),
    [
        ("pm_insufficient_funds", Outcome.SOFT_DECLINE, "insufficient_funds", True),
        ("pm_stolen", Outcome.HARD_DECLINE, "stolen_card", False),
        ("iyz_10005", Outcome.SOFT_DECLINE, "do_not_honour", True),
        ("iyz_10054", Outcome.HARD_DECLINE, "expired_card", False),
        ("iyz_10034", Outcome.HARD_DECLINE, "fraud_suspect", False),
        ("iyz_6000", Outcome.HARD_DECLINE, "fraud_rejected", False),
        ("iyz_10058", Outcome.PROVIDER_ERROR, "not_permitted_to_terminal", False),
        ("iyz_10219", Outcome.PROVIDER_ERROR, "bank_timeout", False),
        ("iyz_10999", Outcome.HARD_DECLINE, "iyzico_10999", False),
        ("iyz_5999", Outcome.PROVIDER_ERROR, "iyzico_5999", False),
    ],
)
async def test_failure_bodies_map_by_the_code_table(
    sandbox: Sandbox, token: str, outcome: Outcome, decline_code: str, retryable: bool
) -> None:
    """Each iyzico errorCode that decides retries maps as the table says; none of them is
    UNKNOWN, because a failure body means nothing was taken, and none was sent twice."""
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(attempt(f"t-{token}", token))
    assert (result.outcome, result.decline_code, result.retryable) == (outcome, decline_code, retryable)
    assert [c["status"] for c in await sandbox.ledger()] == ["declined"]


async def test_rate_limited_is_retryable_after_the_given_wait(sandbox: Sandbox) -> None:
    """iyzico's limiter refuses before processing: RATE_LIMITED with the Retry-After it gave,
    and nothing charged."""
    await sandbox.behave(retry_after_s=7)
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(attempt("rl-1", "pm_rate_limited"))
    assert (result.outcome, result.retry_after_s, result.retryable) == (Outcome.RATE_LIMITED, 7.0, True)
    assert await sandbox.ledger() == []


async def test_refused_attempts_are_never_sent(sandbox: Sandbox) -> None:
    """A payment method that is not a stored card, or a currency iyzico does not take, fails
    cleanly (not retried) without a request reaching iyzico."""
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        bad_token = await provider.charge(attempt("tok-1", payment_method="pm_ok"))
        bad_currency = await provider.charge(attempt("cur-1", currency="JPY"))
    assert (bad_token.outcome, bad_token.retryable, bad_token.decline_code) == (
        Outcome.PROVIDER_ERROR,
        False,
        "invalid_payment_method",
    )
    assert (bad_currency.outcome, bad_currency.decline_code) == (
        Outcome.PROVIDER_ERROR,
        "unsupported_currency",
    )
    assert (await sandbox.stats())["requests"] == 0


async def test_connection_refused_is_not_sent() -> None:
    """Nothing listening: the request never left, so it is a clean, retryable provider error."""
    async with iyzico(f"http://127.0.0.1:{free_port()}/iyzico") as provider:
        result = await provider.charge(attempt("down-1"))
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, True)


async def test_timeout_after_send_is_unknown_and_lookup_finds_the_one_charge(sandbox: Sandbox) -> None:
    """pm_timeout charges, then answers too late: UNKNOWN (never a clean error). Looking it up
    by conversationId finds that payment, approved, and the ledger holds it once."""
    await sandbox.behave(hang_s=5)
    async with iyzico(f"{sandbox.url}/iyzico", timeout_s=0.5) as provider:
        slow = attempt("slow-1", "pm_timeout")
        result = await provider.charge(slow)
        found = await provider.lookup(slow)
    ledger = await sandbox.ledger()
    assert result.outcome is Outcome.UNKNOWN, result
    assert found is not None and found.found and found.result is not None
    assert (found.result.outcome, found.result.provider_ref) == (Outcome.APPROVED, ledger[0]["id"])
    assert [c["merchant_reference"] for c in ledger] == ["7:3"]
    assert (await sandbox.stats())["lookups"] == 1


async def test_server_error_is_unknown_and_not_found_only_when_configured(sandbox: Sandbox) -> None:
    """A 5xx says nothing about the payment, so it is UNKNOWN. The lookup then reports "not
    found" only for an errorCode configured to mean that; otherwise it keeps asking (None)."""
    failing = attempt("err-1", "pm_error")
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(failing)
        undecided = await provider.lookup(failing)
    async with iyzico(
        f"{sandbox.url}/iyzico", lookup_not_found_error_codes=(NOT_FOUND_ERROR_CODE,)
    ) as provider:
        decided = await provider.lookup(failing)
    assert result.outcome is Outcome.UNKNOWN
    assert undecided is None
    assert decided is not None and not decided.found
    assert await sandbox.ledger() == []


async def test_unparseable_answer_after_a_charge_is_unknown(sandbox: Sandbox) -> None:
    """A body that is not iyzico's JSON may follow a payment: UNKNOWN, and the lookup shows
    that it did."""
    garbled = attempt("garbled-1", "iyz_garbled")
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(garbled)
        found = await provider.lookup(garbled)
    assert result.outcome is Outcome.UNKNOWN
    assert found is not None and found.result is not None and found.result.outcome is Outcome.APPROVED


async def test_fraud_review_is_unknown_until_decided(sandbox: Sandbox) -> None:
    """fraudStatus 0 means the payment waits for iyzico's fraud review: UNKNOWN, and a lookup
    that still says so leaves it unknown rather than calling it paid."""
    review = attempt("review-1", "iyz_fraud_review")
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        result = await provider.charge(review)
        found = await provider.lookup(review)
    assert result.outcome is Outcome.UNKNOWN
    assert found is not None and found.found and found.result is not None
    assert found.result.outcome is Outcome.UNKNOWN


async def test_lookup_reports_a_decline_and_ignores_other_attempts_of_the_cycle(sandbox: Sandbox) -> None:
    """Lookups go by conversationId, which is the idempotency key: a declined attempt is found
    as declined, and another attempt for the same subscription cycle is not mistaken for it."""
    async with iyzico(
        f"{sandbox.url}/iyzico", lookup_not_found_error_codes=(NOT_FOUND_ERROR_CODE,)
    ) as provider:
        await provider.charge(attempt("cycle-a", "pm_insufficient_funds"))
        declined = await provider.lookup(attempt("cycle-a", "pm_insufficient_funds"))
        other = await provider.lookup(attempt("cycle-b"))
    assert declined is not None and declined.result is not None
    assert (declined.result.outcome, declined.result.decline_code) == (
        Outcome.SOFT_DECLINE,
        "insufficient_funds",
    )
    assert other is not None and not other.found


def test_answer_that_does_not_match_the_attempt_is_unknown() -> None:
    """A success for another amount, currency or conversation is not taken as this attempt's
    payment: it may have charged, so it is UNKNOWN for an operator."""
    expected = transform.Expected(
        conversation_id="k", basket_id="7:3", paid_price=Decimal("10.0"), currency="TRY"
    )
    base = {"status": "success", "paymentId": "1", "fraudStatus": 1, "conversationId": "k", "basketId": "7:3"}
    good = transform.charge_result(200, {}, json.dumps(base | {"paidPrice": 10.00000000}).encode(), expected)
    assert good.outcome is Outcome.APPROVED
    for change in ({"paidPrice": 100.0}, {"currency": "EUR"}, {"conversationId": "x"}, {"fraudStatus": 2}):
        body = json.dumps(base | {"paidPrice": 10.0} | change).encode()
        assert transform.charge_result(200, {}, body, expected).outcome is Outcome.UNKNOWN, change


# -- in a real daemon ------------------------------------------------------------------------------


@pytest.fixture
def iyzico_kind() -> Iterator[None]:
    """Kind "iyzico" is installed through the payd.providers entry point, as a deployment sees it."""
    assert registry.factory("iyzico") is IyzicoProvider
    yield


def iyzico_provider(sandbox: Sandbox, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "iyzico",
        "base_url": f"{sandbox.url}/iyzico",
        "max_in_flight": 5,
        "timeout_s": 0.5,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
        **overrides,
    }


@pytest.mark.usefixtures("iyzico_kind")
async def test_daemon_reconciles_an_iyzico_timeout_to_exactly_one_charge(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """The key property end to end: iyzico has no idempotency keys, so a pm_timeout attempt
    becomes unknown, is looked up (never sent again), and ends succeeded with exactly one
    charge for its subscription cycle in the gateway's ledger."""
    await sandbox.behave(hang_s=5)
    await broker.follow_events()
    body = request("iyz-slow", payment_method="cuk-1:pm_timeout", subscription_id=4242)
    body |= {"provider": "iyzico", "currency": "TRY"}
    async with daemons.in_process(providers__iyzico=iyzico_provider(sandbox)):
        await broker.publish([body])
        settled = await wait_settled(db, ["iyz-slow"], timeout=30)

        async def both_events() -> bool:
            return len(broker.events) >= 2

        await eventually(both_events, timeout=10, what="unknown and succeeded events")

    assert settled == {"iyz-slow": "succeeded"}
    assert [e["type"] for e in broker.events] == ["payment.unknown", "payment.succeeded"]
    ledger = await sandbox.ledger()
    assert [(c["merchant_reference"], c["status"]) for c in ledger] == [("4242:1", "approved")], "one charge"
    (provider_ref,) = (await query(db, "SELECT provider_ref FROM attempts"))[0]
    assert provider_ref == ledger[0]["id"]
    stats = await sandbox.stats()
    assert stats["accounts"]["iyzico"]["requests"] == 1, "the payment was never sent again"
    assert stats["lookups"] >= 1, "the outcome came from a lookup"


@pytest.mark.usefixtures("iyzico_kind")
async def test_daemon_never_resends_an_iyzico_attempt_the_provider_has_no_record_of(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A 5xx leaves the attempt unknown; iyzico has no record of it, and because iyzico keeps no
    idempotency keys payd does not send it again: after the grace period it fails as
    not_received, with one request at the gateway and nothing charged."""
    body = request("iyz-err", payment_method="cuk-1:pm_error", subscription_id=4343)
    body |= {"provider": "iyzico", "currency": "TRY"}
    provider = iyzico_provider(sandbox, lookup_not_found_error_codes=[NOT_FOUND_ERROR_CODE])
    async with daemons.in_process(providers__iyzico=provider, pipeline={"not_found_grace_s": 2}):
        await broker.publish([body])
        settled = await wait_settled(db, ["iyz-err"], timeout=30)
    assert settled == {"iyz-err": "failed"}
    (code,) = (await query(db, "SELECT decline_code FROM attempts"))[0]
    assert code == "not_received"
    stats = await sandbox.stats()
    assert stats["accounts"]["iyzico"]["requests"] == 1, "never re-sent"
    assert stats["lookups"] >= 1
    assert await sandbox.ledger() == []


@pytest.mark.usefixtures("iyzico_kind")
async def test_reconciliation_looks_an_iyzico_payment_up_by_its_payment_id(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """An answer under fraud review (fraudStatus 0) leaves the attempt unknown with iyzico's
    paymentId recorded; reconciliation's lookups then send that paymentId with the
    conversationId, as iyzico's official sample ``retrieve_payment_result.py`` does. Before,
    the reconciler handed the adapter only the request, and the paymentId was never sent."""
    body = request("iyz-review", payment_method="cuk-1:iyz_fraud_review", subscription_id=4444)
    body |= {"provider": "iyzico", "currency": "TRY"}
    async with daemons.in_process(
        providers__iyzico=iyzico_provider(sandbox), pipeline={"reconcile_backoff_s": [0.2]}
    ):
        await broker.publish([body])

        async def looked_up() -> list[dict[str, Any]]:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{sandbox.url}/iyzico/_sandbox/details") as response,
            ):
                return list(await response.json())

        await eventually(looked_up, timeout=30, what="a reconciliation lookup")
        details = await looked_up()
    (state, provider_ref) = (
        await query(db, "SELECT state, provider_ref FROM attempts WHERE idempotency_key = 'iyz-review'")
    )[0]
    assert state == "unknown" and provider_ref
    assert details[0] == {"paymentId": provider_ref, "paymentConversationId": "iyz-review"}


# -- what a lookup may settle ---------------------------------------------------------------------


async def test_a_failed_payment_found_by_lookup_is_declined_not_unknown(sandbox: Sandbox) -> None:
    """``/payment/detail`` reports a declined payment as found (``status: success``) with
    ``paymentStatus: FAILURE`` and its errorCode (iyzico's Payment resource: paymentStatus
    SUCCESS / FAILURE). That took no money: the lookup settles it by the code table, where
    it used to stay UNKNOWN forever (iyzico attempts are never re-sent)."""
    async with iyzico(f"{sandbox.url}/iyzico") as provider:
        await provider.charge(attempt("failed-1", "iyz_10054"))
        found = await provider.lookup(attempt("failed-1", "iyz_10054"))
    assert found is not None and found.found and found.result is not None and found.anomaly is None
    assert (found.result.outcome, found.result.decline_code) == (Outcome.HARD_DECLINE, "expired_card")
    assert found.result.provider_ref == (await sandbox.ledger())[0]["id"]


SIGNED_FIELDS = {
    "status": "success",
    "paymentId": "22416035",
    "currency": "TRY",
    "basketId": "7:3",
    "conversationId": "k",
    "paidPrice": 10.00000000,
    "price": 10.00000000,
    "paymentStatus": "SUCCESS",
    "fraudStatus": 1,
}
EXPECTED = transform.Expected(
    conversation_id="k", basket_id="7:3", paid_price=Decimal("10.0"), currency="TRY"
)


# How iyzico's official client verifies an answer's signature (source recorded inside).
SIGNATURE_RULE = json.loads(
    (Path(__file__).parent / "fixtures/providers/iyzico_response_signature.json").read_text()
)["payment_answer"]


def _rendered(value: object) -> str:
    text = str(value)  # iyzipay-python: strip_zero(str(number))
    return text.removesuffix(".0") if isinstance(value, float) else text


def _signed(secret_key: str, **changes: Any) -> bytes:
    """An answer signed by the rule iyzipay-python's samples verify, over SIGNED_FIELDS."""
    message = SIGNATURE_RULE["separator"].join(_rendered(SIGNED_FIELDS[f]) for f in SIGNATURE_RULE["fields"])
    assert message == "22416035:TRY:7:3:k:10:10"
    signature = hmac.new(secret_key.encode(), message.encode(), hashlib.sha256).hexdigest()
    return json.dumps(SIGNED_FIELDS | {"signature": signature} | changes).encode()


def test_response_signatures_are_verified() -> None:
    """A success whose signature holds is this attempt's payment; one whose signed fields were
    altered (or signed with another key) is UNKNOWN to a charge and an anomaly to a lookup."""
    none: frozenset[str] = frozenset()
    good = _signed(SANDBOX_SECRET_KEY)
    assert transform.charge_result(200, {}, good, EXPECTED, SANDBOX_SECRET_KEY).outcome is Outcome.APPROVED
    found = transform.lookup_result(200, good, EXPECTED, none, SANDBOX_SECRET_KEY)
    assert found is not None and found.result is not None and found.result.outcome is Outcome.APPROVED
    for bad in (_signed("another-secret-key"), _signed(SANDBOX_SECRET_KEY, price=11.0)):
        charged = transform.charge_result(200, {}, bad, EXPECTED, SANDBOX_SECRET_KEY)
        assert charged.outcome is Outcome.UNKNOWN and "signature" in (charged.reason or "")
        looked_up = transform.lookup_result(200, bad, EXPECTED, none, SANDBOX_SECRET_KEY)
        assert looked_up is not None and looked_up.result is None and looked_up.anomaly is not None


@pytest.mark.parametrize(
    "change",
    [
        {"paidPrice": 12.5},
        {"currency": "EUR"},
        {"basketId": "7:4"},
        {"basketId": None},
        {"conversationId": "x"},
    ],
)
def test_a_lookup_never_settles_a_payment_that_is_not_the_attempts(change: dict[str, Any]) -> None:
    """A looked-up payment must state the attempt's basketId, currency, paidPrice and
    conversationId; another (or none) is an anomaly: no result, the attempt stays unknown."""
    body = json.dumps({k: v for k, v in (SIGNED_FIELDS | change).items() if v is not None}).encode()
    found = transform.lookup_result(200, body, EXPECTED, frozenset())
    assert found is not None and found.found and found.result is None and found.anomaly is not None


@pytest.mark.parametrize(("code", "outcome"), [(None, Outcome.SOFT_DECLINE), ("10043", Outcome.HARD_DECLINE)])
def test_a_failed_payment_without_a_known_code_still_settles(code: str | None, outcome: Outcome) -> None:
    """paymentStatus FAILURE took no money even without an errorCode: a soft ``payment_failed``."""
    fields = SIGNED_FIELDS | {"paymentStatus": "FAILURE"} | ({"errorCode": code} if code else {})
    found = transform.lookup_result(200, json.dumps(fields).encode(), EXPECTED, frozenset())
    assert found is not None and found.result is not None and found.result.outcome is outcome


def test_the_lookup_sends_the_payment_id_where_it_is_known() -> None:
    """iyzico retrieves a payment by paymentId and paymentConversationId (official sample
    ``retrieve_payment_result.py`` sends both); without a known paymentId it is left out."""
    request = attempt("detail-1")
    with_id = json.loads(transform.detail_body(request, "en", "22416035"))
    without = json.loads(transform.detail_body(request, "en"))
    assert with_id["paymentId"] == "22416035" and with_id["paymentConversationId"] == "detail-1"
    assert "paymentId" not in without
