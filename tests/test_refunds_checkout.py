"""Checkout.com refunds, checked against Checkout.com's own definition of them.

The expectations come from checkout-sdk-python (``RefundRequest``, ``refund_payment``,
``get_payment_actions`` and the integration tests asserting what their answers carry) and
the API reference's answers to a refund, vendored in
``tests/fixtures/providers/checkout_refund.json`` with the commit and pages. A refund is
answered ``202 Accepted``: processed asynchronously, so it is recorded unknown and settled
by the payment's actions (the ``Refund`` action whose reference is the refund's key). The
adapter runs over real HTTP against the sandbox's Checkout.com dialect, which executes each
refund in the sandbox's refund book, so its ledger says what was refunded.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Final

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.models import ChargeResult, Outcome, ReversalRequest
from daemon.providers import registry
from daemon.providers.checkout import transform
from daemon.providers.checkout.client import CheckoutProvider
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request
from tests.test_provider_checkout import CHANNEL, SECRET_KEY, attempt, checkout
from tests.test_reversals import _queue_empty, charged, net_by_key, refund, wait_reversals

SPEC: Final = json.loads((Path(__file__).parent / "fixtures/providers/checkout_refund.json").read_text())
HARD, UNKNOWN = Outcome.HARD_DECLINE, Outcome.UNKNOWN


@pytest.fixture(autouse=True)
def secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_CHECKOUT_API_KEY", SECRET_KEY)


def reversal(
    charge: ChargeResult | str | None, amount: int, *, key: str | None = None, **extra: Any
) -> ReversalRequest:
    ref = charge.provider_ref if isinstance(charge, ChargeResult) else charge
    fields: dict[str, Any] = {
        "reversal_id": 1,
        "idempotency_key": key or f"rf-{uuid.uuid4().hex}",
        "original_idempotency_key": "cko-1",
        "original_provider_ref": ref,
        "original_merchant_reference": "42:7",
        "provider": "checkout",
        "amount_minor": amount,
        "currency": "EUR",
    }
    return msgspec.convert(fields | extra, ReversalRequest)


async def charge(
    provider: CheckoutProvider, payment_method: str = "pm_ok", amount: int = 1999
) -> ChargeResult:
    result = await provider.charge(attempt(payment_method, amount_minor=amount, subscription_id=None))
    assert result.outcome is Outcome.APPROVED and result.provider_ref is not None, result
    return result


async def settle(provider: CheckoutProvider, request_: ReversalRequest) -> ChargeResult | None:
    """What a lookup of the refund's action says; None when it found nothing."""
    found = await provider.lookup_refund(request_)
    assert found is not None and found.anomaly is None, found
    return found.result if found.found else None


# --- the request, against checkout-sdk-python's RefundRequest ------------------------------


def test_the_refund_body_uses_only_documented_fields_with_the_key_as_reference() -> None:
    """amount, reference (the refund's key: what its action is found by) and metadata, each a
    RefundRequest field; the reason and the charge's key ride in metadata."""
    body = json.loads(transform.refund_request_body(reversal("pay_x", 500, key="rf-1", reason="moved")))
    assert set(body) <= set(SPEC["refund_request_fields"])
    assert body == {
        "amount": 500,
        "reference": "rf-1",
        "metadata": {"payd_original_idempotency_key": "cko-1", "payd_reason": "moved"},
    }
    assert SPEC["refund_reference_max_length"] == transform.MAX_REFUND_REFERENCE


async def test_refunds_checkout_cannot_take_are_refused_unsent(sandbox: Sandbox) -> None:
    """No payment id, or a key longer than the 80-character reference: failed, never sent."""
    async with checkout(sandbox) as provider:
        for item in (reversal(None, 100), reversal("pay_x", 100, key="k" * 81)):
            result = await provider.refund(item)
            assert (result.outcome, result.retryable) == (Outcome.PROVIDER_ERROR, False), item
            assert result.reason is not None and result.reason.startswith("not sent")
            assert await provider.lookup_refund(item) is None
    assert (await sandbox.stats())["refund_requests"] == 0


# --- over HTTP against the dialect ---------------------------------------------------------


async def test_a_202_is_unknown_until_the_refund_action_says_approved(sandbox: Sandbox) -> None:
    """The documented answer is 202 with the refund's ``action_id``: not yet a success, so the
    refund is unknown (not for an operator: a lookup settles it). The payment's actions then
    show a ``Refund`` action with the key as its reference, approved: succeeded, under that
    action id. The request carried the key in ``Cko-Idempotency-Key``."""
    async with checkout(sandbox) as provider:
        paid = await charge(provider, amount=1000)
        item = reversal(paid, 400, key="rf-cko-1")
        accepted = await provider.refund(item)
        settled = await settle(provider, item)
        again = await provider.refund(item)  # the same key: Checkout.com replays the 202
        not_sent = await settle(provider, reversal(paid, 400, key="rf-cko-never"))
    assert (accepted.outcome, accepted.needs_operator, accepted.accepted) == (UNKNOWN, False, True)
    assert accepted.provider_ref is not None and accepted.provider_ref.startswith("act_")
    assert accepted.reason is not None and "202" in accepted.reason
    assert settled is not None and (settled.outcome, settled.provider_ref) == (
        Outcome.APPROVED,
        accepted.provider_ref,
    )
    assert again.provider_ref == accepted.provider_ref
    assert not_sent is None
    assert net_by_key(await sandbox.ledger()).popitem()[1] == (400, 600)


async def test_partial_refunds_then_the_rest_and_no_more(sandbox: Sandbox) -> None:
    """Two partial refunds use up the payment; one more than remains is refused 422 and one
    after it is all refunded 403 ("Refund not allowed"): failed, unretried, nothing refunded."""
    async with checkout(sandbox) as provider:
        paid = await charge(provider, amount=1000)
        first = await provider.refund(reversal(paid, 700))
        over = await provider.refund(reversal(paid, 301))
        rest = await provider.refund(reversal(paid, 300))
        after = await provider.refund(reversal(paid, 1))
        declined = await provider.charge(attempt("pm_stolen", subscription_id=None))
        of_declined = await provider.refund(reversal(declined, 1))
        unknown_payment = await provider.refund(reversal("pay_nosuchpayment", 1))
    assert first.outcome is rest.outcome is UNKNOWN
    assert (over.outcome, over.decline_code, over.retryable) == (HARD, "refund_amount_exceeds_balance", False)
    assert (after.outcome, after.decline_code) == (HARD, "refund_not_allowed")
    assert (of_declined.outcome, of_declined.decline_code) == (HARD, "refund_not_allowed")
    assert (unknown_payment.outcome, unknown_payment.decline_code) == (HARD, "payment_not_found")
    assert [(c["refunded_minor"], c["net_minor"]) for c in await sandbox.ledger()] == [(1000, 0), (0, 0)]


async def test_a_timed_out_refund_is_unknown_and_found_by_its_action(sandbox: Sandbox) -> None:
    await sandbox.behave(hang_s=5)
    async with checkout(sandbox, timeout_s=0.5) as provider:
        paid = await charge(provider, "pm_refund_timeout")
        item = reversal(paid, 250)
        result = await provider.refund(item)
        settled = await settle(provider, item)
    assert result.outcome is UNKNOWN and "timed out" in (result.reason or ""), result
    assert settled is not None and settled.outcome is Outcome.APPROVED


async def test_the_dialects_actions_carry_what_the_sdk_asserts(sandbox: Sandbox) -> None:
    """Each action has the fields checkout-sdk-python's integration test asserts, newest first,
    and the refund's answer carries ``action_id``, ``reference`` and ``_links``."""
    async with checkout(sandbox) as provider:
        paid = await charge(provider)
    assert paid.provider_ref is not None
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Cko-Idempotency-Key": "rf-shape"}
    base = f"{sandbox.url}/checkout/payments/{paid.provider_ref}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/refunds", json={"amount": 5, "reference": "rf-shape"}, headers=headers
        ) as r:
            assert r.status == 202
            accepted = await r.json()
        async with http.get(f"{base}/actions", headers=headers) as r:
            actions = await r.json()
    assert set(accepted) == set(SPEC["refund_response_fields"])
    assert [a["type"] for a in actions] == ["Refund", "Capture", "Authorization"]
    for action in actions:
        assert set(SPEC["action_fields"]) - {"reference"} <= set(action), action
        assert action["type"] in SPEC["action_types"]
    assert actions[0]["id"] == accepted["action_id"] and actions[0]["reference"] == "rf-shape"


# --- every answer and action verdict, mapped -----------------------------------------------

REQUEST_X: Final = reversal("pay_x", 500, key="rf-x")


@pytest.mark.parametrize("status", sorted(SPEC["refund_statuses"], key=int))
def test_every_documented_answer_to_a_refund_is_mapped(status: str) -> None:
    """202: unknown until the lookup; 401, 403, 404, 422: nothing refunded, failed and never
    retried; 502 (and any other answer): unknown, and never re-sent (Checkout.com keeps a key's
    answer only after a 2xx)."""
    body = b"{}"
    if status == "202":
        body = json.dumps({"action_id": "act_1", "reference": "rf-x"}).encode()
    if status == "422":
        body = json.dumps({"error_type": "request_invalid", "error_codes": ["amount_invalid"]}).encode()
    result = transform.refund_result(REQUEST_X, int(status), {}, body)
    wanted = {
        "202": UNKNOWN,
        "401": Outcome.PROVIDER_ERROR,
        "403": HARD,
        "404": HARD,
        "422": HARD,
        "502": UNKNOWN,
    }[status]
    assert result.outcome is wanted
    assert not result.needs_operator
    if wanted is not UNKNOWN:
        assert not result.retryable
    if status == "422":
        assert result.decline_code == "amount_invalid"


def test_rate_limits_and_conflicts() -> None:
    limited = transform.refund_result(REQUEST_X, 429, {"Retry-After": "3"}, b"")
    assert (limited.outcome, limited.retry_after_s) == (Outcome.RATE_LIMITED, 3.0)
    assert transform.refund_result(REQUEST_X, 409, {}, b"").outcome is UNKNOWN


def test_a_202_for_another_reference_goes_to_an_operator() -> None:
    """Checkout.com answers a reused key with the first request's answer: not this refund's."""
    body = json.dumps({"action_id": "act_1", "reference": "someone-else"}).encode()
    result = transform.refund_result(REQUEST_X, 202, {}, body)
    assert result.outcome is UNKNOWN and result.needs_operator


def _action(**fields: Any) -> transform.PaymentAction:
    base = {"id": "act_r", "type": "Refund", "amount": 500, "reference": "rf-x"}
    return msgspec.convert(base | fields, transform.PaymentAction)


@pytest.mark.parametrize("approved", [*SPEC["action_approved"], None])
def test_the_refund_actions_verdict_settles_the_refund(approved: bool | None) -> None:
    """approved true: succeeded; false: failed with its response code; no verdict yet: unknown,
    asked again. Other actions, and refunds under other references, are not this refund."""
    others = [_action(type="Capture", reference="rf-x"), _action(reference="rf-other", approved=True)]
    found = transform.refund_lookup_result(
        [
            *others,
            _action(approved=approved, response_code="20005", response_summary="Declined - Do not honour"),
        ],
        REQUEST_X,
    )
    assert found.found and found.result is not None
    wanted = {True: Outcome.APPROVED, False: HARD, None: UNKNOWN}[approved]
    assert found.result.outcome is wanted
    if approved is False:
        assert (found.result.decline_code, found.result.retryable) == ("cko_20005", False)
    assert not transform.refund_lookup_result(others, REQUEST_X).found


def test_a_refund_action_of_another_amount_is_an_anomaly() -> None:
    found = transform.refund_lookup_result([_action(amount=1, approved=True)], REQUEST_X)
    assert found.anomaly is not None and found.result is None


async def test_the_adapter_refunds_and_never_resends_after_a_5xx(sandbox: Sandbox) -> None:
    assert registry.factory("checkout") is CheckoutProvider
    async with checkout(sandbox) as provider:
        assert provider.capabilities.refunds and provider.capabilities.resend_only_after_2xx


# --- end to end through the daemon ---------------------------------------------------------


def checkout_section(sandbox: Sandbox, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "checkout",
        "base_url": f"{sandbox.url}/checkout",
        "max_in_flight": 5,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
        "processing_channel_id": CHANNEL,
    } | overrides


def checkout_charge(key: str, amount: int, payment_method: str = "pm_ok") -> dict[str, Any]:
    return request(key, amount_minor=amount, payment_method=payment_method) | {"provider": "checkout"}


async def test_daemon_refunds_checkout_payments_202_unknown_then_reconciled(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Through the daemon: every Checkout.com refund is answered 202, recorded pending
    (refund.pending), and reconciled by the payment's actions to succeeded (refund.succeeded);
    a full and two partial refunds, and one whose answer times out, are each refunded once at
    the gateway; a refund over what remains is refused before it is sent. Nothing is re-sent."""
    await sandbox.behave(hang_s=4)
    await broker.follow_events()
    async with daemons.in_process(providers__checkout=checkout_section(sandbox, timeout_s=1)):
        await charged(
            db,
            broker,
            checkout_charge("ck-full", 1500),
            checkout_charge("ck-part", 1000),
            checkout_charge("ck-slow", 800, "pm_refund_timeout"),
        )
        keys = ["ck-rf-full", "ck-rf-part-1", "ck-rf-part-2", "ck-rf-slow"]
        await broker.publish(
            [
                refund("ck-rf-full", "ck-full", 1500, reason="customer asked"),
                refund("ck-rf-part-1", "ck-part", 300),
                refund("ck-rf-part-2", "ck-part", 200),
                refund("ck-rf-slow", "ck-slow", 500),
            ]
        )
        settled = await wait_reversals(db, keys, timeout=40)
        await broker.publish(
            [
                refund("ck-rf-full", "ck-full", 1500, reason="customer asked"),
                refund("ck-rf-part-2", "ck-part", 200),
            ]
        )  # duplicate deliveries: nothing more is refunded
        await broker.publish([refund("ck-rf-over", "ck-part", 501)])
        over = await wait_reversals(db, ["ck-rf-over"])
        await eventually(lambda: _queue_empty(broker), timeout=20, what="the duplicates to be consumed")

        async def all_events() -> bool:
            return sum(e["type"] == "refund.succeeded" for e in broker.events) == 4

        await eventually(all_events, timeout=20, what="refund.succeeded for each refund")
    assert settled == dict.fromkeys(keys, "succeeded")
    assert over == {"ck-rf-over": "failed"}
    for key in keys:
        types = [e["type"] for e in broker.events if e.get("idempotency_key") == key]
        if key == "ck-rf-slow":
            # Its 202 never arrived: unknown, until the payment's Refund action is read (pending
            # first if the action had no verdict yet).
            assert types[0] == "refund.unknown" and types[-1] == "refund.succeeded", (key, types)
        else:
            # Checkout.com has it (202): pending, never sent again, until its action settles it.
            assert types == ["refund.pending", "refund.succeeded"], (key, types)
    assert net_by_key(await sandbox.ledger()) == {
        "ck-full": (1500, 0),
        "ck-part": (500, 500),
        "ck-slow": (500, 300),
    }
    assert (await sandbox.stats())["refund_requests"] == 4, "no refund was sent twice"
    rows = await query(db, "SELECT provider_ref FROM reversals WHERE state = 'succeeded'")
    assert all(ref.startswith("act_") for (ref,) in rows), rows


async def test_racing_refunds_never_refund_more_than_the_charge(sandbox: Sandbox) -> None:
    """Ten refunds of 300 race on a payment of 1000 and two requests race under one key: at
    most what was charged is refunded, each key at most once; the losers are refused (422) or
    unknown (409, the key in use); the raced key's action is found once, approved."""
    await sandbox.behave(latency_ms=50)
    async with checkout(sandbox) as provider:
        paid = await charge(provider, amount=1000)
        results = await asyncio.gather(*(provider.refund(reversal(paid, 300)) for _ in range(10)))
        raced = reversal(paid, 100, key="rf-raced")
        twice = await asyncio.gather(provider.refund(raced), provider.refund(raced))
        settled = await settle(provider, raced)
    accepted = [r for r in results if r.outcome is UNKNOWN]
    assert len(accepted) == 3
    assert {r.decline_code for r in results if r.outcome is not UNKNOWN} == {"refund_amount_exceeds_balance"}
    assert [r.outcome for r in twice] == [UNKNOWN, UNKNOWN]
    # The second is refused 409 while the first runs, or replays its 202 if it came after.
    assert any("202" in (r.reason or "") for r in twice)
    assert [r["idempotency_key"] for r in await sandbox.refunds()].count("rf-raced") == 1
    assert settled is not None and settled.outcome is Outcome.APPROVED
    assert net_by_key(await sandbox.ledger()).popitem()[1] == (1000, 0)
