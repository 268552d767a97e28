"""Checkout.com's wire types, and its answers mapped to payd outcomes by tables.

Built from Checkout.com's public documentation (full list in
``docs/providers/checkout.md``): "Request a payment" (``POST /payments``),
"Get payment lists" (``GET /payments?reference=``), "Get payment details",
"API response codes", "Recommendation codes" (with Mastercard merchant advice
codes), "Idempotency" and "API rate limits".

Every documented answer has a row. Anything else is UNKNOWN, because an answer
we do not understand may follow a charge; a default that reads as "declined" or
"not sent" could make payd charge again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import msgspec

from daemon.providers.api import AttemptRequest, ChargeResult, LookupResult, Outcome, ReversalRequest

IDEMPOTENCY_KEY_METADATA: Final = "payd_idempotency_key"
"""Metadata key carrying payd's idempotency key, so a lookup by reference can tell attempts apart."""
CUSTOMER_REF_METADATA: Final = "payd_customer_ref"

# --- request ------------------------------------------------------------------------------


class IdSource(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="id"):
    """A stored payment instrument (``src_...``): ``{"type": "id", "id": ...}``."""

    id: str


class CustomerRef(msgspec.Struct, frozen=True, kw_only=True):
    id: str


class PaymentRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of ``POST /payments`` for a merchant-initiated charge of a stored source."""

    source: IdSource
    amount: int
    currency: str
    reference: str
    payment_type: str
    merchant_initiated: bool
    capture: bool
    processing_channel_id: str
    metadata: dict[str, str]
    customer: CustomerRef | None = None
    previous_payment_id: str | None = None
    """The approved payment this merchant-initiated one follows (``PaymentRequest.previous_payment_id``
    in checkout-sdk-python): Checkout.com's stored-credential rules ask for it on every
    merchant-initiated payment after the first of a chain (Visa in particular)."""


_encode = msgspec.json.Encoder().encode


def payment_request_body(request: AttemptRequest, *, processing_channel_id: str) -> bytes:
    """The JSON body for one attempt.

    ``customer.id`` must name a Checkout.com customer (``cus_...``); any other
    customer reference travels in metadata instead, where it cannot fail validation.
    """
    metadata = dict(request.metadata)
    metadata[IDEMPOTENCY_KEY_METADATA] = request.idempotency_key
    customer = None
    if request.customer_ref is not None:
        if request.customer_ref.startswith("cus_"):
            customer = CustomerRef(id=request.customer_ref)
        else:
            metadata[CUSTOMER_REF_METADATA] = request.customer_ref
    return _encode(
        PaymentRequest(
            source=IdSource(id=request.payment_method),
            amount=request.amount_minor,
            currency=request.currency,
            reference=request.merchant_reference,
            payment_type="Recurring",
            merchant_initiated=True,
            capture=True,
            processing_channel_id=processing_channel_id,
            metadata=metadata,
            customer=customer,
            previous_payment_id=request.previous_payment_ref,
        )
    )


# --- responses ----------------------------------------------------------------------------


class Processing(msgspec.Struct, frozen=True, kw_only=True):
    recommendation_code: str | None = None
    partner_merchant_advice_code: str | None = None
    """Mastercard's Merchant Advice Code (MAC)."""


class ActionSummary(msgspec.Struct, frozen=True, kw_only=True):
    type: str | None = None
    response_code: str | None = None
    response_summary: str | None = None


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    """A payment as ``POST /payments`` (201), the list and the details endpoints return it.

    Only the fields the mapping reads; unknown fields are ignored.
    """

    id: str
    status: str | None = None
    approved: bool | None = None
    amount: int | None = None
    currency: str | None = None
    reference: str | None = None
    response_code: str | None = None
    response_summary: str | None = None
    metadata: dict[str, object] | None = None
    processing: Processing | None = None
    actions: list[ActionSummary] | None = None


class PaymentPage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /payments?reference=``: newest first."""

    data: list[Payment] = msgspec.field(default_factory=list)
    total_count: int | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Checkout.com's error body (422): ``request_invalid`` with its ``error_codes``."""

    request_id: str | None = None
    error_type: str | None = None
    error_codes: list[str] = msgspec.field(default_factory=list)


_decode_payment = msgspec.json.Decoder(Payment).decode
_decode_page = msgspec.json.Decoder(PaymentPage).decode
_decode_error = msgspec.json.Decoder(ErrorBody).decode
_UNPARSEABLE = (msgspec.DecodeError, msgspec.ValidationError)


def decode_payment(body: bytes) -> Payment | None:
    try:
        return _decode_payment(body)
    except _UNPARSEABLE:
        return None


def decode_page(body: bytes) -> PaymentPage | None:
    try:
        return _decode_page(body)
    except _UNPARSEABLE:
        return None


# --- the tables ---------------------------------------------------------------------------


class Settled(enum.Enum):
    APPROVED = "approved"
    DECLINED = "declined"
    IN_PROGRESS = "in_progress"
    """Not final yet; Checkout.com moves it on by itself, and a later lookup reads the result."""
    FOR_OPERATOR = "for_operator"
    """A state payd never asks for, which does not end by itself: a person decides."""


# Payment status -> what it says of the authorization payd asked for. Statuses that
# follow an approval (captured, refunded) still mean it was approved. Voided, expired,
# canceled and card-verified payments are states payd never asks for: a person decides.
PAYMENT_STATUSES: Final[Mapping[str, Settled]] = {
    "Authorized": Settled.APPROVED,
    "Captured": Settled.APPROVED,
    "Partially Captured": Settled.APPROVED,
    "Paid": Settled.APPROVED,
    "Refunded": Settled.APPROVED,
    "Partially Refunded": Settled.APPROVED,
    "Declined": Settled.DECLINED,
    "Pending": Settled.IN_PROGRESS,
    "Retry Scheduled": Settled.IN_PROGRESS,
    "Requested": Settled.IN_PROGRESS,
    "Active": Settled.FOR_OPERATOR,
    "Voided": Settled.FOR_OPERATOR,
    "Expired": Settled.FOR_OPERATOR,
    "Canceled": Settled.FOR_OPERATOR,
    "Card Verified": Settled.FOR_OPERATOR,
}


class Decline(msgspec.Struct, frozen=True):
    """What a declined payment's ``response_code`` means for payd."""

    outcome: Outcome
    code: str
    """payd's decline code (at most 64 characters)."""


_SOFT = Outcome.SOFT_DECLINE
_HARD = Outcome.HARD_DECLINE
# Declines caused by our own account set-up: retrying cannot help, and the customer's
# card is not at fault, so they are provider errors (nothing was charged), not declines.
_OURS = Outcome.PROVIDER_ERROR

# Checkout.com response codes with a meaning of their own. 20xxx are soft declines and
# 30xxx hard ones by Checkout.com's ranges; the rows below refine that where retrying
# the same stored card cannot succeed (expired, restricted, revoked, fraud) or where
# the account set-up, not the card, is at fault.
RESPONSE_CODES: Final[Mapping[str, Decline]] = {
    "20001": Decline(_SOFT, "refer_to_issuer"),
    "20002": Decline(_SOFT, "refer_to_issuer"),
    "20005": Decline(_SOFT, "do_not_honour"),
    "20046": Decline(_SOFT, "bank_decline"),
    "20051": Decline(_SOFT, "insufficient_funds"),
    "20061": Decline(_SOFT, "amount_limit_exceeded"),
    "20065": Decline(_SOFT, "frequency_limit_exceeded"),
    "20068": Decline(_SOFT, "issuer_timeout"),
    "20091": Decline(_SOFT, "issuer_unavailable"),
    "20096": Decline(_SOFT, "system_malfunction"),
    "20004": Decline(_HARD, "pick_up_card"),
    "20012": Decline(_HARD, "invalid_transaction"),
    "20014": Decline(_HARD, "invalid_card_number"),
    "20054": Decline(_HARD, "expired_card"),
    "20057": Decline(_HARD, "not_permitted_to_cardholder"),
    "20059": Decline(_HARD, "suspected_fraud"),
    "20062": Decline(_HARD, "restricted_card"),
    "20063": Decline(_HARD, "security_violation"),
    "20067": Decline(_HARD, "pick_up_card"),
    "20087": Decline(_HARD, "invalid_card_data"),
    "20093": Decline(_HARD, "violation_of_law"),
    "20101": Decline(_HARD, "invalid_token"),
    "20108": Decline(_HARD, "cardholder_details_updated"),
    "20114": Decline(_HARD, "invalid_token"),
    "20154": Decline(_HARD, "authentication_required"),
    "200R1": Decline(_HARD, "stop_payment_order"),
    "200R3": Decline(_HARD, "stop_all_payments_order"),
    "30004": Decline(_HARD, "pick_up_card"),
    "30007": Decline(_HARD, "pick_up_card"),
    "30033": Decline(_HARD, "expired_card"),
    "30034": Decline(_HARD, "suspected_fraud"),
    "30036": Decline(_HARD, "restricted_card"),
    "30041": Decline(_HARD, "lost_card"),
    "30043": Decline(_HARD, "stolen_card"),
    "30046": Decline(_HARD, "closed_account"),
    "43401": Decline(_HARD, "authentication_required"),
    # 4xxxx "The request triggered a risk response" (API response codes): our own risk rules
    # would block the same charge again, so it is never retried automatically.
    "40101": Decline(_HARD, "risk_blocked"),
    "20003": Decline(_OURS, "merchant_configuration"),
    "20006": Decline(_OURS, "invalid_request"),
    "20102": Decline(_OURS, "merchant_configuration"),
    "20157": Decline(_OURS, "merchant_configuration"),
}

# The documented ranges, for codes without a row of their own: the first two characters,
# else the first. 20xxx soft, 30xxx hard, 4xxxx "the request triggered a risk response"
# (the same risk rules would block the same charge again).
# 10xxx (approved) on a declined payment contradicts itself, and 50xxx are payout codes:
# neither has a row, so they are UNKNOWN.
RESPONSE_CODE_RANGES: Final[Mapping[str, Outcome]] = {
    "20": _SOFT,
    "30": _HARD,
    "4": _HARD,
}


class Advice(msgspec.Struct, frozen=True):
    """A scheme's retry advice on a decline; it can only make a decline stricter or later."""

    never_retry_code: str | None = None
    """The decline code when it forbids retrying (the decline becomes hard)."""
    retry_after_s: float | None = None
    """The earliest retry, for a soft decline."""


_HOUR = 3600.0
_DAY = 24 * _HOUR

# processing.partner_merchant_advice_code (Mastercard MAC). 01/02 and the card-product
# codes (40, 41, 43) carry no retry advice payd acts on; codes not listed are ignored,
# because they cannot say whether money moved (the status does).
MERCHANT_ADVICE_CODES: Final[Mapping[str, Advice]] = {
    "03": Advice(never_retry_code="do_not_try_again"),
    "04": Advice(never_retry_code="token_requirements_not_met"),
    "21": Advice(never_retry_code="recurring_payment_cancelled"),
    "24": Advice(retry_after_s=1 * _HOUR),
    "25": Advice(retry_after_s=1 * _DAY),
    "26": Advice(retry_after_s=2 * _DAY),
    "27": Advice(retry_after_s=4 * _DAY),
    "28": Advice(retry_after_s=6 * _DAY),
    "29": Advice(retry_after_s=8 * _DAY),
    "30": Advice(retry_after_s=10 * _DAY),
}

# processing.recommendation_code (Checkout.com's own, for Visa and Mastercard).
RECOMMENDATION_CODES: Final[Mapping[str, Advice]] = {
    "03": Advice(never_retry_code="do_not_try_again"),
}


# --- the mapping --------------------------------------------------------------------------


def _reason(*parts: str | None) -> str:
    return " ".join(part for part in parts if part)[:250]


def response_code(payment: Payment) -> tuple[str | None, str | None]:
    """The authorization's response code and summary: top level, else its action."""
    if payment.response_code:
        return payment.response_code, payment.response_summary
    for action in payment.actions or ():
        if action.type == "Authorization" and action.response_code:
            return action.response_code, action.response_summary
    return None, None


def _decline(code: str) -> Decline | None:
    row = RESPONSE_CODES.get(code)
    if row is not None:
        return row
    outcome = RESPONSE_CODE_RANGES.get(code[:2]) or RESPONSE_CODE_RANGES.get(code[:1])
    return None if outcome is None else Decline(outcome, f"cko_{code}"[:64])


def _advice(processing: Processing | None) -> Iterable[tuple[str, Advice]]:
    if processing is None:
        return
    for label, code, table in (
        ("MAC", processing.partner_merchant_advice_code, MERCHANT_ADVICE_CODES),
        ("recommendation", processing.recommendation_code, RECOMMENDATION_CODES),
    ):
        advice = table.get(code) if code else None
        if advice is not None:
            yield f"{label} {code}", advice


def _declined_result(payment: Payment) -> ChargeResult:
    code, summary = response_code(payment)
    if code is None:
        # Declined for certain (nothing charged), but without the code that tells soft
        # from hard: soft keeps the customer and lets dunning ask the issuer again.
        return ChargeResult(
            outcome=_SOFT,
            provider_ref=payment.id,
            decline_code="declined",
            reason="declined without a response code",
        )
    decline = _decline(code)
    if decline is None:
        # A lookup reads the same code again: only a person can settle it.
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            provider_ref=payment.id,
            reason=_reason("declined with unrecognised response code", code, summary),
            needs_operator=True,
        )
    if decline.outcome is _OURS:
        return ChargeResult(
            outcome=_OURS,
            provider_ref=payment.id,
            decline_code=decline.code,
            retryable=False,
            reason=_reason(code, summary),
        )
    outcome, decline_code = decline.outcome, decline.code
    retry_after_s: float | None = None
    notes: list[str] = []
    for note, advice in _advice(payment.processing):
        notes.append(note)
        if advice.never_retry_code is not None:
            if outcome is _SOFT:  # a hard decline keeps its own, more telling, code
                outcome, decline_code = _HARD, advice.never_retry_code
            retry_after_s = None
        elif outcome is _SOFT and advice.retry_after_s is not None:
            retry_after_s = max(retry_after_s or 0.0, advice.retry_after_s)
    return ChargeResult(
        outcome=outcome,
        provider_ref=payment.id,
        decline_code=decline_code,
        retry_after_s=retry_after_s,
        retryable=outcome is _SOFT,
        reason=_reason(code, summary, *(f"({note})" for note in notes)),
    )


def identity_problem(payment: Payment, request: AttemptRequest, *, looked_up: bool) -> str | None:
    """Why ``payment`` is not ``request``'s (reference, amount, currency; the key in metadata
    for a looked-up one), or None. A charge's 201 carries no metadata, and Checkout.com
    answers a reused key with the original response whatever the new body said."""
    checks: list[tuple[str, object, object]] = [
        ("reference", payment.reference, request.merchant_reference),
        ("amount", payment.amount, request.amount_minor),
        ("currency", payment.currency, request.currency),
    ]
    if looked_up:
        key = (payment.metadata or {}).get(IDEMPOTENCY_KEY_METADATA)
        checks.insert(0, ("idempotency key", key, request.idempotency_key))
    for name, found, wanted in checks:
        # A looked-up payment must state each; a charge's answer may leave one out.
        if found != wanted and (looked_up or found is not None):
            return f"payment {payment.id} is for another {name}: {found!r}, not {wanted!r}"
    return None


def lookup_result(payment: Payment, request: AttemptRequest) -> LookupResult:
    """A payment a lookup found: the attempt's result, or an anomaly when it is not the attempt's."""
    problem = identity_problem(payment, request, looked_up=True)
    if problem is not None:
        return LookupResult(found=True, anomaly=problem)
    return LookupResult(found=True, result=payment_result(payment, request))


def payment_result(payment: Payment, request: AttemptRequest) -> ChargeResult:
    """What a payment (from a charge or a lookup) says of ``request``'s attempt."""
    problem = identity_problem(payment, request, looked_up=False)
    if problem is not None:
        return ChargeResult(
            outcome=Outcome.UNKNOWN, provider_ref=payment.id, reason=_reason("identity mismatch:", problem)
        )
    settled = PAYMENT_STATUSES.get(payment.status or "")
    if settled is Settled.APPROVED and payment.approved is not False:
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=payment.id)
    if settled is Settled.DECLINED and payment.approved is not True:
        return _declined_result(payment)
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=payment.id,
        reason=_reason("payment status", repr(payment.status), f"approved={payment.approved}"),
        # Only a payment still in progress can settle on a later lookup; anything else (a state
        # payd never asks for, an unknown status, a status contradicting ``approved``) cannot.
        needs_operator=settled is not Settled.IN_PROGRESS,
    )


def belongs_to(payment: Payment, request: AttemptRequest) -> bool:
    """Whether a payment found under the attempt's reference was made by this attempt."""
    return (payment.metadata or {}).get(IDEMPOTENCY_KEY_METADATA) == request.idempotency_key


def most_decisive(payments: list[Payment]) -> Payment:
    """Of several payments made by one attempt (newest first): an approved one, else the newest."""
    for payment in payments:
        if PAYMENT_STATUSES.get(payment.status or "") is Settled.APPROVED:
            return payment
    return payments[0]


def needs_details(payment: Payment) -> bool:
    """A declined payment from the list without its response code: the details endpoint has it."""
    return payment.status == "Declined" and response_code(payment)[0] is None


# --- HTTP answers to POST /payments -------------------------------------------------------

_Mapper = Callable[[int, Mapping[str, str], bytes, AttemptRequest], ChargeResult]


def _created(status: int, _headers: Mapping[str, str], body: bytes, request: AttemptRequest) -> ChargeResult:
    payment = decode_payment(body)
    if payment is None:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")
    return payment_result(payment, request)


def _accepted(
    status: int, _headers: Mapping[str, str], body: bytes, _request: AttemptRequest
) -> ChargeResult:
    # 202: processing continues at Checkout.com (a pending payment); only a lookup can tell.
    payment = decode_payment(body)
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=payment.id if payment else None,
        reason=_reason(f"{status} accepted, status", repr(payment.status) if payment else None),
    )


def _invalid(status: int, _headers: Mapping[str, str], body: bytes, _request: AttemptRequest) -> ChargeResult:
    # 422 "Invalid data was sent": refused before processing. Sending it again cannot help.
    try:
        error = _decode_error(body)
    except _UNPARSEABLE:
        error = ErrorBody()
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        decline_code=error.error_type[:64] if error.error_type else None,
        retryable=False,
        reason=_reason(str(status), error.error_type, ",".join(error.error_codes), error.request_id),
    )


def _rate_limited(
    status: int, headers: Mapping[str, str], _body: bytes, _request: AttemptRequest | None
) -> ChargeResult:
    # "When you hit a rate limit you will receive a HTTP 429 response. The request can then
    # be safely retried." Without a Retry-After, payd's own backoff applies.
    retry_after: float | None = None
    value = headers.get("Retry-After")
    if value is not None:
        try:
            retry_after = max(0.0, float(value))
        except ValueError:
            retry_after = None
    return ChargeResult(
        outcome=Outcome.RATE_LIMITED,
        retry_after_s=retry_after,
        retryable=True,
        reason=f"{status} rate limited",
    )


def _fixed(result: ChargeResult) -> _Mapper:
    return lambda _status, _headers, _body, _request: result


HTTP_STATUSES: Final[Mapping[int, _Mapper]] = {
    201: _created,
    202: _accepted,
    422: _invalid,
    429: _rate_limited,
    401: _fixed(
        ChargeResult(
            outcome=Outcome.PROVIDER_ERROR,
            retryable=False,
            decline_code="unauthorized",
            reason="401 unauthorized: Checkout.com refused the secret key",
        )
    ),
    403: _fixed(
        ChargeResult(
            outcome=Outcome.PROVIDER_ERROR,
            retryable=False,
            decline_code="not_allowed",
            reason="403 not allowed: the key may not make payments on this processing channel",
        )
    ),
    404: _fixed(
        ChargeResult(
            outcome=Outcome.PROVIDER_ERROR,
            retryable=False,
            decline_code="not_found",
            reason="404 not found: check base_url",
        )
    ),
    # Another request with this Cko-Idempotency-Key is still being processed: it may charge.
    409: _fixed(
        ChargeResult(outcome=Outcome.UNKNOWN, reason="409 conflict: the idempotency key is being processed")
    ),
}


def _unrecognised(
    status: int, _headers: Mapping[str, str], _body: bytes, _request: AttemptRequest
) -> ChargeResult:
    # 5xx (502 "Bad gateway" included) is not documented as "nothing processed".
    return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"{status} answer: the payment may have been made")


def charge_result(
    status: int, headers: Mapping[str, str], body: bytes, request: AttemptRequest
) -> ChargeResult:
    """Map Checkout.com's answer to ``POST /payments`` to an outcome."""
    return HTTP_STATUSES.get(status, _unrecognised)(status, headers, body, request)


# --- refunds ------------------------------------------------------------------------------
# ``POST /payments/{id}/refunds`` (checkout-sdk-python ``RefundRequest``: amount, reference,
# metadata) is answered ``202 Accepted`` with the refund's ``action_id`` and ``reference``:
# the refund is processed asynchronously, so a 202 is not yet a success. Its outcome is read
# from ``GET /payments/{id}/actions`` (each action: id, type, amount, approved,
# response_code, response_summary, reference). Vendored: tests/fixtures/providers/checkout_refund.json.

REFUND_ORIGINAL_METADATA: Final = "payd_original_idempotency_key"
REFUND_REASON_METADATA: Final = "payd_reason"
MAX_REFUND_REFERENCE: Final = 80
"""Checkout.com's limit on a refund's ``reference`` (payd's keys are at most 128 characters:
a longer key cannot be sent, as the lookup matches the action by this reference)."""


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``POST /payments/{id}/refunds``: the reference is the refund's own key."""

    amount: int
    reference: str
    metadata: dict[str, str]


class RefundAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """``202 Accepted`` to a refund: the action that will carry its outcome."""

    action_id: str | None = None
    reference: str | None = None


class PaymentAction(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``GET /payments/{id}/actions``."""

    id: str
    type: str | None = None
    amount: int | None = None
    approved: bool | None = None
    response_code: str | None = None
    response_summary: str | None = None
    reference: str | None = None


_decode_accepted = msgspec.json.Decoder(RefundAccepted).decode
_decode_actions = msgspec.json.Decoder(list[PaymentAction]).decode


def refund_problem(request: ReversalRequest) -> str | None:
    """Why this refund cannot be sent to Checkout.com, found before sending; None if it may go."""
    if not request.original_provider_ref:
        return "the charge has no Checkout.com payment id to refund"
    if len(request.idempotency_key) > MAX_REFUND_REFERENCE:
        return f"the refund's key is longer than Checkout.com's {MAX_REFUND_REFERENCE}-character reference"
    return None


def refund_request_body(request: ReversalRequest) -> bytes:
    metadata = {REFUND_ORIGINAL_METADATA: request.original_idempotency_key}
    if request.reason:
        metadata[REFUND_REASON_METADATA] = request.reason
    return _encode(
        RefundRequest(amount=request.amount_minor, reference=request.idempotency_key, metadata=metadata)
    )


def _refund_accepted(request: ReversalRequest, status: int, body: bytes) -> ChargeResult:
    try:
        accepted = _decode_accepted(body)
    except _UNPARSEABLE:
        accepted = RefundAccepted()
    if accepted.reference is not None and accepted.reference != request.idempotency_key:
        # Checkout.com answers a reused key with the first request's answer: not this refund's.
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            provider_ref=accepted.action_id,
            reason=_reason(f"{status} accepted for another reference:", repr(accepted.reference)),
            needs_operator=True,
        )
    # Checkout.com has the refund: pending (accepted), never sent again, settled by the
    # payment's Refund action (lookup_refund).
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=accepted.action_id,
        accepted=True,
        reason=_reason(
            f"{status} accepted: refund action",
            accepted.action_id,
            "is processed asynchronously; reconciled by lookup",
        ),
    )


def _refund_refused(code: str, what: str) -> ChargeResult:
    return ChargeResult(outcome=_HARD, decline_code=code, retryable=False, reason=what)


def refund_result(
    request: ReversalRequest, status: int, headers: Mapping[str, str], body: bytes
) -> ChargeResult:
    """Map Checkout.com's answer to ``POST /payments/{id}/refunds``.

    202 is the documented success, and only says the refund was accepted for processing.
    403 ("Refund not allowed": the payment is not captured, or nothing remains to refund),
    404 (no such payment) and 422 (invalid data, e.g. more than remains) refund nothing.
    401 is the key; 429 a rate limit (nothing done). 409 (the key is in use by another
    request), 5xx and anything else may have refunded: unknown, and never re-sent
    (Checkout.com stores a key's answer only after a 2xx).
    """
    if status == 202:
        return _refund_accepted(request, status, body)
    if status == 403:
        return _refund_refused("refund_not_allowed", "403 refund not allowed: nothing refunded")
    if status == 404:
        return _refund_refused("payment_not_found", "404 payment not found: nothing refunded")
    if status == 422:
        try:
            error = _decode_error(body)
        except _UNPARSEABLE:
            error = ErrorBody()
        code = (error.error_codes[0] if error.error_codes else error.error_type) or "request_invalid"
        return _refund_refused(
            code[:64], _reason("422", error.error_type, ",".join(error.error_codes), error.request_id)
        )
    if status == 401:
        return ChargeResult(
            outcome=Outcome.PROVIDER_ERROR,
            retryable=False,
            decline_code="unauthorized",
            reason="401 unauthorized: Checkout.com refused the secret key",
        )
    if status == 429:
        limited = _rate_limited(status, headers, body, None)
        return msgspec.structs.replace(limited, reason=f"{status} rate limited: nothing refunded")
    if status == 409:
        return ChargeResult(
            outcome=Outcome.UNKNOWN, reason="409 conflict: the idempotency key is being processed"
        )
    return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"{status} answer: the refund may have been made")


def decode_actions(body: bytes) -> list[PaymentAction] | None:
    try:
        return _decode_actions(body)
    except _UNPARSEABLE:
        return None


def refund_lookup_result(actions: Iterable[PaymentAction], request: ReversalRequest) -> LookupResult:
    """The payment's ``Refund`` action whose reference is the refund's key, read as its outcome:
    approved, declined (with its response code), or still without a verdict."""
    ours = [a for a in actions if a.type == "Refund" and a.reference == request.idempotency_key]
    if not ours:
        return LookupResult(found=False)
    action = next((a for a in ours if a.approved), ours[0])
    if action.amount is not None and action.amount != request.amount_minor:
        return LookupResult(
            found=True,
            anomaly=f"refund action {action.id} is for {action.amount}, not {request.amount_minor}",
        )
    if action.approved is True:
        return LookupResult(found=True, result=ChargeResult(outcome=Outcome.APPROVED, provider_ref=action.id))
    if action.approved is False:
        code = action.response_code or "declined"
        return LookupResult(
            found=True,
            result=ChargeResult(
                outcome=_HARD,
                provider_ref=action.id,
                decline_code=f"cko_{code}"[:64],
                retryable=False,
                reason=_reason("refund declined", code, action.response_summary),
            ),
        )
    return LookupResult(
        found=True,
        result=ChargeResult(
            outcome=Outcome.UNKNOWN, provider_ref=action.id, reason="refund action without a verdict yet"
        ),
    )
