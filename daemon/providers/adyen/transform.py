"""Adyen Checkout ``/payments``: wire types, request encoding, and the mapping of answers to outcomes.

Everything that decides an outcome is a table below: result codes, refusal
reasons, Mastercard merchant advice codes, HTTP errors. An answer that no row
covers is UNKNOWN, because an unrecognised answer may follow a charge; the one
exception is a ``Refused``/``Cancelled`` payment whose reason is unrecognised:
Adyen's result code already says nothing was authorised, so it is a hard
decline (never retried) rather than an unknown that nobody can settle.

Sources: docs/providers/adyen.md lists the Adyen documentation each table follows.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from typing import Final

import msgspec

from daemon.providers.api import AttemptRequest, ChargeResult, Outcome, ReversalOperation, retry_after_seconds

# --- request ---------------------------------------------------------------------------------

MAX_IDEMPOTENCY_KEY: Final = 64  # Adyen: "a maximum of 64 characters"
MAX_REFERENCE: Final = 80  # Adyen: reference "Maximum length: 80 characters"
MIN_SHOPPER_REFERENCE: Final = 3  # Adyen: shopperReference "minimum length: 3 characters"
MAX_SHOPPER_REFERENCE: Final = 256
DEFAULT_RETURN_URL: Final = "https://payd.invalid/adyen/return"
"""``returnUrl`` is required on every ``PaymentRequest`` (Checkout API v71 OpenAPI,
``PaymentRequest.required``), though a ContAuth payment never redirects anyone: a
reserved ``.invalid`` host (RFC 2606) says so, unless an operator configures a page."""


class Amount(msgspec.Struct, frozen=True, kw_only=True):
    value: int
    currency: str


class StoredCard(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    type: str
    stored_payment_method_id: str


class PaymentRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A merchant-initiated charge of a stored card: the documented ContAuth subscription shape."""

    amount: Amount
    reference: str
    merchant_account: str
    payment_method: StoredCard
    shopper_reference: str
    return_url: str
    shopper_interaction: str = "ContAuth"
    recurring_processing_model: str = "Subscription"


class DelayedCapturePaymentRequest(PaymentRequest, frozen=True, kw_only=True, rename="camel"):
    """A payment captured ``captureDelayHours`` after authorisation: until then it can be voided."""

    capture_delay_hours: int


_encode = msgspec.json.Encoder().encode


def idempotency_key(merchant_account: str, key: str) -> str:
    """The ``Idempotency-Key`` Adyen sees for payd's key: 64 hex characters, the same every time.

    Adyen keeps keys per company account and allows 64 characters; payd's keys may
    be 128 and are chosen by senders, so two merchant accounts (or two payd
    deployments) could pick the same one and be answered each other's stored
    response. Hashing with the merchant account keeps them apart and fits the limit.
    It depends on nothing that rotates (never on the API key), so a resend days
    later still carries the same key.
    """
    return hashlib.sha256(f"{merchant_account}\n{key}".encode()).hexdigest()


def payment_reference(request: AttemptRequest) -> str:
    """payd's merchant reference, shortened deterministically when it exceeds Adyen's 80 characters."""
    reference = request.merchant_reference
    if len(reference) <= MAX_REFERENCE:
        return reference
    return "payd-" + hashlib.sha256(reference.encode()).hexdigest()


def shopper_reference_problem(request: AttemptRequest) -> str | None:
    """Why this request cannot be sent at all, or None. Adyen ties a stored card to its shopper."""
    ref = request.customer_ref
    if ref is None:
        return "customer_ref is required: Adyen stored cards belong to a shopperReference"
    if not MIN_SHOPPER_REFERENCE <= len(ref) <= MAX_SHOPPER_REFERENCE:
        return f"customer_ref must hold {MIN_SHOPPER_REFERENCE}-{MAX_SHOPPER_REFERENCE} characters for Adyen"
    return None


def payment_body(
    request: AttemptRequest,
    merchant_account: str,
    return_url: str = DEFAULT_RETURN_URL,
    capture_delay_hours: int | None = None,
) -> bytes:
    assert request.customer_ref is not None  # checked by shopper_reference_problem first
    payment = PaymentRequest(
        amount=Amount(value=request.amount_minor, currency=request.currency),
        reference=payment_reference(request),
        merchant_account=merchant_account,
        payment_method=StoredCard(type="scheme", stored_payment_method_id=request.payment_method),
        shopper_reference=request.customer_ref,
        return_url=return_url,
    )
    if capture_delay_hours is None:  # Adyen's default: captured at once, never voidable
        return _encode(payment)
    delayed = DelayedCapturePaymentRequest(
        amount=payment.amount,
        reference=payment.reference,
        merchant_account=merchant_account,
        payment_method=payment.payment_method,
        shopper_reference=payment.shopper_reference,
        return_url=return_url,
        capture_delay_hours=capture_delay_hours,
    )
    return _encode(delayed)


# --- answers ---------------------------------------------------------------------------------


class PaymentResponse(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The fields of Adyen's PaymentResponse that decide an outcome; the rest are ignored."""

    result_code: str
    psp_reference: str | None = None
    amount: Amount | None = None
    refusal_reason: str | None = None
    refusal_reason_code: str | int | None = None
    merchant_reference: str | None = None
    additional_data: dict[str, object] | None = None


class ServiceError(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    status: int | None = None
    error_code: str | None = None
    message: str | None = None
    error_type: str | None = None
    psp_reference: str | None = None


_decode_payment = msgspec.json.Decoder(PaymentResponse).decode
_decode_error = msgspec.json.Decoder(ServiceError).decode


class Decline(msgspec.Struct, frozen=True):
    """One row of the refusal-reason table."""

    reason: str
    """Adyen's ``refusalReason`` text."""
    code: str
    """payd's ``decline_code``."""
    outcome: Outcome
    """SOFT_DECLINE (dunning may retry later) or HARD_DECLINE (never retried)."""


_SOFT, _HARD = Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE

# refusalReasonCode -> row. Adyen: development-resources/refusal-reasons. Soft are the
# reasons that describe a state that can change by itself (balance, limits, an issuer or
# acquirer outage); hard are the card, the shopper's consent, fraud, and anything that
# needs the shopper present, which an off-session charge cannot bring.
REFUSALS: Final[Mapping[str, Decline]] = {
    "2": Decline("Refused", "refused", _SOFT),
    "3": Decline("Referral", "referral", _SOFT),
    "4": Decline("Acquirer Error", "acquirer_error", _SOFT),
    "5": Decline("Blocked Card", "blocked_card", _HARD),
    "6": Decline("Expired Card", "expired_card", _HARD),
    "7": Decline("Invalid Amount", "invalid_amount", _HARD),
    "8": Decline("Invalid Card Number", "invalid_card_number", _HARD),
    "9": Decline("Issuer Unavailable", "issuer_unavailable", _SOFT),
    "10": Decline("Not supported", "not_supported", _HARD),
    "11": Decline("3D Not Authenticated", "3d_not_authenticated", _HARD),
    "12": Decline("Not enough balance", "insufficient_funds", _SOFT),
    "14": Decline("Acquirer Fraud", "acquirer_fraud", _HARD),
    "15": Decline("Cancelled", "cancelled", _HARD),
    "16": Decline("Shopper Cancelled", "shopper_cancelled", _HARD),
    "17": Decline("Invalid Pin", "invalid_pin", _HARD),
    "18": Decline("Pin tries exceeded", "pin_tries_exceeded", _HARD),
    "19": Decline("Pin validation not possible", "pin_validation_not_possible", _HARD),
    "20": Decline("FRAUD", "fraud", _HARD),
    "21": Decline("Not Submitted", "not_submitted", _SOFT),
    "22": Decline("FRAUD-CANCELLED", "fraud_cancelled", _HARD),
    "23": Decline("Transaction Not Permitted", "transaction_not_permitted", _HARD),
    "24": Decline("CVC Declined", "cvc_declined", _HARD),
    "25": Decline("Restricted Card", "restricted_card", _HARD),
    "26": Decline("Revocation Of Auth", "revocation_of_auth", _HARD),
    "27": Decline("Declined Non Generic", "declined_non_generic", _HARD),
    "28": Decline("Withdrawal amount exceeded", "withdrawal_amount_exceeded", _SOFT),
    "29": Decline("Withdrawal count exceeded", "withdrawal_count_exceeded", _SOFT),
    "31": Decline("Issuer Suspected Fraud", "issuer_suspected_fraud", _HARD),
    "32": Decline("AVS Declined", "avs_declined", _HARD),
    "33": Decline("Card requires online pin", "card_requires_online_pin", _HARD),
    "34": Decline("No checking account available on Card", "no_checking_account", _HARD),
    "35": Decline("No savings account available on Card", "no_savings_account", _HARD),
    "36": Decline("Mobile pin required", "mobile_pin_required", _HARD),
    "37": Decline("Contactless fallback", "contactless_fallback", _HARD),
    "38": Decline("Authentication required", "authentication_required", _HARD),
    "39": Decline("RReq not received from DS", "rreq_not_received", _HARD),
    "40": Decline("Current AID is in Penalty Box.", "aid_in_penalty_box", _HARD),
    "41": Decline("CVM Required Restart Payment", "cvm_required", _HARD),
    "42": Decline("3DS Authentication Error", "3ds_authentication_error", _HARD),
    # Adyen refused it so the schemes' retry limits are not exceeded: later may pass.
    "46": Decline(
        "Transaction blocked by Adyen to prevent excessive retry fees", "excessive_retries_blocked", _SOFT
    ),
}
# For answers that carry the text but not the code.
_REFUSALS_BY_REASON: Final = {row.reason.lower(): row for row in REFUSALS.values()}


class Advice(msgspec.Struct, frozen=True):
    """One row of the Mastercard merchant-advice table."""

    text: str
    outcome: Outcome | None
    """None: informational (card product), leaves the refusal reason's verdict alone."""
    retry_after_s: float | None = None
    """The earliest retry Mastercard allows, where the code names one."""


_HOUR: Final = 3600.0
_DAY: Final = 24 * _HOUR

# additionalData.merchantAdviceCode -> row. Advice only ever makes a verdict stricter:
# "do not try again" turns any decline hard; "retry after" adds its wait to a soft one.
ADVICE: Final[Mapping[str, Advice]] = {
    "01": Advice("New account information available", _SOFT),
    "02": Advice("Cannot approve at this time, try again later", _SOFT),
    "03": Advice("Do not try again", _HARD),
    "04": Advice("Token requirements not fulfilled for this token type", _HARD),
    "21": Advice("Payment cancellation", _HARD),
    "22": Advice("Merchant does not qualify for product code", None),
    "24": Advice("Retry after 1 hour", _SOFT, _HOUR),
    "25": Advice("Retry after 24 hours", _SOFT, _DAY),
    "26": Advice("Retry after 2 days", _SOFT, 2 * _DAY),
    "27": Advice("Retry after 4 days", _SOFT, 4 * _DAY),
    "28": Advice("Retry after 6 days", _SOFT, 6 * _DAY),
    "29": Advice("Retry after 8 days", _SOFT, 8 * _DAY),
    "30": Advice("Retry after 10 days", _SOFT, 10 * _DAY),
    "40": Advice("Consumer non-reloadable prepaid card", None),
    "41": Advice("Consumer single-use virtual card number", None),
    "43": Advice("Consumer multi-use virtual card number", None),
}
# Adyen sends e.g. "03: Do not try again"; some acquirers send the bare number.
_ADVICE_CODE: Final = re.compile(r"^\s*(\d{1,2})\b")
_ADVICE_DECLINE_CODES: Final[Mapping[str, str]] = {
    "03": "do_not_try_again",
    "04": "token_requirements_not_met",
    "21": "payment_cancellation",
}


class Result(enum.Enum):
    """What an Adyen ``resultCode`` means for money, before any reason is read."""

    AUTHORISED = "authorised"
    DECLINED = "declined"  # final, nothing authorised; the refusal reason picks soft or hard
    ERROR = "error"  # final, nothing authorised; a technical failure at Adyen or beyond
    NEEDS_SHOPPER = "needs_shopper"  # an action only the shopper can take; none is coming
    IN_PROGRESS = "in_progress"  # not final: it may still be authorised
    MONEY_MOVED_IN_PART = "partially_authorised"
    UNEXPECTED = "unexpected"  # documented, but not for a ContAuth card payment


# resultCode -> meaning. Adyen: online-payments/build-your-integration/payment-result-codes
# and the Checkout API's PaymentResponse.resultCode enumeration.
RESULT_CODES: Final[Mapping[str, Result]] = {
    "Authorised": Result.AUTHORISED,
    "Refused": Result.DECLINED,
    "Cancelled": Result.DECLINED,
    "Error": Result.ERROR,
    "RedirectShopper": Result.NEEDS_SHOPPER,
    "IdentifyShopper": Result.NEEDS_SHOPPER,
    "ChallengeShopper": Result.NEEDS_SHOPPER,
    "PresentToShopper": Result.NEEDS_SHOPPER,
    "Pending": Result.IN_PROGRESS,
    "Received": Result.IN_PROGRESS,
    "PartiallyAuthorised": Result.MONEY_MOVED_IN_PART,
    "AuthenticationFinished": Result.UNEXPECTED,
    "AuthenticationNotRequired": Result.UNEXPECTED,
    "Success": Result.UNEXPECTED,
}

# What a declined result becomes when its refusal reason is not in the table.
_DEFAULT_DECLINE: Final[Mapping[str, Decline]] = {
    "Refused": Decline("Refused", "refused_unrecognised", _HARD),
    "Cancelled": Decline("Cancelled", "cancelled", _HARD),
}
_ERROR_DECLINE: Final = Decline("Error", "error", Outcome.PROVIDER_ERROR)


class ErrorRow(msgspec.Struct, frozen=True):
    outcome: Outcome
    retryable: bool
    why: str


# Checked first: error codes whose meaning does not depend on the status.
# Adyen: development-resources/api-idempotency.
ERROR_CODES: Final[Mapping[str, ErrorRow]] = {
    # Another request with this key is still being processed (or was): it may charge.
    "704": ErrorRow(Outcome.UNKNOWN, True, "idempotency key in progress or already processed"),
    # Adyen's idempotency store was unavailable; a transient error with no side effects.
    "703": ErrorRow(Outcome.PROVIDER_ERROR, True, "idempotency store unavailable, nothing processed"),
}

# HTTP status -> row, for errors no code above decides. Adyen: development-resources/
# response-handling. 5xx are absent on purpose: Adyen does not say they processed nothing.
STATUSES: Final[Mapping[int, ErrorRow]] = {
    400: ErrorRow(Outcome.PROVIDER_ERROR, False, "bad request"),
    401: ErrorRow(Outcome.PROVIDER_ERROR, False, "unauthorised: check the API key"),
    403: ErrorRow(Outcome.PROVIDER_ERROR, False, "forbidden: the API credential lacks a role"),
    404: ErrorRow(Outcome.PROVIDER_ERROR, False, "not found: check base_url and api_version"),
    405: ErrorRow(Outcome.PROVIDER_ERROR, False, "method not allowed"),
    413: ErrorRow(Outcome.PROVIDER_ERROR, False, "request too large"),
    422: ErrorRow(Outcome.PROVIDER_ERROR, False, "validation error"),
    409: ErrorRow(Outcome.UNKNOWN, True, "conflict: a request with this key is in progress"),
    429: ErrorRow(Outcome.RATE_LIMITED, True, "rate limited"),
}
# A status whose row needs the error code to be read, because 704 shares it.
_NEEDS_ERROR_CODE: Final = frozenset({409, 422})

_TRANSIENT = ErrorRow(Outcome.PROVIDER_ERROR, True, "transient error, no side effects")


def _text(value: object, limit: int = 120) -> str:
    return str(value)[:limit]


def _advice(additional_data: Mapping[str, object] | None) -> tuple[str, Advice | None] | None:
    """The merchant advice code Adyen passed on, and its row (None if not in the table)."""
    raw = (additional_data or {}).get("merchantAdviceCode")
    if not isinstance(raw, str):
        return None
    match = _ADVICE_CODE.match(raw)
    if match is None:
        return None
    code = match.group(1).zfill(2)
    return code, ADVICE.get(code)


def _refusal(payment: PaymentResponse, default: Decline) -> Decline:
    """The refusal-reason row by code; by Adyen's text only when no code came; else ``default``."""
    code = payment.refusal_reason_code
    if code is not None:
        return REFUSALS.get(str(code), default)
    return _REFUSALS_BY_REASON.get((payment.refusal_reason or "").lower(), default)


def _described(payment: PaymentResponse, row: Decline) -> str:
    code = payment.refusal_reason_code
    return (f"{code} " if code is not None else "") + (payment.refusal_reason or row.reason)


def _approved(payment: PaymentResponse) -> ChargeResult:
    return ChargeResult(outcome=Outcome.APPROVED, provider_ref=payment.psp_reference)


def _declined(payment: PaymentResponse) -> ChargeResult:
    row = _refusal(payment, _DEFAULT_DECLINE[payment.result_code])
    outcome, decline_code, retry_after = row.outcome, row.code, None
    reason = f"{payment.result_code}: {_described(payment, row)}"
    advised = _advice(payment.additional_data)
    if advised is not None:
        mac, advice = advised
        reason += f"; merchant advice {mac}" + (f" {advice.text}" if advice else " (unrecognised)")
        if advice is not None and advice.outcome is _HARD:
            outcome, decline_code = _HARD, _ADVICE_DECLINE_CODES.get(mac, decline_code)
        elif advice is not None and outcome is _SOFT:
            retry_after = advice.retry_after_s
    return ChargeResult(
        outcome=outcome,
        provider_ref=payment.psp_reference,
        decline_code=decline_code,
        retry_after_s=retry_after,
        reason=_text(reason, 250),
    )


def _errored(payment: PaymentResponse) -> ChargeResult:
    row = _refusal(payment, _ERROR_DECLINE)
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        provider_ref=payment.psp_reference,
        decline_code=row.code,
        retryable=False,  # final: the same key would only replay this answer
        reason=_text(f"Error: {_described(payment, row)}", 250),
    )


def _needs_shopper(payment: PaymentResponse) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.HARD_DECLINE,
        provider_ref=payment.psp_reference,
        decline_code="shopper_action_required",
        reason=f"{payment.result_code}: needs the shopper, impossible off-session",
    )


# The three below are UNKNOWN that no later answer settles: Adyen has no lookup, and a resend
# under the same key replays this very answer. Only a webhook (not consumed) or a person can
# tell, so reconciliation parks them for an operator at once (``needs_operator``).


def _in_progress(payment: PaymentResponse) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=payment.psp_reference,
        reason=f"{payment.result_code}: not final, may still be authorised; Adyen reports it by webhook only",
        needs_operator=True,
    )


def _partially_authorised(payment: PaymentResponse) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=payment.psp_reference,
        reason="PartiallyAuthorised: part of the amount was authorised; settle it by hand",
        needs_operator=True,
    )


def _unexpected(payment: PaymentResponse) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=payment.psp_reference,
        reason=f"unexpected resultCode {_text(payment.result_code, 40)}",
        needs_operator=True,
    )


_BY_RESULT: Final[Mapping[Result, Callable[[PaymentResponse], ChargeResult]]] = {
    Result.AUTHORISED: _approved,
    Result.DECLINED: _declined,
    Result.ERROR: _errored,
    Result.NEEDS_SHOPPER: _needs_shopper,
    Result.IN_PROGRESS: _in_progress,
    Result.MONEY_MOVED_IN_PART: _partially_authorised,
}


def identity_problem(payment: PaymentResponse, reference: str, amount: Amount | None) -> str | None:
    """Why an answer (a stored one, replayed for a resend) is not this attempt's payment.

    Adyen echoes ``merchantReference`` and, since v52, the authorised ``amount``
    (Checkout API v71 ``PaymentResponse``); either differing means the key's stored
    answer belongs to another payment.
    """
    if payment.merchant_reference is not None and payment.merchant_reference != reference:
        return f"answer is for reference {_text(payment.merchant_reference, 80)}, not ours"
    authorised = payment.amount
    if payment.result_code != "Authorised" or amount is None or authorised is None:
        return None
    if authorised != amount:
        return f"answer authorised {authorised.value} {_text(authorised.currency, 3)}, not ours"
    return None


def _from_payment(payment: PaymentResponse, reference: str, amount: Amount | None) -> ChargeResult:
    problem = identity_problem(payment, reference, amount)
    if problem is not None:
        # A stored answer for another payment under this key says nothing of ours.
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"identity mismatch: {problem}")
    meaning = RESULT_CODES.get(payment.result_code, Result.UNEXPECTED)
    return _BY_RESULT.get(meaning, _unexpected)(payment)


def _from_error(status: int, headers: Mapping[str, str], body: bytes) -> ChargeResult:
    try:
        error: ServiceError | None = _decode_error(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        error = None
    code = error.error_code if error is not None else None
    row = ERROR_CODES.get(code) if code is not None else None
    if row is None and headers.get("transient-error", "").lower() == "true":
        row = _TRANSIENT
    if row is None and (code is not None or status not in _NEEDS_ERROR_CODE):
        row = STATUSES.get(status)
    if row is None:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unrecognised answer {status} {code}")
    message = f" {_text(error.message)}" if error is not None and error.message else ""
    return ChargeResult(
        outcome=row.outcome,
        provider_ref=error.psp_reference if error is not None else None,
        decline_code=None if row.retryable else (f"adyen_{code}" if code else f"http_{status}"),
        retry_after_s=retry_after_seconds(headers) if row.outcome is Outcome.RATE_LIMITED else None,
        retryable=row.retryable,
        reason=_text(f"{status} {code or '-'}: {row.why}.{message}", 250),
    )


def charge_result(
    status: int, headers: Mapping[str, str], body: bytes, *, reference: str, amount: Amount | None = None
) -> ChargeResult:
    """Map an Adyen answer to ``/payments`` to an outcome; ``reference`` and ``amount`` are the
    ones we sent."""
    if status != 200:
        return _from_error(status, headers, body)
    try:
        payment = _decode_payment(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason="unparseable 200 answer")
    return _from_payment(payment, reference, amount)


# --- reversals: /payments/{pspReference}/refunds and /cancels ------------------------------
#
# Checkout API v71 (tests/fixtures/providers/adyen_checkout_v71_reversals.json): both answer
# 201 with ``status: "received"``; the outcome comes later in a REFUND or CANCELLATION
# notification (webhook) whose ``success`` is "true" or "false". Adyen has no read of a
# refund, so a reversal answered "received" is pending until that notification arrives.

RECEIVED: Final = "received"


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    amount: Amount
    merchant_account: str
    reference: str


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    merchant_account: str
    reference: str


class ModificationResponse(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """PaymentRefundResponse / PaymentCancelResponse: the fields payd reads."""

    status: str
    psp_reference: str | None = None
    payment_psp_reference: str | None = None
    reference: str | None = None
    merchant_account: str | None = None
    amount: Amount | None = None


_decode_modification = msgspec.json.Decoder(ModificationResponse).decode


def reversal_reference(key: str) -> str:
    """What Adyen sees as our reference of a reversal: payd's key, shortened like a payment's
    when it exceeds 80 characters (a notification then matches by the digest it carries,
    ``shortened_key_digest``)."""
    if len(key) <= MAX_REFERENCE:
        return key
    return "payd-" + hashlib.sha256(key.encode()).hexdigest()


_SHORTENED: Final = re.compile(r"payd-([0-9a-f]{64})")


def shortened_key_digest(reference: str | None) -> str | None:
    """The SHA-256 hex of payd's key when ``reference`` is a shortened one (``reversal_reference``
    of a key over 80 characters), else None. A key that merely looks like one is also tried
    as itself first (``settle_by_notice`` matches by key before digest)."""
    matched = _SHORTENED.fullmatch(reference or "")
    return matched.group(1) if matched else None


def refund_body(*, amount: Amount, merchant_account: str, reference: str) -> bytes:
    return _encode(RefundRequest(amount=amount, merchant_account=merchant_account, reference=reference))


def cancel_body(*, merchant_account: str, reference: str) -> bytes:
    return _encode(CancelRequest(merchant_account=merchant_account, reference=reference))


def reversal_result(
    status: int, headers: Mapping[str, str], body: bytes, *, reference: str, payment_psp_reference: str
) -> ChargeResult:
    """Map Adyen's answer to a refund or cancel request: ``received`` is an accepted UNKNOWN
    (pending, decided by notification); errors follow the same tables as a payment's."""
    if status not in (200, 201):
        return _from_error(status, headers, body)
    try:
        answer = _decode_modification(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer to a reversal")
    if answer.reference is not None and answer.reference != reference:
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            reason=f"identity mismatch: answer is for reference {_text(answer.reference, 80)}, not ours",
            needs_operator=True,
        )
    if answer.payment_psp_reference is not None and answer.payment_psp_reference != payment_psp_reference:
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            reason=f"identity mismatch: answer is for payment {_text(answer.payment_psp_reference, 40)}",
            needs_operator=True,
        )
    if answer.status != RECEIVED:
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            provider_ref=answer.psp_reference,
            reason=f"unexpected status {_text(answer.status, 40)} (Adyen documents only received)",
            needs_operator=True,
        )
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        accepted=True,
        provider_ref=answer.psp_reference,
        reason="received: Adyen sends the outcome by notification",
    )


# --- notifications (webhooks) ---------------------------------------------------------------
#
# Adyen's standard webhook (Webhooks v1, tests/fixtures/providers/adyen_webhooks_v1.json):
# {"live": "false", "notificationItems": [{"NotificationRequestItem": {...}}]}, each item
# signed in ``additionalData.hmacSignature``: base64 HMAC-SHA256, with the hex-decoded key,
# of pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:
# eventCode:success (Adyen's adyen-python-api-library ``Adyen/util.py``; a missing field is
# empty). The receiver answers ``[accepted]`` once every item is stored.

ACCEPTED_ANSWER: Final = b"[accepted]"
_SIGNED_FIELDS: Final = (
    "pspReference",
    "originalReference",
    "merchantAccountCode",
    "merchantReference",
    "value",
    "currency",
    "eventCode",
    "success",
)


class HmacKeyError(ValueError):
    """The configured HMAC key is not the hex string Adyen's Customer Area shows."""


def basic_auth_matches(header: str, credentials: str) -> bool:
    """Whether an ``Authorization: Basic ...`` header carries ``USERNAME:PASSWORD``, compared in
    constant time; anything unreadable is a mismatch, never an error."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(given, credentials.encode())


def hmac_key_bytes(hex_key: str) -> bytes:
    try:
        key = bytes.fromhex(hex_key.strip())
    except ValueError:
        raise HmacKeyError("the HMAC key must be hexadecimal, as Adyen's Customer Area shows it") from None
    if not key:
        raise HmacKeyError("the HMAC key is empty")
    return key


def _field_text(item: Mapping[str, object], name: str) -> str:
    if name in ("value", "currency"):
        amount = item.get("amount")
        value = amount.get(name, "") if isinstance(amount, dict) else ""
    else:
        value = item.get(name, "")
    if value is None:
        return ""
    if isinstance(value, bool):  # never JSON true/false in Adyen's items, but keep str() exact
        return "true" if value else "false"
    return str(value)


def notification_signature(item: Mapping[str, object], key: bytes) -> str:
    """The ``hmacSignature`` Adyen computes for one NotificationRequestItem."""
    signing = ":".join(_field_text(item, name) for name in _SIGNED_FIELDS)
    return base64.b64encode(hmac.new(key, signing.encode("utf-8"), hashlib.sha256).digest()).decode("ascii")


def signature_valid(item: Mapping[str, object], key: bytes) -> bool:
    additional = item.get("additionalData")
    given = additional.get("hmacSignature") if isinstance(additional, dict) else None
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(notification_signature(item, key).encode(), given.encode())


# eventCode -> the reversal it reports. Others (AUTHORISATION, CAPTURE, REFUND_FAILED,
# CANCEL_OR_REFUND, ...) are acknowledged and ignored: payd never sends the requests behind them.
REVERSAL_EVENTS: Final[Mapping[str, ReversalOperation]] = {
    "REFUND": ReversalOperation.REFUND,
    "CANCELLATION": ReversalOperation.VOID,
}


class NotificationItem(msgspec.Struct, frozen=True, kw_only=True):
    """What payd reads of one verified item (``items`` parses them; signing uses the raw dict)."""

    psp_reference: str | None
    original_reference: str | None
    merchant_account: str | None
    merchant_reference: str | None
    event_code: str
    success: bool
    amount: Amount | None
    reason: str | None


def _text_field(item: Mapping[str, object], name: str) -> str | None:
    value = item.get(name)
    return value if isinstance(value, str) else None


def notification_items(body: bytes) -> list[dict[str, object]] | str:
    """The raw NotificationRequestItems of a notification request, or why it cannot be read."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "not JSON"
    except RecursionError:  # a small body of deeply nested arrays: hostile, not Adyen's
        return "not JSON (nested too deeply)"
    wrappers = document.get("notificationItems") if isinstance(document, dict) else None
    if not isinstance(wrappers, list) or not wrappers:
        return "no notificationItems"
    items = []
    for wrapper in wrappers:
        item = wrapper.get("NotificationRequestItem") if isinstance(wrapper, dict) else None
        if not isinstance(item, dict):
            return "a notificationItems entry without NotificationRequestItem"
        items.append(item)
    return items


def read_item(item: Mapping[str, object]) -> NotificationItem | str:
    """The fields of a verified item, or what is wrong with it."""
    event_code = _text_field(item, "eventCode")
    success = _text_field(item, "success")
    if event_code is None or success not in ("true", "false"):
        return 'eventCode and success ("true"/"false") are required'
    raw_amount = item.get("amount")
    amount = None
    if isinstance(raw_amount, dict):
        value, currency = raw_amount.get("value"), raw_amount.get("currency")
        if isinstance(value, int) and isinstance(currency, str):
            amount = Amount(value=value, currency=currency)
    return NotificationItem(
        psp_reference=_text_field(item, "pspReference"),
        original_reference=_text_field(item, "originalReference"),
        merchant_account=_text_field(item, "merchantAccountCode"),
        merchant_reference=_text_field(item, "merchantReference"),
        event_code=event_code,
        success=success == "true",
        amount=amount,
        reason=_text_field(item, "reason"),
    )


def notice_result(item: NotificationItem, operation: ReversalOperation) -> ChargeResult:
    """``success: "true"``: the reversal succeeded; ``"false"``: it failed (Adyen's reason kept)."""
    if item.success:
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=item.psp_reference)
    what = "refund" if operation is ReversalOperation.REFUND else "cancel"
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        retryable=False,
        provider_ref=item.psp_reference,
        decline_code=f"adyen_{what}_failed",
        reason=_text(f"{item.event_code} success=false: {item.reason or 'no reason given'}", 250),
    )
