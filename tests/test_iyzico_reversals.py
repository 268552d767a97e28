"""iyzico refunds (``/v2/payment/refund``, by paymentId) and same-day cancels (``/payment/cancel``).

Shapes from iyzico's official iyzipay-python (``tests/fixtures/providers/iyzico_reversals.json``,
commit recorded) and iyzico's "Refund & Cancel" pages. The sandbox's iyzico face verifies
each IYZWSv2 signature and, like iyzico, keeps no idempotency key: a reversal sent twice
would refund twice, and its ledger would show it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import msgspec
import pytest

from daemon.models import AttemptRequest, Outcome, ReversalOperation, ReversalRequest
from daemon.providers.base import reversal_operation
from daemon.providers.iyzico import transform
from daemon.providers.iyzico.client import TURKEY, IyzicoProvider, IyzicoProviderConfig
from payd_sandbox.dialects.iyzico import SANDBOX_API_KEY, SANDBOX_SECRET_KEY
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request
from tests.test_reversals import charged, refund, wait_reversals

SPEC = json.loads((Path(__file__).parent / "fixtures/providers/iyzico_reversals.json").read_text())


@pytest.fixture(autouse=True)
def iyzico_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYD_IYZICO_API_KEY", SANDBOX_API_KEY)
    monkeypatch.setenv("PAYD_IYZICO_SECRET_KEY", SANDBOX_SECRET_KEY)


def iyzico_table(sandbox: Sandbox, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "iyzico",
        "base_url": f"{sandbox.url}/iyzico",
        "max_in_flight": 5,
        "timeout_s": 0.5,
        "connect_timeout_s": 1,
        "retry_backoff_s": 0.05,
        "cancel_until_hour": 24,  # the test may run at any hour
    } | overrides


@contextlib.asynccontextmanager
async def iyzico(sandbox: Sandbox, **overrides: Any) -> AsyncIterator[IyzicoProvider]:
    provider = IyzicoProvider(
        "iyzico", msgspec.convert(iyzico_table(sandbox, **overrides), IyzicoProviderConfig)
    )
    try:
        yield provider
    finally:
        await provider.close()


async def charge(provider: IyzicoProvider, key: str, token: str = "pm_ok", amount_minor: int = 1000) -> str:
    result = await provider.charge(
        AttemptRequest(
            idempotency_key=key,
            amount_minor=amount_minor,
            currency="TRY",
            provider="iyzico",
            payment_method=f"cuk-{key}:{token}",
            customer_ref="cust-1",
        )
    )
    assert result.outcome is Outcome.APPROVED and result.provider_ref, result
    return result.provider_ref


def reversal(payment_id: str | None, key: str, amount: int, **extra: Any) -> ReversalRequest:
    return ReversalRequest(
        reversal_id=1,
        idempotency_key=key,
        original_idempotency_key="ch",
        original_provider_ref=payment_id,
        original_merchant_reference="ch",
        provider="iyzico",
        amount_minor=amount,
        currency="TRY",
        charge_amount_minor=1000,
        **extra,
    )


# -- the specification ------------------------------------------------------------------------------


def test_reversal_requests_use_the_official_clients_paths_and_fields() -> None:
    refund_json = json.loads(
        transform.refund_body(
            locale="en", conversation_id="rf", payment_id="9", price="3.0", currency="TRY", ip="1.1.1.1"
        )
    )
    cancel_json = json.loads(
        transform.cancel_body(locale="en", conversation_id="rf", payment_id="9", ip="1.1.1.1")
    )
    for sent, spec in ((refund_json, SPEC["refund_v2"]), (cancel_json, SPEC["cancel"])):
        assert set(spec["required"]) <= set(sent)
        assert set(sent) <= set(spec["required"]) | set(spec["optional"])
        assert set(sent) - {"currency"} <= set(spec["sample_request"])
    assert (
        SPEC["refund_v2"]["path"],
        SPEC["cancel"]["path"],
    ) == (transform.REFUND_PATH, transform.CANCEL_PATH)
    assert refund_json["price"] == "3.0"  # the official sample's decimal string


async def test_cancel_only_for_the_whole_charge_on_the_day_it_was_made_in_turkey(sandbox: Sandbox) -> None:
    """iyzico cancels the whole payment, on its day only (the banks' day, UTC+3)."""
    now = datetime.now(UTC)
    today = reversal("9", "rf", 1000, charged_at=now)
    turkey_midnight = now.astimezone(TURKEY).replace(hour=0, minute=0, second=0, microsecond=0)
    yesterday = msgspec.structs.replace(today, charged_at=turkey_midnight - timedelta(seconds=1))
    async with iyzico(sandbox) as provider, iyzico(sandbox, cancel_until_hour=0) as never:
        assert reversal_operation(provider, today) is ReversalOperation.VOID
        part = msgspec.structs.replace(today, amount_minor=999)
        assert reversal_operation(provider, part) is ReversalOperation.REFUND
        assert reversal_operation(provider, yesterday) is ReversalOperation.REFUND
        assert reversal_operation(never, today) is ReversalOperation.REFUND


def test_answers_map_to_outcomes_and_nothing_unclear_is_ever_taken_for_done() -> None:
    expected = transform.ExpectedReversal(
        conversation_id="rf", payment_id="9", price=Decimal("4.0"), currency="TRY"
    )

    def answer(http: int = 200, **fields: Any) -> Any:
        body = {
            "status": "success",
            "conversationId": "rf",
            "paymentId": "9",
            "price": 4.0,
            "currency": "TRY",
        } | fields
        return transform.reversal_result(http, {}, json.dumps(body).encode(), expected)

    assert answer().outcome is Outcome.APPROVED
    failed = answer(status="failure", errorCode="5093", errorMessage="refund not allowed")
    assert (failed.outcome, failed.retryable, failed.decline_code) == (
        Outcome.PROVIDER_ERROR,
        False,
        "iyzico_5093",
    )
    limited = answer(429, status="failure", errorCode="50000")
    assert limited.outcome is Outcome.RATE_LIMITED
    for unclear in (answer(500), answer(price=5.0), answer(conversationId="other"), answer(status="odd")):
        assert unclear.outcome is Outcome.UNKNOWN and unclear.needs_operator
        assert "settle this reversal by hand" in (unclear.reason or "")
    garbled = transform.reversal_result(200, {}, b"<html>", expected)
    assert garbled.outcome is Outcome.UNKNOWN and garbled.needs_operator


# -- the adapter over HTTP --------------------------------------------------------------------------


async def test_a_refund_and_a_same_day_cancel_reach_the_ledger_once(sandbox: Sandbox) -> None:
    async with iyzico(sandbox) as provider:
        refunded = await charge(provider, "ch-r")
        cancelled = await charge(provider, "ch-c")
        part = await provider.refund(reversal(refunded, "rf-part", 400))
        whole = await provider.refund(reversal(cancelled, "rf-void", 1000, operation=ReversalOperation.VOID))
        beyond = await provider.refund(reversal(refunded, "rf-beyond", 700))
        again = await provider.refund(
            reversal(cancelled, "rf-void-2", 1000, operation=ReversalOperation.VOID)
        )
    assert part.outcome is Outcome.APPROVED and whole.outcome is Outcome.APPROVED
    assert (
        beyond.outcome is Outcome.PROVIDER_ERROR and beyond.decline_code == "iyzico_sandbox_reversal_refused"
    )
    assert again.outcome is Outcome.PROVIDER_ERROR, "a cancelled payment cannot be cancelled again"
    ledger = {c["id"]: (c["refunded_minor"], c["net_minor"]) for c in await sandbox.ledger()}
    assert ledger == {refunded: (400, 600), cancelled: (1000, 0)}


async def test_a_refund_whose_answer_is_lost_is_unknown_for_an_operator(sandbox: Sandbox) -> None:
    """The refund reached iyzico (the ledger has it), its answer did not come: unknown, parked for
    an operator with the reason, since iyzico can neither dedupe a resend nor be asked."""
    await sandbox.behave(hang_s=3)
    async with iyzico(sandbox) as provider:
        payment = await charge(provider, "ch-t", token="pm_refund_timeout")
        result = await provider.refund(reversal(payment, "rf-t", 300))
        assert await provider.lookup_refund(reversal(payment, "rf-t", 300)) is None
    assert result.outcome is Outcome.UNKNOWN and result.needs_operator
    assert "iyzico panel" in (result.reason or "")
    assert [r["amount_minor"] for r in await sandbox.refunds()] == [300]


async def test_nothing_is_sent_without_a_payment_id(sandbox: Sandbox) -> None:
    async with iyzico(sandbox) as provider:
        result = await provider.refund(reversal(None, "rf-x", 100))
    assert result.outcome is Outcome.PROVIDER_ERROR and (result.reason or "").startswith("not sent")
    assert (await sandbox.stats())["refund_requests"] == 0


# -- end to end ------------------------------------------------------------------------------------


def iyzico_charge(key: str, amount_minor: int = 1000, token: str = "pm_ok") -> dict[str, Any]:
    body = request(key, amount_minor=amount_minor, payment_method=f"cuk-{key}:{token}", customer_ref="cust-1")
    return body | {"provider": "iyzico", "currency": "TRY"}


async def test_daemon_cancels_todays_charge_and_refunds_an_older_one(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A whole reversal of a charge made today is stored as a void and sent to /payment/cancel;
    a charge from yesterday (Turkey time) is refunded in part through /v2/payment/refund."""
    await broker.follow_events()
    async with daemons.in_process(providers__iyzico=iyzico_table(sandbox)):
        await charged(db, broker, iyzico_charge("ch-today"), iyzico_charge("ch-old"))
        await query(
            db,
            "UPDATE attempts SET claimed_at = NOW(6) - INTERVAL 2 DAY, finished_at = NOW(6) - INTERVAL 2 DAY "
            "WHERE idempotency_key = 'ch-old'",
        )
        await broker.publish([refund("rf-today", "ch-today", 1000), refund("rf-old", "ch-old", 300)])
        settled = await wait_reversals(db, ["rf-today", "rf-old"])

        async def void_event() -> bool:
            return any(
                e.get("idempotency_key") == "rf-today" and e.get("operation") == "void" for e in broker.events
            )

        await eventually(void_event, timeout=20, what="the void's event")
    assert settled == {"rf-today": "succeeded", "rf-old": "succeeded"}
    assert dict(await query(db, "SELECT idempotency_key, operation FROM reversals")) == {
        "rf-today": "void",
        "rf-old": "refund",
    }
    nets = {c["merchant_reference"]: c["net_minor"] for c in await sandbox.ledger()}
    assert nets == {"ch-today": 0, "ch-old": 700}


async def test_daemon_parks_an_iyzico_refund_whose_answer_timed_out_and_never_resends_it(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """The refund reached iyzico, its answer timed out: unknown (refund.unknown), parked for an
    operator with the reason (no recheck), and never sent again while the daemon goes on
    working (a later refund of another charge goes through)."""
    await sandbox.behave(hang_s=3)
    await broker.follow_events()
    table = iyzico_table(sandbox)
    async with daemons.in_process(providers__iyzico=table, pipeline={"reconcile_backoff_s": [0.2]}):
        await charged(
            db, broker, iyzico_charge("ch-hang", token="pm_refund_timeout"), iyzico_charge("ch-next")
        )
        await query(
            db,
            "UPDATE attempts SET claimed_at = NOW(6) - INTERVAL 2 DAY, finished_at = NOW(6) - INTERVAL 2 DAY",
        )  # refunds, not cancels
        await broker.publish([refund("rf-hang", "ch-hang", 500)])
        assert await wait_reversals(db, ["rf-hang"], done=("unknown",)) == {"rf-hang": "unknown"}

        async def unknown_event() -> bool:
            return any(e["type"] == "refund.unknown" for e in broker.events)

        await eventually(unknown_event, timeout=20, what="refund.unknown")
        await broker.publish([refund("rf-next", "ch-next", 200)])
        assert await wait_reversals(db, ["rf-next"]) == {"rf-next": "succeeded"}
    rows = await query(
        db,
        "SELECT state, recheck_at, reconcile_tries, result_reason FROM reversals "
        "WHERE idempotency_key = 'rf-hang'",
    )
    ((state, recheck_at, reconcile_tries, reason),) = rows
    assert (state, recheck_at, reconcile_tries) == ("unknown", None, 0), "parked: no lookups, no resends"
    assert "iyzico panel" in reason
    refunds = await sandbox.refunds()
    assert sorted(r["amount_minor"] for r in refunds) == [200, 500], "each refund executed once"
    assert (await sandbox.stats())["refund_requests"] == 2, "the timed-out refund was never sent again"


async def test_daemon_parks_an_iyzico_refund_left_unknown_by_a_lease_that_ran_out(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """An instance died while sending a refund: its lease runs out and the refund is unknown,
    made outside the adapter (so not parked by it). iyzico can neither be asked about a refund
    nor sent it twice safely, so reconciliation parks it for an operator with the reason,
    counted as refund_parked, instead of taking it every backoff for ever; nothing is sent."""
    table = iyzico_table(sandbox)
    async with daemons.in_process(providers__iyzico=table, pipeline={"reconcile_backoff_s": [0.2]}) as daemon:
        await charged(db, broker, iyzico_charge("ch-dead"))
        await query(
            db,
            "INSERT INTO reversals (idempotency_key, original_idempotency_key, original_attempt_id, "
            "provider, amount_minor, currency, state, claimed_by, claimed_at, recheck_at, tries) "
            "SELECT 'rf-dead', idempotency_key, id, provider, 400, currency, 'in_flight', 'a-dead-instance', "
            "NOW(6) - INTERVAL 1 MINUTE, NOW(6) - INTERVAL 1 SECOND, 1 FROM attempts",
        )

        async def parked() -> bool:
            rows = await query(
                db, "SELECT state, recheck_at FROM reversals WHERE idempotency_key = 'rf-dead'"
            )
            return rows == [("unknown", None)]

        await eventually(parked, timeout=20, what="the unknown refund parked")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
        ):
            text = await response.text()
    assert 'payd_reconciled_total{result="refund_parked"} 1.0' in text
    ((reason, tries),) = await query(
        db, "SELECT result_reason, reconcile_tries FROM reversals WHERE idempotency_key = 'rf-dead'"
    )
    assert reason.startswith("parked: the provider can neither be asked about this refund")
    assert tries == 1, "taken once, then parked"
    assert (await sandbox.stats())["refund_requests"] == 0, "never sent by reconciliation"
