"""Adyen refunds and cancels: the adapter against the sandbox's Adyen face, and end to end.

Adyen answers a refund or cancel ``201 {"status": "received"}`` and decides it later,
in a REFUND or CANCELLATION notification (Checkout API v71,
``tests/fixtures/providers/adyen_checkout_v71_reversals.json``; Webhooks v1,
``tests/fixtures/providers/adyen_webhooks_v1.json``). payd keeps such a reversal
``pending`` (its amount reserved) until the signed notification reaches
``POST /webhooks/{provider}``. The HMAC vectors are those of Adyen's own
adyen-python-api-library tests (commit recorded in the fixture).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import msgspec
import pytest
import structlog

from daemon.config import ConfigError, PipelineSettings
from daemon.metrics import Metrics
from daemon.models import AttemptRequest, ChargeResult, Outcome, ReversalOperation, ReversalRequest
from daemon.operator.settle import SettleAs, SettleOrder, SettleRefused, settle_attempt
from daemon.pipeline.reconcile_reversals import ReversalReconciler
from daemon.providers.adyen import transform
from daemon.providers.adyen.client import AdyenProvider, AdyenProviderConfig
from daemon.providers.base import NotificationRefused, Notifications, reversal_operation
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request
from tests.test_operator_commands import POLICY
from tests.test_reversals import charged, refund, reversal_states, wait_reversals

FIXTURES = Path(__file__).parent / "fixtures/providers"
CHECKOUT = json.loads((FIXTURES / "adyen_checkout_v71_reversals.json").read_text())
WEBHOOKS = json.loads((FIXTURES / "adyen_webhooks_v1.json").read_text())
API_KEY = "test_adyen_key_not_a_real_one"
HMAC_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
MERCHANT = "PaydTestMerchant"


@pytest.fixture
def adyen_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", API_KEY)
    monkeypatch.setenv("PAYD_ADYEN_HMAC_KEY", HMAC_KEY)


def adyen_table(sandbox: Sandbox, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "adyen",
        "base_url": f"{sandbox.url}/adyen",
        "max_in_flight": 10,
        "timeout_s": 2,
        "connect_timeout_s": 1,
        "merchant_account": MERCHANT,
    } | overrides


@pytest.fixture
async def make_adyen(sandbox: Sandbox, adyen_secrets: None) -> AsyncIterator[Callable[..., AdyenProvider]]:
    del adyen_secrets
    made: list[AdyenProvider] = []

    def make(**overrides: Any) -> AdyenProvider:
        provider = AdyenProvider(
            "adyen", msgspec.convert(adyen_table(sandbox, **overrides), AdyenProviderConfig)
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


def charge_body(key: str, amount_minor: int = 1000, **extra: Any) -> dict[str, Any]:
    return request(key, amount_minor=amount_minor, provider="adyen", customer_ref="shopper-1", **extra)


def reversal(
    psp: str | None, *, key: str = "rf-1", amount: int = 400, charge_amount: int = 1000, **extra: Any
) -> ReversalRequest:
    return ReversalRequest(
        reversal_id=1,
        idempotency_key=key,
        original_idempotency_key="ch-1",
        original_provider_ref=psp,
        original_merchant_reference="ch-1",
        provider="adyen",
        amount_minor=amount,
        currency="EUR",
        charge_amount_minor=charge_amount,
        **extra,
    )


def signed(item: dict[str, Any], key: str = HMAC_KEY) -> dict[str, Any]:
    return item | {
        "additionalData": {"hmacSignature": transform.notification_signature(item, bytes.fromhex(key))}
    }


def envelope(*items: dict[str, Any]) -> bytes:
    return json.dumps(
        {"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    ).encode()


def refund_item(**overrides: Any) -> dict[str, Any]:
    return {
        "pspReference": "REFUND0000000001",
        "originalReference": "PAYMENT000000001",
        "merchantAccountCode": MERCHANT,
        "merchantReference": "rf-1",
        "amount": {"value": 400, "currency": "EUR"},
        "eventCode": "REFUND",
        "eventDate": "2026-01-01T10:00:00+01:00",
        "success": "true",
    } | overrides


# -- the specification ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", WEBHOOKS["hmac"]["vectors"], ids=lambda v: v["from"][:40])
def test_signatures_match_adyens_own_library_vectors(vector: dict[str, Any]) -> None:
    """The notification HMAC is computed exactly as Adyen's library does (its test vectors)."""
    key = bytes.fromhex(vector["key"])
    assert transform.notification_signature(vector["item"], key) == vector["signature"]
    assert transform.signature_valid(
        vector["item"] | {"additionalData": {"hmacSignature": vector["signature"]}}, key
    )
    tampered = vector["item"] | {"success": "false" if vector["item"]["success"] == "true" else "true"}
    assert not transform.signature_valid(
        tampered | {"additionalData": {"hmacSignature": vector["signature"]}}, key
    )


def test_reversal_requests_carry_every_field_the_v71_specification_requires() -> None:
    refund_json = json.loads(
        transform.refund_body(
            amount=transform.Amount(value=5, currency="EUR"), merchant_account="M", reference="r"
        )
    )
    cancel_json = json.loads(transform.cancel_body(merchant_account="M", reference="r"))
    schemas = CHECKOUT["schemas"]
    assert set(schemas["PaymentRefundRequest"]["required"]) <= set(refund_json)
    assert set(schemas["PaymentCancelRequest"]["required"]) <= set(cancel_json)
    assert set(refund_json) <= set(schemas["PaymentRefundRequest"]["properties"])
    assert set(cancel_json) <= set(schemas["PaymentCancelRequest"]["properties"])
    # The documented answer is received, and only received; the outcome is asynchronous.
    assert schemas["PaymentRefundResponse"]["properties"]["status"]["enum"] == ["received"]
    assert schemas["PaymentCancelResponse"]["properties"]["status"]["enum"] == ["received"]
    assert "201" in CHECKOUT["paths"]["/payments/{paymentPspReference}/refunds"]["post"]["responses"]
    # The notification item fields the signature covers are all in the webhook item schema.
    item_fields = set(WEBHOOKS["schemas"]["NotificationRequestItem"]["properties"]) | {"value", "currency"}
    assert set(WEBHOOKS["hmac"]["signing_fields"]) <= item_fields


def test_a_long_reversal_key_fits_adyens_reference_limit() -> None:
    assert transform.reversal_reference("k" * 80) == "k" * 80
    long_reference = transform.reversal_reference("k" * 81)
    assert len(long_reference) <= 80 and long_reference == transform.reversal_reference("k" * 81)


# -- the adapter over HTTP against the sandbox's Adyen face ------------------------------------


async def _charged_psp(adyen: AdyenProvider, key: str = "ch-1", **extra: Any) -> str:
    result = await adyen.charge(msgspec.convert(charge_body(key, **extra), type=AttemptRequest))
    assert result.outcome is Outcome.APPROVED and result.provider_ref
    return result.provider_ref


async def _notifications(sandbox: Sandbox) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sandbox.url}/adyen/_sandbox/notifications") as r,
    ):
        return list((await r.json())["notifications"])


async def test_a_refund_is_received_pending_and_its_notification_says_how_it_ended(
    make_adyen: Callable[..., AdyenProvider], sandbox: Sandbox
) -> None:
    """POST .../refunds answers received: an accepted UNKNOWN carrying Adyen's modification
    reference; the gateway refunded it once (a same-key resend replays received), and the
    REFUND notification it made reads back, through the adapter, as the refund's success."""
    adyen = make_adyen()
    psp = await _charged_psp(adyen)
    first = await adyen.refund(reversal(psp))
    again = await adyen.refund(reversal(psp))
    assert first.outcome is Outcome.UNKNOWN and first.accepted and first.provider_ref
    assert again == first
    ledger = await sandbox.ledger()
    assert [(c["refunded_minor"], c["net_minor"]) for c in ledger] == [(400, 600)]
    (item,) = await _notifications(sandbox)
    assert (item["eventCode"], item["success"], item["originalReference"]) == ("REFUND", "true", psp)
    read = adyen.read_notification(envelope(signed(item)), {})
    assert isinstance(read, Notifications) and read.answer == b"[accepted]"
    (notice,) = read.notices
    assert notice.operation is ReversalOperation.REFUND
    assert (notice.idempotency_key, notice.provider_ref, notice.amount_minor) == (
        "rf-1",
        first.provider_ref,
        400,
    )
    assert notice.result.outcome is Outcome.APPROVED


async def test_a_refund_beyond_what_remains_is_received_then_notified_failed(
    make_adyen: Callable[..., AdyenProvider], sandbox: Sandbox
) -> None:
    adyen = make_adyen()
    psp = await _charged_psp(adyen)
    result = await adyen.refund(reversal(psp, amount=1500, charge_amount=1000))
    assert result.accepted
    (item,) = await _notifications(sandbox)
    read = adyen.read_notification(envelope(signed(item)), {})
    assert isinstance(read, Notifications)
    failed = read.notices[0].result
    assert failed.outcome is Outcome.PROVIDER_ERROR and not failed.retryable
    assert failed.decline_code == "adyen_refund_failed" and "success=false" in (failed.reason or "")
    assert (await sandbox.ledger())[0]["refunded_minor"] == 0


async def test_a_cancel_is_chosen_only_for_the_whole_charge_well_before_capture(
    make_adyen: Callable[..., AdyenProvider],
) -> None:
    """With ``capture_delay_hours`` Adyen captures later, and until shortly before then a whole
    reversal is a cancel; a part, an older charge or immediate capture (the default) refund."""
    delayed, immediate = make_adyen(capture_delay_hours=24), make_adyen()
    now = datetime.now(UTC)
    fresh = reversal("P", amount=1000, charged_at=now - timedelta(hours=1))
    assert reversal_operation(delayed, fresh) is ReversalOperation.VOID
    assert (
        reversal_operation(delayed, msgspec.structs.replace(fresh, amount_minor=999))
        is ReversalOperation.REFUND
    )
    late = msgspec.structs.replace(fresh, charged_at=now - timedelta(hours=23, minutes=30))
    assert reversal_operation(delayed, late) is ReversalOperation.REFUND
    assert reversal_operation(immediate, fresh) is ReversalOperation.REFUND


async def test_a_cancel_before_capture_voids_and_after_capture_fails(
    make_adyen: Callable[..., AdyenProvider], sandbox: Sandbox
) -> None:
    adyen_delayed, adyen_now = make_adyen(capture_delay_hours=24), make_adyen()
    delayed_psp = await _charged_psp(adyen_delayed, "ch-delayed")
    captured_psp = await _charged_psp(adyen_now, "ch-captured")
    void = dict(amount=1000, operation=ReversalOperation.VOID)
    assert (await adyen_delayed.refund(reversal(delayed_psp, key="rf-v1", **void))).accepted
    assert (await adyen_now.refund(reversal(captured_psp, key="rf-v2", **void))).accepted
    by_reference = {n["merchantReference"]: n for n in await _notifications(sandbox)}
    assert by_reference["rf-v1"]["eventCode"] == "CANCELLATION" and by_reference["rf-v1"]["success"] == "true"
    assert by_reference["rf-v2"]["success"] == "false"
    assert {c["merchant_reference"]: c["net_minor"] for c in await sandbox.ledger()} == {
        "ch-delayed": 0,
        "ch-captured": 1000,
    }


async def test_notifications_are_believed_only_with_a_valid_signature(
    make_adyen: Callable[..., AdyenProvider],
) -> None:
    adyen = make_adyen()
    forged = signed(refund_item(), key="00" * 32)
    assert adyen.read_notification(envelope(forged), {}) == NotificationRefused(
        status=401, kind="bad_signature", reason="an item's hmacSignature does not verify"
    )
    # One bad item spoils the request: nothing in it is believed.
    mixed = adyen.read_notification(envelope(signed(refund_item()), forged), {})
    assert isinstance(mixed, NotificationRefused) and mixed.kind == "bad_signature"
    unsigned = adyen.read_notification(envelope(refund_item()), {})
    assert isinstance(unsigned, NotificationRefused) and unsigned.kind == "bad_signature"
    garbage = adyen.read_notification(b"{not json", {})
    assert isinstance(garbage, NotificationRefused) and (garbage.status, garbage.kind) == (400, "malformed")
    # Signed, but nothing payd asked for: acknowledged and ignored.
    other = adyen.read_notification(
        envelope(
            signed(refund_item(eventCode="AUTHORISATION")), signed(refund_item(merchantAccountCode="Other"))
        ),
        {},
    )
    assert isinstance(other, Notifications) and (other.notices, other.ignored) == ([], 2)


async def test_without_an_hmac_key_notifications_are_refused(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", API_KEY)
    monkeypatch.delenv("PAYD_ADYEN_HMAC_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    adyen = AdyenProvider("adyen", msgspec.convert(adyen_table(sandbox), AdyenProviderConfig))
    try:
        refused = adyen.read_notification(envelope(signed(refund_item())), {})
        assert isinstance(refused, NotificationRefused) and refused.kind == "not_configured"
    finally:
        await adyen.close()


def test_a_key_that_is_not_hex_stops_start_up_naming_the_secret_not_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", API_KEY)
    monkeypatch.setenv("PAYD_ADYEN_HMAC_KEY", "not-hex-secret-value")
    with pytest.raises(ConfigError) as raised:
        AdyenProvider("adyen", msgspec.convert(adyen_table_for("http://127.0.0.1:1"), AdyenProviderConfig))
    assert "adyen_hmac_key" in str(raised.value) and "not-hex-secret-value" not in str(raised.value)


def adyen_table_for(url: str) -> dict[str, Any]:
    return {"kind": "adyen", "base_url": url, "max_in_flight": 1, "merchant_account": MERCHANT}


def test_answers_off_the_documented_shape_are_never_taken_as_received() -> None:
    def answer(**fields: Any) -> ChargeResult:
        body = {
            "status": "received",
            "pspReference": "R",
            "paymentPspReference": "P",
            "reference": "rf",
        } | fields
        return transform.reversal_result(
            201, {}, json.dumps(body).encode(), reference="rf", payment_psp_reference="P"
        )

    assert answer().accepted
    assert not answer(status="processed").accepted and answer(status="processed").needs_operator
    assert not answer(reference="other").accepted
    assert not answer(paymentPspReference="Q").accepted
    refused = transform.reversal_result(
        422,
        {},
        b'{"status":422,"errorCode":"167","message":"Original pspReference required"}',
        reference="rf",
        payment_psp_reference="P",
    )
    assert refused.outcome is Outcome.PROVIDER_ERROR and not refused.retryable
    in_progress = transform.reversal_result(
        409,
        {},
        b'{"status":409,"errorCode":"704","message":"in progress"}',
        reference="rf",
        payment_psp_reference="P",
    )
    assert in_progress.outcome is Outcome.UNKNOWN and not in_progress.accepted


# -- end to end: the daemon, the sandbox's Adyen face and its signed notifications -------------


async def _register_webhook(sandbox: Sandbox, port: int, key: str = HMAC_KEY) -> None:
    body = {"url": f"http://127.0.0.1:{port}/webhooks/adyen", "hmac_key": key}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sandbox.url}/adyen/_sandbox/webhook", json=body) as r,
    ):
        assert r.status == 200, await r.text()


async def _post_webhook(port: int, body: bytes) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/webhooks/adyen", data=body) as response,
    ):
        return response.status, await response.text()


async def _metric(port: int, line_start: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


@pytest.mark.usefixtures("adyen_secrets")
async def test_daemon_adyen_refund_is_pending_until_the_signed_notification_settles_it(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """refund -> received (pending, refund.pending) -> the sandbox's signed REFUND notification
    -> succeeded (refund.succeeded); a forged notification is refused (401), counted, and
    changes nothing; the same notification again changes nothing (counted as already)."""
    await broker.follow_events()
    async with daemons.in_process(providers__adyen=adyen_table(sandbox)) as daemon:
        await charged(db, broker, charge_body("ch-a", 1000))
        forged = envelope(
            signed(refund_item(merchantReference="rf-a", amount={"value": 400, "currency": "EUR"}), "00" * 32)
        )
        # No webhook yet: the refund stays pending.
        await broker.publish([refund("rf-a", "ch-a", 400)])
        assert await wait_reversals(db, ["rf-a"], done=("pending",)) == {"rf-a": "pending"}
        assert await _post_webhook(daemon.port, forged) == (
            401,
            json.dumps({"error": "an item's hmacSignature does not verify"}),
        )
        assert (
            await _metric(
                daemon.port, 'payd_webhook_notifications_total{provider="adyen",result="bad_signature"}'
            )
            == 1
        )
        assert await reversal_states(db) == {"rf-a": "pending"}
        # The genuine notification, as the sandbox made it, signed with the shared key.
        (item,) = await _notifications(sandbox)
        genuine = envelope(signed(item))
        assert await _post_webhook(daemon.port, genuine) == (200, "[accepted]")
        assert await reversal_states(db) == {"rf-a": "succeeded"}
        assert await _post_webhook(daemon.port, genuine) == (200, "[accepted]")
        assert (
            await _metric(daemon.port, 'payd_webhook_notifications_total{provider="adyen",result="already"}')
            == 1
        )
        # A refund payd never sent (another system on the account): acknowledged, counted, no change.
        stranger = envelope(signed(refund_item(merchantReference="not-ours", pspReference="ZZZ")))
        assert await _post_webhook(daemon.port, stranger) == (200, "[accepted]")
        unmatched = 'payd_webhook_notifications_total{provider="adyen",result="unmatched"}'
        assert await _metric(daemon.port, unmatched) == 1
        unreadable = json.dumps({"error": "unreadable notification: no notificationItems"})
        assert await _post_webhook(daemon.port, b"[]") == (400, unreadable)

        async def both_events() -> bool:
            return {e["type"] for e in broker.events if e.get("idempotency_key") == "rf-a"} >= {
                "refund.pending",
                "refund.succeeded",
            }

        await eventually(both_events, timeout=20, what="refund.pending and refund.succeeded")
    row = await query(db, "SELECT state, operation, provider_ref, finished_at IS NOT NULL FROM reversals")
    assert row == [("succeeded", "refund", item["pspReference"], 1)]
    assert [(c["refunded_minor"], c["net_minor"]) for c in await sandbox.ledger()] == [(400, 600)]


@pytest.mark.usefixtures("adyen_secrets")
async def test_daemon_adyen_voids_a_fresh_charge_and_the_cancellation_notification_arrives_by_itself(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """With capture_delay_hours the whole-charge reversal is stored as a void before it is sent,
    goes to /cancels, and the sandbox's own webhook delivery settles it: succeeded, net 0."""
    await broker.follow_events()
    async with daemons.in_process(providers__adyen=adyen_table(sandbox, capture_delay_hours=48)) as daemon:
        await _register_webhook(sandbox, daemon.port)
        await charged(db, broker, charge_body("ch-v", 1000))
        await broker.publish([refund("rf-v", "ch-v", 1000)])
        assert await wait_reversals(db, ["rf-v"]) == {"rf-v": "succeeded"}

        async def void_event() -> bool:
            return any(
                e["type"] == "refund.succeeded" and e.get("operation") == "void" for e in broker.events
            )

        await eventually(void_event, timeout=20, what="the void's refund.succeeded event")
    assert await query(db, "SELECT operation FROM reversals") == [("void",)]
    (item,) = await _notifications(sandbox)
    assert item["eventCode"] == "CANCELLATION"
    assert [c["net_minor"] for c in await sandbox.ledger()] == [0]


@pytest.mark.usefixtures("adyen_secrets")
async def test_a_pending_refund_keeps_its_amount_reserved_and_an_operator_can_settle_it(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Invariant 7 with a pending refund: 600 pending of 1000, a further 500 is refused
    (exceeds_remaining) and never sent; the pending one is never sent again; the stale alarm
    counts it; an operator's settle closes it (and refuses a second settle)."""
    async with daemons.in_process(providers__adyen=adyen_table(sandbox)):
        await charged(db, broker, charge_body("ch-p", 1000))
        await broker.publish([refund("rf-p1", "ch-p", 600)])
        await wait_reversals(db, ["rf-p1"], done=("pending",))
        await broker.publish([refund("rf-p2", "ch-p", 500)])
        assert await wait_reversals(db, ["rf-p2"]) == {"rf-p2": "failed"}
        # Lookups run (reconcile_backoff_s is short in tests), but a pending refund is never re-sent.
        await eventually(
            lambda: _reconciled_at_least(db, "rf-p1", 2), timeout=20, what="a few reconciliation passes"
        )
    assert await query(db, "SELECT decline_code FROM reversals WHERE idempotency_key = 'rf-p2'") == [
        ("exceeds_remaining",)
    ]
    stats = await sandbox.stats()
    assert stats["refund_requests"] == 1, "only the first refund reached Adyen, once"
    await query(
        db, "UPDATE reversals SET claimed_at = NOW(6) - INTERVAL 2 DAY WHERE idempotency_key = 'rf-p1'"
    )
    metrics = Metrics()
    reconciler = ReversalReconciler(
        pool=db, lanes={}, settings=PipelineSettings(pending_reversal_alert_s=86400), metrics=metrics
    )
    assert await reconciler.check_stale_pending() == 1
    assert metrics.registry.get_sample_value("payd_refunds_pending_stale") == 1
    settled = await settle_attempt(
        db, settle_order("rf-p1", SettleAs.SUCCEEDED, "seen in the Customer Area"), policy=POLICY
    )
    assert (settled.operation, settled.state.value) == ("refund", "succeeded")
    with pytest.raises(SettleRefused, match="refund rf-p1 is succeeded; only an unknown or pending refund"):
        await settle_attempt(db, settle_order("rf-p1", SettleAs.FAILED, "again"), policy=POLICY)
    assert await reconciler.check_stale_pending() == 0
    assert await query(db, "SELECT state, result_reason FROM reversals WHERE idempotency_key = 'rf-p1'") == [
        ("succeeded", "settled by ops (cli@test): seen in the Customer Area")
    ]


def settle_order(key: str, settle_as: SettleAs, reason: str) -> SettleOrder:
    """What ``payd attempts settle KEY --as ... --reason ...`` hands the settle."""
    return SettleOrder(
        idempotency_key=key, settle_as=settle_as, reason=reason, operator="ops", via="cli@test"
    )


async def _reconciled_at_least(db: aiomysql.Pool, key: str, tries: int) -> bool:
    rows = await query(db, "SELECT reconcile_tries FROM reversals WHERE idempotency_key = %s", key)
    return bool(rows) and rows[0][0] >= tries


def test_signature_is_base64_of_a_sha256() -> None:
    """A sanity check of the encoding the receiver compares (32 bytes, base64)."""
    signature = transform.notification_signature(refund_item(), bytes.fromhex(HMAC_KEY))
    assert len(base64.b64decode(signature)) == 32


@pytest.mark.usefixtures("adyen_secrets")
async def test_daemon_resends_a_timed_out_adyen_refund_under_its_key_and_refunds_once(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Adyen has no read of a refund: a refund whose answer timed out is unknown, re-sent under
    the same Idempotency-Key (Adyen answers it from its store: received), pending, and settled
    by the notification. The gateway refunded it once."""
    await sandbox.behave(hang_s=4)
    async with daemons.in_process(providers__adyen=adyen_table(sandbox, timeout_s=1)) as daemon:
        await _register_webhook(sandbox, daemon.port)
        await charged(db, broker, charge_body("ch-t", 1000, payment_method="pm_refund_timeout"))
        await broker.publish([refund("rf-t", "ch-t", 300)])
        assert await wait_reversals(db, ["rf-t"], done=("unknown",)) == {"rf-t": "unknown"}
        assert await wait_reversals(db, ["rf-t"], timeout=30) == {"rf-t": "succeeded"}
    refunds = await sandbox.refunds()
    assert [r["amount_minor"] for r in refunds] == [300], "refunded once"
    assert (await sandbox.stats())["refund_requests"] >= 2, "the resend reached the gateway"


async def test_with_basic_auth_configured_a_notification_needs_it_too(
    make_adyen: Callable[..., AdyenProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adyen's webhook can also send HTTP basic authentication; when configured it is required,
    compared as bytes, in addition to the signature."""
    monkeypatch.setenv("PAYD_ADYEN_WEBHOOK_AUTH", "adyen-hook:s3cret:with:colons")
    adyen = make_adyen(webhook_basic_auth_secret_name="adyen_webhook_auth")
    body = envelope(signed(refund_item()))
    good = "Basic " + base64.b64encode(b"adyen-hook:s3cret:with:colons").decode()
    wrong = "Basic " + base64.b64encode(b"adyen-hook:guess").decode()
    for header in (
        {},
        {"Authorization": wrong},
        {"Authorization": "Basic %%%"},
        {"Authorization": "Bearer x"},
    ):
        refused = adyen.read_notification(body, header)
        assert isinstance(refused, NotificationRefused) and (refused.status, refused.kind) == (
            401,
            "bad_credentials",
        )
    assert isinstance(adyen.read_notification(body, {"Authorization": good}), Notifications)
    # The signature is still checked behind the password.
    forged = envelope(signed(refund_item(), key="00" * 32))
    refused = adyen.read_notification(forged, {"Authorization": good})
    assert isinstance(refused, NotificationRefused) and refused.kind == "bad_signature"


@pytest.mark.usefixtures("adyen_secrets")
async def test_a_long_key_refund_is_settled_by_its_notification_while_still_unknown(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A key over Adyen's 80-character reference limit (a bulk rollback's ``rollback:RUN:KEY``)
    is sent as ``payd-<sha256 hex>``. Its answer times out (unknown: no pspReference recorded)
    and no resend comes (resend_after_s is long), so the notification the sandbox then delivers
    can only be matched through the key's digest: it settles the refund succeeded."""
    key = "rollback:run-7:" + "k" * 90
    await sandbox.behave(hang_s=4)
    async with daemons.in_process(
        providers__adyen=adyen_table(sandbox, timeout_s=1), pipeline={"resend_after_s": 3600}
    ) as daemon:
        await _register_webhook(sandbox, daemon.port)
        await charged(db, broker, charge_body("ch-long", 1000, payment_method="pm_refund_timeout"))
        await broker.publish([refund(key, "ch-long", 300)])
        assert await wait_reversals(db, [key], done=("unknown",)) == {key: "unknown"}
        assert await query(db, "SELECT provider_ref FROM reversals") == [(None,)]
        assert await wait_reversals(db, [key], timeout=30) == {key: "succeeded"}
        matched = 'payd_webhook_notifications_total{provider="adyen",result="settled"}'
        assert await _metric(daemon.port, matched) == 1
    (item,) = await _notifications(sandbox)
    assert item["merchantReference"] == transform.reversal_reference(key) != key
    assert (await sandbox.stats())["refund_requests"] == 1, "settled by the notification, not a resend"
    assert await query(db, "SELECT state, provider_ref FROM reversals") == [
        ("succeeded", item["pspReference"])
    ]


def test_only_a_reference_payd_shortened_carries_a_key_digest() -> None:
    long_key = "k" * 81
    shortened = transform.reversal_reference(long_key)
    assert transform.shortened_key_digest(shortened) == shortened.removeprefix("payd-")
    assert transform.shortened_key_digest("rf-1") is None
    assert transform.shortened_key_digest(None) is None
    assert transform.shortened_key_digest("payd-" + "A" * 64) is None, "Python's hexdigest is lowercase"


def test_a_deeply_nested_body_is_not_json_not_a_crash() -> None:
    """A few KB of ``[[[[`` exceeds the decoder's recursion limit: read as "not JSON"."""
    for depth in (5000, 100_000):
        assert transform.notification_items(b"[" * depth) == "not JSON (nested too deeply)"
        assert transform.notification_items(b"[" * depth + b"]" * depth) == "not JSON (nested too deeply)"


@pytest.mark.usefixtures("adyen_secrets")
async def test_daemon_refuses_hostile_or_unreadable_notifications_with_a_counted_400(
    db: aiomysql.Pool, sandbox: Sandbox, daemons: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unauthenticated input never makes a 500: deeply nested JSON is refused as malformed
    before any signature check, and an adapter that raises on a body (a bug) is answered 400,
    counted as malformed, its traceback logged once per kind of error and never the body."""
    del db
    async with daemons.in_process(providers__adyen=adyen_table(sandbox)) as daemon:
        malformed = 'payd_webhook_notifications_total{provider="adyen",result="malformed"}'
        assert await _post_webhook(daemon.port, b"[" * 8000) == (
            400,
            json.dumps({"error": "unreadable notification: not JSON (nested too deeply)"}),
        )
        assert await _metric(daemon.port, malformed) == 1

        def broken(self: AdyenProvider, body: bytes, headers: object) -> Notifications:
            raise ValueError(f"adapter bug on {body[:12]!r}")

        monkeypatch.setattr(AdyenProvider, "read_notification", broken)
        secret_body = envelope(refund_item(merchantReference="card-4111111111111111"))
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                assert await _post_webhook(daemon.port, secret_body) == (
                    400,
                    json.dumps({"error": "unreadable notification"}),
                )
        assert await _metric(daemon.port, malformed) == 3
    unreadable = [entry for entry in logs if entry["event"] == "webhook.unreadable"]
    assert [entry["log_level"] for entry in unreadable] == ["error", "error"]
    assert [bool(entry.get("exc_info")) for entry in unreadable] == [True, False], "one traceback"
    assert unreadable[1]["error"] == "ValueError"
    assert all(entry["body_bytes"] == len(secret_body) for entry in unreadable)
    allowed = {"event", "log_level", "provider", "body_bytes", "remote", "exc_info", "error"}
    assert all(set(entry) <= allowed for entry in unreadable), "nothing of the body but its length"


@pytest.mark.usefixtures("adyen_secrets")
async def test_a_provider_success_after_an_operator_failed_the_refund_is_an_error_naming_both_keys(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """An operator settles a pending refund failed (its amount released); Adyen's REFUND
    success=true then arrives. payd changes nothing, answers [accepted] (Adyen must not resend),
    counts it as conflict (the PaydRefundNotificationConflict alert's metric) and logs an
    error naming the refund's and the charge's keys."""
    async with daemons.in_process(providers__adyen=adyen_table(sandbox)) as daemon:
        await charged(db, broker, charge_body("ch-c", 1000))
        await broker.publish([refund("rf-c", "ch-c", 400)])
        await wait_reversals(db, ["rf-c"], done=("pending",))
        settled = await settle_attempt(
            db, settle_order("rf-c", SettleAs.FAILED, "not in the dashboard"), policy=POLICY
        )
        assert (settled.operation, settled.state.value) == ("refund", "failed")
        (item,) = await _notifications(sandbox)
        assert item["success"] == "true"
        with structlog.testing.capture_logs() as logs:
            assert await _post_webhook(daemon.port, envelope(signed(item))) == (200, "[accepted]")
        conflict = 'payd_webhook_notifications_total{provider="adyen",result="conflict"}'
        assert await _metric(daemon.port, conflict) == 1
    assert await reversal_states(db) == {"rf-c": "failed"}
    (line,) = [entry for entry in logs if entry["event"] == "webhook.conflict"]
    assert line["log_level"] == "error"
    assert (line["idempotency_key"], line["original_idempotency_key"]) == ("rf-c", "ch-c")
    assert (line["recorded"], line["notified"]) == ("failed", "succeeded")
