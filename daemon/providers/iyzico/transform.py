"""iyzico's wire types, the IYZWSv2 signature, amounts, and the mapping of its answers to payd outcomes.

Everything here is pure: no I/O, so each rule can be tested on its own. The
client half is ``daemon.providers.iyzico.client``; docs/providers/iyzico.md
cites the iyzico pages each rule follows.

iyzico keeps no idempotency keys, so the one question this module must answer
right is "may this answer follow a payment?". A body that says
``status: failure`` is iyzico's statement that it took no money; everything it
does not plainly say (5xx, a body that does not parse, a success that does not
match what was asked) is UNKNOWN, to be looked up, never sent again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Final, Literal, NamedTuple

import msgspec

from daemon.providers.api import AttemptRequest, ChargeResult, LookupResult, Outcome, retry_after_seconds

PAYMENT_PATH: Final = "/payment/auth"
DETAIL_PATH: Final = "/payment/detail"

# --- the payment method token -------------------------------------------------------------

# payd's payment_method for iyzico is "<cardUserKey>:<cardToken>", both as iyzico's card
# storage returned them. They are base64-ish or UUID strings, never containing ':'.
_STORED_CARD: Final = re.compile(r"^(?P<user>[A-Za-z0-9+/=_.-]{1,126}):(?P<card>[A-Za-z0-9+/=_.-]{1,126})\Z")


class StoredCard(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``paymentCard`` for a card kept in iyzico's card storage: no number, no CVC."""

    card_user_key: str
    card_token: str


def stored_card(payment_method: str) -> StoredCard | None:
    """The stored card a payment method token names, or None if it is not ``USERKEY:TOKEN``."""
    match = _STORED_CARD.match(payment_method)
    if match is None:
        return None
    return StoredCard(card_user_key=match["user"], card_token=match["card"])


# --- amounts --------------------------------------------------------------------------------

# Currencies iyzico documents for payments (Non-3DS "currency"), with their ISO 4217 minor
# units. IRR is left out: its ISO exponent (2) and the one in use (0) disagree.
MINOR_UNITS: Final[Mapping[str, int]] = {"TRY": 2, "EUR": 2, "USD": 2, "GBP": 2}


def format_price(amount_minor: int, currency: str) -> str | None:
    """``amount_minor`` as iyzico's decimal string, or None for a currency iyzico does not take.

    Integer arithmetic only, no float. Trailing zeros go but one decimal stays, as the
    official clients format prices: 1000 EUR cents is "10.0", 1050 is "10.5", 1 is "0.01".
    """
    exponent = MINOR_UNITS.get(currency)
    if exponent is None:
        return None
    units, fraction = divmod(amount_minor, 10**exponent)
    digits = f"{fraction:0{exponent}d}".rstrip("0") if exponent else ""
    return f"{units}.{digits or '0'}"


# --- the IYZWSv2 signature ------------------------------------------------------------------

AUTH_SCHEME: Final = "IYZWSv2"


def signature(secret_key: str, random_key: str, uri_path: str, body: bytes) -> str:
    """hex(HMAC-SHA256(secretKey, randomKey + uri path + request body)), as iyzico documents."""
    message = random_key.encode() + uri_path.encode() + body
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def authorization(api_key: str, secret_key: str, random_key: str, uri_path: str, body: bytes) -> str:
    """The ``Authorization`` header value: ``IYZWSv2 base64(apiKey:..&randomKey:..&signature:..)``."""
    params = f"apiKey:{api_key}&randomKey:{random_key}&signature:"
    params += signature(secret_key, random_key, uri_path, body)
    return f"{AUTH_SCHEME} {base64.b64encode(params.encode()).decode()}"


def random_key() -> str:
    """A fresh ``x-iyzi-rnd``: milliseconds and nine random digits, unique per request."""
    return f"{time.time_ns() // 1_000_000}{secrets.randbelow(10**9):09d}"


# --- wire types: what payd sends ------------------------------------------------------------


class Buyer(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    id: str
    name: str
    surname: str
    identity_number: str
    email: str
    registration_address: str
    city: str
    country: str
    ip: str


class Address(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    contact_name: str
    city: str
    country: str
    address: str


class BasketItem(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    id: str
    name: str
    category1: str
    item_type: Literal["VIRTUAL"]
    price: str


class PaymentRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``POST /payment/auth`` (Non-3DS create payment) with a stored card."""

    locale: str
    conversation_id: str
    price: str
    paid_price: str
    currency: str
    installment: int
    basket_id: str
    payment_channel: str
    payment_group: str
    payment_card: StoredCard
    buyer: Buyer
    billing_address: Address
    basket_items: list[BasketItem]


class DetailRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """``POST /payment/detail`` (retrieve payment result) by the payment's conversationId, and
    by its paymentId where payd knows it (the official samples send both)."""

    locale: str
    conversation_id: str
    payment_conversation_id: str
    payment_id: str | None = None


class PaymentDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What a request needs beyond the attempt: from the provider's configuration."""

    locale: str
    payment_channel: str
    payment_group: str
    basket_item_name: str
    basket_item_category: str
    buyer: Mapping[str, str]
    """Placeholder buyer fields by name (``email``, ``ip``, ...); see ``BUYER_FIELDS``."""


# Buyer fields iyzico requires. Each comes from the attempt's metadata key ``buyer_<name>``
# when the sender gave one, else from the configured placeholder.
BUYER_FIELDS: Final = ("name", "surname", "identity_number", "email", "address", "city", "country", "ip")


class Expected(msgspec.Struct, frozen=True, kw_only=True):
    """What a success answer must echo for payd to believe it is this attempt's payment."""

    conversation_id: str
    basket_id: str
    paid_price: Decimal
    currency: str


class Refused(NamedTuple):
    """An attempt payd will not send: why, as the result to record."""

    result: ChargeResult


_encode = msgspec.json.Encoder().encode


def _refusal(decline_code: str, reason: str) -> Refused:
    return Refused(
        ChargeResult(
            outcome=Outcome.PROVIDER_ERROR, retryable=False, decline_code=decline_code, reason=reason
        )
    )


def payment_body(request: AttemptRequest, defaults: PaymentDefaults) -> tuple[bytes, Expected] | Refused:
    """The JSON body for ``/payment/auth`` and what its answer must echo, or why it is not sent.

    conversationId carries the idempotency key (one per intended charge), so a lookup
    finds this attempt's payment and no other; basketId carries the merchant reference.
    """
    card = stored_card(request.payment_method)
    if card is None:
        return _refusal("invalid_payment_method", "iyzico payment_method must be CARDUSERKEY:CARDTOKEN")
    price = format_price(request.amount_minor, request.currency)
    if price is None:
        return _refusal("unsupported_currency", f"iyzico does not take {request.currency}")
    given = {name: request.metadata.get(f"buyer_{name}") or defaults.buyer[name] for name in BUYER_FIELDS}
    buyer = Buyer(
        id=request.customer_ref or request.merchant_reference,
        name=given["name"],
        surname=given["surname"],
        identity_number=given["identity_number"],
        email=given["email"],
        registration_address=given["address"],
        city=given["city"],
        country=given["country"],
        ip=given["ip"],
    )
    body = PaymentRequest(
        locale=defaults.locale,
        conversation_id=request.idempotency_key,
        price=price,
        paid_price=price,
        currency=request.currency,
        installment=1,
        basket_id=request.merchant_reference,
        payment_channel=defaults.payment_channel,
        payment_group=defaults.payment_group,
        payment_card=card,
        buyer=buyer,
        billing_address=Address(
            contact_name=f"{buyer.name} {buyer.surname}",
            city=buyer.city,
            country=buyer.country,
            address=buyer.registration_address,
        ),
        basket_items=[
            BasketItem(
                id=request.merchant_reference,
                name=defaults.basket_item_name,
                category1=defaults.basket_item_category,
                item_type="VIRTUAL",
                price=price,
            )
        ],
    )
    expected = Expected(
        conversation_id=request.idempotency_key,
        basket_id=request.merchant_reference,
        paid_price=Decimal(price),
        currency=request.currency,
    )
    return _encode(body), expected


def detail_body(request: AttemptRequest, locale: str, payment_id: str | None = None) -> bytes:
    return _encode(
        DetailRequest(
            locale=locale,
            conversation_id=request.idempotency_key,
            payment_conversation_id=request.idempotency_key,
            payment_id=payment_id,
        )
    )


# --- wire types: what iyzico answers --------------------------------------------------------


class Answer(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The fields payd reads from a payment or payment-detail answer; the rest are ignored."""

    status: str
    error_code: str | int | None = None
    error_group: str | None = None
    conversation_id: str | None = None
    payment_id: str | None = None
    payment_status: str | None = None
    fraud_status: int | None = None
    paid_price: Decimal | None = None
    price: Decimal | None = None
    currency: str | None = None
    basket_id: str | None = None
    signature: str | None = None


_decode_answer = msgspec.json.Decoder(Answer).decode


# --- the mapping ----------------------------------------------------------------------------


class Row(NamedTuple):
    outcome: Outcome
    decline_code: str
    retryable: bool
    """Whether sending again could help; only ever True where iyzico refused before processing."""
    about_payment: bool
    """The code describes the payment (a bank or fraud verdict), so a lookup that answers it
    found the payment; otherwise it is about the request that carried it."""


def _bank(outcome: Outcome, decline_code: str) -> Row:
    return Row(outcome, decline_code, retryable=outcome is Outcome.SOFT_DECLINE, about_payment=True)


def _api(outcome: Outcome, decline_code: str, *, retryable: bool = False) -> Row:
    return Row(outcome, decline_code, retryable=retryable, about_payment=False)


SOFT, HARD, ERROR = Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE, Outcome.PROVIDER_ERROR

# errorCode of a ``status: failure`` body -> what payd makes of it. Every row charged nothing:
# iyzico says the payment failed. Soft: dunning may try again another day. Hard: the card
# needs replacing. PROVIDER_ERROR: the merchant's set-up or iyzico's side; not retried.
# Decline codes use the plain names of daemon.subscriptions.networks where one fits.
ERROR_CODES: Final[Mapping[str, Row]] = {
    # Bank error codes (>= 10000), docs "Error Codes" / "Bank Error Codes".
    "10005": _bank(SOFT, "do_not_honour"),
    "10012": _bank(HARD, "invalid_transaction"),
    "10034": _bank(HARD, "fraud_suspect"),
    "10041": _bank(HARD, "pickup_card"),  # PICKUP_CARD (LOST_CARD on older pages)
    "10043": _bank(HARD, "stolen_card"),  # LOST_CARD, "lost/stolen" (STOLEN_CARD on older pages)
    "10051": _bank(SOFT, "insufficient_funds"),
    "10054": _bank(HARD, "expired_card"),
    "10057": _bank(HARD, "transaction_not_allowed"),  # NOT_PERMITTED_TO_CARDHOLDER
    "10058": _bank(ERROR, "not_permitted_to_terminal"),  # the merchant's terminal, not the card
    "10084": _bank(HARD, "invalid_cvc"),
    "10093": _bank(HARD, "restricted_card"),
    "10201": _bank(HARD, "card_not_permitted"),
    "10204": _bank(ERROR, "processing_error"),  # errorGroup UNKNOWN: "a general error occurred"
    "10206": _bank(HARD, "invalid_cvc"),
    "10207": _bank(SOFT, "refer_to_card_issuer"),
    "10208": _bank(ERROR, "invalid_merchant"),
    "10209": _bank(HARD, "blocked_card"),
    "10210": _bank(ERROR, "invalid_cavv"),
    "10211": _bank(ERROR, "invalid_eci"),
    "10213": _bank(HARD, "bin_not_found"),
    "10214": _bank(ERROR, "communication_or_system_error"),
    "10215": _bank(HARD, "invalid_number"),
    "10216": _bank(HARD, "no_such_issuer"),
    "10217": _bank(HARD, "requires_3ds"),
    "10219": _bank(ERROR, "bank_timeout"),
    # Fraud engine, docs "Fraud Notifications": 6000 engine rejection, 6001 black list.
    "6000": _bank(HARD, "fraud_rejected"),
    "6001": _bank(HARD, "blacklisted_card"),
    # The request, not the payment.
    "1000": _api(ERROR, "invalid_signature"),
    "1001": _api(ERROR, "api_credentials_not_found"),
    # Docs "Limiters": refused before processing, so trying again later is safe.
    "50000": _api(Outcome.RATE_LIMITED, "request_limit_exceeded", retryable=True),
}

_FIRST_BANK_CODE: Final = 10000


def error_row(code: str) -> Row:
    """The table's row, or the rule for a code it lacks.

    An unlisted code still came in an explicit failure body, so nothing was taken and it is
    never UNKNOWN. Bank codes (>= 10000) become a hard decline, which stops all further
    charges until someone looks; anything else is a provider error that is not retried.
    """
    row = ERROR_CODES.get(code)
    if row is not None:
        return row
    if code.isdigit() and int(code) >= _FIRST_BANK_CODE:
        return _bank(HARD, f"iyzico_{code}")
    return _api(ERROR, f"iyzico_{code}")


class FraudVerdict(NamedTuple):
    outcome: Outcome
    decline_code: str | None
    reason: str | None


# fraudStatus of a success answer, docs "Retrieve Payment": 1 approved, 0 under review (wait
# for the notification), -1 rejected. Absent on older answers, which predate the field.
FRAUD_STATUS: Final[Mapping[int | None, FraudVerdict]] = {
    1: FraudVerdict(Outcome.APPROVED, None, None),
    None: FraudVerdict(Outcome.APPROVED, None, None),
    0: FraudVerdict(Outcome.UNKNOWN, None, "iyzico fraud review pending (fraudStatus 0)"),
    -1: FraudVerdict(
        Outcome.HARD_DECLINE, "fraud_rejected", "iyzico fraud check rejected it (fraudStatus -1)"
    ),
}

_SUCCESS_PAYMENT_STATUSES: Final = frozenset({None, "SUCCESS"})
_FAILED_PAYMENT_STATUS: Final = "FAILURE"
# A looked-up payment that failed without an errorCode: nothing was taken, and nothing says
# the card is at fault, so dunning may try again (iyzico attempts are never re-sent).
_FAILED_WITHOUT_CODE: Final = Row(Outcome.SOFT_DECLINE, "payment_failed", retryable=True, about_payment=True)

# Without Retry-After, wait this long after a "Request Limit Exceeded": iyzico's limits are
# per minute, so the next second would be refused too.
RATE_LIMIT_WAIT_S: Final = 10.0


def _price_text(value: Decimal) -> str:
    """A price as iyzico's signature takes it: the JSON number without a trailing ``.0``
    (iyzipay-python ``strip_zero(str(price))``)."""
    return format(value.normalize(), "f")


def response_signature(secret_key: str, answer: Answer) -> str | None:
    """hex(HMAC-SHA256(secretKey, "paymentId:currency:basketId:conversationId:paidPrice:price")),
    as iyzico signs payment answers (iyzipay-python samples, ``verify_signature``); None when
    a field it covers is missing."""
    fields = (answer.payment_id, answer.currency, answer.basket_id, answer.conversation_id)
    if None in fields or answer.paid_price is None or answer.price is None:
        return None
    parts = [*(str(field) for field in fields), _price_text(answer.paid_price), _price_text(answer.price)]
    return hmac.new(secret_key.encode(), ":".join(parts).encode(), hashlib.sha256).hexdigest()


def _signature_problem(answer: Answer, secret_key: str | None) -> str | None:
    """Why a signed answer's signature does not hold. Unsigned answers (older API versions) pass."""
    if secret_key is None or answer.signature is None:
        return None
    expected = response_signature(secret_key, answer)
    if expected is None or not hmac.compare_digest(expected, answer.signature):
        return "iyzico answer with a signature that does not verify"
    return None


def _mismatch(answer: Answer, expected: Expected, *, looked_up: bool = False) -> str | None:
    """Why an answer cannot be this attempt's payment, if it cannot. A looked-up payment must
    state each field; a charge's answer may leave one out."""
    checks = (
        ("conversationId", answer.conversation_id, expected.conversation_id),
        ("basketId", answer.basket_id, expected.basket_id),
        ("currency", answer.currency, expected.currency),
        ("paidPrice", answer.paid_price, expected.paid_price),
    )
    for name, got, wanted in checks:
        if got != wanted and (looked_up or got is not None):
            return f"iyzico answer with another {name}: {got!r}, not {wanted!r}"
    return None


def _success(answer: Answer, expected: Expected) -> ChargeResult:
    problem = _mismatch(answer, expected)
    if problem is not None:
        return ChargeResult(outcome=Outcome.UNKNOWN, provider_ref=answer.payment_id, reason=problem)
    if answer.payment_status not in _SUCCESS_PAYMENT_STATUSES:
        # INIT_THREEDS, CALLBACK_THREEDS, ...: a flow payd never starts, waiting for a step payd
        # never takes; a lookup would answer the same for ever, so a person settles it.
        reason = f"iyzico success with paymentStatus {answer.payment_status}"
        return ChargeResult(
            outcome=Outcome.UNKNOWN, provider_ref=answer.payment_id, reason=reason, needs_operator=True
        )
    if not answer.payment_id:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason="iyzico success without a paymentId")
    verdict = FRAUD_STATUS.get(answer.fraud_status)
    if verdict is None:
        reason = f"iyzico success with fraudStatus {answer.fraud_status}"
        return ChargeResult(
            outcome=Outcome.UNKNOWN, provider_ref=answer.payment_id, reason=reason, needs_operator=True
        )
    return ChargeResult(
        outcome=verdict.outcome,
        provider_ref=answer.payment_id,
        decline_code=verdict.decline_code,
        retryable=False,
        reason=verdict.reason,
    )


def _failure(answer: Answer, code: str, headers: Mapping[str, str]) -> ChargeResult:
    row = error_row(code)
    retry_after = (
        retry_after_seconds(headers, RATE_LIMIT_WAIT_S) if row.outcome is Outcome.RATE_LIMITED else None
    )
    return ChargeResult(
        outcome=row.outcome,
        provider_ref=answer.payment_id,
        decline_code=row.decline_code,
        retry_after_s=retry_after,
        retryable=row.retryable,
        reason=f"iyzico {code} {answer.error_group or ''}".rstrip(),
    )


def _error_code(answer: Answer | ReversalAnswer) -> str | None:
    return None if answer.error_code is None else str(answer.error_code)


def _readable(status: int) -> bool:
    """Statuses whose body speaks for itself: iyzico answers failures with 200 or 4xx."""
    return 200 <= status < 500 and status != 429


def charge_result(
    status: int, headers: Mapping[str, str], body: bytes, expected: Expected, secret_key: str | None = None
) -> ChargeResult:
    """Map a ``/payment/auth`` answer to an outcome; whatever is not plainly said is UNKNOWN.
    With ``secret_key`` a signed success must carry iyzico's valid response signature."""
    if status == 429:
        retry_after = retry_after_seconds(headers, RATE_LIMIT_WAIT_S)
        return ChargeResult(outcome=Outcome.RATE_LIMITED, retry_after_s=retry_after, reason="iyzico 429")
    if not _readable(status):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"iyzico answered {status}")
    try:
        answer = _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable iyzico {status} answer")
    if answer.status == "success":
        problem = _signature_problem(answer, secret_key)
        if problem is not None:
            return ChargeResult(outcome=Outcome.UNKNOWN, provider_ref=answer.payment_id, reason=problem)
        return _success(answer, expected)
    code = _error_code(answer)
    if answer.status == "failure" and code is not None:
        return _failure(answer, code, headers)
    return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"iyzico status {answer.status!r} without errorCode")


def _looked_up(answer: Answer, expected: Expected, secret_key: str | None) -> LookupResult:
    """A ``status: success`` detail answer: the payment iyzico holds under the attempt's
    conversationId. It settles the attempt only if it is the attempt's payment (basketId,
    currency, paidPrice, and a signature that holds); otherwise it is an anomaly. A payment
    whose ``paymentStatus`` is FAILURE took no money: a decline by its errorCode, or a soft
    ``payment_failed`` without one, never UNKNOWN (iyzico attempts are never re-sent, so
    an unknown one would stay unknown forever)."""
    problem = _signature_problem(answer, secret_key) or _mismatch(answer, expected, looked_up=True)
    if problem is not None:
        return LookupResult(found=True, anomaly=problem)
    if answer.payment_status != _FAILED_PAYMENT_STATUS:
        return LookupResult(found=True, result=_success(answer, expected))
    code = _error_code(answer)
    row = _FAILED_WITHOUT_CODE if code is None else error_row(code)
    if row.outcome in (Outcome.UNKNOWN, Outcome.RATE_LIMITED):  # not a verdict on the payment
        row = _FAILED_WITHOUT_CODE
    return LookupResult(
        found=True,
        result=ChargeResult(
            outcome=row.outcome,
            provider_ref=answer.payment_id,
            decline_code=row.decline_code,
            retryable=row.retryable,
            reason=f"iyzico paymentStatus FAILURE {code or ''} {answer.error_group or ''}".rstrip(),
        ),
    )


def lookup_result(
    status: int,
    body: bytes,
    expected: Expected,
    not_found_codes: frozenset[str],
    secret_key: str | None = None,
) -> LookupResult | None:
    """Map a ``/payment/detail`` answer: the payment found, not found, or None to ask again.

    "Not found" needs a code listed in ``not_found_codes`` (iyzico does not document the one
    it answers), because calling a charged payment "not found" would fail a paid attempt.
    """
    if not _readable(status):
        return None
    try:
        answer = _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if answer.status == "success":
        return _looked_up(answer, expected, secret_key)
    code = _error_code(answer)
    if answer.status != "failure" or code is None:
        return None
    if code in not_found_codes:
        return LookupResult(found=False)
    if error_row(code).about_payment:
        return LookupResult(found=True, result=_failure(answer, code, {}))
    return None  # about the lookup itself (signature, limit, validation): ask again later


# --- reversals: refund (v2, by paymentId) and same-day cancel -------------------------------
#
# iyzico "Refund & Cancel" (docs.iyzico.com/en/advanced/refund-and-cancel): Refund V2,
# ``POST /v2/payment/refund`` with ``paymentId`` and ``price`` ("Enables refunds over paymentId.
# No item breakdown is required; the system determines the basket item to refund"; the
# official iyzipay-python ``Payment.refund`` calls it), and ``POST /payment/cancel`` with
# ``paymentId``, which cancels the whole payment and works only on the day it was made
# ("before banks perform their own reconciliation"). Both answer ``status: success`` with the
# ``price`` and ``currency`` reversed, or ``status: failure`` with an ``errorCode``. iyzico keeps
# no idempotency key and has no read of a refund, so an answer that is not plainly one of
# those two is UNKNOWN for an operator: never sent again, never looked up.

REFUND_PATH: Final = "/v2/payment/refund"
CANCEL_PATH: Final = "/payment/cancel"


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    locale: str
    conversation_id: str
    payment_id: str
    price: str
    currency: str
    ip: str


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    locale: str
    conversation_id: str
    payment_id: str
    ip: str


class ReversalAnswer(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The fields payd reads from a refund or cancel answer."""

    status: str
    error_code: str | int | None = None
    error_group: str | None = None
    error_message: str | None = None
    conversation_id: str | None = None
    payment_id: str | int | None = None
    payment_transaction_id: str | int | None = None
    price: Decimal | None = None
    currency: str | None = None


_decode_reversal = msgspec.json.Decoder(ReversalAnswer).decode


class ExpectedReversal(msgspec.Struct, frozen=True, kw_only=True):
    """What an answer to one reversal must echo."""

    conversation_id: str
    payment_id: str
    price: Decimal | None
    """The amount refunded; None for a cancel (the whole payment, whatever iyzico holds)."""
    currency: str


def refund_body(
    *, locale: str, conversation_id: str, payment_id: str, price: str, currency: str, ip: str
) -> bytes:
    return _encode(
        RefundRequest(
            locale=locale,
            conversation_id=conversation_id,
            payment_id=payment_id,
            price=price,
            currency=currency,
            ip=ip,
        )
    )


def cancel_body(*, locale: str, conversation_id: str, payment_id: str, ip: str) -> bytes:
    return _encode(
        CancelRequest(locale=locale, conversation_id=conversation_id, payment_id=payment_id, ip=ip)
    )


def _operator(reason: str, provider_ref: str | None = None) -> ChargeResult:
    return ChargeResult(
        outcome=Outcome.UNKNOWN,
        provider_ref=provider_ref,
        needs_operator=True,
        reason=(
            f"{reason}; iyzico keeps no idempotency key and has no read of a refund: "
            "check the payment in the iyzico panel, then settle this reversal by hand"
        )[:255],
    )


def operator_unknown(result: ChargeResult) -> ChargeResult:
    """A transport UNKNOWN (timeout, connection lost after sending) of a reversal, for an operator."""
    return _operator(result.reason or "no answer")


def _reversal_mismatch(answer: ReversalAnswer, expected: ExpectedReversal) -> str | None:
    checks = (
        ("conversationId", answer.conversation_id, expected.conversation_id),
        ("paymentId", None if answer.payment_id is None else str(answer.payment_id), expected.payment_id),
        ("currency", answer.currency, expected.currency),
        ("price", answer.price, expected.price),
    )
    for name, got, wanted in checks:
        if wanted is not None and got is not None and got != wanted:
            return f"iyzico answer with another {name}: {got!r}, not {wanted!r}"
    return None


def reversal_result(
    status: int, headers: Mapping[str, str], body: bytes, expected: ExpectedReversal
) -> ChargeResult:
    """Map a refund or cancel answer: success approved, failure failed (nothing reversed), a
    429 rate limited (refused before processing), anything else unknown for an operator."""
    if status == 429:
        retry_after = retry_after_seconds(headers, RATE_LIMIT_WAIT_S)
        return ChargeResult(outcome=Outcome.RATE_LIMITED, retry_after_s=retry_after, reason="iyzico 429")
    if not _readable(status):
        return _operator(f"iyzico answered {status}")
    try:
        answer = _decode_reversal(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _operator(f"unparseable iyzico {status} answer")
    reference = None if answer.payment_transaction_id is None else str(answer.payment_transaction_id)
    if answer.status == "success":
        problem = _reversal_mismatch(answer, expected)
        if problem is not None:
            return _operator(problem, reference)
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=reference or expected.payment_id)
    code = _error_code(answer)
    if answer.status != "failure" or code is None:
        return _operator(f"iyzico status {answer.status!r} without errorCode")
    row = error_row(code)
    if row.outcome is Outcome.RATE_LIMITED:
        retry_after = retry_after_seconds(headers, RATE_LIMIT_WAIT_S)
        return ChargeResult(outcome=Outcome.RATE_LIMITED, retry_after_s=retry_after, reason=f"iyzico {code}")
    message = f": {answer.error_message[:120]}" if answer.error_message else ""
    return ChargeResult(
        outcome=Outcome.PROVIDER_ERROR,
        retryable=False,
        decline_code=f"iyzico_{code}",
        reason=f"iyzico {code} {answer.error_group or ''}".rstrip() + message,
    )
