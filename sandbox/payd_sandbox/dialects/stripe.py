"""Stripe-shaped routes on the sandbox core, under ``/stripe``.

What a Stripe adapter is tested against: ``POST /v1/payment_intents`` (create and confirm
in one call), ``GET /v1/payment_intents`` (list), ``GET /v1/payment_intents/search`` and
``GET /v1/payment_intents/{id}``, with Stripe's request checks (API key, form encoding,
documented parameters, ``Stripe-Version``) and Stripe's response objects and error bodies.
The core ``Gateway`` executes every charge, so its ledger, idempotency and stats stay true.

The payment method token picks the outcome. The core's tokens (``pm_ok``,
``pm_insufficient_funds``, ``pm_stolen``, ``pm_rate_limited``, ``pm_error``,
``pm_timeout``) keep their meaning; the ``pm_stripe_*`` tokens in ``TOKENS`` produce the
rest of Stripe's answers (decline and advice codes, Mastercard advice, PaymentIntent
statuses, lock timeouts). The core cannot record a decline code of the dialect's choosing,
so a ``pm_stripe_*`` decline is executed by the core as ``pm_insufficient_funds`` or
``pm_stolen`` (its ledger row shows that token's decline code) and answered with the
Stripe codes of the token. Other tokens roll the core's mix.

Sandbox conventions (not Stripe's): any ``sk_``/``rk_`` key of the right shape is valid;
a key containing ``_readonly`` lacks write permission (403); ``Idempotency-Key`` is
required (the core charges by key); ``confirm=true`` and a ``payment_method`` with its
``customer`` are required (only saved-card charges are modelled); the ledger's merchant
reference is ``metadata[payd_reference]``, or the idempotency key without it. The
idempotency check compares the whole form once a key has executed, like Stripe's.

API versions: a request without ``Stripe-Version`` is answered in the account's default
version, ``ACCOUNT_DEFAULT_VERSION`` (an older one, as on long-standing accounts). Error
objects of versions before ``2024-12-18.acacia`` lack ``advice_code``,
``network_advice_code`` and ``network_decline_code`` (Stripe changelog, "Network advice
and decline codes", 2024-12-18.acacia), so a client that pins no version loses them.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import msgspec
from aiohttp import web

from payd_sandbox.gateway import (
    GATEWAY_KEY,
    Charge,
    ChargeRequest,
    ChargeStatus,
    Executed,
    Gateway,
    Refusal,
)
from payd_sandbox.refunds import Refund, RefundBody, RefundRefusal

PREFIX: Final = "/stripe"

# --- scenarios ----------------------------------------------------------------------------


class CardDecline(msgspec.Struct, frozen=True, kw_only=True):
    """The Stripe card error a declined token answers with."""

    code: str = "card_declined"
    decline_code: str | None = None
    advice_code: str | None = None
    network_advice_code: str | None = None
    network_decline_code: str | None = None
    brand: str = "visa"


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    executes_as: str
    """The core token that executes it: decides approved, declined or a refusal."""
    decline: CardDecline | None = None
    intent_status: str | None = None
    """Answer 200 with this PaymentIntent status instead of ``succeeded`` or a 402."""
    on_session_status: str | None = None
    """The status when ``off_session`` is not true (an on-session customer could act)."""
    lock_timeout: bool = False
    """Answer 429 ``lock_timeout`` without executing (the object was locked)."""


def _declined(executes_as: str, **decline: str) -> Scenario:
    return Scenario(executes_as=executes_as, decline=CardDecline(**decline))


_SOFT: Final = "pm_insufficient_funds"
_HARD: Final = "pm_stolen"

TOKENS: Final[Mapping[str, Scenario]] = {
    "pm_insufficient_funds": _declined(_SOFT, decline_code="insufficient_funds"),
    "pm_stolen": _declined(_HARD, decline_code="stolen_card"),
    "pm_stripe_do_not_honor": _declined(_SOFT, decline_code="do_not_honor"),
    "pm_stripe_generic_decline": _declined(_SOFT, decline_code="generic_decline"),
    "pm_stripe_lost_card": _declined(_HARD, decline_code="lost_card"),
    "pm_stripe_pickup_card": _declined(_HARD, decline_code="pickup_card"),
    "pm_stripe_fraudulent": _declined(_HARD, decline_code="fraudulent"),
    "pm_stripe_expired_card": _declined(_HARD, code="expired_card"),
    "pm_stripe_processing_error": _declined(_SOFT, code="processing_error"),
    "pm_stripe_decline_rate_limited": _declined(_SOFT, code="card_decline_rate_limit_exceeded"),
    "pm_stripe_duplicate_transaction": _declined(_HARD, decline_code="duplicate_transaction"),
    "pm_stripe_unknown_decline": _declined(_SOFT, decline_code="a_code_stripe_adds_tomorrow"),
    "pm_stripe_try_again_later": _declined(
        _SOFT, decline_code="generic_decline", advice_code="try_again_later"
    ),
    "pm_stripe_do_not_try_again": _declined(
        _HARD, decline_code="insufficient_funds", advice_code="do_not_try_again"
    ),
    "pm_stripe_confirm_card_data": _declined(
        _HARD, decline_code="generic_decline", advice_code="confirm_card_data"
    ),
    "pm_stripe_mac_01": _declined(
        _SOFT,
        decline_code="do_not_honor",
        network_advice_code="01",
        network_decline_code="05",
        brand="mastercard",
    ),
    "pm_stripe_mac_02": _declined(
        _SOFT,
        decline_code="insufficient_funds",
        network_advice_code="02",
        network_decline_code="51",
        brand="mastercard",
    ),
    "pm_stripe_mac_03": _declined(
        _HARD,
        decline_code="insufficient_funds",
        network_advice_code="03",
        network_decline_code="51",
        brand="mastercard",
    ),
    "pm_stripe_mac_04": _declined(
        _HARD,
        decline_code="do_not_honor",
        network_advice_code="04",
        network_decline_code="05",
        brand="mastercard",
    ),
    "pm_stripe_mac_03_visa": _declined(
        _SOFT, decline_code="insufficient_funds", network_advice_code="03", network_decline_code="51"
    ),
    "pm_stripe_mac_21": _declined(
        _HARD,
        decline_code="do_not_honor",
        network_advice_code="21",
        network_decline_code="05",
        brand="mastercard",
    ),
    "pm_stripe_mac_24": _declined(
        _SOFT,
        decline_code="insufficient_funds",
        network_advice_code="24",
        network_decline_code="51",
        brand="mastercard",
    ),
    "pm_stripe_mac_30": _declined(
        _SOFT,
        decline_code="insufficient_funds",
        network_advice_code="30",
        network_decline_code="51",
        brand="mastercard",
    ),
    # Stripe fails an off-session confirmation that needs 3-D Secure with a 402; on-session
    # the PaymentIntent waits for the customer in requires_action.
    "pm_stripe_authentication_required": Scenario(
        executes_as=_HARD,
        decline=CardDecline(code="authentication_required", decline_code="authentication_required"),
        on_session_status="requires_action",
    ),
    "pm_stripe_requires_action": Scenario(executes_as=_HARD, intent_status="requires_action"),
    "pm_stripe_processing": Scenario(executes_as="pm_ok", intent_status="processing"),
    "pm_stripe_lock_timeout": Scenario(executes_as="pm_ok", lock_timeout=True),
}

# What a core decline looks like when no scenario names the token (the core's mix).
_CORE_DECLINES: Final[Mapping[str | None, CardDecline]] = {
    "insufficient_funds": CardDecline(decline_code="insufficient_funds"),
    "stolen_card": CardDecline(decline_code="stolen_card"),
}

# --- state of the dialect (per application) -----------------------------------------------


class _Intent(msgspec.Struct, kw_only=True):
    """What Stripe keeps of a create request that the core has no field for."""

    form: tuple[tuple[str, str], ...]
    token: str
    customer: str
    description: str | None
    metadata: dict[str, str]
    payment_method_types: list[str]
    off_session: bool
    executed: bool = False


class _RefundForm(msgspec.Struct, frozen=True, kw_only=True):
    """What Stripe keeps of a refund request that the core's refund has no field for."""

    form: tuple[tuple[str, str], ...]
    payment_intent: str | None
    reason: str | None
    metadata: dict[str, str]


class _State:
    def __init__(self) -> None:
        self.intents: dict[str, _Intent] = {}  # by idempotency key, in creation order
        self.keys_of_ids: dict[str, str] = {}  # PaymentIntent id -> idempotency key
        self.refund_forms: dict[str, _RefundForm] = {}  # by the refund's idempotency key


_STATE_KEY: Final = web.AppKey("stripe_dialect_state", _State)

# --- request checks -----------------------------------------------------------------------

_JSON: Final = "application/json"
_FORM: Final = "application/x-www-form-urlencoded"
_MAX_KEY_LENGTH: Final = 255  # Stripe: "Idempotency keys are up to 255 characters long"
_API_KEY: Final = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]{4,}\Z")
_API_VERSION: Final = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?\Z")
_METADATA: Final = re.compile(r"^metadata\[([^\[\]]{1,40})\]\Z")
_LISTED: Final = re.compile(r"^(payment_method_types|expand)\[(\d+)\]\Z")
_CURRENCY: Final = re.compile(r"^[a-z]{3}\Z")
_OFF_SESSION: Final = frozenset({"true", "false", "one_off", "recurring"})
_BOOLEANS: Final = frozenset({"true", "false"})
_MAX_AMOUNT: Final = 99_999_999  # Stripe: "supports up to eight digits"
# Documented create parameters the dialect accepts; it acts on the first seven.
_PARAMETERS: Final = frozenset(
    {
        "amount",
        "currency",
        "customer",
        "payment_method",
        "confirm",
        "off_session",
        "description",
        "capture_method",
        "error_on_requires_action",
        "receipt_email",
        "return_url",
        "setup_future_usage",
        "statement_descriptor_suffix",
    }
)


class _Refused(Exception):
    """A request Stripe would refuse: status and error object."""

    def __init__(self, status: int, error: dict[str, object]) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = error


def _invalid(message: str, *, param: str | None = None, code: str | None = None) -> _Refused:
    error: dict[str, object] = {"type": "invalid_request_error", "message": message}
    if param is not None:
        error["param"] = param
    if code is not None:
        error["code"] = code
    return _Refused(400, error)


class _Form(msgspec.Struct, kw_only=True):
    amount: int
    currency: str
    customer: str
    payment_method: str
    off_session: bool
    description: str | None
    metadata: dict[str, str]
    payment_method_types: list[str]


def _authenticate(request: web.Request, *, write: bool) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    key = credentials.strip()
    if scheme.lower() == "basic":  # curl -u sk_test_...: sends the key as the user name
        try:
            key = base64.b64decode(key, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            key = ""
    elif scheme.lower() != "bearer":
        key = ""
    if not key:
        message = "You did not provide an API key. Provide it in the Authorization header (Bearer auth)."
        raise _Refused(401, {"type": "invalid_request_error", "message": message})
    if not _API_KEY.match(key):
        shown = f"{key[:8]}****{key[-4:]}" if len(key) > 12 else "****"
        raise _Refused(
            401, {"type": "invalid_request_error", "message": f"Invalid API Key provided: {shown}"}
        )
    if write and "_readonly" in key:
        message = "The provided key does not have the required permissions for this endpoint."
        raise _Refused(403, {"type": "invalid_request_error", "message": message})
    version = request.headers.get("Stripe-Version")
    if version is not None and not _API_VERSION.match(version):
        raise _invalid(f"Invalid Stripe API version: {version}", code="api_version_invalid")


def _split(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """Plain parameters, ``metadata[...]`` and ``name[N]`` lists; unknown names are refused."""
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    listed: dict[str, dict[int, str]] = {}
    for name, value in pairs:
        if (match := _METADATA.match(name)) is not None:
            if len(value) > 500:
                raise _invalid("Metadata values can have up to 500 characters.", param=name)
            metadata[match.group(1)] = value
        elif (match := _LISTED.match(name)) is not None:
            listed.setdefault(match.group(1), {})[int(match.group(2))] = value
        elif name in _PARAMETERS:
            fields[name] = value
        else:
            raise _invalid(f"Received unknown parameter: {name}", param=name, code="parameter_unknown")
    lists = {name: [value for _, value in sorted(items.items())] for name, items in listed.items()}
    return fields, metadata, lists


def _parse_form(pairs: list[tuple[str, str]]) -> _Form:
    fields, metadata, lists = _split(pairs)
    if len(metadata) > 50:
        raise _invalid("You can have up to 50 metadata keys.", param="metadata")
    for name in ("amount", "currency", "payment_method"):
        if not fields.get(name):
            raise _invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")
    amount = fields["amount"]
    if not amount.isdecimal() or not 1 <= int(amount) <= _MAX_AMOUNT:
        raise _invalid("Invalid integer: " + amount, param="amount", code="parameter_invalid_integer")
    currency = fields["currency"]
    if not _CURRENCY.match(currency):
        raise _invalid(f"Invalid currency: {currency}.", param="currency")
    for name in ("confirm", "error_on_requires_action"):
        if fields.get(name, "false") not in _BOOLEANS:
            raise _invalid(f"Invalid boolean: {fields[name]}", param=name)
    if fields.get("confirm") != "true":
        raise _invalid("sandbox: only create-and-confirm (confirm=true) is modelled", param="confirm")
    off_session = fields.get("off_session", "false")
    if off_session not in _OFF_SESSION:
        raise _invalid(f"Invalid off_session: {off_session}", param="off_session")
    customer = fields.get("customer")
    if not customer:
        message = "The payment method is attached to a Customer: provide that Customer as `customer`."
        raise _invalid(message, param="customer")
    types = lists.get("payment_method_types", [])
    if types and "card" not in types:
        message = f"The PaymentMethod provided (card) is not allowed for this PaymentIntent: {types}"
        raise _invalid(message, param="payment_method", code="payment_intent_incompatible_payment_method")
    return _Form(
        amount=int(amount),
        currency=currency,
        customer=customer,
        payment_method=fields["payment_method"],
        off_session=off_session != "false",
        description=fields.get("description"),
        metadata=metadata,
        payment_method_types=types or ["card"],
    )


async def _read_form(request: web.Request) -> tuple[_Form, tuple[tuple[str, str], ...]]:
    """The checked form, and its parameters in a canonical order for idempotency checks."""
    if request.content_type != _FORM:
        raise _invalid(f"sandbox: Stripe takes form-encoded bodies ({_FORM}), got {request.content_type}")
    try:
        text = (await request.read()).decode()
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"Invalid request body: {exc}") from None
    return _parse_form(pairs), tuple(sorted(pairs))


# --- responses ----------------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type=_JSON, headers=headers)


def _error(
    status: int, error: Mapping[str, object], headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json(status, {"error": error}, headers)


def _intent_id(charge: Charge) -> str:
    return "pi_" + charge.id.removeprefix("ch_")


def _scenario(token: str) -> Scenario | None:
    return TOKENS.get(token)


def _card_error(charge: Charge, intent: _Intent | None) -> dict[str, object]:
    scenario = _scenario(intent.token) if intent is not None else None
    decline = scenario.decline if scenario is not None else None
    decline = decline or _CORE_DECLINES.get(charge.decline_code) or CardDecline()
    token = intent.token if intent is not None else charge.payment_method
    error: dict[str, object] = {
        "type": "card_error",
        "code": decline.code,
        "decline_code": decline.decline_code,
        "advice_code": decline.advice_code,
        "network_advice_code": decline.network_advice_code,
        "network_decline_code": decline.network_decline_code,
        "message": "Your card was declined.",
        "doc_url": f"https://stripe.com/docs/error-codes/{decline.code.replace('_', '-')}",
        "charge": charge.id,
        "payment_method": {
            "id": token,
            "object": "payment_method",
            "type": "card",
            "card": {"brand": decline.brand, "last4": "4242"},
        },
        "payment_method_type": "card",
    }
    return error


def _status(charge: Charge, intent: _Intent | None) -> str:
    scenario = _scenario(intent.token) if intent is not None else None
    if scenario is not None:
        if scenario.on_session_status is not None and intent is not None and not intent.off_session:
            return scenario.on_session_status
        if scenario.intent_status is not None:
            return scenario.intent_status
    return "succeeded" if charge.status is ChargeStatus.APPROVED else "requires_payment_method"


def _payment_intent(charge: Charge, intent: _Intent | None) -> dict[str, object]:
    """The PaymentIntent object for an executed charge, in its current state."""
    status = _status(charge, intent)
    failed = status == "requires_payment_method"
    return {
        "id": _intent_id(charge),
        "object": "payment_intent",
        "amount": charge.amount_minor,
        "amount_capturable": 0,
        "amount_received": charge.amount_minor if status == "succeeded" else 0,
        "capture_method": "automatic_async",
        "confirmation_method": "automatic",
        "created": int(charge.created_at),
        "currency": charge.currency.lower(),
        "customer": intent.customer if intent is not None else None,
        "description": intent.description if intent is not None else None,
        "last_payment_error": _card_error(charge, intent) if failed else None,
        "latest_charge": charge.id,
        "livemode": False,
        "metadata": intent.metadata if intent is not None else {},
        "next_action": {"type": "use_stripe_sdk"} if status == "requires_action" else None,
        "payment_method": intent.token if intent is not None else charge.payment_method,
        "payment_method_types": intent.payment_method_types if intent is not None else ["card"],
        "status": status,
    }


def _executed_response(state: _State, executed: Executed, intent: _Intent | None) -> web.Response:
    charge = executed.charge
    state.keys_of_ids[_intent_id(charge)] = charge.idempotency_key
    headers = {"Idempotent-Replayed": "true"} if executed.replayed else None
    body = _payment_intent(charge, intent)
    if body["status"] == "requires_payment_method":
        error = _card_error(charge, intent) | {"payment_intent": body}
        return _error(402, error, headers)
    return _json(200, body, headers)


def _refusal_response(refusal: Refusal, key: str, retry_after_s: int) -> web.Response:
    if refusal is Refusal.RATE_LIMITED:
        message = (
            "Request rate limit exceeded. Learn more about rate limits: https://stripe.com/docs/rate-limits."
        )
        error = {"type": "invalid_request_error", "code": "rate_limit", "message": message}
        return _error(429, error, {"Retry-After": str(retry_after_s)})
    if refusal is Refusal.IDEMPOTENCY_CONFLICT:
        message = (
            "There is currently another in-progress request using this Stripe token (probably "
            "the same idempotency key). Try the request again later."
        )
        error = {"type": "invalid_request_error", "code": "idempotency_key_in_use", "message": message}
        return _error(409, error, {"Stripe-Should-Retry": "true"})
    if refusal is Refusal.IDEMPOTENCY_MISMATCH:
        return _error(400, _mismatch(key))
    status = 503 if refusal is Refusal.UNAVAILABLE else 500
    message = "An unknown error occurred" if status == 500 else "sandbox: the server is unavailable"
    return _error(status, {"type": "api_error", "message": message})


def _mismatch(key: str) -> dict[str, object]:
    message = (
        "Keys for idempotent requests can only be used with the same parameters they were first "
        f"used with. Try using a key other than '{key}' if you meant to execute a different request."
    )
    return {"type": "idempotency_error", "message": message}


_LOCK_TIMEOUT: Final = {
    "type": "invalid_request_error",
    "code": "lock_timeout",
    "message": (
        "This object cannot be accessed right now because another API request or Stripe process "
        "is currently accessing it. If you see this error intermittently, retry the request."
    ),
}

# --- handlers -----------------------------------------------------------------------------


async def _create(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    account = request.headers.get("Stripe-Account") or "stripe"
    stats = gateway.arrive(account)
    try:
        return await _create_confirmed(request, gateway, account)
    except _Refused as refused:
        return _error(refused.status, refused.error)
    finally:
        gateway.depart(stats)


async def _create_confirmed(request: web.Request, gateway: Gateway, account: str) -> web.Response:
    _authenticate(request, write=True)
    form, canonical = await _read_form(request)
    key = request.headers.get("Idempotency-Key", "")
    if not 1 <= len(key) <= _MAX_KEY_LENGTH:
        raise _invalid(f"sandbox: send an Idempotency-Key header of 1-{_MAX_KEY_LENGTH} characters")
    state = request.app[_STATE_KEY]
    earlier = state.intents.get(key)
    if earlier is not None and earlier.executed and earlier.form != canonical:
        raise _Refused(400, _mismatch(key))
    scenario = _scenario(form.payment_method)
    if scenario is not None and scenario.lock_timeout:
        return _error(429, _LOCK_TIMEOUT, {"Stripe-Should-Retry": "true"})
    intent = _Intent(
        form=canonical,
        token=form.payment_method,
        customer=form.customer,
        description=form.description,
        metadata=form.metadata,
        payment_method_types=form.payment_method_types,
        off_session=form.off_session,
    )
    if earlier is None or not earlier.executed:
        # Kept before the core executes, so a lookup during a pm_timeout hang sees it.
        state.intents[key] = intent
    charge_request = ChargeRequest(
        amount_minor=form.amount,
        currency=form.currency.upper(),
        payment_method=scenario.executes_as if scenario is not None else form.payment_method,
        merchant_reference=form.metadata.get("payd_reference") or key,
        customer_ref=form.customer,
        metadata=form.metadata,
    )
    result = await gateway.charge(account=account, idempotency_key=key, request=charge_request)
    if isinstance(result, Refusal):
        return _refusal_response(result, key, gateway.retry_after_s)
    stored = state.intents[key]
    stored.executed = True
    return _executed_response(state, result, stored)


async def _resolve(request: web.Request, keys: list[str]) -> list[dict[str, object]]:
    """The PaymentIntents of these keys that the core executed, newest first."""
    gateway = request.app[GATEWAY_KEY]
    state = request.app[_STATE_KEY]
    found: list[tuple[float, int, dict[str, object]]] = []
    for order, key in enumerate(keys):
        charge = await gateway.lookup(key)
        if charge is not None:
            state.keys_of_ids[_intent_id(charge)] = key
            found.append((charge.created_at, order, _payment_intent(charge, state.intents.get(key))))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [intent for _, _, intent in found]


def _limit(request: web.Request) -> int:
    value = request.query.get("limit", "10")
    if not value.isdecimal() or not 1 <= int(value) <= 100:
        raise _invalid(f"Invalid integer: {value}", param="limit", code="parameter_invalid_integer")
    return int(value)


async def _list(request: web.Request) -> web.Response:
    try:
        _authenticate(request, write=False)
        limit = _limit(request)
        customer = request.query.get("customer")
        state = request.app[_STATE_KEY]
        keys = [k for k, i in state.intents.items() if customer is None or i.customer == customer]
        intents = await _resolve(request, keys)
        after = request.query.get("starting_after")
        if after is not None:
            ids = [intent["id"] for intent in intents]
            if after not in ids:
                raise _invalid(f"No such payment_intent: '{after}'", param="starting_after")
            intents = intents[ids.index(after) + 1 :]
    except _Refused as refused:
        return _error(refused.status, refused.error)
    body = {
        "object": "list",
        "url": "/v1/payment_intents",
        "has_more": len(intents) > limit,
        "data": intents[:limit],
    }
    return _json(200, body)


# A clause of Stripe's search query language that the dialect understands.
_CLAUSE: Final = re.compile(
    r"""^(?:metadata\[(?P<q1>["'])(?P<field>.+?)(?P=q1)\]|(?P<plain>customer|status))"""
    r"""\s*:\s*(?P<q2>["'])(?P<value>(?:\\.|(?!(?P=q2)).)*)(?P=q2)\Z"""
)
_AND: Final = re.compile(r"\s+(?:AND\s+)?", re.IGNORECASE)


def _parse_query(query: str) -> list[tuple[str | None, str, str]]:
    """``(metadata field or None, attribute, value)`` per clause; clauses are ANDed."""
    clauses = []
    for text in _AND.split(query.strip()):
        match = _CLAUSE.match(text)
        if match is None:
            raise _invalid(f"sandbox: unsupported search clause {text!r}", param="query")
        value = re.sub(r"\\(.)", r"\1", match.group("value"))
        clauses.append((match.group("field"), match.group("plain") or "metadata", value))
    return clauses


async def _search(request: web.Request) -> web.Response:
    try:
        _authenticate(request, write=False)
        limit = _limit(request)
        clauses = _parse_query(request.query.get("query", ""))
        state = request.app[_STATE_KEY]
        keys = [
            key
            for key, intent in state.intents.items()
            if all(
                (intent.metadata.get(field) if field is not None else intent.customer) == value
                for field, attribute, value in clauses
                if attribute != "status"
            )
        ]
        intents = await _resolve(request, keys)
    except _Refused as refused:
        return _error(refused.status, refused.error)
    statuses = {value for _, attribute, value in clauses if attribute == "status"}
    intents = [intent for intent in intents if not statuses or intent["status"] in statuses]
    body = {
        "object": "search_result",
        "url": "/v1/payment_intents/search",
        "has_more": len(intents) > limit,
        "next_page": None,
        "data": intents[:limit],
    }
    return _json(200, body)


async def _retrieve(request: web.Request) -> web.Response:
    try:
        _authenticate(request, write=False)
    except _Refused as refused:
        return _error(refused.status, refused.error)
    intent_id = request.match_info["intent"]
    key = request.app[_STATE_KEY].keys_of_ids.get(intent_id)
    intents = await _resolve(request, [key]) if key is not None else []
    if not intents:
        error = {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "param": "intent",
            "message": f"No such payment_intent: '{intent_id}'",
        }
        return _error(404, error)
    return _json(200, intents[0])


# --- refunds ------------------------------------------------------------------------------
# POST /v1/refunds and GET /v1/refunds, with the parameters of stripe-python's
# RefundCreateParams and RefundListParams (tests/fixtures/providers/stripe_refund.json).
# The core's RefundBook executes each refund: per key at most once, never more than
# remains of the charge, and the ledger shows each charge's refunded and net amounts.

_REFUND_PARAMETERS: Final = frozenset(
    {
        "amount",
        "charge",
        "currency",
        "customer",
        "instructions_email",
        "origin",
        "payment_intent",
        "reason",
        "refund_application_fee",
        "reverse_transfer",
    }
)
_REFUND_REASONS: Final = frozenset({"duplicate", "fraudulent", "requested_by_customer"})


def _charge_id(payment_intent: str) -> str:
    return "ch_" + payment_intent.removeprefix("pi_")


def _refund_pairs(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, value in pairs:
        if (match := _METADATA.match(name)) is not None:
            if len(value) > 500:
                raise _invalid("Metadata values can have up to 500 characters.", param=name)
            metadata[match.group(1)] = value
        elif name in _REFUND_PARAMETERS or (_LISTED.match(name) and name.startswith("expand[")):
            fields[name] = value
        else:
            raise _invalid(f"Received unknown parameter: {name}", param=name, code="parameter_unknown")
    if len(metadata) > 50:
        raise _invalid("You can have up to 50 metadata keys.", param="metadata")
    return fields, metadata


def _refund_object(refund: Refund, charge: Charge, kept: _RefundForm | None) -> dict[str, object]:
    return {
        "id": refund.id,
        "object": "refund",
        "amount": refund.amount_minor,
        "balance_transaction": None,
        "charge": charge.id,
        "created": int(refund.created_at),
        "currency": refund.currency.lower(),
        "metadata": kept.metadata if kept is not None else {},
        "payment_intent": _intent_id(charge),
        "reason": kept.reason if kept is not None else None,
        "status": refund.status,
    }


async def _create_refund(request: web.Request) -> web.Response:
    try:
        _authenticate(request, write=True)
        if request.content_type != _FORM:
            raise _invalid(f"Invalid request: unsupported Content-Type {request.content_type}")
        try:
            text = (await request.read()).decode()
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _invalid(f"Invalid request body: {exc}") from None
        fields, metadata = _refund_pairs(pairs)
        return await _refund(request, fields, metadata, tuple(sorted(pairs)))
    except _Refused as refused:
        return _error(refused.status, refused.error)


async def _refund(
    request: web.Request,
    fields: dict[str, str],
    metadata: dict[str, str],
    canonical: tuple[tuple[str, str], ...],
) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    state = request.app[_STATE_KEY]
    key = request.headers.get("Idempotency-Key", "")
    if not 1 <= len(key) <= _MAX_KEY_LENGTH:
        raise _invalid(f"sandbox: send an Idempotency-Key header of 1-{_MAX_KEY_LENGTH} characters")
    earlier = state.refund_forms.get(key)
    if earlier is not None and earlier.form != canonical:
        raise _Refused(400, _mismatch(key))
    intent, charge_id = fields.get("payment_intent"), fields.get("charge")
    if (intent is None) == (charge_id is None):
        raise _invalid("You must pass exactly one of `charge` or `payment_intent`.", code="parameter_missing")
    reason = fields.get("reason")
    if reason is not None and reason not in _REFUND_REASONS:
        message = f"Invalid reason: must be one of {', '.join(sorted(_REFUND_REASONS))}"
        raise _invalid(message, param="reason")
    charge = gateway.charge_by_id(_charge_id(intent) if intent is not None else charge_id or "")
    if charge is None:
        kind, name = ("payment_intent", intent) if intent is not None else ("charge", charge_id)
        message = f"No such {kind}: '{name}'"
        raise _Refused(
            404,
            {"type": "invalid_request_error", "code": "resource_missing", "param": kind, "message": message},
        )
    remaining = charge.amount_minor - gateway.refunds.refunded(charge.id)
    amount_text = fields.get("amount")
    if amount_text is not None and (not amount_text.isdecimal() or int(amount_text) < 1):
        raise _invalid("Invalid integer: " + amount_text, param="amount", code="parameter_invalid_integer")
    amount = int(amount_text) if amount_text is not None else remaining
    kept = _RefundForm(form=canonical, payment_intent=intent, reason=reason, metadata=metadata)
    if amount < 1:  # nothing remains, and no amount asked: the whole charge was refunded
        raise _already_refunded(charge)
    state.refund_forms.setdefault(key, kept)
    result = await gateway.refund(charge, key=key, body=RefundBody(amount_minor=amount, reason=reason))
    if isinstance(result, RefundRefusal):
        if earlier is None:
            state.refund_forms.pop(key, None)  # nothing executed: the key stays free
        remaining = charge.amount_minor - gateway.refunds.refunded(charge.id)
        raise _refund_refusal(result, charge, amount, key, remaining)
    refund, replayed = result
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return _json(200, _refund_object(refund, charge, state.refund_forms.get(key)), headers)


def _already_refunded(charge: Charge) -> _Refused:
    message = f"Charge {charge.id} has already been refunded."
    return _invalid(message, code="charge_already_refunded")


def _refund_refusal(
    refusal: RefundRefusal, charge: Charge, amount: int, key: str, remaining: int
) -> _Refused:
    if refusal is RefundRefusal.EXCEEDS_REMAINING:
        if remaining <= 0:
            return _already_refunded(charge)
        return _invalid(
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
            param="amount",
            code="amount_too_large",
        )
    if refusal is RefundRefusal.NOT_REFUNDABLE:
        message = f"This PaymentIntent ({_intent_id(charge)}) does not have a successful charge to refund."
        return _invalid(message, code="charge_not_refundable")
    if refusal is RefundRefusal.IDEMPOTENCY_CONFLICT:
        message = "There is currently another in-progress request using this idempotency key."
        error: dict[str, object] = {
            "type": "invalid_request_error",
            "code": "idempotency_key_in_use",
            "message": message,
        }
        return _Refused(409, error)
    if refusal is RefundRefusal.IDEMPOTENCY_MISMATCH:
        return _Refused(400, _mismatch(key))
    return _Refused(
        404, {"type": "invalid_request_error", "code": "resource_missing", "message": "No such charge"}
    )


async def _list_refunds(request: web.Request) -> web.Response:
    try:
        _authenticate(request, write=False)
        limit = _limit(request)
        gateway = request.app[GATEWAY_KEY]
        state = request.app[_STATE_KEY]
        intent, charge_id = request.query.get("payment_intent"), request.query.get("charge")
        wanted = _charge_id(intent) if intent is not None else charge_id
        charges = {c.id: c for c in gateway.ledger() if wanted is None or c.id == wanted}
        refunds = [
            _refund_object(refund, charges[refund.charge], state.refund_forms.get(refund.idempotency_key))
            for refund in reversed(gateway.refunds.refunds)
            if refund.charge in charges
        ]
        after = request.query.get("starting_after")
        if after is not None:
            ids = [refund["id"] for refund in refunds]
            if after not in ids:
                raise _invalid(f"No such refund: '{after}'", param="starting_after")
            refunds = refunds[ids.index(after) + 1 :]
    except _Refused as refused:
        return _error(refused.status, refused.error)
    body = {"object": "list", "url": "/v1/refunds", "has_more": len(refunds) > limit, "data": refunds[:limit]}
    return _json(200, body)


ACCOUNT_DEFAULT_VERSION: Final = "2022-11-15"
"""The version Stripe applies to a request without ``Stripe-Version``: the account's default."""
_ADVICE_SINCE: Final = "2024-12-18"
_ADVICE_FIELDS: Final = ("advice_code", "network_advice_code", "network_decline_code")
_Handler = Callable[[web.Request], Awaitable[web.Response]]


def _without_advice(value: Any) -> None:
    """Drop the advice fields from every error object in a decoded body, in place."""
    if isinstance(value, dict):
        for name in _ADVICE_FIELDS:
            value.pop(name, None)
        for item in value.values():
            _without_advice(item)
    elif isinstance(value, list):
        for item in value:
            _without_advice(item)


def _versioned(handler: _Handler) -> _Handler:
    """Answers in the request's API version: before 2024-12-18, errors carry no advice."""

    async def handle(request: web.Request) -> web.Response:
        response = await handler(request)
        version = request.headers.get("Stripe-Version") or ACCOUNT_DEFAULT_VERSION
        if version[:10] >= _ADVICE_SINCE or not isinstance(response.body, bytes):
            return response
        body = msgspec.json.decode(response.body)
        _without_advice(body)
        response.body = _encode(body)
        return response

    return handle


def add_routes(app: web.Application) -> None:
    app[_STATE_KEY] = _State()
    app.add_routes(
        [
            web.post(f"{PREFIX}/v1/payment_intents", _versioned(_create)),
            web.get(f"{PREFIX}/v1/payment_intents", _versioned(_list)),
            web.get(f"{PREFIX}/v1/payment_intents/search", _versioned(_search)),
            web.get(f"{PREFIX}/v1/payment_intents/{{intent}}", _versioned(_retrieve)),
            web.post(f"{PREFIX}/v1/refunds", _versioned(_create_refund)),
            web.get(f"{PREFIX}/v1/refunds", _versioned(_list_refunds)),
        ]
    )
