"""The reversal state machine in MariaDB: pending, voids, notices and operator settles.

Each test writes a succeeded charge as the pipeline leaves one, claims a reversal
through ``claim_reversal`` and drives it with the storage functions the pipeline,
the reconciler and the webhook receiver use, and with ``settle_attempt``, what
``payd attempts settle`` and ``POST /admin/attempts/KEY/settle`` run; the table,
the outbox and the audit rows are the judges.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import aiomysql
import pytest

from daemon.config import PipelineSettings
from daemon.metrics import Metrics
from daemon.models import ChargeResult, Outcome, RefundRequest, ReversalOperation, ReversalRequest
from daemon.operator.settle import AttemptNotFound, SettleAs, SettleOrder, SettleRefused, settle_attempt
from daemon.pipeline.reconcile_reversals import ReversalReconciler
from daemon.storage.reversals import (
    Notice,
    Settled,
    claim_reversal,
    record_reversal,
    settle_by_notice,
    take_due_reversals,
)
from tests.support import Broker, DaemonFactory, Sandbox, eventually, query, request
from tests.test_operator_commands import POLICY
from tests.test_reversals import charged, refund, wait_reversals

ACCEPTED = ChargeResult(outcome=Outcome.UNKNOWN, accepted=True, provider_ref="MOD1", reason="received")
SUCCEEDED = ChargeResult(outcome=Outcome.APPROVED, provider_ref="MOD1")
FAILED = ChargeResult(outcome=Outcome.PROVIDER_ERROR, retryable=False, decline_code="adyen_refund_failed")


async def _charge(db: aiomysql.Pool, key: str = "ch-1", amount: int = 1000, age_h: float = 1) -> None:
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, state, "
        "outcome, provider_ref, finished_at) VALUES (%s, 'adyen', %s, 'EUR', 'pm_ok', 'succeeded', "
        "'approved', 'PSP1', NOW(6) - INTERVAL %s SECOND)",
        key,
        amount,
        int(age_h * 3600),
    )


async def _claim(
    db: aiomysql.Pool,
    key: str = "rf-1",
    amount: int = 400,
    *,
    original: str = "ch-1",
    operation: ReversalOperation = ReversalOperation.REFUND,
) -> ReversalRequest:
    claim = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key=key, original_idempotency_key=original, amount_minor=amount
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
        operation_of=lambda _: operation,
    )
    assert claim.claimed is not None, claim
    return claim.claimed


async def _row(db: aiomysql.Pool, key: str = "rf-1") -> tuple[str, str | None, int]:
    ((state, provider_ref, parked),) = await query(
        db, "SELECT state, provider_ref, recheck_at IS NULL FROM reversals WHERE idempotency_key = %s", key
    )
    return state, provider_ref, parked


async def _events(db: aiomysql.Pool) -> list[tuple[str, str]]:
    rows = await query(db, "SELECT routing_key, payload FROM outbox ORDER BY id")
    return [(routing_key, json.loads(payload)["operation"]) for routing_key, payload in rows]


def _notice(**overrides: object) -> Notice:
    fields: dict[str, object] = {
        "provider": "adyen",
        "provider_ref": "MOD1",
        "idempotency_key": "rf-1",
        "operation": ReversalOperation.REFUND,
        "amount_minor": 400,
        "currency": "EUR",
        "result": SUCCEEDED,
    } | overrides
    return Notice(**fields)  # type: ignore[arg-type]


async def test_the_claim_carries_what_the_adapter_chooses_by_and_stores_its_choice(db: aiomysql.Pool) -> None:
    """The adapter is asked with the charge's amount and completion time, and a void is written
    in the claim's own commit, before any provider call."""
    await _charge(db, age_h=2)
    seen: list[ReversalRequest] = []

    def choose(reversal: ReversalRequest) -> ReversalOperation:
        seen.append(reversal)
        return ReversalOperation.VOID

    claim = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key="rf-v", original_idempotency_key="ch-1", amount_minor=1000
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
        operation_of=choose,
    )
    assert claim.claimed is not None and claim.claimed.operation is ReversalOperation.VOID
    (asked,) = seen
    assert asked.charge_amount_minor == 1000 and asked.charged_at is not None
    assert timedelta(hours=1) < datetime.now(UTC) - asked.charged_at < timedelta(hours=3)
    assert await query(db, "SELECT operation, state FROM reversals") == [("void", "in_flight")]


async def test_accepted_becomes_pending_then_a_notice_settles_it_once(db: aiomysql.Pool) -> None:
    await _charge(db)
    reversal = await _claim(db)
    assert await record_reversal(db, reversal, ACCEPTED, tries=1, unknown_recheck_s=60)
    assert await _row(db) == ("pending", "MOD1", 0)
    # A later "still don't know" (a resend replaying received) changes nothing.
    assert not await record_reversal(db, reversal, ACCEPTED, tries=1, unknown_recheck_s=60)
    assert not await record_reversal(
        db, reversal, ChargeResult(outcome=Outcome.UNKNOWN, reason="timeout"), tries=1, unknown_recheck_s=60
    )
    assert (await settle_by_notice(db, _notice()))[0] is Settled.SETTLED
    assert await _row(db) == ("succeeded", "MOD1", 1)
    assert (await settle_by_notice(db, _notice()))[0] is Settled.ALREADY
    assert (await settle_by_notice(db, _notice(result=FAILED)))[0] is Settled.CONFLICT
    assert await _row(db) == ("succeeded", "MOD1", 1)
    assert await _events(db) == [("refund.pending", "refund"), ("refund.succeeded", "refund")]


async def test_a_notice_that_overtakes_the_answer_settles_it_and_the_answer_changes_nothing(
    db: aiomysql.Pool,
) -> None:
    await _charge(db)
    reversal = await _claim(db)
    # Matched by payd's key (the provider's reference is not recorded yet).
    assert (await settle_by_notice(db, _notice(provider_ref="MOD9", result=FAILED)))[0] is Settled.SETTLED
    assert not await record_reversal(db, reversal, ACCEPTED, tries=1, unknown_recheck_s=60)
    assert (await _row(db))[0] == "failed"
    assert [kind for kind, _ in await _events(db)] == ["refund.failed"]


async def test_a_notice_naming_another_amount_operation_or_reversal_settles_nothing(
    db: aiomysql.Pool,
) -> None:
    await _charge(db)
    reversal = await _claim(db)
    await record_reversal(db, reversal, ACCEPTED, tries=1, unknown_recheck_s=60)
    assert (await settle_by_notice(db, _notice(amount_minor=401)))[0] is Settled.MISMATCH
    assert (await settle_by_notice(db, _notice(currency="USD")))[0] is Settled.MISMATCH
    assert (await settle_by_notice(db, _notice(operation=ReversalOperation.VOID)))[0] is Settled.MISMATCH
    outcome, found = await settle_by_notice(db, _notice(idempotency_key="someone-else", provider_ref="X"))
    assert (outcome, found) == (Settled.UNMATCHED, None)
    assert (await settle_by_notice(db, _notice(provider="adyen_other")))[0] is Settled.UNMATCHED
    # Matched by the provider's reference alone (a reference payd had to shorten).
    assert (await settle_by_notice(db, _notice(idempotency_key="payd-abc")))[0] is Settled.SETTLED
    assert (await _row(db))[0] == "succeeded"


async def test_pending_reversals_are_due_lookups_and_parked_unknowns_are_not(db: aiomysql.Pool) -> None:
    """A pending reversal is taken for a lookup (flagged pending, so it is never re-sent); an
    unknown that nothing the provider says will settle is parked: never taken."""
    await _charge(db)
    pending = await _claim(db, "rf-p", 100)
    parked = await _claim(db, "rf-x", 100)
    await record_reversal(db, pending, ACCEPTED, tries=1, unknown_recheck_s=0)
    lost = ChargeResult(outcome=Outcome.UNKNOWN, needs_operator=True, reason="no answer; settle by hand")
    await record_reversal(db, parked, lost, tries=1, unknown_recheck_s=0)
    assert await _row(db, "rf-x") == ("unknown", None, 1)
    due = await take_due_reversals(db, limit=10, backoff_s=[30.0])
    assert [(d.reversal.idempotency_key, d.state.value) for d in due] == [("rf-p", "pending")]


def _order(key: str, settle_as: SettleAs, reason: str = "not in the dashboard") -> SettleOrder:
    return SettleOrder(
        idempotency_key=key, settle_as=settle_as, reason=reason, operator="ops", via="cli@test"
    )


async def test_an_operator_settles_only_pending_or_unknown_reversals(db: aiomysql.Pool) -> None:
    """``payd attempts settle`` on refunds: in flight is refused, an unknown key is not found, a
    pending one is failed (its amount released, its refund.failed event written, audited under
    the charge's key), and a second settle of it is refused; nothing else changes."""
    await query(db, "DELETE FROM attempt_audit")
    await _charge(db)
    in_flight = await _claim(db, "rf-f", 100)
    pending = await _claim(db, "rf-p", 100)
    await record_reversal(db, pending, ACCEPTED, tries=1, unknown_recheck_s=60)
    with pytest.raises(SettleRefused, match="refund rf-f is in_flight; only an unknown or pending refund"):
        await settle_attempt(db, _order("rf-f", SettleAs.SUCCEEDED), policy=POLICY)
    with pytest.raises(AttemptNotFound, match="no attempt with key rf-none"):
        await settle_attempt(db, _order("rf-none", SettleAs.SUCCEEDED), policy=POLICY)
    settled = await settle_attempt(db, _order("rf-p", SettleAs.FAILED), policy=POLICY)
    assert (settled.operation, settled.state.value, settled.original_idempotency_key) == (
        "refund",
        "failed",
        "ch-1",
    )
    assert await query(
        db,
        "SELECT state, decline_code, result_reason, recheck_at IS NULL, finished_at IS NOT NULL "
        "FROM reversals WHERE idempotency_key = 'rf-p'",
    ) == [("failed", "operator_settled", "settled by ops (cli@test): not in the dashboard", 1, 1)]
    assert await _events(db) == [("refund.pending", "refund"), ("refund.failed", "refund")]
    assert await query(
        db, "SELECT idempotency_key, action, state_before, state_after, operator, reason FROM attempt_audit"
    ) == [("ch-1", "settle_refund", "pending", "failed", "ops", "refund rf-p: not in the dashboard")]
    with pytest.raises(SettleRefused, match="refund rf-p is failed; only an unknown or pending refund"):
        await settle_attempt(db, _order("rf-p", SettleAs.SUCCEEDED, "again"), policy=POLICY)
    assert await _row(db, "rf-f") == ("in_flight", None, 0)
    # The 100 the failed refund held is free again: 900 of 1000 may be refunded beside rf-f.
    await _claim(db, "rf-rest", 900)
    del in_flight


async def test_an_operator_settles_a_pending_refund_whose_key_is_also_a_settled_charges(
    db: aiomysql.Pool,
) -> None:
    """A refund's key may equal a charge's. Only an unknown charge takes the settle from a refund
    of the same key: with that charge succeeded, the pending refund is the one settled."""
    await _charge(db)
    await _charge(db, "dup-key", amount=500)
    pending = await _claim(db, "dup-key", 400)
    await record_reversal(db, pending, ACCEPTED, tries=1, unknown_recheck_s=60)
    settled = await settle_attempt(
        db, _order("dup-key", SettleAs.SUCCEEDED, "in the dashboard"), policy=POLICY
    )
    assert (settled.operation, settled.state.value, settled.original_idempotency_key) == (
        "refund",
        "succeeded",
        "ch-1",
    )
    assert (await _row(db, "dup-key"))[0] == "succeeded"
    assert await query(db, "SELECT state FROM attempts WHERE idempotency_key = 'dup-key'") == [("succeeded",)]
    assert await _events(db) == [("refund.pending", "refund"), ("refund.succeeded", "refund")]


@pytest.mark.parametrize("state", ["pending", "unknown"])
async def test_a_pending_or_unknown_reversal_holds_its_amount_against_the_charge(
    db: aiomysql.Pool, state: str
) -> None:
    await _charge(db)
    first = await _claim(db, "rf-1", 700)
    result = ACCEPTED if state == "pending" else ChargeResult(outcome=Outcome.UNKNOWN, reason="timeout")
    await record_reversal(db, first, result, tries=1, unknown_recheck_s=60)
    assert (await _row(db))[0] == state
    refused = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key="rf-2", original_idempotency_key="ch-1", amount_minor=301
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
    )
    assert refused.refused is not None and refused.refused.decline_code == "exceeds_remaining"
    assert "300 of 1000" in (refused.refused.reason or "")


async def test_daemon_keeps_a_refund_pending_until_a_lookup_reads_its_outcome(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """The sandbox accepts a pm_refund_pending charge's refund as pending: payd records it
    pending (refund.pending), looks it up on the reconcile backoff without ever sending it
    again, and records succeeded once the lookup reads it so (refund.succeeded)."""
    await sandbox.behave(hang_s=2)
    await broker.follow_events()
    async with daemons.in_process(pipeline={"reconcile_backoff_s": [0.3]}):
        await charged(db, broker, request("ch-pend", payment_method="pm_refund_pending"))
        await broker.publish([refund("rf-pend", "ch-pend", 250)])
        assert await wait_reversals(db, ["rf-pend"], done=("pending",)) == {"rf-pend": "pending"}
        assert await wait_reversals(db, ["rf-pend"]) == {"rf-pend": "succeeded"}

        async def both_events() -> bool:
            kinds = [e["type"] for e in broker.events if e.get("idempotency_key") == "rf-pend"]
            return kinds == ["refund.pending", "refund.succeeded"]

        await eventually(both_events, timeout=20, what="refund.pending then refund.succeeded")
    ((reconcile_tries,),) = await query(db, "SELECT reconcile_tries FROM reversals")
    assert reconcile_tries >= 1, "the outcome came from a lookup"
    stats = await sandbox.stats()
    assert stats["refund_requests"] == 1, "a pending refund is never sent again"
    assert [(c["refunded_minor"], c["net_minor"]) for c in await sandbox.ledger()] == [(250, 750)]


async def test_an_accepted_refund_frees_its_slot_and_is_a_healthy_answer(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A pending answer is the provider's word, not payd giving up: its max_in_flight slot is
    free at once and the breaker counts it a success. With one slot held for ten minutes per
    unanswered call, the second of three refunds could not be sent within the wait; with
    ``breaker_min_calls = 2``, three "failures" would open the breaker."""
    await sandbox.behave(hang_s=600)  # every refund stays pending for the whole test
    lane = {"max_in_flight": 1, "slot_hold_s": 600, "breaker_min_calls": 2}
    charges = [f"ch-acc-{i}" for i in range(3)]
    keys = [f"rf-acc-{i}" for i in range(3)]
    async with daemons.in_process(providers__sandbox=lane) as daemon:
        await charged(db, broker, *(request(key, payment_method="pm_refund_pending") for key in charges))
        await broker.publish([refund(key, charge, 100) for key, charge in zip(keys, charges, strict=True)])
        states = await wait_reversals(db, keys, done=("pending",), timeout=60)
        lane_status = (await daemon.status())["providers"]["sandbox"]
    assert states == dict.fromkeys(keys, "pending")
    assert (lane_status["held"], lane_status["breaker"], lane_status["breaker_trips"]) == (0, "closed", 0)
    assert (await sandbox.stats())["refund_requests"] == 3, "each sent once"


async def test_a_pending_refund_older_than_the_alert_age_is_counted_though_every_pass_touches_it(
    db: aiomysql.Pool,
) -> None:
    """The stale-pending alarm survives reconciliation: a pending refund claimed two days ago
    is taken by real reconcile passes (each writes reconcile_tries and recheck_at, so its
    updated_at is fresh), and is still counted as older than pending_reversal_alert_s."""
    await _charge(db)
    reversal = await _claim(db)
    assert await record_reversal(db, reversal, ACCEPTED, tries=1, unknown_recheck_s=0)
    await query(
        db,
        "UPDATE reversals SET claimed_at = NOW(6) - INTERVAL 2 DAY, updated_at = NOW(6) - INTERVAL 2 DAY, "
        "recheck_at = NOW(6) - INTERVAL 1 SECOND",
    )
    metrics = Metrics()
    reconciler = ReversalReconciler(
        pool=db,
        lanes={},
        settings=PipelineSettings(pending_reversal_alert_s=86400, reconcile_backoff_s=[0.0]),
        metrics=metrics,
    )
    for _ in range(3):
        assert await reconciler.reconcile_once() == 0
    ((tries, fresh),) = await query(
        db, "SELECT reconcile_tries, updated_at > NOW(6) - INTERVAL 1 HOUR FROM reversals"
    )
    assert tries >= 3 and fresh == 1, "the passes took it and refreshed updated_at"
    assert await reconciler.check_stale_pending() == 1
    assert metrics.registry.get_sample_value("payd_refunds_pending_stale") == 1
    # A young pending refund is not counted.
    await query(db, "UPDATE reversals SET claimed_at = NOW(6)")
    assert await reconciler.check_stale_pending() == 0


async def test_a_notice_of_a_shortened_key_settles_its_in_flight_reversal_by_the_digest(
    db: aiomysql.Pool,
) -> None:
    """No provider reference is recorded yet (in flight): the key's digest alone matches, and
    only for the provider that sent it."""
    await _charge(db)
    long_key = "rollback:run-1:" + "x" * 100
    await _claim(db, long_key)
    digest = hashlib.sha256(long_key.encode()).hexdigest()
    shortened = {"idempotency_key": "payd-" + digest, "provider_ref": "MOD1"}
    other = _notice(provider="adyen_other", key_digest=digest, **shortened)
    assert (await settle_by_notice(db, other))[0] is Settled.UNMATCHED
    outcome, found = await settle_by_notice(db, _notice(key_digest=digest, **shortened))
    assert outcome is Settled.SETTLED and found is not None and found.idempotency_key == long_key
    assert await _row(db, long_key) == ("succeeded", "MOD1", 1)


async def test_a_queued_refund_whose_message_is_gone_fails_never_sent_and_frees_its_amount(
    db: aiomysql.Pool,
) -> None:
    """A refund released unsent (as a halt or drain releases it) whose message never comes back
    is failed as never_sent by a real reconcile pass once queued past queued_orphan_after_s:
    its refund.failed event is written, the metric counts it, its amount no longer blocks a
    refund of the whole charge, and a late copy of its message sends nothing. A refund
    released just now is left queued."""
    await _charge(db)
    orphan = await _claim(db, "rf-orphan", 600)
    assert await record_reversal(db, orphan, None, tries=0, unknown_recheck_s=0)
    await query(db, "UPDATE reversals SET recheck_at = NOW(6) - INTERVAL 2 HOUR")
    young = await _claim(db, "rf-young", 100)
    assert await record_reversal(db, young, None, tries=0, unknown_recheck_s=0)
    refused = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key="rf-all", original_idempotency_key="ch-1", amount_minor=400
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
    )
    assert refused.refused is not None and refused.refused.decline_code == "exceeds_remaining"
    metrics = Metrics()
    reconciler = ReversalReconciler(
        pool=db, lanes={}, settings=PipelineSettings(queued_orphan_after_s=3600), metrics=metrics
    )
    assert await reconciler.sweep_orphans() == 0, "not before this instance has run queued_orphan_after_s"
    reconciler._first_orphan_sweep_at = float("-inf")
    assert await reconciler.reconcile_once() == 0
    states = dict(
        await query(
            db, "SELECT idempotency_key, CONCAT(state, '/', COALESCE(decline_code, '')) FROM reversals"
        )
    )
    assert states == {
        "rf-orphan": "failed/never_sent",
        "rf-young": "queued/",
        "rf-all": "failed/exceeds_remaining",
    }
    assert metrics.registry.get_sample_value("payd_reconciled_total", {"result": "refund_never_sent"}) == 1
    assert await _events(db) == [("refund.failed", "refund"), ("refund.failed", "refund")]
    # The 600 is free again: 900 of 1000 may be refunded beside the young 100.
    await _claim(db, "rf-rest", 900)
    # A late copy of the orphan's message finds it failed and is not sent.
    late = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key="rf-orphan", original_idempotency_key="ch-1", amount_minor=600
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
    )
    assert late.claimed is None and late.already is not None and late.already.value == "failed"


async def test_the_refund_or_void_choice_reads_when_the_provider_was_called_not_when_it_settled(
    db: aiomysql.Pool,
) -> None:
    """A charge claimed (sent) three days ago, unknown, and settled by reconciliation a minute
    ago: the adapter is told it was charged three days ago, so it never chooses a void of a
    payment long since captured."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, state, "
        "outcome, provider_ref, claimed_at, finished_at) VALUES ('ch-late', 'adyen', 1000, 'EUR', 'pm_ok', "
        "'succeeded', 'approved', 'PSP9', NOW(6) - INTERVAL 3 DAY, NOW(6) - INTERVAL 1 MINUTE)",
    )
    reversal = await _claim(db, "rf-late", 1000, original="ch-late")
    assert reversal.charged_at is not None
    assert timedelta(days=2) < datetime.now(UTC) - reversal.charged_at < timedelta(days=4)


async def test_settling_a_refund_that_named_no_charge_is_a_clear_refusal(db: aiomysql.Pool) -> None:
    """A refund of an unknown charge is refused at once (no_charge, failed, no charge row to
    join): an operator's settle of its key says so instead of raising LookupError."""
    refused = await claim_reversal(
        db,
        RefundRequest(
            operation="refund", idempotency_key="rf-none", original_idempotency_key="no-such", amount_minor=5
        ),
        claimed_by="test",
        lease_s=60,
        refundable=lambda _: True,
    )
    assert refused.refused is not None and refused.refused.decline_code == "no_charge"
    order = SettleOrder(
        idempotency_key="rf-none",
        settle_as=SettleAs.SUCCEEDED,
        reason="dashboard",
        operator="ops",
        via="cli@test",
    )
    with pytest.raises(SettleRefused, match="rf-none is failed; it named no charge and was refused at once"):
        await settle_attempt(db, order, policy=POLICY)
    assert await query(db, "SELECT state, decline_code FROM reversals") == [("failed", "no_charge")]


async def test_a_charges_reversals_and_a_shortened_key_are_found_through_an_index(db: aiomysql.Pool) -> None:
    """Migration 0016: reversals_of (payd refund, attempts show) and the digest match of a
    notification read one index range, not the whole table."""
    await _charge(db)
    await _claim(db)
    ((_, _, _, _, _, key_of_charge, *_),) = await query(
        db,
        "EXPLAIN SELECT id FROM reversals WHERE original_idempotency_key = %s ORDER BY id",
        "ch-1",
    )
    ((_, _, _, _, _, key_of_digest, *_),) = await query(
        db, "EXPLAIN SELECT id FROM reversals WHERE provider = 'adyen' AND key_sha256 = %s", "0" * 64
    )
    assert (key_of_charge, key_of_digest) == ("ix_reversals_original_key", "ix_reversals_key_sha256")
