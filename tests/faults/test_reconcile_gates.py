"""Reconciliation's provider calls pass the same gates as a charge: the halt, checked again once a
limiter slot is granted, and the in-flight limit, kept while a re-send the provider may still be
running has timed out. Real unknown rows in MariaDB, the sandbox gateway over HTTP as the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiomysql
import pytest

from daemon.config import Config
from daemon.halt import HaltKeys, HaltState
from daemon.metrics import Metrics
from daemon.pipeline.execute import Lane, breaker_for
from daemon.pipeline.limiter import ProviderLimiter
from daemon.pipeline.reconcile import Reconciler
from daemon.providers.registry import create_provider
from daemon.subscriptions.policy import SubscriptionPolicy
from tests.support import NAMESPACE, Broker, DaemonFactory, Sandbox, eventually, query

HALT_ORDER = b'{"reason": "incident", "by": "ops", "at": "now"}'


async def add_unknown(db: aiomysql.Pool, key: str, *, claimed_hours_ago: int = 0) -> None:
    """An attempt a timeout left unknown, due a lookup now."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, "
        "state, outcome, reason, claimed_at, recheck_at) VALUES (%s, 'sandbox', 700, 'EUR', 'pm_ok', "
        "'unknown', 'unknown', 'timed out', NOW(6) - INTERVAL %s HOUR, NOW(6))",
        key,
        claimed_hours_ago,
    )


@pytest.fixture
async def one_slot_lane(daemons: DaemonFactory) -> AsyncIterator[tuple[Lane, Config]]:
    """The sandbox lane as ``payd run`` builds it, with one in-flight slot and a fresh halt read."""
    config, _, _ = daemons.config(providers__sandbox={"max_in_flight": 1})
    provider_config = config.providers["sandbox"]
    halt = HaltState(["sandbox"], HaltKeys(NAMESPACE), grace_s=1.0)
    halt.apply(None, {"sandbox": None})
    lane = Lane(
        name="sandbox",
        provider=create_provider("sandbox", provider_config),
        config=provider_config,
        limiter=ProviderLimiter(1),
        breaker=breaker_for(provider_config),
        halt=halt,
    )
    try:
        yield lane, config
    finally:
        await lane.provider.close()


def _halt(state: HaltState, how: str) -> None:
    if how == "halted":
        state.apply(HALT_ORDER, {"sandbox": None})
    else:  # the last successful read is older than the grace: the state is unknown
        state.apply(None, {"sandbox": None}, read_at=time.monotonic() - 10 * state.grace_s)


@pytest.mark.parametrize("how", ["halted", "unknown"])
async def test_a_halt_that_begins_while_a_lookup_waits_for_a_slot_is_obeyed(
    db: aiomysql.Pool, sandbox: Sandbox, one_slot_lane: tuple[Lane, Config], how: str
) -> None:
    """A lookup waiting for the provider's only slot (held by a charge) when the fleet is halted,
    or the halt state becomes unknown, used to go out as soon as the slot was free: the halt was
    checked only before the wait. Now it is checked again once the slot is granted, as a charge's
    is; the attempt stays unknown and is looked up after the halt is lifted."""
    lane, config = one_slot_lane
    reconciler = Reconciler(
        pool=db,
        lanes={"sandbox": lane},
        settings=config.pipeline,
        metrics=Metrics(),
        policy=SubscriptionPolicy(config.subscriptions),
    )
    await add_unknown(db, f"waits-{how}")
    assert await lane.limiter.acquire(), "the slot a charge in flight holds"
    reconciling = asyncio.create_task(reconciler.reconcile_once())

    async def waiting() -> bool:
        return lane.limiter.waiting == 1

    await eventually(waiting, timeout=10, what="the lookup to wait for the slot")
    _halt(lane.halt, how)
    lane.limiter.release()
    assert await asyncio.wait_for(reconciling, timeout=30) == 0
    assert (await sandbox.stats())["lookups"] == 0, "a lookup went out while the fleet was halted"
    assert lane.limiter.in_flight == 0, "the slot was given back"

    lane.halt.apply(None, {"sandbox": None})  # resumed: the same attempt is asked about again

    async def looked_up() -> bool:
        await reconciler.reconcile_once()
        return bool((await sandbox.stats())["lookups"] >= 1)

    await eventually(looked_up, timeout=30, what="the lookup after the resume", interval=0.3)


async def test_a_resend_that_times_out_keeps_its_slot_so_the_provider_never_sees_more(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A re-send is a charge: when payd gives up on it (timeout), the provider may still be running
    it. Its slot used to be freed at once, so the next reconciliation call started beside it and
    the gateway saw two charges at once against ``max_in_flight = 1``. Held for ``slot_hold_s``
    (longer than the gateway's hang), the gateway never sees more than one."""
    # The sandbox hangs every charge for hang_s and then answers 503, charging nothing; lookups
    # answer at once ("not found"), so both attempts are re-sent (their claims are an hour old).
    await sandbox.behave(hang_rate=1.0, hang_s=2)
    await add_unknown(db, "resend-a", claimed_hours_ago=1)
    await add_unknown(db, "resend-b", claimed_hours_ago=1)
    lane = {"max_in_flight": 1, "timeout_s": 0.5, "connect_timeout_s": 0.5, "slot_hold_s": 3}
    async with daemons.in_process(providers__sandbox=lane):

        async def both_resent() -> bool:
            return bool((await sandbox.stats())["requests"] >= 2)

        await eventually(both_resent, timeout=60, what="both attempts to be re-sent")
    peak = (await sandbox.stats())["peak_in_flight"]
    assert peak <= 1, f"the gateway saw {peak} concurrent re-sends against max_in_flight = 1"
    assert await sandbox.ledger() == [], "a hang charges nothing"
