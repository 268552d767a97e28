"""The sandbox gateway: a real HTTP server that behaves like a payment gateway.

Two layers. `Gateway` is the core every dialect shares: the ledger of executed
charges, the idempotency store, token outcomes, latency and fault injection, and the
stats. It knows nothing of HTTP. The native dialect below (`/v1/charges`) and the
control endpoints (`/_sandbox/...`) are the wire format payd's sandbox adapter is
written against; other dialects (Stripe-, Adyen-shaped routes) would be further route
sets calling the same `Gateway.charge` / `Gateway.lookup`.

The hot path is kept plain because load tests must measure payd, not this server:
decoders and constant bodies are built once, nothing is logged per request, and a
request with latency off never touches a timer.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Final

import msgspec
from aiohttp import web

from payd_sandbox.behaviour import (
    TOKEN_OUTCOMES,
    Dice,
    Fault,
    LatencyDist,
    Outcome,
    SandboxBehaviour,
    SandboxSettings,
    SettingError,
    add_arguments,
    seeded_generators,
    settings_from_args,
    snapshot,
    updated,
)
from payd_sandbox.refunds import Charge as RefundableCharge
from payd_sandbox.refunds import Refund, RefundBody, RefundBook, RefundRefusal, refund_routes

__all__ = [
    "GATEWAY_KEY",
    "AccountStats",
    "Charge",
    "ChargeRequest",
    "ChargeStatus",
    "Executed",
    "Gateway",
    "LatencyDist",
    "Refusal",
    "SandboxBehaviour",
    "SandboxSettings",
    "SettingError",
    "Stats",
    "add_arguments",
    "build_app",
    "serve",
    "settings_from_args",
]

# --- core ----------------------------------------------------------------------------------


class ChargeStatus(enum.StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"


class Refusal(enum.StrEnum):
    """Why a charge request executed nothing. None of these charges or stores the key."""

    RATE_LIMITED = "rate_limited"
    API_ERROR = "api_error"
    UNAVAILABLE = "unavailable"  # an injected hang ended
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"  # the key is still being processed
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"  # the key was used for another charge


class ChargeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A charge as the gateway understands it; unknown JSON fields are ignored."""

    amount_minor: Annotated[int, msgspec.Meta(gt=0)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}\Z")]
    payment_method: Annotated[str, msgspec.Meta(min_length=1)]
    merchant_reference: Annotated[str, msgspec.Meta(min_length=1)]
    customer_ref: str | None = None
    metadata: dict[str, str] = {}


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    """An executed charge: approved or declined, in the ledger and the idempotency store."""

    id: str
    status: ChargeStatus
    decline_code: str | None
    retryable: bool
    idempotency_key: str
    merchant_reference: str
    amount_minor: int
    currency: str
    payment_method: str
    account: str
    created_at: float


class Executed(msgspec.Struct, frozen=True):
    charge: Charge
    replayed: bool  # an earlier request with this key executed it


class _Verdict(msgspec.Struct, frozen=True):
    status: ChargeStatus
    decline_code: str | None
    retryable: bool


_VERDICTS: Final[Mapping[Outcome, _Verdict | Refusal]] = {
    Outcome.APPROVE: _Verdict(ChargeStatus.APPROVED, None, retryable=False),
    Outcome.TIMEOUT: _Verdict(ChargeStatus.APPROVED, None, retryable=False),
    Outcome.SOFT_DECLINE: _Verdict(ChargeStatus.DECLINED, "insufficient_funds", retryable=True),
    Outcome.HARD_DECLINE: _Verdict(ChargeStatus.DECLINED, "stolen_card", retryable=False),
    Outcome.ERROR: Refusal.API_ERROR,
    Outcome.RATE_LIMITED: Refusal.RATE_LIMITED,
}

_FAULT_REFUSALS: Final[Mapping[Fault, Refusal]] = {
    Fault.ERROR: Refusal.API_ERROR,
    Fault.RATE_LIMITED: Refusal.RATE_LIMITED,
    Fault.HANG: Refusal.UNAVAILABLE,
}


class AccountStats(msgspec.Struct):
    """Charge requests seen, and how many were inside the gateway at once."""

    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


class Stats(msgspec.Struct, kw_only=True):
    """Charge requests (`requests`, `in_flight`, `peak_in_flight`, also per account),
    lookups, and charges executed since the start or the last reset."""

    requests: int
    in_flight: int
    peak_in_flight: int
    lookups: int
    charges: int
    approved: int
    declined: int
    accounts: dict[str, AccountStats]
    refund_requests: int = 0
    refunds: int = 0


def _same_charge(charge: Charge | ChargeRequest, request: ChargeRequest) -> bool:
    return (
        charge.amount_minor == request.amount_minor
        and charge.currency == request.currency
        and charge.payment_method == request.payment_method
        and charge.merchant_reference == request.merchant_reference
    )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Gateway:
    """The state of one sandbox gateway, shared by every dialect.

    Idempotency keys are global, not per account, so a lookup finds a charge whatever
    account made it. Everything runs on one event loop, so no locks are needed: the
    only awaits are pauses, and the pending map covers the pause before a charge.
    """

    def __init__(self, behaviour: SandboxBehaviour) -> None:
        self._behaviour = snapshot(behaviour)
        self._rng, self._latency_rng = seeded_generators(self._behaviour.seed)
        self._dice = Dice(self._behaviour, rng=self._rng, latency_rng=self._latency_rng)
        self._ledger: list[Charge] = []
        self._by_key: dict[str, Charge] = {}
        self._by_id: dict[str, Charge] = {}
        self.refunds = RefundBook()
        self._pending: dict[str, ChargeRequest] = {}
        self._totals = AccountStats()
        self._accounts: dict[str, AccountStats] = {}
        self._lookups = 0
        self._approved = 0
        self._pauses: set[asyncio.Future[None]] = set()
        self._closing = False

    @property
    def behaviour(self) -> SandboxBehaviour:
        return self._behaviour

    @property
    def retry_after_s(self) -> int:
        return self._dice.retry_after_s

    def set_behaviour(self, changes: Mapping[str, object]) -> SandboxBehaviour:
        """Apply a subset of settings live; reseeds only if `seed` is among them.

        Raises `ValueError` naming the setting; the behaviour is unchanged then.
        """
        behaviour = updated(self._behaviour, changes)
        if "seed" in changes:
            self._rng, self._latency_rng = seeded_generators(behaviour.seed)
        self._behaviour = behaviour
        self._dice = Dice(behaviour, rng=self._rng, latency_rng=self._latency_rng)
        return behaviour

    async def charge(
        self, *, account: str, idempotency_key: str, request: ChargeRequest
    ) -> Executed | Refusal:
        """Execute a charge at most once per key.

        In order: injected faults (nothing charged, key left free); a completed key
        (replay, or 422 if the charge differs); a key still in progress (409, or 422);
        then latency, the token table or the mix, and recording. A pm_timeout charge is
        recorded before its hang.
        """
        dice = self._dice
        fault = dice.fault()
        if fault is not None:
            if fault is Fault.HANG:
                await self._pause(dice.hang_s)
            return _FAULT_REFUSALS[fault]
        earlier = self._earlier_use(idempotency_key, request)
        if earlier is None:
            return await self._execute(account, idempotency_key, request, dice)
        if isinstance(earlier, Executed):
            await self._pause(dice.latency_s())  # a replay takes as long as a lookup
        return earlier

    def _earlier_use(self, idempotency_key: str, request: ChargeRequest) -> Executed | Refusal | None:
        """What an earlier request with this key decides for this one, if there was one."""
        done = self._by_key.get(idempotency_key)
        if done is not None:
            if _same_charge(done, request):
                return Executed(done, replayed=True)
            return Refusal.IDEMPOTENCY_MISMATCH
        pending = self._pending.get(idempotency_key)
        if pending is not None:
            if _same_charge(pending, request):
                return Refusal.IDEMPOTENCY_CONFLICT
            return Refusal.IDEMPOTENCY_MISMATCH
        return None

    async def _execute(
        self, account: str, idempotency_key: str, request: ChargeRequest, dice: Dice
    ) -> Executed | Refusal:
        # From here until the charge is stored the key is taken: another request with
        # it gets 409, however long the latency.
        self._pending[idempotency_key] = request
        try:
            await self._pause(dice.latency_s())
            outcome = TOKEN_OUTCOMES.get(request.payment_method) or dice.mix_outcome()
            verdict = _VERDICTS[outcome]
            if isinstance(verdict, Refusal):
                return verdict
            charge = self._record(account, idempotency_key, request, verdict)
        finally:
            self._pending.pop(idempotency_key, None)
        if outcome is Outcome.TIMEOUT:
            # Recorded first: a lookup during the hang already finds the charge.
            await self._pause(dice.hang_s)
        return Executed(charge, replayed=False)

    def charge_by_id(self, charge_id: str) -> Charge | None:
        return self._by_id.get(charge_id)

    async def refund(
        self, charge: RefundableCharge | None, *, key: str, body: RefundBody
    ) -> tuple[Refund, bool] | RefundRefusal:
        """Refund (part of) an executed charge at most once per key (``refunds``)."""
        return await self.refunds.refund(
            charge,
            key=key,
            body=body,
            pause=self._pause,
            latency_s=self._dice.latency_s(),
            hang_s=self._dice.hang_s,
        )

    async def lookup(self, idempotency_key: str) -> Charge | None:
        """The charge executed under this key, if any (pending ones are not executed yet)."""
        self._lookups += 1
        await self._pause(self._dice.latency_s())
        return self._by_key.get(idempotency_key)

    def _record(
        self, account: str, idempotency_key: str, request: ChargeRequest, verdict: _Verdict
    ) -> Charge:
        charge = Charge(
            id="ch_" + secrets.token_hex(12),
            status=verdict.status,
            decline_code=verdict.decline_code,
            retryable=verdict.retryable,
            idempotency_key=idempotency_key,
            merchant_reference=request.merchant_reference,
            amount_minor=request.amount_minor,
            currency=request.currency,
            payment_method=request.payment_method,
            account=account,
            created_at=time.time(),
        )
        self._ledger.append(charge)
        self._by_key[idempotency_key] = charge
        self._by_id[charge.id] = charge
        if verdict.status is ChargeStatus.APPROVED:
            self._approved += 1
        return charge

    # Stats: a dialect calls arrive() when a charge request comes in and depart() when
    # its response is ready, so injected latency and hangs count as in flight.

    def arrive(self, account: str) -> AccountStats:
        stats = self._accounts.get(account)
        if stats is None:
            stats = self._accounts[account] = AccountStats()
        for counter in (self._totals, stats):
            counter.requests += 1
            counter.in_flight += 1
            counter.peak_in_flight = max(counter.peak_in_flight, counter.in_flight)
        return stats

    def depart(self, stats: AccountStats) -> None:
        self._totals.in_flight -= 1
        stats.in_flight -= 1

    def ledger(self) -> Sequence[Charge]:
        return self._ledger

    def stats(self) -> Stats:
        """A snapshot; later requests do not change it."""
        totals = self._totals
        return Stats(
            requests=totals.requests,
            in_flight=totals.in_flight,
            peak_in_flight=totals.peak_in_flight,
            lookups=self._lookups,
            charges=len(self._ledger),
            approved=self._approved,
            declined=len(self._ledger) - self._approved,
            accounts={name: msgspec.structs.replace(s) for name, s in self._accounts.items()},
            refund_requests=self.refunds.requests,
            refunds=len(self.refunds.refunds),
        )

    def reset(self) -> None:
        """Forget every charge and count. Requests still inside stay counted as in flight
        (their departure must not drive the count negative), and a seeded gateway starts
        its sequence again, so a reset run repeats the outcomes of the first."""
        self._ledger = []
        self._by_key = {}
        self._by_id = {}
        self.refunds = RefundBook()
        self._lookups = self._approved = 0
        for stats in (self._totals, *self._accounts.values()):
            stats.requests = 0
            stats.peak_in_flight = stats.in_flight
        self._accounts = {name: s for name, s in self._accounts.items() if s.in_flight}
        if self._behaviour.seed is not None:
            self.set_behaviour({"seed": self._behaviour.seed})

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end at once when the gateway closes, so no handler outlives it."""
        if seconds <= 0 or self._closing:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        self._pauses.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._pauses.discard(waiter)

    def close(self) -> None:
        """End every pause (hangs included) now and skip later ones; the server is going."""
        self._closing = True
        for waiter in self._pauses:
            _wake(waiter)


# --- native dialect and control endpoints ---------------------------------------------------

GATEWAY_KEY: Final = web.AppKey("sandbox_gateway", Gateway)

_JSON: Final = "application/json"
_DEFAULT_ACCOUNT: Final = "default"
_MAX_KEY_LENGTH: Final = 255


class _ChargeBody(msgspec.Struct):
    id: str
    status: ChargeStatus
    decline_code: str | None
    retryable: bool
    idempotency_key: str
    merchant_reference: str
    amount_minor: int
    currency: str
    created_at: float


class _LedgerEntry(msgspec.Struct):
    id: str
    idempotency_key: str
    merchant_reference: str
    amount_minor: int
    currency: str
    status: ChargeStatus
    decline_code: str | None
    account: str
    created_at: float
    refunded_minor: int
    net_minor: int
    """What the charge took less what was refunded (0 for a declined charge)."""


_encode = msgspec.json.Encoder().encode
_decode_charge_request = msgspec.json.Decoder(ChargeRequest).decode
_decode_changes = msgspec.json.Decoder(dict[str, object]).decode

_STATUS_CODES: Final[Mapping[ChargeStatus, int]] = {
    ChargeStatus.APPROVED: 200,
    ChargeStatus.DECLINED: 402,
}
_REPLAYED: Final[Mapping[str, str]] = {"Idempotent-Replayed": "true"}


def _error(kind: str, **fields: object) -> bytes:
    return _encode({"error": {"type": kind, **fields}})


# 429 is missing: its body and header carry the live retry_after_s.
_REFUSALS: Final[Mapping[Refusal, tuple[int, bytes]]] = {
    Refusal.API_ERROR: (
        500,
        _error("api_error", charged=False, message="sandbox: internal error, nothing charged"),
    ),
    Refusal.UNAVAILABLE: (503, _error("unavailable", charged=False)),
    Refusal.IDEMPOTENCY_CONFLICT: (409, _error("idempotency_conflict")),
    Refusal.IDEMPOTENCY_MISMATCH: (422, _error("idempotency_mismatch")),
}
_NOT_FOUND: Final = _error("not_found")


def _json(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _invalid(message: str) -> web.Response:
    return _json(400, _error("invalid_request", message=message))


def _charge_response(charge: Charge, *, replayed: bool) -> web.Response:
    body = _ChargeBody(
        charge.id,
        charge.status,
        charge.decline_code,
        charge.retryable,
        charge.idempotency_key,
        charge.merchant_reference,
        charge.amount_minor,
        charge.currency,
        charge.created_at,
    )
    headers = _REPLAYED if replayed else None
    return _json(_STATUS_CODES[charge.status], _encode(body), headers)


def _refusal_response(refusal: Refusal, retry_after_s: int) -> web.Response:
    if refusal is Refusal.RATE_LIMITED:
        message = f"sandbox: rate limited, retry after {retry_after_s} s"
        body = _error("rate_limited", message=message)
        return _json(429, body, {"Retry-After": str(retry_after_s)})
    status, body = _REFUSALS[refusal]
    return _json(status, body)


async def _post_charge(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    account = request.headers.get("Sandbox-Account") or _DEFAULT_ACCOUNT
    stats = gateway.arrive(account)
    try:
        key = request.headers.get("Idempotency-Key")
        if not key or len(key) > _MAX_KEY_LENGTH:
            return _invalid(f"Idempotency-Key header must hold 1-{_MAX_KEY_LENGTH} characters")
        try:
            charge_request = _decode_charge_request(await request.read())
        except msgspec.DecodeError as exc:
            return _invalid(f"invalid body: {exc}")
        result = await gateway.charge(account=account, idempotency_key=key, request=charge_request)
        if isinstance(result, Refusal):
            return _refusal_response(result, gateway.retry_after_s)
        return _charge_response(result.charge, replayed=result.replayed)
    finally:
        gateway.depart(stats)


async def _get_charge(request: web.Request) -> web.Response:
    charge = await request.app[GATEWAY_KEY].lookup(request.match_info["idempotency_key"])
    if charge is None:
        return _json(404, _NOT_FOUND)
    return _charge_response(charge, replayed=False)


async def _get_ledger(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    entries = [
        _LedgerEntry(
            c.id,
            c.idempotency_key,
            c.merchant_reference,
            c.amount_minor,
            c.currency,
            c.status,
            c.decline_code,
            c.account,
            c.created_at,
            gateway.refunds.refunded(c.id),
            (c.amount_minor if c.status is ChargeStatus.APPROVED else 0) - gateway.refunds.refunded(c.id),
        )
        for c in gateway.ledger()
    ]
    return _json(200, _encode({"charges": entries, "refunds": gateway.refunds.refunds}))


async def _get_stats(request: web.Request) -> web.Response:
    return _json(200, _encode(request.app[GATEWAY_KEY].stats()))


async def _post_reset(request: web.Request) -> web.Response:
    request.app[GATEWAY_KEY].reset()
    return web.Response(status=204)


async def _get_behaviour(request: web.Request) -> web.Response:
    return _json(200, _encode(request.app[GATEWAY_KEY].behaviour))


async def _post_behaviour(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        changes = _decode_changes(body) if body.strip() else {}
        behaviour = request.app[GATEWAY_KEY].set_behaviour(changes)
    except ValueError as exc:  # msgspec's DecodeError and ValidationError included
        return _invalid(str(exc))
    return _json(200, _encode(behaviour))


async def _end_pauses(app: web.Application) -> None:
    app[GATEWAY_KEY].close()


def build_app(behaviour: SandboxBehaviour) -> web.Application:
    """The sandbox gateway as an aiohttp application, with a fresh `Gateway`."""
    app = web.Application()
    app[GATEWAY_KEY] = Gateway(behaviour)
    # on_shutdown runs before aiohttp waits for handlers to finish, so hangs end first.
    app.on_shutdown.append(_end_pauses)
    app.add_routes(
        [
            web.post("/v1/charges", _post_charge),
            web.get("/v1/charges/{idempotency_key}", _get_charge),
            web.get("/_sandbox/ledger", _get_ledger),
            web.get("/_sandbox/stats", _get_stats),
            web.post("/_sandbox/reset", _post_reset),
            web.get("/_sandbox/behaviour", _get_behaviour),
            web.post("/_sandbox/behaviour", _post_behaviour),
            *refund_routes(lambda request: request.app[GATEWAY_KEY]),
        ]
    )
    from payd_sandbox.dialects import add_dialect_routes  # noqa: PLC0415 (dialects import us)

    add_dialect_routes(app)
    return app


LISTEN_BACKLOG = 4096
"""Connections the kernel queues before the gateway accepts them (capped by net.core.somaxconn).
aiohttp's default, 128, overflows when a daemon opens thousands of connections at once (10,000
calls in flight): dropped SYNs are retried after 1 s, 3 s, ..., connects outlast
``connect_timeout_s``, and the provider's breaker opens on a gateway that was only slow to accept."""


async def serve(settings: SandboxSettings, shutdown: asyncio.Event) -> None:
    """Listen until `shutdown` is set, then close. The caller owns the loop and signals."""
    runner = web.AppRunner(build_app(settings.behaviour), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
        await site.start()
        port = runner.addresses[0][1]  # the real one when settings.port is 0
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"sandbox gateway listening on http://{host}:{port}", flush=True)
        await shutdown.wait()
    finally:
        await runner.cleanup()
