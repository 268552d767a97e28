"""Small pieces whose failure would break an invariant: the limiter, intake, the sandbox mapping."""

from __future__ import annotations

import ast
import asyncio
import json
import random
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from daemon.cards import holds_card_number, mask_card_numbers
from daemon.config import RabbitMQSettings
from daemon.events import iso_utc, now_iso
from daemon.models import AttemptRequest, Outcome
from daemon.pipeline.intake import MAX_BODY_BYTES, MAX_REASON_CHARS, Invalid, decode_request
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
        # Python's $ matches before a trailing newline: these passed ^...$ patterns.
        (body(idempotency_key="k-1\n"), "idempotency_key"),
        (body(currency="EUR\n"), "currency"),
        # Luhn-valid card numbers in any text field, plain or grouped.
        (body(customer_ref="5555555555554444"), "customer_ref holds what looks like a card number"),
        (body(customer_ref="card 5555 5555 5555 4444 exp 12/29"), "customer_ref"),
        (body(metadata={"note": "5555-5555-5555-4444"}), "metadata holds what looks like a card number"),
        (body(metadata={"5555555555554444": "x"}), "metadata"),
        (body(idempotency_key="5555555555554444"), "idempotency_key holds"),
        (body(idempotency_key="order-5555-5555-5555-4444"), "idempotency_key holds"),
        # Bytes that are not UTF-8, in a known field and in one the model ignores.
        (body(payment_method="pm_ok").replace(b"pm_ok", b"pm_\xff"), "not UTF-8"),
        (body(extra="x").replace(b'"x"', b'"\xc3\x28"'), "not UTF-8"),
        # Nesting deep enough to exhaust the recursion limit, where nothing reads it.
        (body(extra=None).replace(b"null", b"[" * 10_000 + b"]" * 10_000), "nested too deeply"),
    ],
)
def test_invalid_requests_carry_a_reason(raw: bytes, reason: str) -> None:
    """Each of these is refused with a reason naming what is wrong; none of them raises
    (the UTF-8 and nesting cases raised UnicodeDecodeError and RecursionError before)."""
    result = decode_request(raw, {"sandbox"})
    assert isinstance(result, Invalid)
    assert reason in result.reason
    assert "5555555555554444" not in result.reason and "5555 5555" not in result.reason
    assert "4444" not in result.reason, "the reason never echoes a card number"


@pytest.mark.parametrize(
    "fields",
    [
        {"customer_ref": "5555555555554445"},  # 16 digits, not Luhn-valid
        {"idempotency_key": "123e4567-e89b-12d3-a456-426614174000"},
        {"idempotency_key": "12345678-1234-1234-1234-123456789012"},  # an all-digit UUID
        {"metadata": {"invoice": "2026-11-29 INV-000123", "hash": "a5555555555554444"}},
        {"customer_ref": "cus_5555555555554444x"},  # digits glued to letters: an identifier
    ],
)
def test_look_alikes_of_card_numbers_are_accepted(fields: dict[str, object]) -> None:
    """The screen refuses Luhn-valid 13-19 digit sequences only, not every long number."""
    assert isinstance(decode_request(body(**fields), {"sandbox"}), AttemptRequest)


def test_card_numbers_are_recognised_and_masked() -> None:
    """Test cards from the networks' published lists (Stripe's testing page,
    https://docs.stripe.com/testing#cards): Visa 16, Amex 15 grouped 4-6-5, Diners 14,
    UnionPay 19; masked whole, the text around them kept."""
    for number in ("4242424242424242", "3782 822463 10005", "36227206271667", "6205500000000000004"):
        assert holds_card_number(number), number
        assert mask_card_numbers(f"pan={number}; ok") == "pan=[card number]; ok"
    assert not holds_card_number("4242424242424241")


def test_reasons_are_short_printable_and_free_of_card_numbers() -> None:
    """A reason ends in an AMQP header and in logs: bounded, printable, nothing to leak."""
    reason = Invalid.because("bad \x00\n\u2028 value 4242 4242 4242 4242 " + "x" * 5000).reason
    assert len(reason) <= MAX_REASON_CHARS and reason.endswith("...")
    assert reason.isprintable() and reason.isascii()
    assert "4242" not in reason and "[card number]" in reason


def test_settings_patterns_refuse_a_trailing_newline() -> None:
    """Configuration names are exact too: "payd\n" is not a namespace."""
    assert msgspec.convert({"namespace": "payd"}, RabbitMQSettings).namespace == "payd"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"namespace": "payd\n"}, RabbitMQSettings)


def _regex_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals given to re.* functions or to msgspec.Meta(pattern=...)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        candidates: list[ast.expr] = []
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "re":
            candidates = node.args[:1]
        candidates += [kw.value for kw in node.keywords if kw.arg == "pattern"]
        found += [
            (c.lineno, c.value)
            for c in candidates
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        ]
    return found


def test_no_pattern_in_the_daemon_anchors_with_dollar() -> None:
    """Every regex ends with \\Z, so no validation lets a trailing newline through."""
    from tests.support import ROOT  # noqa: PLC0415

    offenders = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        for line, pattern in _regex_literals(ast.parse(path.read_text())):
            if pattern.endswith("$") and not pattern.endswith("\\$"):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {pattern}")
    assert not offenders


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
    # A 400 is refused before processing (docs/sandbox.md): charged=false or not. (Before, a
    # 400 without it was unknown, and re-sent to the same 400 for ever.)
    invalid = json.dumps({"error": {"type": "invalid_request", "message": "bad"}}).encode()
    refused = charge_result(400, {}, invalid)
    assert (refused.outcome, refused.retryable) == (Outcome.PROVIDER_ERROR, False)
    # A key that belongs to another charge: no later answer settles it, an operator must.
    reused = charge_result(422, {}, json.dumps({"error": {"type": "idempotency_mismatch"}}).encode())
    assert (reused.outcome, reused.needs_operator) == (Outcome.UNKNOWN, True)


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


def test_publish_check_judges_each_line_like_the_daemon(tmp_path: Path) -> None:
    """``payd publish --check`` reads bytes, not text: a line that is not UTF-8 or nests too
    deeply is reported with the daemon's reason (it crashed the command before), a trailing
    newline inside a value is refused, a card number is never printed, a valid line passes."""
    from tests.support import PAYD, config_text  # noqa: PLC0415

    config = tmp_path / "payd.toml"
    config.write_text(config_text(sandbox_url="http://127.0.0.1:1", http_port=0))
    lines = [
        body(),
        body(currency="EUR\n"),
        body(payment_method="pm_ok").replace(b"pm_ok", b"pm_\xff"),
        body(extra=None).replace(b"null", b"[" * 5_000 + b"]" * 5_000),
        body(customer_ref="4242 4242 4242 4242"),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    done = subprocess.run(
        [PAYD, "publish", "--check", "--config", str(config), str(requests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    reported = done.stdout.splitlines()
    assert [line.split(":")[0] for line in reported] == ["line 2", "line 3", "line 4", "line 5"], done.stdout
    assert "currency" in reported[0] and "not UTF-8" in reported[1] and "nested too deeply" in reported[2]
    assert "card number" in reported[3] and "4242" not in done.stdout


def test_event_timestamps_have_one_format_whatever_the_clock() -> None:
    """Payment events (Python's aware clock) and subscription events (the database's naive
    UTC datetimes) write the same ISO 8601 form; an aware non-UTC time is converted, not
    suffixed (the old subscription formatter wrote ``+02:00Z`` for one)."""
    moment = datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=UTC)
    assert iso_utc(moment) == iso_utc(moment.replace(tzinfo=None)) == "2026-03-01T12:00:00.000005Z"
    assert iso_utc(moment.astimezone(timezone(timedelta(hours=2)))) == "2026-03-01T12:00:00.000005Z"
    assert now_iso().endswith("Z") and len(now_iso()) == len("2026-03-01T12:00:00.000005Z")
