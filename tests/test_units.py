"""Small pieces whose failure would break an invariant: the limiter, intake, the sandbox mapping."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from daemon.models import AttemptRequest, Outcome
from daemon.pipeline.intake import MAX_BODY_BYTES, Invalid, decode_request
from daemon.pipeline.limiter import ProviderLimiter
from daemon.providers.sandbox.transform import ERROR_TABLE, charge_result
from daemon.secrets import Secret, load_secret


async def test_limiter_never_exceeds_its_limit_under_churn() -> None:
    """Invariant 4 at the source: 300 holders of random length, some cancelled while waiting."""
    limiter = ProviderLimiter(5)
    rng = random.Random(3)
    seen_over = []

    async def holder() -> None:
        if await limiter.acquire():
            try:
                if limiter.in_flight > limiter.limit:
                    seen_over.append(limiter.in_flight)
                await asyncio.sleep(rng.random() / 200)
            finally:
                limiter.release()

    tasks = [asyncio.create_task(holder()) for _ in range(300)]
    await asyncio.sleep(0.005)
    for task in rng.sample(tasks, 40):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not seen_over
    assert limiter.in_flight == 0 and limiter.waiting == 0
    assert limiter.peak == 5


async def test_lowered_limit_grants_nothing_until_below_it() -> None:
    """Calls already in flight finish; no new call starts until in-flight is under the new limit."""
    limiter = ProviderLimiter(5)
    for _ in range(5):
        assert await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(10)]
    await asyncio.sleep(0)
    limiter.set_limit(2)
    granted_at = []
    for _ in range(5):
        limiter.release()
        await asyncio.sleep(0)
        granted_at.append(limiter.in_flight)
    assert max(granted_at[3:]) <= 2, granted_at
    assert sum(w.done() for w in waiters) == 2
    for waiter in waiters:
        waiter.cancel()


async def test_closed_limiter_turns_waiters_away() -> None:
    limiter = ProviderLimiter(1)
    assert await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    limiter.close()
    assert await waiter is False
    assert await limiter.acquire() is False


def body(**fields: object) -> bytes:
    base: dict[str, object] = {
        "idempotency_key": "k-1",
        "amount_minor": 100,
        "currency": "EUR",
        "provider": "sandbox",
        "payment_method": "pm_ok",
    }
    base.update(fields)
    return json.dumps(base).encode()


def test_unknown_fields_are_ignored_and_reference_is_derived() -> None:
    request = decode_request(body(new_field=1, subscription_id=9, cycle=4), {"sandbox"})
    assert isinstance(request, AttemptRequest)
    assert request.merchant_reference == "9:4"
    one_off = decode_request(body(), {"sandbox"})
    assert isinstance(one_off, AttemptRequest) and one_off.merchant_reference == "k-1"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"x" * (MAX_BODY_BYTES + 1), "limit is"),
        (body(idempotency_key="a" * 129), "idempotency_key"),
        (body(amount_minor=0), "amount_minor"),
        (body(currency="EURO"), "currency"),
        (body(metadata={"k": 1}), "metadata"),
        (body(cycle=3), "subscription_id and cycle"),
        (body(payment_method="5555555555554444"), "card number"),
    ],
)
def test_invalid_requests_carry_a_reason(raw: bytes, reason: str) -> None:
    result = decode_request(raw, {"sandbox"})
    assert isinstance(result, Invalid)
    assert reason in result.reason
    assert "5555555555554444" not in result.reason


def test_sandbox_mapping_keeps_may_have_charged_apart() -> None:
    """Only an explicit charged=false makes a server error a clean provider error."""
    clean = json.dumps({"error": {"type": "api_error", "charged": False}}).encode()
    vague = json.dumps({"error": {"type": "api_error"}}).encode()
    assert charge_result(500, {}, clean).outcome is Outcome.PROVIDER_ERROR
    assert charge_result(500, {}, vague).outcome is Outcome.UNKNOWN
    assert charge_result(502, {}, b"<html>bad gateway</html>").outcome is Outcome.UNKNOWN
    assert charge_result(200, {}, b"{").outcome is Outcome.UNKNOWN
    teapot = json.dumps({"error": {"type": "teapot"}}).encode()
    assert charge_result(418, {}, teapot).outcome is Outcome.UNKNOWN
    limited = json.dumps({"error": {"type": "rate_limited"}}).encode()
    result = charge_result(429, {"Retry-After": "7"}, limited)
    assert result.outcome is Outcome.RATE_LIMITED and result.retry_after_s == 7
    assert all(outcome is not Outcome.APPROVED for outcome, _ in ERROR_TABLE.values())


def test_secrets_never_print(tmp_path: object) -> None:
    secret = Secret("hunter2", "environment PAYD_X")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    loaded = load_secret("mysql_password", {"PAYD_MYSQL_PASSWORD": "pw"})
    assert loaded is not None and loaded.reveal() == "pw"
    assert load_secret("mysql_password", {}) is None


async def test_a_delivery_on_a_closed_channel_is_recognised() -> None:
    """After a broker restart, old deliveries must be left to redelivery, not acked elsewhere."""
    import aio_pika  # noqa: PLC0415

    from daemon.broker import delivery_channel_open, settle  # noqa: PLC0415
    from tests.support import NAMESPACE, reset_broker  # noqa: PLC0415

    test_broker = await reset_broker()
    await test_broker.channel.default_exchange.publish(
        aio_pika.Message(b"x"), routing_key=f"{NAMESPACE}.attempts.dead"
    )
    channel = await test_broker.connection.channel()
    queue = await channel.get_queue(f"{NAMESPACE}.attempts.dead", ensure=False)
    message = await queue.get(no_ack=False, fail=True)
    assert message is not None and delivery_channel_open(message)
    await channel.close()
    assert not delivery_channel_open(message)
    assert await settle(message, ack=True) is False, "never acked on another channel"
    await test_broker.connection.close()
