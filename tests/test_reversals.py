"""Refunds end to end: MariaDB, RabbitMQ and the sandbox gateway over HTTP; the ledger is the judge.

Invariant 7 (DESIGN.md, "Reversals"): the sum of succeeded, in-flight and unknown
reversals of a charge never exceeds the charged amount, whatever the concurrency.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiomysql

from tests.support import NAMESPACE, Broker, DaemonFactory, Sandbox, eventually, query, request, wait_settled

REVERSAL_TERMINAL = ("succeeded", "failed")


def refund(key: str, original: str, amount_minor: int, **extra: Any) -> dict[str, Any]:
    return {
        "operation": "refund",
        "idempotency_key": key,
        "original_idempotency_key": original,
        "amount_minor": amount_minor,
        **extra,
    }


async def reversal_states(db: aiomysql.Pool) -> dict[str, str]:
    return dict(await query(db, "SELECT idempotency_key, state FROM reversals"))


async def wait_reversals(
    db: aiomysql.Pool, keys: Iterable[str], *, timeout: float = 60, done: tuple[str, ...] = REVERSAL_TERMINAL
) -> dict[str, str]:
    wanted = set(keys)

    async def settled() -> bool:
        current = await reversal_states(db)
        return all(current.get(key) in done for key in wanted)

    await eventually(settled, timeout=timeout, what=f"{len(wanted)} refunds to settle")
    current = await reversal_states(db)
    return {key: current[key] for key in wanted}


async def charged(db: aiomysql.Pool, broker: Broker, *bodies: dict[str, Any]) -> None:
    await broker.publish(bodies)
    settled = await wait_settled(db, [b["idempotency_key"] for b in bodies])
    assert set(settled.values()) == {"succeeded"}, settled


def net_by_key(ledger: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {c["idempotency_key"]: (c["refunded_minor"], c["net_minor"]) for c in ledger}


async def test_full_and_partial_refunds_reach_the_ledger_once(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A full refund and two partial ones succeed, each refunded once at the gateway (its ledger
    shows each charge's net amount), with refund.succeeded events naming the charge; a refund
    redelivered with its key changes nothing."""
    await broker.follow_events()
    async with daemons.in_process():
        await charged(
            db, broker, request("ch-full", amount_minor=1500), request("ch-part", amount_minor=1000)
        )
        await broker.publish(
            [
                refund("rf-full", "ch-full", 1500, reason="customer asked"),
                refund("rf-part-1", "ch-part", 300),
                refund("rf-part-2", "ch-part", 200),
            ]
        )
        settled = await wait_reversals(db, ["rf-full", "rf-part-1", "rf-part-2"])
        await broker.publish([refund("rf-part-1", "ch-part", 300)])  # a duplicate delivery

        async def events_out() -> bool:
            return sum(e["type"].startswith("refund.") for e in broker.events) >= 3

        await eventually(events_out, timeout=20, what="refund events")
        await eventually(
            lambda: _queue_empty(broker), timeout=20, what="the duplicate delivery to be consumed"
        )
    assert settled == {"rf-full": "succeeded", "rf-part-1": "succeeded", "rf-part-2": "succeeded"}
    ledger = await sandbox.ledger()
    assert net_by_key(ledger) == {
        "ch-full": (1500, 0),
        "ch-part": (500, 500),
    }
    refunds = await sandbox.refunds()
    assert sorted(r["idempotency_key"] for r in refunds) == ["rf-full", "rf-part-1", "rf-part-2"]
    events = {e["idempotency_key"]: e for e in broker.events if e["type"].startswith("refund.")}
    assert events["rf-full"]["type"] == "refund.succeeded"
    assert events["rf-full"]["original_idempotency_key"] == "ch-full"
    assert events["rf-part-2"]["amount_minor"] == 200
    assert await query(db, "SELECT COUNT(*) FROM reversals") == [(3,)]


async def _queue_empty(broker: Broker) -> bool:
    queue = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
    return queue.declaration_result.message_count == 0
