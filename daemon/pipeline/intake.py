"""Intake: decode and validate one delivery. Never raises: bad input becomes a reason.

Whatever arrives on the queue comes back either as an ``AttemptRequest`` or as
``Invalid(reason)``, which the pipeline dead-letters with that reason; an
exception here would leave the message neither acked nor dead-lettered, to be
redelivered on every restart. The reason travels in a header and into logs,
so it never echoes a card number and never grows with the input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from typing import Final, TypeVar

import msgspec

from daemon.cards import holds_card_number, mask_card_numbers
from daemon.models import AttemptRequest, RefundRequest

T = TypeVar("T")
MAX_BODY_BYTES: Final = 64 * 1024
MAX_REASON_CHARS: Final = 300
_decode = msgspec.json.Decoder(AttemptRequest).decode
_decode_refund = msgspec.json.Decoder(RefundRequest).decode


class _Operation(msgspec.Struct, frozen=True):
    """Only the ``operation`` field; a request without one is a charge."""

    operation: str | None = None


_decode_operation = msgspec.json.Decoder(_Operation).decode
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
# A card number's digits reach the body as ASCII digits (possibly grouped), a \u escape or
# non-ASCII digits; a body with none of these cannot hold one, and most bodies have none.
_DIGIT_RUN: Final = re.compile(rb"\d[\d -]{11,}\d")


class Invalid(msgspec.Struct, frozen=True):
    """Why a request cannot be processed; becomes the ``x-payd-error`` header."""

    reason: str

    @classmethod
    def because(cls, reason: str) -> Invalid:
        """A reason fit for a header and a log line: printable ASCII, short, no card number."""
        text = _UNPRINTABLE.sub("?", mask_card_numbers(reason))
        if len(text) > MAX_REASON_CHARS:
            text = text[: MAX_REASON_CHARS - 3] + "..."
        return cls(text)


def decode_request(body: bytes, providers: Container[str]) -> AttemptRequest | RefundRequest | Invalid:
    try:
        return _decode_request(body, providers)
    except Exception as error:  # the contract: a bad message is a dead letter, never a crash
        return Invalid.because(f"cannot decode the request ({type(error).__name__})")


def _decode_request(body: bytes, providers: Container[str]) -> AttemptRequest | RefundRequest | Invalid:
    if len(body) > MAX_BODY_BYTES:
        return Invalid.because(f"request is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        # JSON text exchanged between systems is UTF-8 (RFC 8259, section 8.1). msgspec
        # checks only the strings it keeps, so bad bytes in an ignored field would pass.
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return Invalid.because(f"not a JSON object: not UTF-8 (byte {error.start})")
    # Charges, the hot path, pay one substring search more: a body without the word (or an
    # escape that could spell it, looked for once for the card screen too) names no operation.
    escaped = b"\\u" in body
    if escaped or b"operation" in body:
        refund = _decode_operation_request(body)
        if refund is not None:
            return refund
    try:  # inline rather than through _decoded: this is every charge's path
        request = _decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as error:
        return _invalid(error)
    field = _field_holding_a_card_number(request) if _may_hold_a_card_number(body, escaped) else None
    if field is not None:
        # Names the field, never the value.
        return Invalid.because(
            f"invalid request: {field} holds what looks like a card number - at `$.{field}`"
        )
    if request.provider not in providers:
        return Invalid.because(f"invalid request: unknown provider {request.provider!r} - at `$.provider`")
    return request


def _decoded(decode: Callable[[bytes], T], body: bytes) -> T | Invalid:
    try:
        return decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as error:
        return _invalid(error)


def _invalid(error: Exception) -> Invalid:
    if isinstance(error, msgspec.ValidationError):
        return Invalid.because(f"invalid request: {error}")
    if isinstance(error, RecursionError):
        # msgspec stops at Python's recursion limit, cleanly, before the stack runs out.
        return Invalid.because("not a JSON object: nested too deeply")
    return Invalid.because(f"not a JSON object: {error}")


def _decode_operation_request(body: bytes) -> RefundRequest | Invalid | None:
    """A refund, why the request is invalid, or None for a charge (no operation, or "charge")."""
    named = _decoded(_decode_operation, body)
    if isinstance(named, Invalid):
        return named
    if named.operation is None or named.operation == "charge":
        return None
    if named.operation != "refund":
        return Invalid.because(
            f"invalid request: unknown operation {named.operation[:40]!r} - at `$.operation`"
        )
    refund = _decoded(_decode_refund, body)
    if isinstance(refund, Invalid):
        return refund
    for name in ("idempotency_key", "original_idempotency_key", "reason"):
        if holds_card_number(getattr(refund, name) or ""):
            # Names the field, never the value.
            return Invalid.because(
                f"invalid request: {name} holds what looks like a card number - at `$.{name}`"
            )
    return refund


def _may_hold_a_card_number(body: bytes, escaped: bool) -> bool:
    """A first look at the whole body, in C, that clears most requests at once (``escaped``:
    it holds a ``\\u`` escape)."""
    return escaped or not body.isascii() or _DIGIT_RUN.search(body) is not None


def _field_holding_a_card_number(request: AttemptRequest) -> str | None:
    """The first text field holding a Luhn-valid card number (``payment_method`` is checked
    stricter by the model itself)."""
    for name, text in (
        ("idempotency_key", request.idempotency_key),
        ("provider", request.provider),
        ("customer_ref", request.customer_ref or ""),
    ):
        if holds_card_number(text):
            return name
    if any(holds_card_number(key) or holds_card_number(value) for key, value in request.metadata.items()):
        return "metadata"
    return None
