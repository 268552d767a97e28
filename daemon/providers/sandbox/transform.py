"""The sandbox gateway's wire types and the mapping of its answers to payd outcomes.

Every status the gateway documents has a row; anything else is UNKNOWN, because
an unrecognised answer may follow a charge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Literal

import msgspec

from daemon.providers.api import (
    AttemptRequest,
    ChargeResult,
    LookupResult,
    Outcome,
    ReversalRequest,
    retry_after_seconds,
)


class ChargeBody(msgspec.Struct, frozen=True, kw_only=True):
    amount_minor: int
    currency: str
    payment_method: str
    merchant_reference: str
    customer_ref: str | None
    metadata: dict[str, str]


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: Literal["approved", "declined"]
    decline_code: str | None = None
    retryable: bool = False


class FoundCharge(Charge, frozen=True, kw_only=True):
    """A charge as ``GET /v1/charges/{key}`` answers it: with what it was for."""

    merchant_reference: str
    amount_minor: int
    currency: str


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    charged: bool | None = None
    message: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


_encode = msgspec.json.Encoder().encode
_decode_charge = msgspec.json.Decoder(Charge).decode
_decode_error = msgspec.json.Decoder(ErrorBody).decode
_decode_found = msgspec.json.Decoder(FoundCharge).decode


def charge_body(request: AttemptRequest) -> bytes:
    return _encode(
        ChargeBody(
            amount_minor=request.amount_minor,
            currency=request.currency,
            payment_method=request.payment_method,
            merchant_reference=request.merchant_reference,
            customer_ref=request.customer_ref,
            metadata=request.metadata,
        )
    )


def _charge_result(body: bytes) -> ChargeResult:
    charge = _decode_charge(body)
    if charge.status == "approved":
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=charge.id)
    outcome = Outcome.SOFT_DECLINE if charge.retryable else Outcome.HARD_DECLINE
    return ChargeResult(outcome=outcome, provider_ref=charge.id, decline_code=charge.decline_code)


def _error_result(status: int, headers: Mapping[str, str], body: bytes) -> ChargeResult:
    error = _decode_error(body).error
    row = ERROR_TABLE.get((status, error.type))
    if row is None:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unrecognised answer {status} {error.type}")
    outcome, retryable = row
    if (status, error.type) in FOR_OPERATOR:
        return ChargeResult(outcome=outcome, needs_operator=True, reason=FOR_OPERATOR[status, error.type])
    if outcome is Outcome.PROVIDER_ERROR and status >= 500 and error.charged is not False:
        # Only an explicit "nothing charged" makes a server error safe to call clean. A 400 is
        # refused before processing (docs/sandbox.md: charged "no"), with or without it.
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"{status} {error.type} without charged=false")
    retry_after = retry_after_seconds(headers) if outcome is Outcome.RATE_LIMITED else None
    return ChargeResult(
        outcome=outcome,
        retry_after_s=retry_after,
        retryable=retryable,
        decline_code=error.type if not retryable else None,
        reason=f"{status} {error.type}",
    )


# (HTTP status, error type) -> (outcome, whether trying again can help).
ERROR_TABLE: Final[dict[tuple[int, str], tuple[Outcome, bool]]] = {
    (429, "rate_limited"): (Outcome.RATE_LIMITED, True),
    (500, "api_error"): (Outcome.PROVIDER_ERROR, True),
    (503, "unavailable"): (Outcome.PROVIDER_ERROR, True),
    (400, "invalid_request"): (Outcome.PROVIDER_ERROR, False),
    # Another request with this key is still running at the gateway: it may charge.
    (409, "idempotency_conflict"): (Outcome.UNKNOWN, True),
    # The key was used before with other parameters: whatever happened then stands.
    (422, "idempotency_mismatch"): (Outcome.UNKNOWN, True),
}

# Unknown answers no later answer settles: the attempt is parked for an operator.
FOR_OPERATOR: Final[dict[tuple[int, str], str]] = {
    # The key belongs to another charge (or another request in progress): a lookup under it
    # finds that one, never this attempt's, so only a person can tell what happened.
    (422, "idempotency_mismatch"): "422 idempotency_mismatch: the key was used for another charge",
}

_BY_STATUS: Final[dict[int, Callable[[int, Mapping[str, str], bytes], ChargeResult]]] = {
    200: lambda _status, _headers, body: _charge_result(body),
    402: lambda _status, _headers, body: _charge_result(body),
}


def charge_result(status: int, headers: Mapping[str, str], body: bytes) -> ChargeResult:
    """Map a gateway answer to an outcome; a body that does not parse is UNKNOWN."""
    mapper = _BY_STATUS.get(status, _error_result)
    try:
        return mapper(status, headers, body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")


def lookup_result(status: int, body: bytes, request: AttemptRequest) -> LookupResult:
    """A charge found under the attempt's key (200 or 402): its result, or an anomaly when it
    was for another amount, currency or reference (the key reused): never settled as this one."""
    try:
        found = _decode_found(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return LookupResult(
            found=True, result=ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")
        )
    theirs = (found.amount_minor, found.currency, found.merchant_reference)
    mine = (request.amount_minor, request.currency, request.merchant_reference)
    if theirs != mine:
        return LookupResult(
            found=True, anomaly=f"the charge under this key is for {theirs}, the attempt {mine}"
        )
    return LookupResult(found=True, result=charge_result(status, {}, body))


# -- refunds --------------------------------------------------------------------------------


class RefundBody(msgspec.Struct, frozen=True, kw_only=True):
    amount_minor: int
    reason: str | None


class Refund(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: Literal["succeeded", "pending"]
    idempotency_key: str
    amount_minor: int


_decode_refund = msgspec.json.Decoder(Refund).decode

# Refusals of a refund: the gateway executed nothing, and sending it again cannot help.
REFUND_REFUSALS: Final[frozenset[tuple[int, str]]] = frozenset(
    {
        (404, "not_found"),
        (400, "charge_not_refundable"),
        (400, "amount_exceeds_remaining"),
    }
)


def refund_body(request: ReversalRequest) -> bytes:
    return _encode(RefundBody(amount_minor=request.amount_minor, reason=request.reason))


def refund_result(
    request: ReversalRequest, status: int, headers: Mapping[str, str], body: bytes
) -> ChargeResult:
    """Map the gateway's answer to a refund; anything unrecognised is UNKNOWN (it may have refunded)."""
    try:
        if status == 200:
            refund = _decode_refund(body)
            if (
                refund.idempotency_key != request.idempotency_key
                or refund.amount_minor != request.amount_minor
            ):
                return ChargeResult(outcome=Outcome.UNKNOWN, reason="the refund answered is not this one")
            if refund.status == "pending":  # accepted, decided later: a lookup reads the outcome
                return ChargeResult(
                    outcome=Outcome.UNKNOWN, accepted=True, provider_ref=refund.id, reason="refund pending"
                )
            return ChargeResult(outcome=Outcome.APPROVED, provider_ref=refund.id)
        kind = _decode_error(body).error.type
        if (status, kind) in REFUND_REFUSALS:
            return ChargeResult(
                outcome=Outcome.HARD_DECLINE, decline_code=kind, retryable=False, reason=f"{status} {kind}"
            )
        return _error_result(status, headers, body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")
