"""Hostile input at intake: it never raises, and every message is acked or dead-lettered with
a reason that echoes neither a card number nor the input's bulk.

The fuzzer drives the real ``decode_request``; the end-to-end test sends the same kinds of
bodies through RabbitMQ to a running daemon and reads the dead-letter queue.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aio_pika
import aiomysql
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.cards import holds_card_number
from daemon.models import AttemptRequest
from daemon.pipeline.intake import MAX_BODY_BYTES, MAX_REASON_CHARS, Invalid, decode_request
from tests.support import NAMESPACE, Broker, DaemonFactory, Sandbox, eventually, query, request, wait_settled

PROVIDERS = frozenset({"sandbox"})
# Test card numbers the networks publish (https://docs.stripe.com/testing#cards), written
# the ways people write them.
CARDS = (
    "4242424242424242",
    "4000 0566 5566 5556",
    "5555-5555-5555-4444",
    "378282246310005",
    "6011111111111117",
)
_KEY = re.compile(r"[A-Za-z0-9:_-]{1,128}")
_CURRENCY = re.compile(r"[A-Z]{3}")


def valid_body(**changes: Any) -> dict[str, Any]:
    return {**request("fz-1", customer_ref="cus_1", metadata={"plan": "gold"}), **changes}


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = (
    "idempotency_key",
    "subscription_id",
    "cycle",
    "amount_minor",
    "currency",
    "provider",
    "payment_method",
)
FIELDS += ("customer_ref", "metadata")


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A plausible request with some fields replaced, unknown fields added, then maybe its
    bytes damaged: the input a buggy or hostile sender produces."""
    body = valid_body()
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        current, replacement = body.get(name), draw(json_value)
        suffix = draw(st.text(alphabet="EURk1\n \t\x00", min_size=1, max_size=5))
        body[name] = current + suffix if isinstance(current, str) and draw(st.booleans()) else replacement
    for name in draw(st.lists(st.text(max_size=8), max_size=2)):
        body[name] = draw(json_value)
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode()
    damage = draw(st.sampled_from(("none", "bytes", "truncate", "nest", "newline")))
    at = draw(st.integers(0, len(raw)))
    if damage == "bytes":
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif damage == "truncate":
        raw = raw[:at]
    elif damage == "nest":
        depth = draw(st.integers(100, 20_000))
        raw = raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    elif damage == "newline":
        raw += b"\n"
    return raw


@st.composite
def requests_holding_a_card(draw: st.DrawFn) -> bytes:
    card = draw(st.sampled_from(CARDS))
    where = draw(st.sampled_from(("customer_ref", "metadata value", "metadata key", "idempotency_key")))
    text = draw(st.sampled_from(("{}", "card {} exp 12/29", "ref:{}", "{} ")).map(lambda t: t.format(card)))
    if where == "customer_ref":
        body = valid_body(customer_ref=text)
    elif where == "metadata value":
        body = valid_body(metadata={"note": text})
    elif where == "metadata key":
        body = valid_body(metadata={text[:40]: "x"})
    else:
        body = valid_body(idempotency_key=re.sub(r"[^A-Za-z0-9:_-]", "-", text))
    return json.dumps(body).encode()


def check_outcome(raw: bytes) -> AttemptRequest | Invalid:
    """The properties every outcome of intake has, whatever the input."""
    result = decode_request(raw, PROVIDERS)  # must not raise
    if isinstance(result, Invalid):
        reason = result.reason
        assert reason and len(reason) <= MAX_REASON_CHARS, reason
        assert reason.isascii() and reason.isprintable(), reason
        assert not holds_card_number(reason), reason
        return result
    assert isinstance(result, AttemptRequest)
    assert _KEY.fullmatch(result.idempotency_key) and _CURRENCY.fullmatch(result.currency), result
    assert result.provider in PROVIDERS and result.amount_minor > 0
    texts = [result.idempotency_key, result.payment_method, result.customer_ref or ""]
    texts += [*result.metadata.keys(), *result.metadata.values()]
    assert not any(holds_card_number(text) for text in texts), result
    return result


FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    """Any bytes at all come back as a request or a bounded, printable reason."""
    check_outcome(raw)


@FUZZ
@given(mutated_requests())
def test_damaged_requests_never_raise_and_what_passes_is_exact(raw: bytes) -> None:
    """Damaged or altered requests never raise; what is accepted satisfies every rule exactly
    (no trailing newline in a key or currency, no card number anywhere)."""
    check_outcome(raw)


@FUZZ
@given(requests_holding_a_card())
def test_a_card_number_in_any_field_is_refused_without_echoing_it(raw: bytes) -> None:
    """Wherever the card number sits, the request is refused and the reason does not carry it."""
    result = check_outcome(raw)
    assert isinstance(result, Invalid)
    assert "card number" in result.reason


class NotUtf8(str):
    """A header string that goes on the wire as bytes that are not UTF-8, as a sender in
    another language can publish it (pamqp then reads it back as bytes)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


def hostile_bodies() -> list[bytes]:
    """One of each kind of input that once escaped intake or got further than it should."""
    base = json.dumps(valid_body(idempotency_key="hostile")).encode()
    deep = b"[" * 10_000 + b"]" * 10_000
    return [
        b"",
        b"\xff\xfe\x00 not even text",
        base.replace(b'"pm_ok"', b'"pm_\xff"'),  # not UTF-8, in a known field
        base[:-1] + b', "extra": "\xc3\x28"}',  # not UTF-8, in an ignored field
        base[:-1] + b', "extra": ' + deep + b"}",  # RecursionError, in an ignored field
        json.dumps(valid_body(idempotency_key="h-cur", currency="EUR\n")).encode(),
        json.dumps(valid_body(idempotency_key="h-key\n")).encode(),
        json.dumps(valid_body(idempotency_key="h-ref", customer_ref="4242 4242 4242 4242")).encode(),
        json.dumps(valid_body(idempotency_key="h-md", metadata={"4242424242424242": "x"})).encode(),
        base[:-1] + b', "pad": "' + b"x" * MAX_BODY_BYTES + b'"}',
        base.replace(b'"pm_ok"', b'"pm\\ud800"'),  # a lone surrogate
        base + b"\n{}",
        b"\xef\xbb\xbf" + base,  # a byte order mark, which RFC 8259 section 8.1 forbids
    ]


async def test_hostile_bodies_through_rabbitmq_are_each_dead_lettered_with_a_reason(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Each hostile body lands in the dead-letter queue exactly once with a bounded reason
    that carries no card number, its sender's headers kept (even one that is not UTF-8);
    nothing else happens: no attempt row, no charge, nothing left in the attempts queue, and
    the daemon goes on to charge a valid request."""
    bodies = hostile_bodies()
    odd_headers = {
        "x-nested": {"a": [1, "b", bytearray(b"\x00\xff")]},
        "x-big": 2**62,
        "x-raw": NotUtf8("r"),
    }
    async with daemons.in_process() as daemon:
        for body in bodies:
            await broker.channel.default_exchange.publish(
                aio_pika.Message(body, headers=odd_headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=f"{NAMESPACE}.attempts",
            )
        await broker.publish([request("after-the-storm")])
        assert await wait_settled(db, ["after-the-storm"]) == {"after-the-storm": "succeeded"}

        async def all_dead_lettered() -> bool:
            return int((await daemon.status())["counters"]["dead_lettered"]) >= len(bodies)

        await eventually(all_dead_lettered, timeout=30, what="every hostile body dead-lettered")

    dead = await broker.dead_letters()
    assert sorted(body for body, _ in dead) == sorted(bodies), "each exactly once, unchanged"
    for body, headers in dead:
        reason = str(headers["x-payd-error"])
        assert reason and len(reason) <= MAX_REASON_CHARS, (body[:80], reason)
        assert "4242" not in reason, reason
        assert headers["x-big"] == 2**62, "the sender's headers travel with it"
        assert headers["x-raw"] == b"\xff\xfe", "a header that is not UTF-8 too, as bytes"
    attempts = await broker.channel.declare_queue(f"{NAMESPACE}.attempts", passive=True)
    assert attempts.declaration_result.message_count == 0, "every delivery was settled"
    assert await query(db, "SELECT idempotency_key FROM attempts") == [("after-the-storm",)]
    assert [c["idempotency_key"] for c in await sandbox.ledger()] == ["after-the-storm"]
