"""Stripe's wire types, the PaymentIntent request, and the mapping of Stripe's answers to payd outcomes.

The decisions are tables (data); ``docs/providers/stripe.md`` prints them with the Stripe
pages each row follows. Two rules frame them:

- Anything Stripe could have executed and that the tables do not name is UNKNOWN: only a
  lookup can say whether money moved (Stripe: "treat the result of a 500 as indeterminate").
- A ``card_error`` (HTTP 402) is a decline by definition: the payment attempt failed and
  nothing was charged. Its decline code, Stripe's ``advice_code`` and the card network's
  advice decide soft or hard; whichever says "do not retry" wins. An unrecognised decline
  code is still a decline, a soft one.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

import msgspec

from daemon.providers.api import (
    AttemptRequest,
    ChargeResult,
    LookupResult,
    Outcome,
    ReversalRequest,
    retry_after_seconds,
)

SOFT: Final = Outcome.SOFT_DECLINE
HARD: Final = Outcome.HARD_DECLINE

KEY_METADATA: Final = "payd_key"
"""PaymentIntent metadata holding payd's idempotency key: what a lookup searches for."""
REFERENCE_METADATA: Final = "payd_reference"
"""PaymentIntent metadata holding the merchant reference (``SUBSCRIPTION_ID:CYCLE`` or the key)."""
MAX_METADATA_KEYS: Final = 50  # Stripe: "up to 50 keys"

DEFAULT_API_VERSION: Final = "2024-12-18.acacia"
"""The ``Stripe-Version`` payd sends unless configured otherwise: the first version whose error
objects carry ``network_advice_code`` (stripe-python 11.4.0 changelog). Without a pinned
version the account's default applies, and on older defaults the advice fields that turn a
decline into "never retry" are absent."""

_DAY_S: Final = 24 * 3600.0

# --- wire types ---------------------------------------------------------------------------
# Only the fields payd reads; Stripe adds fields in new API versions, unknown ones are ignored.


class Card(msgspec.Struct, frozen=True, kw_only=True):
    brand: str | None = None


class PaymentMethod(msgspec.Struct, frozen=True, kw_only=True):
    id: str | None = None
    card: Card | None = None


class StripeError(msgspec.Struct, frozen=True, kw_only=True):
    """Stripe's error object: the body's ``error``, and a PaymentIntent's ``last_payment_error``."""

    type: str
    code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    network_advice_code: str | None = None
    network_decline_code: str | None = None
    param: str | None = None
    payment_intent: PaymentIntent | None = None
    payment_method: PaymentMethod | None = None


class PaymentIntent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str
    status: str
    amount: int | None = None
    currency: str | None = None
    created: int = 0
    metadata: dict[str, str] = {}
    last_payment_error: StripeError | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: StripeError


class PaymentIntentPage(msgspec.Struct, frozen=True, kw_only=True):
    """A list (``object: list``) or a search result (``object: search_result``)."""

    object: str
    data: list[PaymentIntent]
    has_more: bool = False


_decode_intent = msgspec.json.Decoder(PaymentIntent).decode
_decode_error = msgspec.json.Decoder(ErrorBody).decode
_decode_page = msgspec.json.Decoder(PaymentIntentPage).decode

# --- the request --------------------------------------------------------------------------


def request_problem(request: AttemptRequest) -> str | None:
    """Why Stripe would refuse this request, found before sending it; None if it may go."""
    if request.customer_ref is None:
        # Stripe: "If the payment method is attached to a Customer, you must also provide
        # the ID of that Customer"; a saved (reusable) card is always attached to one.
        return "customer_ref is required: a saved Stripe payment method is charged with its customer"
    reserved = sorted({KEY_METADATA, REFERENCE_METADATA} & request.metadata.keys())
    if reserved:
        return f"metadata key {reserved[0]!r} is reserved for payd"
    if len(request.metadata) + 2 > MAX_METADATA_KEYS:
        return (
            f"metadata has {len(request.metadata)} keys; Stripe allows {MAX_METADATA_KEYS} including payd's 2"
        )
    bracketed = sorted(key for key in request.metadata if "[" in key or "]" in key)
    if bracketed:
        return f"metadata key {bracketed[0]!r}: Stripe refuses square brackets in keys"
    return None


def payment_intent_form(
    request: AttemptRequest, *, payment_method_types: Sequence[str], description_prefix: str
) -> bytes:
    """``POST /v1/payment_intents`` form body: create and confirm off-session in one call.

    The same request always encodes to the same bytes, as Stripe's idempotency layer
    compares a retry's parameters with the first request's.
    """
    assert request.customer_ref is not None  # request_problem() refuses the request otherwise
    pairs = [
        ("amount", str(request.amount_minor)),
        ("currency", request.currency.lower()),
        ("customer", request.customer_ref),
        ("payment_method", request.payment_method),
        ("confirm", "true"),
        ("off_session", "true"),
        ("description", f"{description_prefix} {request.merchant_reference}"),
        (f"metadata[{KEY_METADATA}]", request.idempotency_key),
        (f"metadata[{REFERENCE_METADATA}]", request.merchant_reference),
    ]
    pairs.extend((f"metadata[{key}]", value) for key, value in sorted(request.metadata.items()))
    pairs.extend((f"payment_method_types[{i}]", kind) for i, kind in enumerate(payment_method_types))
    return urllib.parse.urlencode(pairs).encode()


def search_query(idempotency_key: str) -> str:
    """Stripe search-query-language clause matching payd's key in the metadata."""
    quoted = idempotency_key.replace("\\", "\\\\").replace('"', '\\"')
    return f'metadata["{KEY_METADATA}"]:"{quoted}"'


# --- the tables ---------------------------------------------------------------------------

# Stripe decline codes (docs.stripe.com/declines/codes), and the codes a card error carries
# without a decline code (docs.stripe.com/error-codes). SOFT: the same saved card can
# succeed later without the customer (funds arrive, a limit resets, the issuer recovers);
# Stripe's next step is to try again or the reason is unknown. HARD: only the customer
# can change the answer (another card, corrected data, an authentication, a call to the
# issuer about a block), or retrying is forbidden (lost, stolen, fraud, revoked).
DECLINE_CODES: Final[Mapping[str, Outcome]] = {
    # try again / limits that reset / reason unknown
    "insufficient_funds": SOFT,
    "approve_with_id": SOFT,
    "issuer_not_available": SOFT,
    "processing_error": SOFT,
    "reenter_transaction": SOFT,
    "try_again_later": SOFT,  # deprecated decline code, now an advice code
    "card_velocity_exceeded": SOFT,
    "withdrawal_count_limit_exceeded": SOFT,
    "card_decline_rate_limit_exceeded": SOFT,  # error code: "try again after 24 hours"
    "generic_decline": SOFT,
    "do_not_honor": SOFT,
    "call_issuer": SOFT,
    "no_action_taken": SOFT,
    "card_declined": SOFT,  # error code without a decline code: issuer gave no reason
    "payment_method_not_available": SOFT,  # "retry later with the same payment method"
    # the customer must act: authenticate, new card, corrected data
    "authentication_required": HARD,
    "expired_card": HARD,
    "incorrect_number": HARD,
    "invalid_number": HARD,
    "incorrect_cvc": HARD,
    "invalid_cvc": HARD,
    "incorrect_zip": HARD,
    "invalid_expiry_month": HARD,
    "invalid_expiry_year": HARD,
    "incorrect_pin": HARD,
    "invalid_pin": HARD,
    "offline_pin_required": HARD,
    "online_or_offline_pin_required": HARD,
    "pin_try_exceeded": HARD,
    "invalid_account": HARD,
    "new_account_information_available": HARD,
    "invalid_amount": HARD,
    "card_not_supported": HARD,
    "currency_not_supported": HARD,
    "not_permitted": HARD,
    "service_not_allowed": HARD,
    "transaction_not_allowed": HARD,
    "testmode_decline": HARD,
    "payment_intent_authentication_failure": HARD,  # "provide a new payment method"
    "payment_method_provider_decline": HARD,  # "provide a new payment method"
    "refer_to_customer": HARD,  # "the customer has stopped the payment with their bank"
    # retrying is refused or risky
    "lost_card": HARD,
    "stolen_card": HARD,
    "pickup_card": HARD,
    "restricted_card": HARD,
    "fraudulent": HARD,
    "merchant_blacklist": HARD,
    "security_violation": HARD,
    "revocation_of_authorization": HARD,
    "revocation_of_all_authorizations": HARD,
    "stop_payment_order": HARD,
    "do_not_try_again": HARD,  # deprecated decline code, now an advice code
    # "a transaction with identical amount and card was submitted very recently": never
    # retried automatically; an operator checks whether an earlier payment exists
    "duplicate_transaction": HARD,
}

# Earliest retry Stripe documents for a code, in seconds.
CODE_RETRY_AFTER_S: Final[Mapping[str, float]] = {"card_decline_rate_limit_exceeded": _DAY_S}

# Stripe's advice_code (docs.stripe.com/declines/card, "Declined card retries").
ADVICE_CODES: Final[Mapping[str, Outcome]] = {
    "try_again_later": SOFT,
    "do_not_try_again": HARD,
    "confirm_card_data": HARD,  # "the customer needs to validate the information on their card"
}

# network_advice_code is network-specific (Stripe: "take the card's brand into
# consideration"); for Mastercard it is the Merchant Advice Code. (outcome, earliest retry).
MASTERCARD_ADVICE: Final[Mapping[str, tuple[Outcome, float | None]]] = {
    # New account information available: Stripe's automatic card updates refresh a saved
    # card from the network, so the same payment method can succeed on a later retry.
    "01": (SOFT, None),
    "02": (SOFT, None),  # cannot approve at this time, try again later
    "03": (HARD, None),  # do not try again
    # Token requirements not fulfilled for this token type: the same saved card fails again
    # until its token is fixed (hard, as in the Adyen and Checkout.com tables).
    "04": (HARD, None),
    "21": (HARD, None),  # payment cancellation: the cardholder stopped the recurring payment
    "24": (SOFT, 3600.0),  # retry after 1 hour
    "25": (SOFT, _DAY_S),  # retry after 24 hours
    "26": (SOFT, 2 * _DAY_S),  # retry after 2 days
    "27": (SOFT, 4 * _DAY_S),  # retry after 4 days
    "28": (SOFT, 6 * _DAY_S),  # retry after 6 days
    "29": (SOFT, 8 * _DAY_S),  # retry after 8 days
    "30": (SOFT, 10 * _DAY_S),  # retry after 10 days
}
NETWORK_ADVICE: Final[Mapping[str, Mapping[str, tuple[Outcome, float | None]]]] = {
    "mastercard": MASTERCARD_ADVICE,
}

# Answers other than 200 and 402 card errors: (HTTP status, error type) -> (outcome, whether
# trying again can help). A type of None matches any type of that status.
ERROR_TABLE: Final[Mapping[tuple[int, str | None], tuple[Outcome, bool]]] = {
    # The key was used with other parameters: whatever its first request did stands.
    (400, "idempotency_error"): (Outcome.UNKNOWN, True),
    # Invalid parameters fail validation, before execution (nothing is charged).
    (400, "invalid_request_error"): (Outcome.PROVIDER_ERROR, False),
    (401, None): (Outcome.PROVIDER_ERROR, False),  # no valid API key: configuration
    (403, None): (Outcome.PROVIDER_ERROR, False),  # the key lacks the permission: configuration
    (404, "invalid_request_error"): (Outcome.PROVIDER_ERROR, False),  # wrong base_url or path
    # Conflicts with a concurrent request (same idempotency key, or an object lock).
    (409, None): (Outcome.UNKNOWN, True),
    (424, None): (Outcome.UNKNOWN, True),  # "a failure in a dependency external to Stripe"
    # Rate limiters run before the idempotency layer: nothing was executed.
    (429, None): (Outcome.RATE_LIMITED, True),
    # "Rate limits were previously coded as 400's with code 'rate_limit'" (stripe-python,
    # _api_requestor.specific_v1_api_error): see ERROR_CODES.
    (500, None): (Outcome.UNKNOWN, True),  # Stripe: treat a 500 as indeterminate
    (502, None): (Outcome.UNKNOWN, True),
    (503, None): (Outcome.UNKNOWN, True),
    (504, None): (Outcome.UNKNOWN, True),
}

# Error codes that override their status's row: they are raised while a request executes.
ERROR_CODES: Final[Mapping[str, tuple[Outcome, bool]]] = {
    "lock_timeout": (Outcome.UNKNOWN, True),  # Stripe answers these with 429 (or 409)
    "idempotency_key_in_use": (Outcome.UNKNOWN, True),  # another request with the key runs
    "rate_limit": (Outcome.RATE_LIMITED, True),  # 429, or 400 on older API versions
}


def _approved(intent: PaymentIntent) -> ChargeResult:
    return ChargeResult(outcome=Outcome.APPROVED, provider_ref=intent.id)


def _payment_failed(intent: PaymentIntent) -> ChargeResult:
    if intent.last_payment_error is not None:
        return card_decline(intent.last_payment_error, provider_ref=intent.id)
    return ChargeResult(
        outcome=HARD,
        provider_ref=intent.id,
        decline_code="requires_payment_method",
        retryable=False,
        reason="payment intent requires_payment_method without an error",
    )


def _needs_customer(intent: PaymentIntent) -> ChargeResult:
    # Off-session, nobody can perform the action (3-D Secure, a redirect): nothing was
    # charged, and only the customer, back on-session, can complete a payment.
    return ChargeResult(
        outcome=HARD,
        provider_ref=intent.id,
        decline_code="requires_action",
        retryable=False,
        reason="payment intent requires_action: the customer must authenticate on-session",
    )


def _not_final(intent: PaymentIntent) -> ChargeResult:
    # "processing" ends by itself (succeeded or requires_payment_method): a later lookup settles it.
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=intent.id,
        reason=f"payment intent {intent.status}: not final, money may move",
    )


def _stuck(intent: PaymentIntent) -> ChargeResult:
    # Authorised but not captured, or never confirmed: payd asked for neither, and the intent
    # waits for a call payd will not make. A person decides (capture, or cancel and retry).
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=intent.id,
        reason=f"payment intent {intent.status}: waits for a capture or confirmation payd never makes",
        needs_operator=True,
    )


def _canceled(intent: PaymentIntent) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        provider_ref=intent.id,
        decline_code="canceled",
        retryable=False,
        reason="payment intent canceled: nothing charged",
    )


# PaymentIntent.status (docs.stripe.com/payments/paymentintents/lifecycle) -> result.
INTENT_STATUSES: Final[Mapping[str, Callable[[PaymentIntent], ChargeResult]]] = {
    "succeeded": _approved,
    "requires_payment_method": _payment_failed,
    "requires_action": _needs_customer,
    "processing": _not_final,
    "requires_capture": _stuck,  # authorised, not captured: an operator decides
    "requires_confirmation": _stuck,
    "canceled": _canceled,
}

# --- the mapping --------------------------------------------------------------------------


def _network_advice(error: StripeError) -> tuple[Outcome, float | None] | None:
    if error.network_advice_code is None or error.payment_method is None:
        return None
    card = error.payment_method.card
    table = NETWORK_ADVICE.get(card.brand or "") if card is not None else None
    return None if table is None else table.get(error.network_advice_code)


def card_decline(error: StripeError, *, provider_ref: str | None) -> ChargeResult:
    """A card error: soft unless the decline code, the advice or the network says never."""
    code = error.decline_code or error.code or "card_declined"
    base = DECLINE_CODES.get(code)
    verdicts: list[tuple[Outcome, float | None]] = [(base or SOFT, CODE_RETRY_AFTER_S.get(code))]
    notes = [f"decline_code {code}" if base else f"unrecognised decline_code {code}"]
    advice = ADVICE_CODES.get(error.advice_code or "")
    if advice is not None:
        verdicts.append((advice, None))
        notes.append(f"advice_code {error.advice_code}")
    network = _network_advice(error)
    if network is not None:
        verdicts.append(network)
        notes.append(f"network_advice_code {error.network_advice_code}")
    hard = any(outcome is HARD for outcome, _ in verdicts)
    waits = [wait for _, wait in verdicts if wait is not None]
    return ChargeResult(
        outcome=HARD if hard else SOFT,
        provider_ref=provider_ref,
        decline_code=code,
        retry_after_s=None if hard or not waits else max(waits),
        retryable=not hard,
        reason="card_error: " + ", ".join(notes),
    )


def intent_result(intent: PaymentIntent) -> ChargeResult:
    mapper = INTENT_STATUSES.get(intent.status)
    if mapper is None:
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            provider_ref=intent.id,
            reason=f"unrecognised payment intent status {intent.status}",
            needs_operator=True,
        )
    return mapper(intent)


def _error_result(status: int, headers: Mapping[str, str], error: StripeError) -> ChargeResult:
    what = f"{status} {error.type}" + (f" {error.code}" if error.code else "")
    row = ERROR_CODES.get(error.code or "") or ERROR_TABLE.get((status, error.type))
    row = row or ERROR_TABLE.get((status, None))
    if row is None:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unrecognised answer {what}")
    outcome, retryable = row
    should_retry = headers.get("Stripe-Should-Retry")
    if should_retry is not None:
        what += f", Stripe-Should-Retry {should_retry}"
    if outcome is Outcome.RATE_LIMITED:
        # Stripe does not promise a Retry-After; its limits are per second, hence 1 s without one.
        return ChargeResult(outcome=outcome, retry_after_s=retry_after_seconds(headers), reason=what)
    return ChargeResult(
        outcome=outcome,
        decline_code=None if retryable else (error.code or error.type),
        retryable=retryable,
        reason=what + (f" (param {error.param})" if error.param else ""),
    )


def charge_result(status: int, headers: Mapping[str, str], body: bytes) -> ChargeResult:
    """Map Stripe's answer to ``POST /v1/payment_intents``; a body that does not parse is UNKNOWN."""
    try:
        if status == 200:
            intent = _decode_intent(body)
            if intent.object != "payment_intent":
                return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"200 with a {intent.object} object")
            return intent_result(intent)
        error = _decode_error(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")
    if status == 402:
        if error.type != "card_error":
            return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unrecognised answer 402 {error.type}")
        provider_ref = error.payment_intent.id if error.payment_intent is not None else None
        return card_decline(error, provider_ref=provider_ref)
    return _error_result(status, headers, error)


def decode_page(body: bytes) -> PaymentIntentPage | None:
    """A list or search page of PaymentIntents; None if it does not parse."""
    try:
        page = _decode_page(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return page if page.object in ("list", "search_result") else None


def matching(intents: Iterable[PaymentIntent], idempotency_key: str) -> list[PaymentIntent]:
    return [intent for intent in intents if intent.metadata.get(KEY_METADATA) == idempotency_key]


def identity_problem(intent: PaymentIntent, request: AttemptRequest) -> str | None:
    """Why ``intent`` is not ``request``'s payment (key, amount, currency), or None if it is."""
    checks = (
        ("metadata." + KEY_METADATA, intent.metadata.get(KEY_METADATA), request.idempotency_key),
        ("amount", intent.amount, request.amount_minor),
        ("currency", intent.currency, request.currency.lower()),
    )
    for name, found, wanted in checks:
        if found != wanted:
            return f"payment intent {intent.id} has {name} {found!r}, the attempt {wanted!r}"
    return None


def search_lookup_result(page: PaymentIntentPage, request: AttemptRequest) -> LookupResult:
    """A search by the attempt's key: whatever it returns must carry exactly that key."""
    ours = matching(page.data, request.idempotency_key)
    if page.data and not ours:
        problem = identity_problem(page.data[0], request)
        return LookupResult(found=True, anomaly=f"the search for the attempt's key found another: {problem}")
    return lookup_result(ours, request)


def lookup_result(intents: Sequence[PaymentIntent], request: AttemptRequest) -> LookupResult:
    """What the PaymentIntents carrying the attempt's idempotency key say of it.

    Normally there is one. Should a key have been reused after Stripe forgot it (24 h),
    a success wins, then anything that may still move money, then the newest. One that
    does not match the attempt's amount and currency settles nothing: an anomaly.
    """
    if not intents:
        return LookupResult(found=False)
    for intent in intents:
        problem = identity_problem(intent, request)
        if problem is not None:
            return LookupResult(found=True, anomaly=problem)
    results = [(intent.created, intent_result(intent)) for intent in intents]
    for wanted in (Outcome.APPROVED, Outcome.UNKNOWN):
        for _, result in results:
            if result.outcome is wanted:
                return LookupResult(found=True, result=result)
    return LookupResult(found=True, result=max(results, key=lambda pair: pair[0])[1])


# --- refunds ------------------------------------------------------------------------------
# ``POST /v1/refunds`` and ``GET /v1/refunds`` (stripe-python ``RefundCreateParams``,
# ``RefundListParams`` and ``Refund``; the values are vendored in
# tests/fixtures/providers/stripe_refund.json). A refund is addressed by the charge's
# PaymentIntent (``pi_...``, what payd records as the charge's provider reference).

REFUND_KEY_METADATA: Final = KEY_METADATA
"""Refund metadata holding the refund's own idempotency key: what a refund lookup matches."""
REFUND_ORIGINAL_METADATA: Final = "payd_original_key"
"""Refund metadata holding the refunded charge's idempotency key."""
REFUND_REASON_METADATA: Final = "payd_reason"
"""Refund metadata holding a free-text reason that is none of Stripe's ``reason`` values."""
MAX_METADATA_VALUE: Final = 500  # Stripe: "values can be up to 500 characters long"

REFUND_REASONS: Final = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
"""The only values ``POST /v1/refunds`` accepts in ``reason`` (``RefundCreateParams.reason``);
any other text travels in metadata instead, where it cannot fail validation."""


class Refund(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str
    status: str | None = None
    amount: int | None = None
    currency: str | None = None
    payment_intent: str | None = None
    charge: str | None = None
    created: int = 0
    metadata: dict[str, str] = {}
    failure_reason: str | None = None
    pending_reason: str | None = None


class RefundPage(msgspec.Struct, frozen=True, kw_only=True):
    object: str
    data: list[Refund]
    has_more: bool = False


_decode_refund = msgspec.json.Decoder(Refund).decode
_decode_refund_page = msgspec.json.Decoder(RefundPage).decode


def refund_problem(request: ReversalRequest) -> str | None:
    """Why this refund cannot be sent to Stripe, found before sending it; None if it may go."""
    ref = request.original_provider_ref
    if ref is None or not ref.startswith(("pi_", "ch_")):
        return f"the charge's Stripe id is {ref!r}, not a PaymentIntent (pi_...) or charge (ch_...)"
    return None


def refund_form(request: ReversalRequest) -> bytes:
    """``POST /v1/refunds`` form body: the charge's PaymentIntent (or charge), the amount, and
    the keys in metadata. The same request always encodes to the same bytes (a resend under
    the same ``Idempotency-Key`` must carry the same parameters)."""
    ref = request.original_provider_ref
    assert ref is not None  # refund_problem() refuses the request otherwise
    pairs = [
        ("charge" if ref.startswith("ch_") else "payment_intent", ref),
        ("amount", str(request.amount_minor)),
        (f"metadata[{REFUND_KEY_METADATA}]", request.idempotency_key),
        (f"metadata[{REFUND_ORIGINAL_METADATA}]", request.original_idempotency_key),
    ]
    if request.reason in REFUND_REASONS:
        pairs.append(("reason", request.reason))
    elif request.reason:
        pairs.append((f"metadata[{REFUND_REASON_METADATA}]", request.reason[:MAX_METADATA_VALUE]))
    return urllib.parse.urlencode(pairs).encode()


def _refund_succeeded(refund: Refund) -> ChargeResult:
    return ChargeResult(outcome=Outcome.APPROVED, provider_ref=refund.id)


def _refund_in_progress(refund: Refund) -> ChargeResult:
    # pending: "the refund is processing" (pending_reason processing, insufficient_funds,
    # charge_pending); requires_action: the customer must give refund details (non-card
    # methods). Both end by themselves in succeeded, failed or canceled: a lookup reads it.
    # Stripe has the refund, so it is pending (accepted): never sent again, only looked up.
    detail = f" ({refund.pending_reason})" if refund.pending_reason else ""
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=refund.id,
        accepted=True,
        reason=f"refund {refund.status}{detail}: not final, money may move",
    )


def _refund_failed(refund: Refund) -> ChargeResult:
    # failed: "the refund has failed" and the funds return to the merchant's balance;
    # canceled: cancelled before it was processed. Nothing reached the customer either way.
    code = refund.failure_reason or refund.status or "failed"
    return ChargeResult(
        outcome=HARD,
        provider_ref=refund.id,
        decline_code=code[:64],
        retryable=False,
        reason=f"refund {refund.status}" + (f": {refund.failure_reason}" if refund.failure_reason else ""),
    )


# Refund.status (stripe-python ``Refund.status``; docs.stripe.com/refunds#failed-refunds).
REFUND_STATUSES: Final[Mapping[str, Callable[[Refund], ChargeResult]]] = {
    "succeeded": _refund_succeeded,
    "pending": _refund_in_progress,
    "requires_action": _refund_in_progress,
    "failed": _refund_failed,
    "canceled": _refund_failed,
}

# Stripe error codes (stripe-python's error ``code`` enumeration) by which Stripe refuses a
# refund it did not execute: sending it again cannot help. Their rows override ERROR_TABLE.
REFUND_REFUSALS: Final = frozenset(
    {
        "charge_already_refunded",  # "the charge has already been refunded"
        "amount_too_large",  # more than remains unrefunded
        "amount_too_small",
        "charge_disputed",  # "the charge has been charged back"
        "refund_disputed_payment",
        "charge_not_refundable",
        "intent_invalid_state",  # the PaymentIntent has no succeeded charge to refund
        "balance_insufficient",
        "resource_missing",  # no such PaymentIntent or charge
    }
)


def refund_identity_problem(refund: Refund, request: ReversalRequest) -> str | None:
    """Why ``refund`` is not ``request``'s (key, charge, amount, currency), or None if it is."""
    target = "charge" if (request.original_provider_ref or "").startswith("ch_") else "payment_intent"
    checks = (
        (
            "metadata." + REFUND_KEY_METADATA,
            refund.metadata.get(REFUND_KEY_METADATA),
            request.idempotency_key,
        ),
        (target, getattr(refund, target), request.original_provider_ref),
        ("amount", refund.amount, request.amount_minor),
        ("currency", refund.currency, request.currency.lower()),
    )
    for name, found, wanted in checks:
        if found != wanted:
            return f"refund {refund.id} has {name} {found!r}, the refund asked for {wanted!r}"
    return None


def refund_status_result(refund: Refund) -> ChargeResult:
    mapper = REFUND_STATUSES.get(refund.status or "")
    if mapper is None:
        return ChargeResult(
            outcome=Outcome.UNKNOWN,
            provider_ref=refund.id,
            reason=f"unrecognised refund status {refund.status}",
            needs_operator=True,
        )
    return mapper(refund)


def refund_result(
    request: ReversalRequest, status: int, headers: Mapping[str, str], body: bytes
) -> ChargeResult:
    """Map Stripe's answer to ``POST /v1/refunds``; a body that does not parse is UNKNOWN."""
    try:
        if status == 200:
            refund = _decode_refund(body)
            if refund.object != "refund":
                return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"200 with a {refund.object} object")
            problem = refund_identity_problem(refund, request)
            if problem is not None:
                # A replay of another request under this key: whatever it did stands.
                return ChargeResult(
                    outcome=Outcome.UNKNOWN, provider_ref=refund.id, reason=problem, needs_operator=True
                )
            return refund_status_result(refund)
        error = _decode_error(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {status} answer")
    if status in (400, 404) and error.type == "invalid_request_error" and error.code in REFUND_REFUSALS:
        return ChargeResult(
            outcome=HARD,
            decline_code=error.code,
            retryable=False,
            reason=f"{status} {error.type} {error.code}: refund refused, nothing refunded",
        )
    return _error_result(status, headers, error)


def decode_refund_page(body: bytes) -> RefundPage | None:
    """A list page of refunds; None if it does not parse."""
    try:
        page = _decode_refund_page(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return page if page.object == "list" else None


def refund_lookup_result(refunds: Sequence[Refund], request: ReversalRequest) -> LookupResult:
    """What the refunds carrying the refund's key say of it: normally one (Stripe stores a
    key's answer, so a resend replays it rather than refunding again)."""
    ours = [
        refund for refund in refunds if refund.metadata.get(REFUND_KEY_METADATA) == request.idempotency_key
    ]
    if not ours:
        return LookupResult(found=False)
    for refund in ours:
        problem = refund_identity_problem(refund, request)
        if problem is not None:
            return LookupResult(found=True, anomaly=problem)
    results = [refund_status_result(refund) for refund in ours]
    for wanted in (Outcome.APPROVED, Outcome.UNKNOWN):
        for result in results:
            if result.outcome is wanted:
                return LookupResult(found=True, result=result)
    return LookupResult(found=True, result=results[0])
