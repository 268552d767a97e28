"""The sandbox gateway's Adyen face: Checkout ``POST /adyen/{version}/payments``.

It checks a request against the documented shape of a stored-card subscription
charge (``X-API-Key``, ``merchantAccount``, ``reference``, ``amount``, ``returnUrl``,
``paymentMethod.storedPaymentMethodId``, ``shopperReference``,
``shopperInteraction: ContAuth``, ``recurringProcessingModel: Subscription``,
``Idempotency-Key`` of at most 64 characters) and answers with Adyen's
PaymentResponse or ServiceError objects. Charges go through the shared
``Gateway`` core, so the ledger, idempotency and stats stay true: the merchant
account is the core's account, ``reference`` its merchant reference.

The core tokens (``pm_ok``, ``pm_insufficient_funds``, ``pm_stolen``,
``pm_rate_limited``, ``pm_error``, ``pm_timeout``) mean what they mean on every
face. This face adds tokens for Adyen's own answers (docs/providers/adyen.md lists
them with what payd makes of each):

- ``pm_adyen_refused_<code>``: ``Refused`` with that ``refusalReasonCode``;
  ``pm_adyen_expired`` is ``pm_adyen_refused_6``.
- ``pm_adyen_mac_<NN>``: ``Refused`` 12 (Not enough balance) carrying Mastercard
  merchant advice code NN in ``additionalData.merchantAdviceCode``.
- ``pm_adyen_result_<ResultCode>``: that ``resultCode`` (Pending, Received,
  Cancelled, Error, RedirectShopper, ...); ``pm_adyen_pending`` is Pending.
- ``pm_adyen_server_error``: charges, then answers 500 without ``transient-error``
  (a resend under the same key gets the stored Authorised answer).
- ``pm_adyen_unauthorised`` (401), ``pm_adyen_forbidden`` (403),
  ``pm_adyen_invalid`` (422), ``pm_adyen_store_unavailable`` (503 / 703,
  ``transient-error: true``): refused before processing, nothing charged.

The core knows only its own tokens, so an Adyen token is executed as the core
token with the same effect on money (``_Script.core_method``), and the Adyen
answer it stands for is remembered per idempotency key, so a replay returns
exactly the first answer, as Adyen's idempotency does.

Reversals (Checkout API v71): ``POST /adyen/{version}/payments/{pspReference}/refunds``
(``merchantAccount``, ``amount``, ``reference``) and ``.../cancels`` (``merchantAccount``,
``reference``) answer 201 ``status: received``; the reversal is executed in the core's
refund book at once (the ledger shows it), and its outcome goes out as a REFUND or
CANCELLATION notification, ``success`` "true" or "false" (a refund beyond what
remains; a cancel of a payment already captured: one made without
``captureDelayHours``, or whose delay has run out). ``POST /adyen/_sandbox/webhook``
``{"url": ..., "hmac_key": HEX}`` makes the face sign each notification (HMAC-SHA256
as Adyen documents it) and POST it to ``url`` until it answers ``[accepted]``;
``GET /adyen/_sandbox/notifications`` lists every notification made, signed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import msgspec
from aiohttp import web

from payd_sandbox.gateway import (
    GATEWAY_KEY,
    Charge,
    ChargeRequest,
    ChargeStatus,
    Refusal,
)
from payd_sandbox.refunds import Refund, RefundBody, RefundRefusal

PREFIX: Final = "/adyen"

_JSON: Final = "application/json"
_MAX_KEY: Final = 64  # Adyen: idempotency keys of at most 64 characters
_MAX_REFERENCE: Final = 80
_MIN_SHOPPER_REFERENCE: Final = 3
_MAX_RETURN_URL: Final = 8000

# --- wire types ------------------------------------------------------------------------------


class _Amount(msgspec.Struct, frozen=True):
    value: int | None = None
    currency: str | None = None


class _PaymentMethod(msgspec.Struct, frozen=True, rename="camel"):
    type: str | None = None
    stored_payment_method_id: str | None = None


class _PaymentRequest(msgspec.Struct, frozen=True, rename="camel"):
    """Every field optional, so that a missing one gets Adyen's error, not a parse failure."""

    amount: _Amount | None = None
    reference: str | None = None
    merchant_account: str | None = None
    payment_method: _PaymentMethod | None = None
    shopper_reference: str | None = None
    shopper_interaction: str | None = None
    recurring_processing_model: str | None = None
    return_url: str | None = None
    capture_delay_hours: int | None = None


class _PaymentResponse(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    psp_reference: str
    result_code: str
    amount: _Amount
    merchant_reference: str
    refusal_reason: str | None = None
    refusal_reason_code: str | None = None
    additional_data: dict[str, str] | None = None


class _ServiceError(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    status: int
    error_code: str
    message: str
    error_type: str


_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(_PaymentRequest).decode

# --- Adyen's tables (as Adyen documents them, independent of payd's adapter) -----------------

_REFUSAL_REASONS: Final[Mapping[str, str]] = {
    "2": "Refused",
    "3": "Referral",
    "4": "Acquirer Error",
    "5": "Blocked Card",
    "6": "Expired Card",
    "7": "Invalid Amount",
    "8": "Invalid Card Number",
    "9": "Issuer Unavailable",
    "10": "Not supported",
    "11": "3D Not Authenticated",
    "12": "Not enough balance",
    "14": "Acquirer Fraud",
    "15": "Cancelled",
    "16": "Shopper Cancelled",
    "17": "Invalid Pin",
    "18": "Pin tries exceeded",
    "19": "Pin validation not possible",
    "20": "FRAUD",
    "21": "Not Submitted",
    "22": "FRAUD-CANCELLED",
    "23": "Transaction Not Permitted",
    "24": "CVC Declined",
    "25": "Restricted Card",
    "26": "Revocation Of Auth",
    "27": "Declined Non Generic",
    "28": "Withdrawal amount exceeded",
    "29": "Withdrawal count exceeded",
    "31": "Issuer Suspected Fraud",
    "32": "AVS Declined",
    "33": "Card requires online pin",
    "34": "No checking account available on Card",
    "35": "No savings account available on Card",
    "36": "Mobile pin required",
    "37": "Contactless fallback",
    "38": "Authentication required",
    "39": "RReq not received from DS",
    "40": "Current AID is in Penalty Box.",
    "41": "CVM Required Restart Payment",
    "42": "3DS Authentication Error",
    "46": "Transaction blocked by Adyen to prevent excessive retry fees",
}

_MERCHANT_ADVICE: Final[Mapping[str, str]] = {
    "01": "New account information available",
    "02": "Cannot approve at this time, try again later",
    "03": "Do not try again",
    "04": "Token requirements not fulfilled for this token type",
    "21": "Payment cancellation",
    "22": "Merchant does not qualify for product code",
    "24": "Retry after 1 hour",
    "25": "Retry after 24 hours",
    "26": "Retry after 2 days",
    "27": "Retry after 4 days",
    "28": "Retry after 6 days",
    "29": "Retry after 8 days",
    "30": "Retry after 10 days",
    "40": "Consumer non-reloadable prepaid card",
    "41": "Consumer single-use virtual card number",
    "43": "Consumer multi-use virtual card number",
}

# resultCode -> the core token with the same effect on money. Answers that are not final
# (Pending, Received) or moved money in part count as charged: the strictest assumption.
_RESULT_CORE_TOKENS: Final[Mapping[str, str]] = {
    "Authorised": "pm_ok",
    "Pending": "pm_ok",
    "Received": "pm_ok",
    "PartiallyAuthorised": "pm_ok",
    "Refused": "pm_stolen",
    "Cancelled": "pm_stolen",
    "Error": "pm_stolen",
    "RedirectShopper": "pm_stolen",
    "IdentifyShopper": "pm_stolen",
    "ChallengeShopper": "pm_stolen",
    "PresentToShopper": "pm_stolen",
}


class _Script(msgspec.Struct, frozen=True, kw_only=True):
    """The Adyen answer an Adyen token stands for."""

    core_method: str
    result_code: str
    refusal_code: str | None = None
    advice: str | None = None
    fail_status: int | None = None
    """Answer this error instead of the result the first time (the charge still happened)."""


class _Rejection(msgspec.Struct, frozen=True):
    """Refused before processing: nothing charged, nothing stored under the key."""

    status: int
    error_code: str
    message: str
    error_type: str
    transient: bool = False


_REJECTIONS: Final[Mapping[str, _Rejection]] = {
    "pm_adyen_unauthorised": _Rejection(401, "000", "HTTP Status Response - Unauthorized", "security"),
    "pm_adyen_forbidden": _Rejection(403, "010", "Not allowed", "security"),
    "pm_adyen_invalid": _Rejection(422, "000", "paymentDetails not supplied", "validation"),
    "pm_adyen_store_unavailable": _Rejection(
        503, "703", "required resource temporarily unavailable", "internal", transient=True
    ),
}

_ALIASES: Final[Mapping[str, str]] = {
    "pm_adyen_expired": "pm_adyen_refused_6",
    "pm_adyen_pending": "pm_adyen_result_Pending",
}
_REFUSED_TOKEN: Final = re.compile(r"^pm_adyen_refused_([0-9]{1,3})\Z")
_ADVICE_TOKEN: Final = re.compile(r"^pm_adyen_mac_([0-9]{2})\Z")
_RESULT_TOKEN: Final = re.compile(r"^pm_adyen_result_([A-Za-z]+)\Z")
_SERVER_ERROR: Final = _Script(core_method="pm_ok", result_code="Authorised", fail_status=500)


def _script(method_id: str) -> _Script | None:
    """The Adyen answer a token asks for, or None for a core (or unscripted) token."""
    method_id = _ALIASES.get(method_id, method_id)
    if method_id == "pm_adyen_server_error":
        return _SERVER_ERROR
    if match := _REFUSED_TOKEN.match(method_id):
        code = match.group(1)
        core = "pm_insufficient_funds" if code == "12" else "pm_stolen"
        return _Script(core_method=core, result_code="Refused", refusal_code=code)
    if (match := _ADVICE_TOKEN.match(method_id)) and match.group(1) in _MERCHANT_ADVICE:
        mac = match.group(1)
        return _Script(
            core_method="pm_insufficient_funds", result_code="Refused", refusal_code="12", advice=mac
        )
    if (match := _RESULT_TOKEN.match(method_id)) and match.group(1) in _RESULT_CORE_TOKENS:
        result = match.group(1)
        return _Script(core_method=_RESULT_CORE_TOKENS[result], result_code=result)
    return None


# The core's own verdicts, as Adyen would word them.
_CORE_DECLINES: Final[Mapping[str | None, tuple[str, str]]] = {
    "insufficient_funds": ("12", "51 : Insufficient funds/over credit limit"),
    "stolen_card": ("5", "43 : Stolen card, pick up"),
}


def _scripted_body(script: _Script, charge: Charge) -> _PaymentResponse:
    code = script.refusal_code
    additional = (
        {"merchantAdviceCode": f"{script.advice}: {_MERCHANT_ADVICE[script.advice]}"}
        if script.advice
        else None
    )
    return _PaymentResponse(
        psp_reference=_psp_reference(charge),
        result_code=script.result_code,
        amount=_Amount(charge.amount_minor, charge.currency),
        merchant_reference=charge.merchant_reference,
        refusal_reason=_REFUSAL_REASONS.get(code, "Refused") if code else None,
        refusal_reason_code=code,
        additional_data=additional,
    )


def _core_body(charge: Charge) -> _PaymentResponse:
    if charge.status is ChargeStatus.APPROVED:
        return _PaymentResponse(
            psp_reference=_psp_reference(charge),
            result_code="Authorised",
            amount=_Amount(charge.amount_minor, charge.currency),
            merchant_reference=charge.merchant_reference,
        )
    code, raw = _CORE_DECLINES.get(charge.decline_code, ("2", "05 : Do not honour"))
    return _PaymentResponse(
        psp_reference=_psp_reference(charge),
        result_code="Refused",
        amount=_Amount(charge.amount_minor, charge.currency),
        merchant_reference=charge.merchant_reference,
        refusal_reason=_REFUSAL_REASONS[code],
        refusal_reason_code=code,
        additional_data={"refusalReasonRaw": raw},
    )


def _psp_reference(charge: Charge) -> str:
    """Adyen's 16-character reference, derived from the core's id so a replay repeats it."""
    return charge.id.removeprefix("ch_")[:16].upper()


# --- answers -----------------------------------------------------------------------------


def _json(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _error(
    status: int, code: str, message: str, kind: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = _encode(_ServiceError(status=status, error_code=code, message=message, error_type=kind))
    return _json(status, body, headers)


def _invalid(message: str, code: str = "000") -> web.Response:
    return _error(422, code, message, "validation")


_TRANSIENT: Final[Mapping[str, str]] = {"transient-error": "true"}
_IDEMPOTENCY_IN_PROGRESS: Final = "request already processed or in progress"


def _refusal_answer(refusal: Refusal, retry_after_s: int) -> web.Response:
    if refusal is Refusal.RATE_LIMITED:
        headers = {"Retry-After": str(retry_after_s)}
        return _error(429, "000", f"Too many requests, retry after {retry_after_s} s", "internal", headers)
    if refusal is Refusal.IDEMPOTENCY_CONFLICT:
        return _error(409, "704", _IDEMPOTENCY_IN_PROGRESS, "validation")
    if refusal is Refusal.IDEMPOTENCY_MISMATCH:
        return _error(422, "704", _IDEMPOTENCY_IN_PROGRESS, "validation")
    # API_ERROR and UNAVAILABLE: nothing processed, which Adyen says with transient-error.
    status = 503 if refusal is Refusal.UNAVAILABLE else 500
    return _error(status, "000", "sandbox: internal error, nothing processed", "internal", _TRANSIENT)


def _shape_problem(payment: _PaymentRequest) -> web.Response | None:
    """Adyen's 422 for the first way the request differs from a ContAuth stored-card charge."""
    amount = payment.amount
    if amount is None or amount.value is None or amount.currency is None:
        return _invalid("Required object 'amount' is not provided.", "100")
    if amount.value <= 0:
        return _invalid("Invalid amount specified", "137")
    if not re.fullmatch(r"[A-Z]{3}", amount.currency):
        return _invalid("Invalid currency code")
    if not payment.merchant_account:
        return _invalid("Invalid Merchant Account", "901")
    if not payment.reference or len(payment.reference) > _MAX_REFERENCE:
        return _invalid(f"Field 'reference' is required and holds at most {_MAX_REFERENCE} characters")
    if not payment.return_url:
        # Required on every PaymentRequest (Checkout API v71 OpenAPI); live Adyen: 422 14_030.
        return _invalid("Required field 'returnUrl' is not provided.", "14_030")
    if len(payment.return_url) > _MAX_RETURN_URL:
        return _invalid(f"Field 'returnUrl' holds at most {_MAX_RETURN_URL} characters")
    method = payment.payment_method
    if method is None or not method.stored_payment_method_id:
        return _invalid("paymentDetails not supplied")
    if method.type != "scheme":
        return _invalid("sandbox: paymentMethod.type must be scheme for a stored card")
    if not payment.shopper_reference or len(payment.shopper_reference) < _MIN_SHOPPER_REFERENCE:
        return _invalid("Recurring payments require a shopperReference")
    if payment.shopper_interaction != "ContAuth":
        return _invalid("sandbox: shopperInteraction must be ContAuth for a merchant-initiated charge")
    if payment.recurring_processing_model != "Subscription":
        return _invalid("sandbox: recurringProcessingModel must be Subscription")
    return None


_SCRIPTS_KEY: Final = web.AppKey("adyen_scripts", dict[str, _Script])


async def _post_payments(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    try:
        payment = _decode_request(await request.read()) if request.content_type == _JSON else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        payment = None
    account = (payment.merchant_account if payment else None) or "adyen"
    stats = gateway.arrive(account)
    try:
        if not request.headers.get("X-API-Key"):
            return _error(401, "000", "HTTP Status Response - Unauthorized", "security")
        if payment is None:
            return _error(400, "000", "Unable to parse message", "validation")
        given_key = request.headers.get("Idempotency-Key")
        if given_key is not None and not 0 < len(given_key) <= _MAX_KEY:
            return _invalid(f"Idempotency-Key must hold 1-{_MAX_KEY} characters")
        problem = _shape_problem(payment)
        if problem is not None:
            return problem
        assert payment.payment_method is not None and payment.amount is not None  # checked above
        token = payment.payment_method.stored_payment_method_id or ""
        rejection = _REJECTIONS.get(token)
        if rejection is not None:
            headers = _TRANSIENT if rejection.transient else None
            return _error(
                rejection.status, rejection.error_code, rejection.message, rejection.error_type, headers
            )
        # Without the header Adyen processes the request without idempotency.
        key = given_key or "adyen-unkeyed-" + secrets.token_hex(16)
        script = _script(token)
        result = await gateway.charge(
            account=account,
            idempotency_key=key,
            request=ChargeRequest(
                amount_minor=payment.amount.value or 0,
                currency=payment.amount.currency or "",
                payment_method=script.core_method if script else token,
                merchant_reference=payment.reference or "",
                customer_ref=payment.shopper_reference,
            ),
        )
        if isinstance(result, Refusal):
            return _refusal_answer(result, gateway.retry_after_s)
        scripts = request.app[_SCRIPTS_KEY]
        if result.replayed:
            script = scripts.get(key)  # the first answer, whatever this request's token
        elif script is None:
            scripts.pop(key, None)  # a key reused after /_sandbox/reset
        else:
            scripts[key] = script
            if script.fail_status is not None:
                return _error(
                    script.fail_status, "000", "sandbox: internal error after processing", "internal"
                )
        body = _scripted_body(script, result.charge) if script else _core_body(result.charge)
        _note_capture(request.app, payment, result.charge, replayed=result.replayed)
        headers = {"Idempotency-Key": given_key} if given_key else None
        return _json(200, _encode(body), headers)
    finally:
        gateway.depart(stats)


# --- reversals and notifications ---------------------------------------------------------------


class _ModificationRequest(msgspec.Struct, frozen=True, rename="camel"):
    """PaymentRefundRequest / PaymentCancelRequest, every field optional (Adyen's 422 if missing)."""

    merchant_account: str | None = None
    amount: _Amount | None = None
    reference: str | None = None


class _ModificationResponse(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    merchant_account: str
    payment_psp_reference: str
    psp_reference: str
    status: str
    reference: str | None = None
    amount: _Amount | None = None


class _Webhook(msgspec.Struct, kw_only=True):
    url: str | None = None
    hmac_key: str | None = None


class _Modifications(msgspec.Struct, kw_only=True):
    """The face's own records: Adyen's answer per modification key, and every notification."""

    answers: dict[str, tuple[str, int | None, bytes]] = msgspec.field(default_factory=dict)
    notifications: list[dict[str, Any]] = msgspec.field(default_factory=list)
    webhook: _Webhook = msgspec.field(default_factory=_Webhook)
    deliveries: set[asyncio.Task[None]] = msgspec.field(default_factory=set)


_decode_modification = msgspec.json.Decoder(_ModificationRequest).decode
_decode_webhook = msgspec.json.Decoder(_Webhook).decode
_CAPTURES_KEY: Final = web.AppKey("adyen_captures", dict[str, float])
"""pspReference -> when the payment is captured, for payments made with ``captureDelayHours``."""
_MODIFICATIONS_KEY: Final = web.AppKey("adyen_modifications", _Modifications)
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


def _sign(item: Mapping[str, Any], hex_key: str) -> str:
    """Adyen's notification HMAC: base64 HMAC-SHA256 (hex-decoded key) of the fields joined by ':'."""
    values = {**item, "value": item["amount"]["value"], "currency": item["amount"]["currency"]}
    signing = ":".join(str(values.get(name, "")) for name in _SIGNED_FIELDS)
    digest = hmac.new(bytes.fromhex(hex_key), signing.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _modification_reference(key: str) -> str:
    """A modification's own pspReference, the same for every replay of its key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16].upper()


def _find_payment(request: web.Request, psp: str) -> Charge | None:
    for charge in request.app[GATEWAY_KEY].ledger():
        if _psp_reference(charge) == psp:
            return charge
    return None


async def _deliver(app: web.Application, item: dict[str, Any]) -> None:
    """POST one notification to the registered webhook until it answers ``[accepted]``."""
    webhook = app[_MODIFICATIONS_KEY].webhook
    if webhook.url is None:
        return
    body = {"live": "false", "notificationItems": [{"NotificationRequestItem": item}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for attempt in range(8):
            try:
                async with session.post(webhook.url, json=body) as response:
                    if (await response.read()) == b"[accepted]":
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2 * 2**attempt)


def _notify(app: web.Application, item: dict[str, Any]) -> None:
    records = app[_MODIFICATIONS_KEY]
    if records.webhook.hmac_key:
        item["additionalData"] = {"hmacSignature": _sign(item, records.webhook.hmac_key)}
    records.notifications.append(item)
    if records.webhook.url is not None:
        task = asyncio.create_task(_deliver(app, item))
        records.deliveries.add(task)
        task.add_done_callback(records.deliveries.discard)


def _note_capture(app: web.Application, payment: _PaymentRequest, charge: Charge, *, replayed: bool) -> None:
    """Remember when a payment made with ``captureDelayHours`` is captured (until then: voidable)."""
    if payment.capture_delay_hours and not replayed:
        app[_CAPTURES_KEY][_psp_reference(charge)] = charge.created_at + payment.capture_delay_hours * 3600.0


def _captured(request: web.Request, charge: Charge) -> bool:
    captures_at = request.app[_CAPTURES_KEY].get(_psp_reference(charge))
    return captures_at is None or time.time() >= captures_at


_REFUND_FAILURES: Final[Mapping[RefundRefusal, str]] = {
    RefundRefusal.EXCEEDS_REMAINING: "Insufficient in-process funds on paymentPspReference",
    RefundRefusal.NOT_REFUNDABLE: "Transaction not refundable: the payment was not authorised",
    RefundRefusal.NOT_FOUND: "Original pspReference not found",
}


def _modification_problem(
    body: _ModificationRequest, given_key: str | None, *, cancel: bool
) -> web.Response | None:
    """Adyen's answer to the first way a refund or cancel request is off its documented shape."""
    if given_key is not None and not 0 < len(given_key) <= _MAX_KEY:
        return _invalid(f"Idempotency-Key must hold 1-{_MAX_KEY} characters")
    if not body.merchant_account:
        return _invalid("Invalid Merchant Account", "901")
    if body.reference is not None and len(body.reference) > _MAX_REFERENCE:
        return _invalid(f"Field 'reference' holds at most {_MAX_REFERENCE} characters")
    if cancel:
        return None
    if body.amount is None or body.amount.value is None or body.amount.currency is None:
        return _invalid("Required object 'amount' is not provided.", "100")
    if body.amount.value <= 0:
        return _invalid("Invalid amount specified", "137")
    return None


async def _modify(request: web.Request, *, cancel: bool) -> web.Response:
    records = request.app[_MODIFICATIONS_KEY]
    psp = request.match_info["psp"]
    if not request.headers.get("X-API-Key"):
        return _error(401, "000", "HTTP Status Response - Unauthorized", "security")
    try:
        body = _decode_modification(await request.read())
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _error(400, "000", "Unable to parse message", "validation")
    given_key = request.headers.get("Idempotency-Key")
    problem = _modification_problem(body, given_key, cancel=cancel)
    if problem is not None:
        return problem
    charge = _find_payment(request, psp)
    if charge is None:
        return _invalid("Original pspReference required for this operation", "167")
    amount = charge.amount_minor if cancel else (body.amount.value if body.amount else None) or 0
    if not cancel and body.amount is not None and body.amount.currency != charge.currency:
        return _invalid("Currency of modification does not match the payment", "128")
    key = given_key or "adyen-unkeyed-" + secrets.token_hex(16)
    operation = "cancels" if cancel else "refunds"
    earlier = records.answers.get(key)
    if earlier is not None:
        if earlier[:2] != (f"{operation}/{psp}", None if cancel else amount):
            return _error(422, "704", _IDEMPOTENCY_IN_PROGRESS, "validation")
        return _json(201, earlier[2], {"Idempotency-Key": given_key} if given_key else None)
    answer = _encode(
        _ModificationResponse(
            merchant_account=body.merchant_account or "",
            payment_psp_reference=psp,
            psp_reference=_modification_reference(key),
            status="received",
            reference=body.reference,
            amount=None if cancel else _Amount(amount, charge.currency),
        )
    )
    outcome = await _execute(request, charge, key, amount, cancel=cancel)
    if outcome is RefundRefusal.IDEMPOTENCY_CONFLICT:
        return _error(409, "704", _IDEMPOTENCY_IN_PROGRESS, "validation")
    if outcome is RefundRefusal.IDEMPOTENCY_MISMATCH:
        return _error(422, "704", _IDEMPOTENCY_IN_PROGRESS, "validation")
    if isinstance(outcome, RefundRefusal):  # a StrEnum: tested before plain str
        failure: str | None = _REFUND_FAILURES.get(outcome, outcome.value)
    else:
        failure = outcome if isinstance(outcome, str) else None
    records.answers[key] = (f"{operation}/{psp}", None if cancel else amount, answer)
    if not (isinstance(outcome, tuple) and outcome[1]):  # a replay in the core: notified already
        _notify(
            request.app,
            {
                "pspReference": _modification_reference(key),
                "originalReference": psp,
                "merchantAccountCode": body.merchant_account,
                "merchantReference": body.reference or "",
                "amount": {"value": amount, "currency": charge.currency},
                "eventCode": "CANCELLATION" if cancel else "REFUND",
                "eventDate": datetime.now(UTC).isoformat(timespec="seconds"),
                "success": "false" if failure else "true",
                "reason": failure or "",
                "paymentMethod": "visa",
            },
        )
    return _json(201, answer, {"Idempotency-Key": given_key} if given_key else None)


_ALREADY_CAPTURED: Final = "Payment already captured: refund it instead"


async def _execute(
    request: web.Request, charge: Charge, key: str, amount: int, *, cancel: bool
) -> tuple[Refund, bool] | RefundRefusal | str:
    """The reversal in the core's refund book (the ledger shows it), or why it failed."""
    if cancel and _captured(request, charge):
        return _ALREADY_CAPTURED
    gateway = request.app[GATEWAY_KEY]
    if cancel and gateway.refunds.refunded(charge.id):
        return RefundRefusal.EXCEEDS_REMAINING  # a cancel reverses the whole payment or nothing
    reason = "cancel" if cancel else "refund"
    return await gateway.refund(charge, key=key, body=RefundBody(amount_minor=amount, reason=reason))


async def _post_refunds(request: web.Request) -> web.Response:
    return await _modify(request, cancel=False)


async def _post_cancels(request: web.Request) -> web.Response:
    return await _modify(request, cancel=True)


async def _post_webhook(request: web.Request) -> web.Response:
    try:
        webhook = _decode_webhook(await request.read())
        if webhook.hmac_key is not None:
            bytes.fromhex(webhook.hmac_key)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as error:
        return _json(400, _encode({"error": f"invalid webhook settings: {error}"}))
    request.app[_MODIFICATIONS_KEY].webhook = webhook
    return _json(200, _encode({"url": webhook.url, "signed": webhook.hmac_key is not None}))


async def _get_notifications(request: web.Request) -> web.Response:
    return _json(200, _encode({"notifications": request.app[_MODIFICATIONS_KEY].notifications}))


async def _stop_deliveries(app: web.Application) -> None:
    for task in list(app[_MODIFICATIONS_KEY].deliveries):
        task.cancel()


def add_routes(app: web.Application) -> None:
    app[_SCRIPTS_KEY] = {}
    app[_CAPTURES_KEY] = {}
    app[_MODIFICATIONS_KEY] = _Modifications()
    app.on_shutdown.append(_stop_deliveries)
    app.add_routes(
        [
            web.post(PREFIX + r"/{version:v[0-9]+}/payments", _post_payments),
            web.post(PREFIX + r"/{version:v[0-9]+}/payments/{psp}/refunds", _post_refunds),
            web.post(PREFIX + r"/{version:v[0-9]+}/payments/{psp}/cancels", _post_cancels),
            web.post(PREFIX + "/_sandbox/webhook", _post_webhook),
            web.get(PREFIX + "/_sandbox/notifications", _get_notifications),
        ]
    )
