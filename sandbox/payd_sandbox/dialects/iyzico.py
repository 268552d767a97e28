"""An iyzico-shaped face of the sandbox gateway: ``/iyzico/payment/auth`` and ``/iyzico/payment/detail``.

Written from iyzico's documentation, independently of payd's iyzico adapter, so
the adapter's tests check it against the documented contract rather than
against itself. Every request must carry a valid IYZWSv2 signature made with
the sandbox key pair below and the documented body shape (stored cards only:
the sandbox never sees a card number).

iyzico keeps no idempotency keys, and neither does this dialect: each payment
request is a new charge in the core, under a fresh core key
(``<conversationId>~<random>``), with basketId as the ledger's merchant
reference. If payd ever sent an attempt twice, the ledger would show two
charges for one merchant reference.

The cardToken half of the payment method picks the outcome through the core
(``pm_ok``, ``pm_insufficient_funds``, ``pm_stolen``, ``pm_rate_limited``,
``pm_error``, ``pm_timeout``, or the mix), plus dialect tokens:
``iyz_<errorCode>`` a declined payment answered with that errorCode,
``iyz_fraud_review`` approved with fraudStatus 0, and ``iyz_garbled`` approved,
then answered with a body that is not JSON.

Answers are iyzico's: a declined payment is ``status: failure`` with its errorCode to
``/payment/auth``, but ``/payment/detail`` reports it as ``status: success`` (the
retrieval worked) with ``paymentStatus: FAILURE`` and the errorCode. Success answers
carry iyzico's response ``signature``: hex HMAC-SHA256 with the secret key over
``paymentId:currency:basketId:conversationId:paidPrice:price`` (iyzipay-python samples).
``GET /iyzico/_sandbox/details`` lists what each ``/payment/detail`` asked for
(``paymentId``, ``paymentConversationId``), for tests.

Reversals (iyzico "Refund & Cancel"): ``POST /iyzico/v2/payment/refund`` (``paymentId``,
``price``, ``currency``, ``conversationId``, ``ip``) refunds part or all of an approved
payment; ``POST /iyzico/payment/cancel`` (``paymentId``, ``conversationId``, ``ip``) reverses
the whole payment, and only on the day it was made (Turkey time, UTC+3). Both go through
the core's refund book (the ledger shows them) under a fresh key each time: iyzico keeps no
idempotency key, so a request sent twice refunds twice, as iyzico would. A refund beyond
what remains, or a cancel of a payment refunded in part, another day's payment or an
unknown one, is ``status: failure``. A payment made with the card token
``pm_refund_timeout`` records each refund, then answers only after ``hang_s``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Annotated, Final, Literal

import msgspec
from aiohttp import web

from payd_sandbox.gateway import (
    GATEWAY_KEY,
    Charge,
    ChargeRequest,
    ChargeStatus,
    Refusal,
)
from payd_sandbox.refunds import RefundBody, RefundRefusal

PREFIX: Final = "/iyzico"

# The sandbox merchant's key pair (public test values, like iyzico's own sandbox keys).
SANDBOX_API_KEY: Final = "sandbox-payd-iyzico-api-key"
SANDBOX_SECRET_KEY: Final = "sandbox-payd-iyzico-secret-key"  # noqa: S105 -- public test key
_KEY_PAIRS: Final[Mapping[str, str]] = {SANDBOX_API_KEY: SANDBOX_SECRET_KEY}

NOT_FOUND_ERROR_CODE: Final = "sandbox_payment_not_found"
"""What ``/payment/detail`` answers for a payment it has no record of. iyzico does not document
its own code for this, so the sandbox uses one no one could mistake for iyzico's."""

_ACCOUNT: Final = "iyzico"
_CURRENCY_EXPONENTS: Final[Mapping[str, int]] = {"TRY": 2, "EUR": 2, "USD": 2, "GBP": 2, "IRR": 2}
_INSTALLMENTS: Final = frozenset({1, 2, 3, 6, 9, 12})
_DECIMAL: Final = re.compile(r"^\d{1,12}(\.\d{1,8})?\Z")
_AUTH: Final = re.compile(
    r"^apiKey:(?P<api>[^&]+)&randomKey:(?P<rnd>[^&]+)&signature:(?P<sig>[0-9a-f]{64})\Z"
)

# --- the documented request shapes -----------------------------------------------------------

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Card(msgspec.Struct, rename="camel"):
    card_user_key: NonEmpty
    card_token: NonEmpty


class _Buyer(msgspec.Struct, rename="camel"):
    id: NonEmpty
    name: NonEmpty
    surname: NonEmpty
    identity_number: NonEmpty
    email: NonEmpty
    registration_address: NonEmpty
    city: NonEmpty
    country: NonEmpty
    ip: NonEmpty


class _Address(msgspec.Struct, rename="camel"):
    contact_name: NonEmpty
    city: NonEmpty
    country: NonEmpty
    address: NonEmpty


class _BasketItem(msgspec.Struct, rename="camel"):
    id: NonEmpty
    name: NonEmpty
    category1: NonEmpty
    item_type: Literal["PHYSICAL", "VIRTUAL"]
    price: str


class _Payment(msgspec.Struct, rename="camel"):
    price: str
    paid_price: str
    currency: str
    installment: int
    payment_card: _Card
    buyer: _Buyer
    billing_address: _Address
    basket_items: Annotated[list[_BasketItem], msgspec.Meta(min_length=1)]
    shipping_address: _Address | None = None
    locale: Literal["tr", "en"] = "tr"
    conversation_id: str = ""
    basket_id: str = ""
    payment_channel: Literal[
        "WEB",
        "MOBILE",
        "MOBILE_WEB",
        "MOBILE_IOS",
        "MOBILE_ANDROID",
        "MOBILE_WINDOWS",
        "MOBILE_TABLET",
        "MOBILE_PHONE",
    ] = "WEB"
    payment_group: Literal["PRODUCT", "LISTING", "SUBSCRIPTION"] = "PRODUCT"


class _Detail(msgspec.Struct, rename="camel"):
    payment_id: str = ""
    payment_conversation_id: str = ""
    conversation_id: str = ""
    locale: Literal["tr", "en"] = "tr"


_decode_payment = msgspec.json.Decoder(_Payment).decode
_decode_detail = msgspec.json.Decoder(_Detail).decode
_encode = msgspec.json.Encoder(decimal_format="number").encode

# --- what the dialect remembers --------------------------------------------------------------


class _Sent(msgspec.Struct, frozen=True):
    """What a payment request said, to answer it (and lookups of it) in iyzico's words."""

    conversation_id: str
    basket_id: str
    price: Decimal
    paid_price: Decimal
    currency: str
    card: _Card
    special: str | None  # a dialect token, if the card token was one


class _Book:
    """Core keys by conversationId and by paymentId. The core holds the charges: after a
    ``/_sandbox/reset`` its lookups find nothing, and so does the dialect."""

    def __init__(self) -> None:
        self.by_conversation: dict[str, list[str]] = {}
        self.by_payment_id: dict[str, str] = {}
        self.sent: dict[str, _Sent] = {}
        self.details: list[dict[str, str | None]] = []
        """What each ``/payment/detail`` asked for, in order."""

    def open(self, key: str, sent: _Sent) -> None:
        self.sent[key] = sent
        self.by_conversation.setdefault(sent.conversation_id, []).append(key)

    def drop(self, key: str) -> None:
        sent = self.sent.pop(key)
        keys = self.by_conversation[sent.conversation_id]
        keys.remove(key)
        if not keys:
            del self.by_conversation[sent.conversation_id]

    def find(self, detail: _Detail) -> str:
        """The core key a lookup means ("" if none): by paymentId, else the latest payment
        with that conversationId (iyzico does not say which it answers when there are more)."""
        if detail.payment_id:
            return self.by_payment_id.get(detail.payment_id, "")
        keys = self.by_conversation.get(detail.payment_conversation_id)
        return keys[-1] if keys else ""


BOOK_KEY: Final = web.AppKey("sandbox_iyzico_book", _Book)

# --- answers ---------------------------------------------------------------------------------

# errorCode -> (errorGroup, errorMessage), from iyzico's "Error Codes" pages.
_ERRORS: Final[Mapping[str, tuple[str, str]]] = {
    "10005": ("DO_NOT_HONOUR", "Transaction not approved"),
    "10012": ("INVALID_TRANSACTION", "Invalid transaction"),
    "10034": ("FRAUD_SUSPECT", "Payment failed to pass security check"),
    "10041": ("PICKUP_CARD", "Lost card, seize the card"),
    "10043": ("LOST_CARD", "Lost card, seize the card"),
    "10051": ("NOT_SUFFICIENT_FUNDS", "Insufficient card limit, insufficient balance"),
    "10054": ("EXPIRED_CARD", "Expiry date incorrect"),
    "10057": ("NOT_PERMITTED_TO_CARDHOLDER", "Cardholder cannot perform this transaction"),
    "10058": ("NOT_PERMITTED_TO_TERMINAL", "Terminal is not permitted to perform this transaction"),
    "10084": ("INVALID_CVC2", "Invalid CVC2"),
    "10204": ("UNKNOWN", "An error occurred while processing payment"),
    "10219": ("REQUEST_TIMEOUT", "Request timeout"),
    "6000": ("FRAUD", "Payment request has not passed fraud check"),
    "6001": ("FRAUD", "Card is in the black list"),
}
# The core's two decline codes, in iyzico's words.
_CORE_DECLINES: Final[Mapping[str, str]] = {"insufficient_funds": "10051", "stolen_card": "10043"}
# Dialect tokens that are not an errorCode, and the core token each charges as.
_SPECIAL_TOKENS: Final[Mapping[str, str]] = {"iyz_fraud_review": "pm_ok", "iyz_garbled": "pm_ok"}
_ERROR_TOKEN: Final = re.compile(r"^iyz_(?P<code>\d{1,6})\Z")
_GARBLED: Final = b"<html><body>upstream sent an invalid response</body></html>"


def _failure(
    code: str, message: str | None = None, *, conversation_id: str = "", status: int = 200
) -> web.Response:
    group, documented = _ERRORS.get(code, (None, "Error"))
    body = {
        "status": "failure",
        "errorCode": code,
        "errorMessage": message or documented,
        "errorGroup": group,
        "locale": "en",
        "systemTime": int(time.time() * 1000),
        "conversationId": conversation_id or None,
    }
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def _invalid(message: str, conversation_id: str = "") -> web.Response:
    return _failure("11", f"Invalid request: {message}", conversation_id=conversation_id, status=400)


def _eight(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.00000001"))  # iyzico answers amounts with 8 decimals


def _price_text(value: Decimal) -> str:
    return format(value.normalize(), "f")  # the number without a trailing ".0"


def _signature(*fields: str) -> str:
    return hmac.new(SANDBOX_SECRET_KEY.encode(), ":".join(fields).encode(), hashlib.sha256).hexdigest()


def _payment(charge: Charge, sent: _Sent, conversation_id: str) -> dict[str, object]:
    """What every answer about a payment says of it, found or failed."""
    return {
        "status": "success",
        "locale": "en",
        "systemTime": int(time.time() * 1000),
        "conversationId": conversation_id or None,
        "price": _eight(sent.price),
        "paidPrice": _eight(sent.paid_price),
        "paymentId": charge.id,
        "basketId": sent.basket_id or None,
        "currency": sent.currency,
    }


def _failed_payment(charge: Charge, sent: _Sent, conversation_id: str, code: str) -> web.Response:
    """``/payment/detail`` of a declined payment: found (``status: success``), and failed."""
    group, message = _ERRORS.get(code, (None, "Error"))
    body = _payment(charge, sent, conversation_id) | {
        "paymentStatus": "FAILURE",
        "errorCode": code,
        "errorMessage": message,
        "errorGroup": group,
    }
    return web.Response(body=_encode(body), content_type="application/json")


def _success(charge: Charge, sent: _Sent, conversation_id: str) -> web.Response:
    body = _payment(charge, sent, conversation_id) | {
        "installment": 1,
        "paymentStatus": "SUCCESS",
        "fraudStatus": 0 if sent.special == "iyz_fraud_review" else 1,
        "cardType": "CREDIT_CARD",
        "cardAssociation": "MASTER_CARD",
        "cardUserKey": sent.card.card_user_key,
        "cardToken": sent.card.card_token,
        "binNumber": "552879",
        "lastFourDigits": "0008",
        "phase": "AUTH",
        "authCode": "000000",
        "signature": _signature(
            charge.id,
            sent.currency,
            sent.basket_id,
            conversation_id,
            _price_text(sent.paid_price),
            _price_text(sent.price),
        ),
    }
    return web.Response(body=_encode(body), content_type="application/json")


def _answer(charge: Charge, sent: _Sent, conversation_id: str, *, detail: bool = False) -> web.Response:
    if charge.status is ChargeStatus.APPROVED:
        return _success(charge, sent, conversation_id)
    token = _ERROR_TOKEN.match(sent.special or "")
    code = token["code"] if token else _CORE_DECLINES.get(charge.decline_code or "", "10005")
    if detail:
        return _failed_payment(charge, sent, conversation_id, code)
    return _failure(code, conversation_id=conversation_id)


def _refused(refusal: Refusal, retry_after_s: int, conversation_id: str) -> web.Response:
    if refusal is Refusal.RATE_LIMITED:  # docs "Limiters"; the status code is the usual one
        response = _failure("50000", "Request Limit Exceeded", conversation_id=conversation_id, status=429)
        response.headers["Retry-After"] = str(retry_after_s)
        return response
    # An internal error or an injected hang: nothing was charged, and iyzico does not say so.
    status = 503 if refusal is Refusal.UNAVAILABLE else 500
    return _failure("100001", "System error", conversation_id=conversation_id, status=status)


# --- checks ----------------------------------------------------------------------------------


def _unauthenticated(request: web.Request, body: bytes) -> web.Response | None:
    """None if the IYZWSv2 signature over randomKey + uri path + body holds, else iyzico's
    answer: 200 with errorCode 1001 (unknown api key) or 1000 (invalid signature)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    try:
        params = base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        params = ""
    match = _AUTH.match(params) if scheme == "IYZWSv2" else None
    if match is None:
        return _failure("1000", "Invalid signature")
    secret = _KEY_PAIRS.get(match["api"])
    if secret is None:
        return _failure("1001", "Api credentials not found")
    if request.headers.get("x-iyzi-rnd") != match["rnd"]:
        return _failure("1000", "Invalid signature")
    path = request.path.removeprefix(PREFIX)
    expected = hmac.new(secret.encode(), match["rnd"].encode() + path.encode() + body, hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), match["sig"]):
        return _failure("1000", "Invalid signature")
    return None


def _amount(text: str, currency: str) -> Decimal | None:
    """A documented decimal amount > 0 with no more decimals than the currency has."""
    if not _DECIMAL.match(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    exponent = _CURRENCY_EXPONENTS[currency]
    if value <= 0 or (value * 10**exponent) != (value * 10**exponent).to_integral_value():
        return None
    return value


def _shape_error(payment: _Payment) -> str | None:
    """What in a decoded payment request breaks the documented rules, if anything."""
    if payment.currency not in _CURRENCY_EXPONENTS:
        return f"currency {payment.currency!r} is not one of {sorted(_CURRENCY_EXPONENTS)}"
    if payment.installment not in _INSTALLMENTS:
        return f"installment {payment.installment} is not one of {sorted(_INSTALLMENTS)}"
    amounts = [payment.price, payment.paid_price, *(item.price for item in payment.basket_items)]
    if any(_amount(text, payment.currency) is None for text in amounts):
        return "price, paidPrice and basket item prices must be decimal strings within the currency"
    if sum(Decimal(item.price) for item in payment.basket_items) != Decimal(payment.price):
        return "basket item prices must add up to price"
    physical = any(item.item_type == "PHYSICAL" for item in payment.basket_items)
    if physical and payment.shipping_address is None:
        return "shippingAddress is required with PHYSICAL basket items"
    return None


# --- handlers --------------------------------------------------------------------------------


async def _post_payment(request: web.Request) -> web.Response:
    """``POST /payment/auth``: a Non-3DS payment with a stored card."""
    gateway = request.app[GATEWAY_KEY]
    stats = gateway.arrive(_ACCOUNT)
    try:
        body = await request.read()
        refused = _unauthenticated(request, body)
        if refused is not None:
            return refused
        try:
            payment = _decode_payment(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            return _invalid(str(error))
        problem = _shape_error(payment)
        if problem is not None:
            return _invalid(problem, payment.conversation_id)
        return await _charge(request.app, payment)
    finally:
        gateway.depart(stats)


async def _charge(app: web.Application, payment: _Payment) -> web.Response:
    gateway, book = app[GATEWAY_KEY], app[BOOK_KEY]
    token = payment.payment_card.card_token
    special = token if token in _SPECIAL_TOKENS or _ERROR_TOKEN.match(token) else None
    core_token = _SPECIAL_TOKENS.get(token, "pm_stolen" if special else token)
    sent = _Sent(
        conversation_id=payment.conversation_id,
        basket_id=payment.basket_id,
        price=Decimal(payment.price),
        paid_price=Decimal(payment.paid_price),
        currency=payment.currency,
        card=payment.payment_card,
        special=special,
    )
    paid_minor = int(sent.paid_price * 10 ** _CURRENCY_EXPONENTS[payment.currency])
    charge_request = ChargeRequest(
        amount_minor=paid_minor,
        currency=payment.currency,
        payment_method=core_token,
        merchant_reference=payment.basket_id or payment.conversation_id or "-",
        customer_ref=payment.buyer.id,
    )
    # A fresh key per request: the core never treats a second request as a replay.
    key = f"{payment.conversation_id}~{secrets.token_hex(8)}"
    book.open(key, sent)  # before charging, so a lookup during a pm_timeout hang finds it
    result = await gateway.charge(account=_ACCOUNT, idempotency_key=key, request=charge_request)
    if isinstance(result, Refusal):
        book.drop(key)
        return _refused(result, gateway.retry_after_s, payment.conversation_id)
    book.by_payment_id[result.charge.id] = key
    if special == "iyz_garbled":
        return web.Response(body=_GARBLED, content_type="text/html")
    return _answer(result.charge, sent, payment.conversation_id)


async def _post_detail(request: web.Request) -> web.Response:
    """``POST /payment/detail``: a payment by paymentId or paymentConversationId."""
    gateway, book = request.app[GATEWAY_KEY], request.app[BOOK_KEY]
    body = await request.read()
    refused = _unauthenticated(request, body)
    if refused is not None:
        return refused
    try:
        detail = _decode_detail(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return _invalid(str(error))
    book.details.append(
        {"paymentId": detail.payment_id, "paymentConversationId": detail.payment_conversation_id}
    )
    if not (detail.payment_id or detail.payment_conversation_id):
        return _invalid("paymentId or paymentConversationId is required", detail.conversation_id)
    key = book.find(detail)
    charge = await gateway.lookup(key)  # counted as a lookup even when nothing matches
    sent = book.sent.get(key)
    if charge is None or sent is None:
        message = "Payment not found (sandbox)"
        return _failure(NOT_FOUND_ERROR_CODE, message, conversation_id=detail.conversation_id)
    return _answer(charge, sent, detail.conversation_id, detail=True)


async def _get_details(request: web.Request) -> web.Response:
    return web.json_response(request.app[BOOK_KEY].details)


# --- reversals --------------------------------------------------------------------------------


class _Reversal(msgspec.Struct, rename="camel"):
    """A refund (``price`` given) or cancel request; every field optional, checked below."""

    payment_id: str = ""
    conversation_id: str = ""
    ip: str = ""
    price: str | None = None
    currency: str | None = None
    locale: Literal["tr", "en"] = "tr"


_decode_reversal = msgspec.json.Decoder(_Reversal).decode
_TURKEY: Final = timezone(timedelta(hours=3))
_REVERSAL_FAILURES: Final[Mapping[RefundRefusal, str]] = {
    RefundRefusal.EXCEEDS_REMAINING: "Refund amount exceeds the refundable amount of the payment",
    RefundRefusal.NOT_REFUNDABLE: "The payment was not successful: nothing to refund",
    RefundRefusal.NOT_FOUND: "Payment not found (sandbox)",
}
# Codes of the sandbox's own, for failures iyzico documents in words only.
REVERSAL_FAILURE_CODE: Final = "sandbox_reversal_refused"
CANCEL_NOT_TODAY_CODE: Final = "sandbox_cancel_not_same_day"


def _reversed(charge: Charge, conversation_id: str, amount: Decimal, currency: str) -> web.Response:
    body = {
        "status": "success",
        "locale": "en",
        "systemTime": int(time.time() * 1000),
        "conversationId": conversation_id or None,
        "paymentId": charge.id,
        "paymentTransactionId": f"{charge.id}-1",
        "price": _eight(amount),
        "currency": currency,
        "authCode": "000000",
        "hostReference": f"host-{charge.id}",
    }
    return web.Response(body=_encode(body), content_type="application/json")


async def _reverse(request: web.Request, *, cancel: bool) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    body = await request.read()
    refused = _unauthenticated(request, body)
    if refused is not None:
        return refused
    try:
        ask = _decode_reversal(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return _invalid(str(error))
    if not ask.payment_id or not ask.ip:
        return _invalid("paymentId and ip are required", ask.conversation_id)
    charge = gateway.charge_by_id(ask.payment_id)
    if charge is None:
        return _failure(
            NOT_FOUND_ERROR_CODE, "Payment not found (sandbox)", conversation_id=ask.conversation_id
        )
    exponent = _CURRENCY_EXPONENTS[charge.currency]
    if cancel:
        made = datetime.fromtimestamp(charge.created_at, UTC).astimezone(_TURKEY).date()
        if made != datetime.now(UTC).astimezone(_TURKEY).date():
            message = "A payment can be cancelled only on the day it was made: refund it"
            return _failure(CANCEL_NOT_TODAY_CODE, message, conversation_id=ask.conversation_id)
        if gateway.refunds.refunded(charge.id):
            refusal = RefundRefusal.EXCEEDS_REMAINING  # a cancel reverses the whole payment or nothing
            return _failure(
                REVERSAL_FAILURE_CODE, _REVERSAL_FAILURES[refusal], conversation_id=ask.conversation_id
            )
        amount_minor = charge.amount_minor
    else:
        if ask.price is None or ask.currency not in (None, charge.currency):
            return _invalid("price is required, in the payment's currency", ask.conversation_id)
        value = _amount(ask.price, charge.currency)
        if value is None:
            return _invalid("price must be a decimal string within the currency", ask.conversation_id)
        amount_minor = int(value * 10**exponent)
    key = f"{ask.conversation_id}~{secrets.token_hex(8)}"  # no idempotency at iyzico
    result = await gateway.refund(
        charge, key=key, body=RefundBody(amount_minor=amount_minor, reason="cancel" if cancel else "refund")
    )
    if isinstance(result, RefundRefusal):
        message = _REVERSAL_FAILURES.get(result, result.value)
        return _failure(REVERSAL_FAILURE_CODE, message, conversation_id=ask.conversation_id)
    return _reversed(charge, ask.conversation_id, Decimal(amount_minor) / 10**exponent, charge.currency)


async def _post_refund(request: web.Request) -> web.Response:
    return await _reverse(request, cancel=False)


async def _post_cancel(request: web.Request) -> web.Response:
    return await _reverse(request, cancel=True)


def add_routes(app: web.Application) -> None:
    app[BOOK_KEY] = _Book()
    app.add_routes(
        [
            web.post(f"{PREFIX}/payment/auth", _post_payment),
            web.post(f"{PREFIX}/payment/detail", _post_detail),
            web.get(f"{PREFIX}/_sandbox/details", _get_details),
            web.post(f"{PREFIX}/v2/payment/refund", _post_refund),
            web.post(f"{PREFIX}/payment/cancel", _post_cancel),
        ]
    )
