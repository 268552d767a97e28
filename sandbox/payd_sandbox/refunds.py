"""The sandbox gateway's refunds: the book of refunds per charge, and the native routes.

A refund is addressed by the charge's id (``POST /v1/charges/{id}/refunds``, as
Stripe's ``POST /v1/refunds`` takes ``charge``), honours ``Idempotency-Key``
the way charges do (same key and parameters: the same refund, replayed; other
parameters: 422; still running: 409), and never refunds more than remains of
the charge: the remaining amount is checked again after the latency pause,
when the refund is recorded, so concurrent refunds cannot overshoot. Refunds of
a charge made with ``pm_refund_timeout`` are recorded, then answered only
after ``hang_s`` (the refund twin of ``pm_timeout``). Refunds of a charge made
with ``pm_refund_pending`` are recorded (the ledger counts them) but answered
``status: pending``, and read back ``succeeded`` only once ``hang_s`` has passed:
a provider that accepts a refund and decides it later.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Final, Protocol

import msgspec
from aiohttp import web

REFUND_HANGS: Final = "pm_refund_timeout"
"""A charge made with this token approves; each of its refunds is recorded, then hangs."""
REFUND_PENDS: Final = "pm_refund_pending"
"""A charge made with this token approves; each of its refunds is pending until ``hang_s`` passes."""


class Charge(Protocol):
    """What a refund reads of the gateway's executed charge (``gateway.Charge``)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def amount_minor(self) -> int: ...
    @property
    def currency(self) -> str: ...
    @property
    def payment_method(self) -> str: ...


class RefundRefusal(enum.StrEnum):
    """Why a refund request executed nothing (no refund recorded, key left free)."""

    NOT_FOUND = "not_found"
    NOT_REFUNDABLE = "charge_not_refundable"
    EXCEEDS_REMAINING = "amount_exceeds_remaining"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"


class RefundBody(msgspec.Struct, frozen=True, kw_only=True):
    amount_minor: Annotated[int, msgspec.Meta(gt=0)]
    reason: str | None = None


class Refund(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    status: str
    charge: str
    idempotency_key: str
    amount_minor: int
    currency: str
    reason: str | None
    created_at: float
    settles_at: float | None = None
    """For a pending refund: when it reads ``succeeded``."""


class _Pending(msgspec.Struct, frozen=True):
    charge_id: str
    amount_minor: int


class RefundBook:
    """Every refund executed, by key and by charge. One event loop: no locks needed."""

    def __init__(self) -> None:
        self.refunds: list[Refund] = []
        self._by_key: dict[str, Refund] = {}
        self._pending: dict[str, _Pending] = {}
        self._refunded: dict[str, int] = {}
        self.requests = 0
        """Refund requests received, whatever came of them."""

    def refunded(self, charge_id: str) -> int:
        return self._refunded.get(charge_id, 0)

    def lookup(self, key: str) -> Refund | None:
        """The refund under ``key`` as it stands now: a pending one turns succeeded when due."""
        refund = self._by_key.get(key)
        if refund is not None and refund.settles_at is not None and time.time() >= refund.settles_at:
            return msgspec.structs.replace(refund, status="succeeded", settles_at=None)
        return refund

    def _earlier_use(self, key: str, charge_id: str, amount: int) -> Refund | RefundRefusal | None:
        done = self._by_key.get(key)
        if done is not None:
            same = done.charge == charge_id and done.amount_minor == amount
            return done if same else RefundRefusal.IDEMPOTENCY_MISMATCH
        pending = self._pending.get(key)
        if pending is not None:
            if pending == _Pending(charge_id, amount):
                return RefundRefusal.IDEMPOTENCY_CONFLICT
            return RefundRefusal.IDEMPOTENCY_MISMATCH
        return None

    async def refund(
        self,
        charge: Charge | None,
        *,
        key: str,
        body: RefundBody,
        pause: Callable[[float], Awaitable[None]],
        latency_s: float,
        hang_s: float,
    ) -> tuple[Refund, bool] | RefundRefusal:
        """The refund (and whether it is a replay), or why nothing was refunded."""
        self.requests += 1
        if charge is None:
            return RefundRefusal.NOT_FOUND
        earlier = self._earlier_use(key, charge.id, body.amount_minor)
        if isinstance(earlier, Refund):
            return self.lookup(key) or earlier, True
        if earlier is not None:
            return earlier
        if charge.status != "approved":
            return RefundRefusal.NOT_REFUNDABLE
        self._pending[key] = _Pending(charge.id, body.amount_minor)
        try:
            await pause(latency_s)
            # Checked when recorded, after the pause: refunds racing each other cannot overshoot.
            if self.refunded(charge.id) + body.amount_minor > charge.amount_minor:
                return RefundRefusal.EXCEEDS_REMAINING
            pends = charge.payment_method == REFUND_PENDS
            refund = Refund(
                id="re_" + secrets.token_hex(12),
                status="pending" if pends else "succeeded",
                settles_at=time.time() + hang_s if pends else None,
                charge=charge.id,
                idempotency_key=key,
                amount_minor=body.amount_minor,
                currency=charge.currency,
                reason=body.reason,
                created_at=time.time(),
            )
            self.refunds.append(refund)
            self._by_key[key] = refund
            self._refunded[charge.id] = self.refunded(charge.id) + body.amount_minor
        finally:
            self._pending.pop(key, None)
        if charge.payment_method == REFUND_HANGS:
            await pause(hang_s)  # recorded first: a lookup during the hang finds it
        return refund, False


# -- native routes ------------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode
_decode_body = msgspec.json.Decoder(RefundBody).decode
_JSON: Final = "application/json"
_MAX_KEY_LENGTH: Final = 255

_REFUSAL_STATUS: Final[Mapping[RefundRefusal, int]] = {
    RefundRefusal.NOT_FOUND: 404,
    RefundRefusal.NOT_REFUNDABLE: 400,
    RefundRefusal.EXCEEDS_REMAINING: 400,
    RefundRefusal.IDEMPOTENCY_CONFLICT: 409,
    RefundRefusal.IDEMPOTENCY_MISMATCH: 422,
}


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type=_JSON, headers=headers)


class Gateway(Protocol):
    """What the routes need of ``gateway.Gateway`` (which imports this module, not the reverse)."""

    refunds: RefundBook

    def charge_by_id(self, charge_id: str) -> Charge | None: ...

    async def refund(
        self, charge: Charge | None, *, key: str, body: RefundBody
    ) -> tuple[Refund, bool] | RefundRefusal: ...


def refund_routes(gateway_of: Callable[[web.Request], Gateway]) -> list[web.RouteDef]:
    """``POST /v1/charges/{charge_id}/refunds`` and ``GET /v1/refunds/{idempotency_key}``."""

    async def post_refund(request: web.Request) -> web.Response:
        gateway = gateway_of(request)
        key = request.headers.get("Idempotency-Key")
        if not key or len(key) > _MAX_KEY_LENGTH:
            message = f"Idempotency-Key header must hold 1-{_MAX_KEY_LENGTH} characters"
            return _json(400, {"error": {"type": "invalid_request", "message": message}})
        try:
            body = _decode_body(await request.read())
        except msgspec.DecodeError as error:
            return _json(400, {"error": {"type": "invalid_request", "message": f"invalid body: {error}"}})
        charge = gateway.charge_by_id(request.match_info["charge_id"])
        result = await gateway.refund(charge, key=key, body=body)
        if isinstance(result, RefundRefusal):
            detail: dict[str, object] = {"type": result.value}
            if result is RefundRefusal.EXCEEDS_REMAINING and charge is not None:
                detail["remaining_minor"] = charge.amount_minor - gateway.refunds.refunded(charge.id)
            return _json(_REFUSAL_STATUS[result], {"error": detail})
        refund, replayed = result
        return _json(200, refund, {"Idempotent-Replayed": "true"} if replayed else None)

    async def get_refund(request: web.Request) -> web.Response:
        refund = gateway_of(request).refunds.lookup(request.match_info["idempotency_key"])
        if refund is None:
            return _json(404, {"error": {"type": "not_found"}})
        return _json(200, refund)

    return [
        web.post("/v1/charges/{charge_id}/refunds", post_refund),
        web.get("/v1/refunds/{idempotency_key}", get_refund),
    ]
