"""Stripe refunds, checked against Stripe's own definition of them.

The expectations come from stripe-python (generated from Stripe's OpenAPI spec), vendored in
``tests/fixtures/providers/stripe_refund.json`` with its commit: ``POST /v1/refunds``
parameters and its ``reason`` enumeration, ``Refund.status``, the ``GET /v1/refunds``
filters, and the error codes by which Stripe refuses a refund. The adapter runs over real
HTTP against the sandbox's Stripe dialect, which refuses a request off that shape and
executes each refund in the sandbox's refund book, so its ledger says what was refunded.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Final

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.models import ChargeResult, Outcome, ReversalRequest
from daemon.providers import registry
from daemon.providers.stripe import transform
from daemon.providers.stripe.client import StripeProvider
from payd_sandbox.dialects import stripe as dialect
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request
from tests.test_provider_stripe import API_KEY, attempt, open_stripe, stripe_config
from tests.test_reversals import _queue_empty, charged, net_by_key, refund, wait_reversals

SPEC: Final = json.loads((Path(__file__).parent / "fixtures/providers/stripe_refund.json").read_text())
HARD, UNKNOWN = Outcome.HARD_DECLINE, Outcome.UNKNOWN


@pytest.fixture(autouse=True)
def stripe_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_STRIPE_API_KEY", API_KEY)


def reversal(
    charge: ChargeResult | str, amount: int, *, key: str | None = None, **extra: Any
) -> ReversalRequest:
    ref = charge if isinstance(charge, str) else charge.provider_ref
    fields: dict[str, Any] = {
        "reversal_id": 1,
        "idempotency_key": key or f"rf-{uuid.uuid4().hex}",
        "original_idempotency_key": "renewal-1",
        "original_provider_ref": ref,
        "original_merchant_reference": "7:3",
        "provider": "stripe",
        "amount_minor": amount,
        "currency": "EUR",
    }
    return msgspec.convert(fields | extra, ReversalRequest)


async def charge(provider: StripeProvider, payment_method: str = "pm_ok", amount: int = 1999) -> ChargeResult:
    result = await provider.charge(attempt(payment_method, amount_minor=amount))
    assert result.outcome is Outcome.APPROVED and result.provider_ref is not None, result
    return result


# --- the request, against stripe-python's RefundCreateParams ------------------------------


def _form(request: ReversalRequest) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(transform.refund_form(request).decode(), strict_parsing=True)


@pytest.mark.parametrize("reason", [*SPEC["create_reason"], "customer moved abroad", None])
def test_the_refund_form_uses_only_documented_parameters_and_reasons(reason: str | None) -> None:
    """Every parameter is one of RefundCreateParams' (metadata[...] for payd's keys); ``reason``
    is only ever one of the three values Stripe accepts, and any other text travels as
    metadata ``payd_reason`` instead of failing validation. The charge is addressed by its
    PaymentIntent, and the refund's own key is in the metadata for the lookup."""
    pairs = _form(reversal("pi_abc", 500, key="rf-1", reason=reason))
    names = {name.split("[")[0] for name, _ in pairs}
    assert names <= set(SPEC["create_parameters"]), names
    fields = dict(pairs)
    assert fields["payment_intent"] == "pi_abc" and fields["amount"] == "500"
    assert fields["metadata[payd_key]"] == "rf-1"
    assert fields["metadata[payd_original_key]"] == "renewal-1"
    if reason in SPEC["create_reason"]:
        assert fields["reason"] == reason and "metadata[payd_reason]" not in fields
    else:
        assert "reason" not in fields
        assert fields.get("metadata[payd_reason]") == reason


def test_a_charge_id_is_refunded_by_charge_and_the_dialect_knows_stripes_parameters() -> None:
    """A ``ch_`` reference is sent as ``charge``; the dialect accepts exactly the documented
    create parameters (so a request it accepts is a request Stripe accepts)."""
    assert dict(_form(reversal("ch_abc", 5)))["charge"] == "ch_abc"
    assert set(SPEC["create_parameters"]) - {"metadata"} == dialect._REFUND_PARAMETERS
    assert dialect._REFUND_REASONS == transform.REFUND_REASONS == set(SPEC["create_reason"])


async def test_a_refund_without_a_payment_intent_is_refused_unsent(sandbox: Sandbox) -> None:
    """A charge recorded without Stripe's id cannot be addressed: failed, never sent."""
    async with open_stripe(sandbox) as provider:
        result = await provider.refund(reversal("not-a-stripe-id", 100))
        assert await provider.lookup_refund(reversal("not-a-stripe-id", 100)) is None
    assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False)
    assert result.reason is not None and result.reason.startswith("not sent")
    assert (await sandbox.stats())["refund_requests"] == 0


# --- over HTTP against the dialect ---------------------------------------------------------


async def test_full_and_partial_refunds_succeed_and_never_exceed_the_charge(sandbox: Sandbox) -> None:
    """Two partial refunds then the rest succeed; one more is refused with Stripe's code
    (``charge_already_refunded``), as is a partial refund over what remains
    (``amount_too_large``); refused ones are failed, not retried, and refund nothing."""
    async with open_stripe(sandbox) as provider:
        paid = await charge(provider, amount=1000)
        first = await provider.refund(reversal(paid, 300))
        too_much = await provider.refund(reversal(paid, 800))
        second = await provider.refund(reversal(paid, 700))
        again = await provider.refund(reversal(paid, 1))
    assert [r.outcome for r in (first, second)] == [Outcome.APPROVED] * 2
    assert first.provider_ref is not None and first.provider_ref.startswith("re_")
    assert (too_much.outcome, too_much.decline_code, too_much.retryable) == (HARD, "amount_too_large", False)
    assert (again.outcome, again.decline_code) == (HARD, "charge_already_refunded")
    assert net_by_key(await sandbox.ledger()).popitem()[1] == (1000, 0)
    assert len(await sandbox.refunds()) == 2


async def test_a_resend_under_the_same_key_replays_the_refund(sandbox: Sandbox) -> None:
    """Stripe's idempotency: the same key and parameters answer the same refund, refunding once."""
    async with open_stripe(sandbox) as provider:
        paid = await charge(provider)
        request_ = reversal(paid, 400, key="rf-same")
        first = await provider.refund(request_)
        second = await provider.refund(request_)
    assert first.outcome is second.outcome is Outcome.APPROVED
    assert first.provider_ref == second.provider_ref
    assert len(await sandbox.refunds()) == 1


async def test_a_refund_of_a_declined_payment_intent_is_refused(sandbox: Sandbox) -> None:
    async with open_stripe(sandbox) as provider:
        declined = await provider.charge(attempt("pm_stolen"))
        assert declined.provider_ref is not None
        result = await provider.refund(reversal(declined, 100))
    assert (result.outcome, result.decline_code) == (HARD, "charge_not_refundable")
    assert await sandbox.refunds() == []


async def test_the_dialect_refuses_a_reason_off_stripes_enumeration(sandbox: Sandbox) -> None:
    """What Stripe answers a free-text ``reason``: the adapter never sends one (see above)."""
    async with open_stripe(sandbox) as provider:
        paid = await charge(provider)
    form = {"payment_intent": paid.provider_ref or "", "amount": "100", "reason": "customer asked"}
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "rf-free-text"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sandbox.url}/stripe/v1/refunds", data=form, headers=headers) as response,
    ):
        status, body = response.status, await response.json()
    assert status == 400 and body["error"]["param"] == "reason"
    assert await sandbox.refunds() == []


async def test_timeout_is_unknown_then_the_lookup_finds_the_refund_by_its_key(sandbox: Sandbox) -> None:
    """A refund answered too late may have been made: unknown. ``GET /v1/refunds?payment_intent=``
    lists it with the key in its metadata, so the lookup settles it succeeded; a refund never
    sent is not found, and one of another amount under the key is an anomaly, never settled."""
    await sandbox.behave(hang_s=5)
    async with open_stripe(sandbox, timeout_s=0.5) as provider:
        paid = await charge(provider, "pm_refund_timeout")
        slow = reversal(paid, 250, key="rf-slow")
        result = await provider.refund(slow)
        found = await provider.lookup_refund(slow)
        missing = await provider.lookup_refund(reversal(paid, 250, key="rf-never-sent"))
        other = await provider.lookup_refund(reversal(paid, 999, key="rf-slow"))
    assert result.outcome is UNKNOWN, result
    assert found is not None and found.found and found.result is not None, found
    assert found.result.outcome is Outcome.APPROVED and found.result.provider_ref is not None
    assert missing is not None and not missing.found
    assert other is not None and other.anomaly is not None and "amount" in other.anomaly
    assert net_by_key(await sandbox.ledger()).popitem()[1] == (250, 1749)


async def test_the_lookup_reads_every_page_of_the_charges_refunds(sandbox: Sandbox) -> None:
    """Stripe lists at most ``limit`` refunds a page: the lookup follows ``starting_after``."""
    async with open_stripe(sandbox, lookup_page_size=2) as provider:
        paid = await charge(provider)
        requests_ = [reversal(paid, 10, key=f"rf-page-{n}") for n in range(5)]
        for item in requests_:
            assert (await provider.refund(item)).outcome is Outcome.APPROVED
        found = await provider.lookup_refund(requests_[0])  # the oldest: on the last page
    assert found is not None and found.result is not None and found.result.outcome is Outcome.APPROVED


# --- every status and error, mapped --------------------------------------------------------


def _refund(status: str, **fields: Any) -> bytes:
    body = {
        "id": "re_1",
        "object": "refund",
        "status": status,
        "amount": 500,
        "currency": "eur",
        "payment_intent": "pi_abc",
        "metadata": {"payd_key": "rf-x"},
    }
    return json.dumps(body | fields).encode()


REQUEST_X: Final = reversal("pi_abc", 500, key="rf-x")


@pytest.mark.parametrize("status", SPEC["status"])
def test_every_refund_status_is_mapped(status: str) -> None:
    """succeeded: approved; pending and requires_action: unknown and accepted (pending), settled
    by a later lookup
    (Stripe moves them on by itself); failed and canceled: failed with Stripe's failure_reason."""
    result = transform.refund_result(
        REQUEST_X, 200, {}, _refund(status, failure_reason="expired_or_canceled_card")
    )
    wanted = {
        "succeeded": Outcome.APPROVED,
        "pending": UNKNOWN,
        "requires_action": UNKNOWN,
        "failed": HARD,
        "canceled": HARD,
    }[status]
    assert result.outcome is wanted
    assert not result.needs_operator
    # Stripe has a pending refund: accepted, so it is recorded pending and never sent again.
    assert result.accepted is (status in ("pending", "requires_action"))
    if wanted is HARD:
        assert (result.decline_code, result.retryable) == ("expired_or_canceled_card", False)


def test_a_refund_answer_for_another_request_is_never_settled() -> None:
    """A 200 whose refund carries another key, amount or PaymentIntent is not this refund."""
    for change in ({"amount": 1}, {"payment_intent": "pi_other"}, {"metadata": {}}, {"currency": "usd"}):
        result = transform.refund_result(REQUEST_X, 200, {}, _refund("succeeded", **change))
        assert result.outcome is UNKNOWN and result.needs_operator, change
    unrecognised = transform.refund_result(REQUEST_X, 200, {}, _refund("new_status"))
    assert unrecognised.outcome is UNKNOWN and unrecognised.needs_operator


def _error(status: int, kind: str, code: str | None = None) -> ChargeResult:
    body = json.dumps({"error": {"type": kind, "code": code, "message": "x"}}).encode()
    return transform.refund_result(REQUEST_X, status, {}, body)


@pytest.mark.parametrize("code", SPEC["refund_error_codes"])
def test_stripes_refusal_codes_fail_the_refund_unretried(code: str) -> None:
    result = _error(404 if code == "resource_missing" else 400, "invalid_request_error", code)
    assert (result.outcome, result.decline_code, result.retryable) == (HARD, code, False)


def test_other_errors_follow_the_charge_table() -> None:
    """Rate limits are rate limited (nothing done); 5xx, lock timeouts and a key in use may have
    refunded: unknown; other invalid requests and auth failures refund nothing: failed."""
    assert _error(429, "invalid_request_error", "rate_limit").outcome is Outcome.RATE_LIMITED
    assert _error(400, "invalid_request_error", "rate_limit").outcome is Outcome.RATE_LIMITED
    for status, kind, code in (
        (500, "api_error", None),
        (503, "api_error", None),
        (429, "invalid_request_error", "lock_timeout"),
        (409, "invalid_request_error", "idempotency_key_in_use"),
        (400, "idempotency_error", None),
    ):
        assert _error(status, kind, code).outcome is UNKNOWN, (status, kind, code)
    for status, kind, code in (
        (400, "invalid_request_error", "parameter_unknown"),
        (401, "invalid_request_error", None),
        (403, "invalid_request_error", None),
    ):
        result = _error(status, kind, code)
        assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False), (status, code)
    assert transform.refund_result(REQUEST_X, 502, {}, b"<html>").outcome is UNKNOWN


def test_the_adapter_says_it_refunds() -> None:
    assert StripeProvider.capabilities.refunds
    assert registry.factory("stripe") is StripeProvider


# --- end to end through the daemon ---------------------------------------------------------


def stripe_section(sandbox: Sandbox, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "stripe",
        "base_url": f"{sandbox.url}/stripe",
        "max_in_flight": 5,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
    } | overrides


def stripe_charge(key: str, amount: int, payment_method: str = "pm_ok") -> dict[str, Any]:
    return request(key, amount_minor=amount, payment_method=payment_method) | {
        "provider": "stripe",
        "customer_ref": "cus_payd",
    }


async def test_daemon_refunds_stripe_charges_fully_partly_and_never_beyond(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Through the daemon: a full and two partial refunds succeed; a refund over what remains is
    refused before it is sent; a refund whose answer times out is unknown, then reconciled by
    the lookup to succeeded, never sent twice. The gateway's ledger shows each charge refunded
    exactly what payd recorded."""
    await sandbox.behave(hang_s=4)
    await broker.follow_events()
    async with daemons.in_process(providers__stripe=stripe_section(sandbox, timeout_s=1)):
        await charged(
            db,
            broker,
            stripe_charge("st-full", 1500),
            stripe_charge("st-part", 1000),
            stripe_charge("st-slow", 800, "pm_refund_timeout"),
        )
        await broker.publish(
            [
                refund("st-rf-full", "st-full", 1500, reason="requested_by_customer"),
                refund("st-rf-part-1", "st-part", 300, reason="plan changed"),
                refund("st-rf-part-2", "st-part", 200),
                refund("st-rf-slow", "st-slow", 500),
            ]
        )
        settled = await wait_reversals(
            db, ["st-rf-full", "st-rf-part-1", "st-rf-part-2", "st-rf-slow"], timeout=40
        )
        await broker.publish(
            [
                refund("st-rf-full", "st-full", 1500, reason="requested_by_customer"),
                refund("st-rf-part-2", "st-part", 200),
            ]
        )  # duplicate deliveries: nothing more is refunded
        await broker.publish([refund("st-rf-over", "st-part", 501)])
        over = await wait_reversals(db, ["st-rf-over"])
        await eventually(lambda: _queue_empty(broker), timeout=20, what="the duplicates to be consumed")

        async def slow_events() -> bool:
            keys = [e["type"] for e in broker.events if e.get("idempotency_key") == "st-rf-slow"]
            return keys == ["refund.unknown", "refund.succeeded"]

        await eventually(slow_events, timeout=20, what="refund.unknown then refund.succeeded")
    assert settled == dict.fromkeys(["st-rf-full", "st-rf-part-1", "st-rf-part-2", "st-rf-slow"], "succeeded")
    assert over == {"st-rf-over": "failed"}
    assert net_by_key(await sandbox.ledger()) == {
        "st-full": (1500, 0),
        "st-part": (500, 500),
        "st-slow": (500, 300),
    }
    refunds = await sandbox.refunds()
    assert sorted(r["idempotency_key"] for r in refunds) == [
        "st-rf-full",
        "st-rf-part-1",
        "st-rf-part-2",
        "st-rf-slow",
    ]
    stats = await sandbox.stats()
    assert stats["refund_requests"] == 4, "the timed-out refund was looked up, not sent again"
    rows = await query(db, "SELECT idempotency_key, provider_ref FROM reversals WHERE state = 'succeeded'")
    assert {ref for _, ref in rows} == {r["id"] for r in refunds}


async def test_racing_refunds_never_refund_more_than_the_charge(sandbox: Sandbox) -> None:
    """Ten refunds of 300 race on a charge of 1000 (with latency, so they overlap) and two
    requests race under one key: the dialect refunds at most what was charged, each key at
    most once; the losers are refused (``amount_too_large``) or unknown (the key in use), and
    a lookup of the raced key finds its one refund."""
    await sandbox.behave(latency_ms=50)
    async with open_stripe(sandbox) as provider:
        paid = await charge(provider, amount=1000)
        results = await asyncio.gather(*(provider.refund(reversal(paid, 300)) for _ in range(10)))
        raced = reversal(paid, 100, key="rf-raced")
        twice = await asyncio.gather(provider.refund(raced), provider.refund(raced))
        found = await provider.lookup_refund(raced)
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.APPROVED) == 3
    assert {r.decline_code for r in results if r.outcome is not Outcome.APPROVED} == {"amount_too_large"}
    # The second is refused 409 while the first runs (unknown), or replays it if it came after.
    assert Outcome.APPROVED in {r.outcome for r in twice} <= {Outcome.APPROVED, UNKNOWN}
    assert [r["idempotency_key"] for r in await sandbox.refunds()].count("rf-raced") == 1
    assert found is not None and found.result is not None and found.result.outcome is Outcome.APPROVED
    assert net_by_key(await sandbox.ledger()).popitem()[1] == (1000, 0)


async def test_refund_headers_carry_the_refunds_key_and_the_pinned_version() -> None:
    """``Idempotency-Key`` is the refund's own key (never the charge's), ``Stripe-Version`` the
    pinned one, and the headers' repr never shows the API key."""
    provider = StripeProvider("stripe", stripe_config("http://127.0.0.1:1/stripe"))
    try:
        item = reversal("pi_abc", 100, key="rf-headers")
        headers = provider.refund_headers(item, transform.refund_form(item))
    finally:
        await provider.close()
    assert headers["Idempotency-Key"] == "rf-headers"
    assert headers["Stripe-Version"] == "2024-12-18.acacia"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert API_KEY not in repr(headers) and API_KEY not in str(headers)
