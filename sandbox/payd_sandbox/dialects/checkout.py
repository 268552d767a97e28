"""Checkout.com-shaped face of the sandbox gateway, under ``/checkout``.

Speaks what payd's Checkout.com adapter uses of the Payments API, as the public
docs describe it: ``POST /payments`` (stored ``id`` source, ``Cko-Idempotency-Key``,
``Authorization: Bearer sk_...``), ``GET /payments?reference=`` (payment list,
newest first) and ``GET /payments/{id}`` (payment details with its actions). Every
charge goes through the shared ``Gateway`` core, so the ledger, idempotency store,
faults, latency and stats stay true; this module only translates.

Tokens: the core's (``pm_ok``, ``pm_insufficient_funds``, ``pm_stolen``,
``pm_rate_limited``, ``pm_error``, ``pm_timeout``, anything else rolls the mix) plus
the ``pm_cko_*`` tokens in ``SCENARIOS``, each one row of the adapter's tables. A
``pm_cko_*`` token is charged in the core as the core token with the same verdict
(approved, soft or hard decline) and rendered with its Checkout.com codes.

Checkout.com stores a ``Cko-Idempotency-Key``'s answer only after a 2xx; after a 4xx or
5xx the same key is processed again. ``pm_cko_server_error`` charges and then answers 500,
so the key stays free here too: a request repeating it is charged again under a core key
of its own (``KEY~N``), and the ledger shows both charges under one reference.
``pm_cko_server_error_unlisted`` is the same, and its payment is missing from the payment
list (the list has not caught up), so a lookup by reference finds nothing.

Stored-credential chains: a merchant-initiated ``Recurring`` payment must name, in
``previous_payment_id``, an approved payment of the same source, once that source has an
approved payment for an earlier cycle of the same subscription (reference ``SUB:CYCLE``):
Checkout.com's merchant-initiated transaction rules ("Stored credentials": subsequent
payments reference the previous one, Visa in particular). Without it: 422
``previous_payment_id_required``; naming anything else: 422 ``previous_payment_id_invalid``.

Where Checkout.com documents no body (401, 404, 409, 429, 5xx) the answer has none.
How faults look here: rate limited is 429 with ``Retry-After``; an API error is 502
(Bad gateway, the 5xx Checkout.com documents); an injected hang ends in 503.
``GET /checkout/_sandbox/requests/{idempotency_key}`` shows what a charge request
carried (body and header names, never the key's value), for tests.

Refunds: ``POST /payments/{id}/refunds`` (checkout-sdk-python ``RefundRequest``: amount,
reference, metadata; ``Cko-Idempotency-Key``) is executed by the core's refund book (at
most once per key, never more than remains, shown in the ledger) and answered ``202`` with
its ``action_id`` and ``reference``, as Checkout.com does; the outcome is then read from
``GET /payments/{id}/actions``, where the refund is a ``Refund`` action with that reference.
Refused: 404 (no such payment), 403 (not approved, or nothing left to refund), 422
``refund_amount_exceeds_balance`` (more than remains; the sandbox's code for it),
``amount_invalid`` and ``reference_invalid`` (over 80 characters); 409 while the same key
runs. Refunds of a ``pm_refund_timeout`` payment are recorded, then answered after the hang.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
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

PREFIX: Final = "/checkout"

_JSON: Final = "application/json"
_DEFAULT_ACCOUNT: Final = "checkout"
_SECRET_KEY: Final = re.compile(r"^Bearer sk_(?:sbox_)?[A-Za-z0-9_-]{4,}\Z")
_CURRENCY: Final = re.compile(r"^[A-Z]{3}\Z")
_PAYMENT_TYPES: Final = frozenset({"Regular", "Recurring", "MOTO", "Installment", "PayLater", "Unscheduled"})
_MAX_PAGE: Final = 100


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """A dialect token: the core token charged, and the Checkout.com codes shown."""

    charged_as: str
    response_code: str
    summary: str
    recommendation_code: str | None = None
    merchant_advice_code: str | None = None
    pending: bool = False
    """Answer ``202 Pending`` to the charge (lookups later show the core's verdict)."""
    server_error: bool = False
    """Charge, then answer 500: the key's answer is not stored, a repeat is charged again."""
    unlisted: bool = False
    """The payment list does not show this payment yet."""


def _declined(
    charged_as: str, code: str, summary: str, recommendation: str | None, mac: str | None
) -> Scenario:
    return Scenario(
        charged_as=charged_as,
        response_code=code,
        summary=summary,
        recommendation_code=recommendation,
        merchant_advice_code=mac,
    )


def _soft(code: str, summary: str, *, recommendation: str | None = None, mac: str | None = None) -> Scenario:
    return _declined("pm_insufficient_funds", code, summary, recommendation, mac)


def _hard(code: str, summary: str, *, recommendation: str | None = None, mac: str | None = None) -> Scenario:
    return _declined("pm_stolen", code, summary, recommendation, mac)


SCENARIOS: Final[dict[str, Scenario]] = {
    "pm_cko_do_not_honour": _soft("20005", "Declined - Do not honour"),
    "pm_cko_expired": _hard("20054", "Expired card", recommendation="01"),
    "pm_cko_restricted": _hard("20062", "Restricted card"),
    "pm_cko_security": _hard("20063", "Security violation"),
    "pm_cko_pickup": _hard("30004", "Pick up card (No fraud)"),
    "pm_cko_lost": _hard("30041", "Lost card - Pick up"),
    "pm_cko_revoked": _hard("200R1", "Issuer initiated a stop payment (revocation order)"),
    "pm_cko_risk": _hard("41101", "Risk Blocked Transaction"),
    "pm_cko_risk_40101": _hard("40101", "Risk Blocked Transaction"),
    "pm_cko_merchant_config": _hard("20157", "Invalid merchant configurations - Contact Support"),
    "pm_cko_unrecognised": _hard("60000", "Sandbox: a code in no documented range"),
    "pm_cko_mac_03": _soft("20051", "Insufficient Funds", mac="03"),
    "pm_cko_mac_21": _soft("20005", "Declined - Do not honour", mac="21"),
    **{
        f"pm_cko_mac_{mac}": _soft("20051", "Insufficient Funds", mac=mac)
        for mac in ("24", "25", "26", "27", "28", "29", "30")
    },
    "pm_cko_pending": Scenario(charged_as="pm_ok", response_code="10000", summary="Approved", pending=True),
    "pm_cko_server_error": Scenario(
        charged_as="pm_ok", response_code="10000", summary="Approved", server_error=True
    ),
    "pm_cko_server_error_unlisted": Scenario(
        charged_as="pm_ok", response_code="10000", summary="Approved", server_error=True, unlisted=True
    ),
}
INVALID_SOURCE: Final = "pm_cko_invalid"
"""Refused with 422 ``source_id_invalid`` before anything is charged."""

# What the core's own verdicts look like here (tokens without a scenario).
_APPROVED: Final = Scenario(charged_as="", response_code="10000", summary="Approved")
_CORE_DECLINES: Final[dict[str | None, Scenario]] = {
    "insufficient_funds": _soft("20051", "Insufficient Funds", recommendation="02"),
    "stolen_card": _hard("30043", "Stolen card - Pick up", recommendation="03"),
}
_DECLINED: Final = _hard("20005", "Declined - Do not honour")


# --- what a charge request carried ------------------------------------------------------


class _Source(msgspec.Struct, kw_only=True):
    type: str | None = None
    id: str | None = None


class _Customer(msgspec.Struct, kw_only=True):
    id: str | None = None
    email: str | None = None
    name: str | None = None


class _PaymentRequest(msgspec.Struct, kw_only=True):
    """``POST /payments`` as far as this dialect reads it; other fields are ignored."""

    source: _Source | None = None
    amount: int | None = None
    currency: str | None = None
    reference: str | None = None
    payment_type: str = "Regular"
    merchant_initiated: bool = False
    capture: bool = True
    processing_channel_id: str | None = None
    customer: _Customer | None = None
    metadata: dict[str, str | int | float | bool | None] | None = None
    previous_payment_id: str | None = None


class Received(msgspec.Struct, kw_only=True):
    """A charge request as received: what lookups render, and what tests inspect."""

    token: str
    amount: int
    currency: str
    reference: str
    payment_type: str
    merchant_initiated: bool
    processing_channel_id: str
    customer_id: str | None
    metadata: dict[str, str | int | float | bool | None]
    body: dict[str, Any]
    header_names: list[str]
    authorization_scheme: str


class _Received:
    """Per core key, the request that made (or is making) the charge."""

    def __init__(self) -> None:
        self.by_key: dict[str, Received] = {}
        self.uncached: dict[str, int] = {}
        """Keys whose charge answered a 5xx (not stored), and how many times."""

    def core_key(self, key: str) -> str:
        """The key the core charges under: a key whose answer was never stored starts afresh."""
        times = self.uncached.get(key)
        return key if times is None else f"{key}~{times}"


_RECEIVED_KEY: Final = web.AppKey("checkout_dialect_received", _Received)

# --- bodies -----------------------------------------------------------------------------


class _Link(msgspec.Struct):
    href: str


class _SourceBody(msgspec.Struct):
    id: str
    type: str = "card"


class _CustomerBody(msgspec.Struct):
    id: str


class _ProcessingBody(msgspec.Struct, omit_defaults=True):
    recommendation_code: str | None = None
    partner_merchant_advice_code: str | None = None


class _Action(msgspec.Struct):
    id: str
    type: str
    response_code: str
    response_summary: str


class _PaymentBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """201 to ``POST /payments``."""

    id: str
    action_id: str
    amount: int
    currency: str
    approved: bool
    status: str
    response_code: str
    response_summary: str
    processed_on: str
    reference: str
    source: _SourceBody
    links: dict[str, _Link] = msgspec.field(name="_links")
    auth_code: str | None = None
    customer: _CustomerBody | None = None
    processing: _ProcessingBody | None = None


class _PendingBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """202 to ``POST /payments``."""

    id: str
    status: str
    reference: str
    links: dict[str, _Link] = msgspec.field(name="_links")
    customer: _CustomerBody | None = None


class _DetailsBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A payment in the list (without actions) and from ``GET /payments/{id}`` (with them)."""

    id: str
    requested_on: str
    source: _SourceBody
    amount: int
    currency: str
    payment_type: str
    reference: str
    approved: bool
    status: str
    metadata: dict[str, str | int | float | bool | None]
    links: dict[str, _Link] = msgspec.field(name="_links")
    customer: _CustomerBody | None = None
    processing: _ProcessingBody | None = None
    actions: list[_Action] | None = None


class _PageBody(msgspec.Struct):
    limit: int
    skip: int
    total_count: int
    data: list[_DetailsBody]


class _ErrorBody(msgspec.Struct):
    request_id: str
    error_type: str
    error_codes: list[str]


_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(_PaymentRequest).decode
_decode_any = msgspec.json.Decoder().decode


def _request_id() -> str:
    return secrets.token_hex(16)


def _response(status: int, body: bytes | None = None, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"Cko-Request-Id": _request_id(), **(headers or {})}
    if body is None:
        return web.Response(status=status, headers=all_headers)
    return web.Response(status=status, body=body, content_type=_JSON, headers=all_headers)


def _invalid(*error_codes: str) -> web.Response:
    return _response(422, _encode(_ErrorBody(_request_id(), "request_invalid", list(error_codes))))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _payment_id(charge: Charge) -> str:
    return "pay_" + charge.id.removeprefix("ch_")


def _links(request: web.Request, payment_id: str) -> dict[str, _Link]:
    base = f"{request.scheme}://{request.host}{PREFIX}/payments/{payment_id}"
    return {"self": _Link(base), "actions": _Link(f"{base}/actions")}


def _scenario(charge: Charge, received: Received) -> Scenario:
    scenario = SCENARIOS.get(received.token)
    if scenario is not None:
        return scenario
    if charge.status is ChargeStatus.APPROVED:
        return _APPROVED
    return _CORE_DECLINES.get(charge.decline_code, _DECLINED)


def _processing(scenario: Scenario) -> _ProcessingBody | None:
    if scenario.recommendation_code is None and scenario.merchant_advice_code is None:
        return None
    return _ProcessingBody(scenario.recommendation_code, scenario.merchant_advice_code)


def _customer(received: Received) -> _CustomerBody | None:
    return None if received.customer_id is None else _CustomerBody(received.customer_id)


def _charge_response(request: web.Request, charge: Charge, received: Received) -> web.Response:
    """The 201 (or 202) the charge got; a replay gets the same, as Checkout.com documents."""
    scenario = _scenario(charge, received)
    payment_id = _payment_id(charge)
    if scenario.pending:
        pending = _PendingBody(
            id=payment_id,
            status="Pending",
            reference=charge.merchant_reference,
            links=_links(request, payment_id),
            customer=_customer(received),
        )
        return _response(202, _encode(pending))
    approved = charge.status is ChargeStatus.APPROVED
    body = _PaymentBody(
        id=payment_id,
        action_id="act_" + charge.id.removeprefix("ch_"),
        amount=charge.amount_minor,
        currency=charge.currency,
        approved=approved,
        status="Authorized" if approved else "Declined",
        response_code=scenario.response_code,
        response_summary=scenario.summary,
        processed_on=_iso(charge.created_at),
        reference=charge.merchant_reference,
        source=_SourceBody(received.token),
        links=_links(request, payment_id),
        auth_code=charge.id[-6:] if approved else None,
        customer=_customer(received),
        processing=_processing(scenario),
    )
    return _response(201, _encode(body))


def _details(request: web.Request, charge: Charge, received: Received, *, actions: bool) -> _DetailsBody:
    """The payment now: approved ones are captured (``capture: true``), pending ones settled."""
    scenario = _scenario(charge, received)
    approved = charge.status is ChargeStatus.APPROVED
    payment_id = _payment_id(charge)
    authorization = _Action(
        id="act_" + charge.id.removeprefix("ch_"),
        type="Authorization",
        response_code=scenario.response_code,
        response_summary=scenario.summary,
    )
    return _DetailsBody(
        id=payment_id,
        requested_on=_iso(charge.created_at),
        source=_SourceBody(received.token),
        amount=charge.amount_minor,
        currency=charge.currency,
        payment_type=received.payment_type,
        reference=charge.merchant_reference,
        approved=approved,
        status="Captured" if approved else "Declined",
        metadata=received.metadata,
        links=_links(request, payment_id),
        customer=_customer(received),
        processing=_processing(scenario),
        actions=[authorization] if actions else None,
    )


# --- handlers ---------------------------------------------------------------------------


def _authorized(request: web.Request) -> bool:
    return bool(_SECRET_KEY.match(request.headers.get("Authorization", "")))


def _problems(payment: _PaymentRequest) -> list[str]:
    """Checkout.com-style error codes for what the request lacks; empty when it is valid."""
    problems = []
    channel = payment.processing_channel_id
    if not channel:
        problems.append("processing_channel_id_required")
    elif not channel.startswith("pc_"):
        problems.append("processing_channel_id_invalid")
    source = payment.source
    if source is None:
        problems.append("payment_source_required")
    elif source.type != "id":
        problems.append("payment_source_type_invalid")  # this dialect knows stored sources only
    elif not source.id:
        problems.append("source_id_required")
    elif source.id == INVALID_SOURCE:
        problems.append("source_id_invalid")
    if payment.amount is None:
        problems.append("amount_required")
    elif payment.amount <= 0:
        problems.append("amount_invalid")  # no card verifications here
    if payment.currency is None:
        problems.append("currency_required")
    elif not _CURRENCY.match(payment.currency):
        problems.append("currency_invalid")
    if payment.payment_type not in _PAYMENT_TYPES:
        problems.append("payment_type_invalid")
    return problems


def _received(request: web.Request, payment: _PaymentRequest, raw: bytes) -> Received:
    assert payment.source is not None and payment.source.id and payment.processing_channel_id
    assert payment.amount is not None and payment.currency is not None
    return Received(
        token=payment.source.id,
        amount=payment.amount,
        currency=payment.currency,
        reference=payment.reference or "",
        payment_type=payment.payment_type,
        merchant_initiated=payment.merchant_initiated,
        processing_channel_id=payment.processing_channel_id,
        customer_id=payment.customer.id if payment.customer else None,
        metadata=dict(payment.metadata or {}),
        body=_decode_any(raw),
        header_names=sorted(str(name) for name in request.headers),
        authorization_scheme=request.headers.get("Authorization", "").partition(" ")[0],
    )


def _subscription(reference: str) -> str | None:
    """The subscription part of a renewal's reference ``SUB:CYCLE``; None for other references."""
    sub, colon, cycle = reference.partition(":")
    return sub if colon and sub.isdigit() and cycle.isdigit() else None


def _chain_problem(request: web.Request, payment: _PaymentRequest) -> str | None:
    """Why a merchant-initiated recurring payment breaks its stored-credential chain, or None."""
    if not (payment.merchant_initiated and payment.payment_type == "Recurring" and payment.source):
        return None
    source, reference = payment.source.id, payment.reference or ""
    book = request.app[_RECEIVED_KEY].by_key
    approved = [
        charge
        for charge in request.app[GATEWAY_KEY].ledger()
        if charge.status is ChargeStatus.APPROVED
        and (received := book.get(charge.idempotency_key)) is not None
        and received.token == source
        and received.processing_channel_id == payment.processing_channel_id
    ]
    if payment.previous_payment_id is not None:
        known = {_payment_id(charge) for charge in approved}
        return None if payment.previous_payment_id in known else "previous_payment_id_invalid"
    subscription = _subscription(reference)
    earlier_cycles = [
        charge
        for charge in approved
        if subscription is not None
        and _subscription(charge.merchant_reference) == subscription
        and charge.merchant_reference != reference
    ]
    return "previous_payment_id_required" if earlier_cycles else None


async def _post_payment(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    raw = await request.read()
    try:
        payment = _decode_request(raw)
    except msgspec.DecodeError:  # ValidationError included
        payment = None
    account = (payment.processing_channel_id if payment else None) or _DEFAULT_ACCOUNT
    stats = gateway.arrive(account)
    try:
        if not _authorized(request):
            return _response(401)
        if payment is None:
            return _invalid("request_malformed")
        problems = _problems(payment)
        chain = None if problems else _chain_problem(request, payment)
        if problems or chain:
            return _invalid(*problems, *([chain] if chain else []))
        # Without the header Checkout.com does not deduplicate; neither does this.
        key = request.headers.get("Cko-Idempotency-Key") or "cko_none_" + secrets.token_hex(12)
        return await _charge(request, gateway, key, _received(request, payment, raw))
    finally:
        gateway.depart(stats)


async def _charge(request: web.Request, gateway: Gateway, given_key: str, received: Received) -> web.Response:
    book = request.app[_RECEIVED_KEY]
    state = book.by_key
    key = book.core_key(given_key)
    scenario = SCENARIOS.get(received.token)
    charge_request = ChargeRequest(
        amount_minor=received.amount,
        currency=received.currency,
        payment_method=scenario.charged_as if scenario else received.token,
        merchant_reference=received.reference,
        customer_ref=received.customer_id,
        metadata={name: str(value) for name, value in received.metadata.items()},
    )
    # Known before the core can record anything, so a lookup during a pm_timeout hang
    # already shows this request's metadata.
    registered = state.setdefault(key, received) is received
    result = await gateway.charge(
        account=received.processing_channel_id, idempotency_key=key, request=charge_request
    )
    if isinstance(result, Executed):
        if not result.replayed:
            state[key] = received
            if scenario is not None and scenario.server_error:
                book.uncached[given_key] = book.uncached.get(given_key, 0) + 1
                return _response(500)
        return _charge_response(request, result.charge, state.get(key, received))
    if registered and result in (Refusal.RATE_LIMITED, Refusal.API_ERROR, Refusal.UNAVAILABLE):
        del state[key]  # nothing was charged and the key stays free
    return await _refusal_response(request, gateway, key, result)


async def _refusal_response(
    request: web.Request, gateway: Gateway, key: str, refusal: Refusal
) -> web.Response:
    if refusal is Refusal.RATE_LIMITED:
        return _response(429, headers={"Retry-After": str(gateway.retry_after_s)})
    if refusal is Refusal.API_ERROR:
        return _response(502)
    if refusal is Refusal.UNAVAILABLE:
        return _response(503)
    if refusal is Refusal.IDEMPOTENCY_MISMATCH:
        # Checkout.com answers a reused key with the original response, whatever the body.
        earlier = await gateway.lookup(key)
        received = request.app[_RECEIVED_KEY].by_key.get(key)
        if earlier is not None and received is not None:
            return _charge_response(request, earlier, received)
    return _response(409)  # another request with this key is being processed


def _ours(
    request: web.Request, charges: list[Charge], *, listing: bool = False
) -> list[tuple[Charge, Received]]:
    state = request.app[_RECEIVED_KEY].by_key
    found = []
    for charge in charges:
        received = state.get(charge.idempotency_key)
        scenario = SCENARIOS.get(received.token) if received is not None else None
        if received is not None and not (listing and scenario is not None and scenario.unlisted):
            found.append((charge, received))
    return found


async def _list_payments(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _response(401)
    reference = request.query.get("reference")
    try:
        limit = int(request.query.get("limit", "10"))
        skip = int(request.query.get("skip", "0"))
    except ValueError:
        return _invalid("paging_invalid")
    if not reference:
        return _invalid("reference_required")
    if not 1 <= limit <= _MAX_PAGE or skip < 0:
        return _invalid("paging_invalid")
    gateway = request.app[GATEWAY_KEY]
    keys = dict.fromkeys(c.idempotency_key for c in gateway.ledger() if c.merchant_reference == reference)
    # The core looks up by key only: one lookup per payment keeps its stats counting reads.
    current = [charge for key in keys if (charge := await gateway.lookup(key)) is not None]
    matching = sorted(
        _ours(request, current, listing=True), key=lambda pair: pair[0].created_at, reverse=True
    )
    page = [
        _details(request, charge, received, actions=False)
        for charge, received in matching[skip : skip + limit]
    ]
    return _response(200, _encode(_PageBody(limit, skip, len(matching), page)))


async def _get_payment(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _response(401)
    charge_id = "ch_" + request.match_info["payment_id"].removeprefix("pay_")
    gateway = request.app[GATEWAY_KEY]
    recorded = next((c for c in gateway.ledger() if c.id == charge_id), None)
    current = None if recorded is None else await gateway.lookup(recorded.idempotency_key)
    found = _ours(request, [current] if current is not None else [])
    if not found:
        return _response(404)
    charge, received = found[0]
    return _response(200, _encode(_details(request, charge, received, actions=True)))


async def _get_received(request: web.Request) -> web.Response:
    received = request.app[_RECEIVED_KEY].by_key.get(request.match_info["idempotency_key"])
    if received is None:
        return _response(404)
    return _response(200, _encode(received))


# --- refunds and actions ----------------------------------------------------------------

_MAX_REFUND_REFERENCE: Final = 80


class _RefundRequest(msgspec.Struct, kw_only=True):
    amount: int | None = None
    reference: str | None = None
    metadata: dict[str, str | int | float | bool | None] | None = None


class _KeptRefund(msgspec.Struct, frozen=True, kw_only=True):
    reference: str | None
    metadata: dict[str, str | int | float | bool | None]


class _RefundAccepted(msgspec.Struct, kw_only=True, omit_defaults=True):
    action_id: str
    links: dict[str, _Link] = msgspec.field(name="_links")
    reference: str | None = None


class _ActionBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of ``GET /payments/{id}/actions``."""

    id: str
    type: str
    processed_on: str
    amount: int
    approved: bool
    response_code: str
    response_summary: str
    reference: str | None = None
    metadata: dict[str, str | int | float | bool | None] | None = None


_REFUNDS_KEY: Final = web.AppKey("checkout_dialect_refunds", dict[str, _KeptRefund])
_decode_refund_request = msgspec.json.Decoder(_RefundRequest).decode


def _refund_action_id(refund: Refund) -> str:
    return "act_" + refund.id.removeprefix("re_")


def _charge_of(request: web.Request) -> Charge | None:
    return request.app[GATEWAY_KEY].charge_by_id(
        "ch_" + request.match_info["payment_id"].removeprefix("pay_")
    )


def _refund_refusal(refusal: RefundRefusal, remaining: int) -> web.Response:
    if refusal is RefundRefusal.IDEMPOTENCY_CONFLICT:
        return _response(409)
    if refusal is RefundRefusal.EXCEEDS_REMAINING and remaining > 0:
        return _invalid("refund_amount_exceeds_balance")
    return _response(403)  # "Refund not allowed"


async def _post_refund(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _response(401)
    try:
        body = _decode_refund_request(await request.read() or b"{}")
    except msgspec.DecodeError:  # ValidationError included
        return _invalid("request_malformed")
    if body.amount is not None and body.amount <= 0:
        return _invalid("amount_invalid")
    if body.reference is not None and len(body.reference) > _MAX_REFUND_REFERENCE:
        return _invalid("reference_invalid")
    gateway = request.app[GATEWAY_KEY]
    charge = _charge_of(request)
    if charge is None or request.app[_RECEIVED_KEY].by_key.get(charge.idempotency_key) is None:
        return _response(404)
    remaining = charge.amount_minor - gateway.refunds.refunded(charge.id)
    if charge.status is not ChargeStatus.APPROVED or remaining <= 0:
        return _response(403)  # "Refund not allowed": not captured, or already all refunded
    # Without the header Checkout.com does not deduplicate; neither does this.
    key = request.headers.get("Cko-Idempotency-Key") or "cko_none_" + secrets.token_hex(12)
    kept = request.app[_REFUNDS_KEY]
    first_use = key not in kept
    kept.setdefault(key, _KeptRefund(reference=body.reference, metadata=dict(body.metadata or {})))
    amount = body.amount if body.amount is not None else remaining
    result = await gateway.refund(charge, key=key, body=RefundBody(amount_minor=amount))
    if result is RefundRefusal.IDEMPOTENCY_MISMATCH:
        # Checkout.com answers a reused key with the original response, whatever the body.
        earlier = gateway.refunds.lookup(key)
        if earlier is not None:
            result = earlier, True
    if isinstance(result, RefundRefusal):
        if first_use and gateway.refunds.lookup(key) is None:
            kept.pop(key, None)  # nothing executed: the key stays free
        return _refund_refusal(result, charge.amount_minor - gateway.refunds.refunded(charge.id))
    refund, _replayed = result
    accepted = _RefundAccepted(
        action_id=_refund_action_id(refund),
        reference=kept[key].reference,
        links={"payment": _Link(_links(request, _payment_id(charge))["self"].href)},
    )
    return _response(202, _encode(accepted))


async def _get_actions(request: web.Request) -> web.Response:
    """The payment's actions, newest first: its refunds, its capture, its authorization."""
    if not _authorized(request):
        return _response(401)
    charge = _charge_of(request)
    received = None if charge is None else request.app[_RECEIVED_KEY].by_key.get(charge.idempotency_key)
    if charge is None or received is None:
        return _response(404)
    gateway = request.app[GATEWAY_KEY]
    kept = request.app[_REFUNDS_KEY]
    scenario = _scenario(charge, received)
    approved = charge.status is ChargeStatus.APPROVED
    actions = [
        _ActionBody(
            id=_refund_action_id(refund),
            type="Refund",
            processed_on=_iso(refund.created_at),
            amount=refund.amount_minor,
            approved=True,
            response_code="10000",
            response_summary="Approved",
            reference=kept[refund.idempotency_key].reference if refund.idempotency_key in kept else None,
            metadata=kept[refund.idempotency_key].metadata if refund.idempotency_key in kept else None,
        )
        for refund in reversed(gateway.refunds.refunds)
        if refund.charge == charge.id
    ]
    if approved:
        actions.append(
            _ActionBody(
                id="act_cap_" + charge.id.removeprefix("ch_"),
                type="Capture",
                processed_on=_iso(charge.created_at),
                amount=charge.amount_minor,
                approved=True,
                response_code="10000",
                response_summary="Approved",
            )
        )
    actions.append(
        _ActionBody(
            id="act_" + charge.id.removeprefix("ch_"),
            type="Authorization",
            processed_on=_iso(charge.created_at),
            amount=charge.amount_minor,
            approved=approved,
            response_code=scenario.response_code,
            response_summary=scenario.summary,
            reference=charge.merchant_reference,
        )
    )
    return _response(200, _encode(actions))


def add_routes(app: web.Application) -> None:
    app[_RECEIVED_KEY] = _Received()
    app[_REFUNDS_KEY] = {}
    app.add_routes(
        [
            web.post(f"{PREFIX}/payments", _post_payment),
            web.get(f"{PREFIX}/payments", _list_payments),
            web.get(f"{PREFIX}/payments/{{payment_id}}", _get_payment),
            web.post(f"{PREFIX}/payments/{{payment_id}}/refunds", _post_refund),
            web.get(f"{PREFIX}/payments/{{payment_id}}/actions", _get_actions),
            web.get(f"{PREFIX}/_sandbox/requests/{{idempotency_key}}", _get_received),
        ]
    )
