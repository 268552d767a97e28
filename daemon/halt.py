"""The emergency stop: a fleet-wide halt, global or per provider, kept in Redis.

``payd halt`` (or ``POST /admin/halt``) writes a key; every instance polls the
keys four times a second, so within one second no instance starts a new
provider call (charges, lookups and re-sends alike). Calls already on the wire
finish. Attempts already claimed wait in memory (their rows stay in_flight
under a live lease), and when a claim would run out they go back to the queue;
nothing is failed. ``payd resume`` deletes the key.

The halt fails safe. An instance that cannot read the keys (Redis down or
hung, an ACL that refuses the read, a watcher that died) keeps the last state
it read for ``[redis] halt_grace_s``; after that the halt state is *unknown*
and the instance behaves as halted for every provider until a read succeeds
again. Freshness is judged by the time of the last successful read, not by an
error being seen, so even a watcher that stopped without a word cannot leave
the instance charging. A grace of at most a second keeps the fleet-wide
contract ("no new provider call within one second") for an instance cut off
from Redis too; ``/readyz``, ``/status``, ``payd_halt_state_unknown`` and a log
line say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import msgspec
import redis.asyncio as aioredis
import structlog

log = structlog.get_logger("payd.halt")

POLL_INTERVAL_S: Final = 0.25
DEFAULT_GRACE_S: Final = 1.0
READ_TIMEOUT_S: Final = 1.0
"""A read that takes longer is abandoned and retried: a hung Redis must not hang the watcher."""


class HaltKeys(msgspec.Struct, frozen=True):
    """Where one fleet's halt lives: ``PREFIX:halt:global`` and ``PREFIX:halt:provider:NAME``."""

    prefix: str

    @property
    def global_key(self) -> str:
        return f"{self.prefix}:halt:global"

    def provider_key(self, provider: str) -> str:
        return f"{self.prefix}:halt:provider:{provider}"

    def key(self, provider: str | None) -> str:
        return self.provider_key(provider) if provider else self.global_key


class HaltOrder(msgspec.Struct, frozen=True, kw_only=True):
    """What is stored under a halt key: who halted, when and why."""

    reason: str
    by: str
    at: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(HaltOrder).decode


class HaltState:
    """This instance's view of the halt keys, refreshed by ``watch``.

    It starts unknown: until the first read succeeds, nothing is called.
    """

    def __init__(self, providers: Iterable[str], keys: HaltKeys, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        self._providers = list(providers)
        self.keys = keys
        self.grace_s = grace_s
        self.global_order: HaltOrder | None = None
        self.provider_orders: dict[str, HaltOrder] = {}
        self.stale = False
        """The last read failed (the last state read is kept, within the grace)."""
        self.last_read = -math.inf
        """When the last successful read was sent (monotonic clock): what it saw was true then."""
        self.last_error: str | None = None
        self.read_errors = 0
        self._reported_unknown = False
        self._changed = asyncio.Event()

    def known(self) -> bool:
        """Whether the last successful read is recent enough to act on."""
        return time.monotonic() - self.last_read <= self.grace_s

    def fresh(self) -> bool:
        return not self.stale and self.known()

    def blocks(self, provider: str) -> bool:
        return self.global_order is not None or provider in self.provider_orders or not self.known()

    async def wait_for_change(self, at_most_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(at_most_s, 0.001))

    def apply(
        self, global_raw: bytes | None, provider_raw: dict[str, bytes | None], *, read_at: float | None = None
    ) -> None:
        """Take a successful read of the keys, sent at ``read_at`` (default: now)."""
        was_known = self.known()
        before = (self.global_order, dict(self.provider_orders))
        self.global_order = _parse(global_raw)
        self.provider_orders = {
            name: order for name, raw in provider_raw.items() if (order := _parse(raw)) is not None
        }
        self.stale = False
        self.last_error = None
        self.last_read = time.monotonic() if read_at is None else read_at
        if self._reported_unknown:
            self._reported_unknown = False
            log.warning("halt.state_known", global_halt=self.global_order is not None)
        if (self.global_order, self.provider_orders) != before:
            log.warning(
                "halt.changed",
                global_halt=self.global_order is not None,
                halted_providers=sorted(self.provider_orders),
            )
            self._changed.set()
        elif not was_known:
            self._changed.set()  # attempts waiting on an unknown state may go on

    def failed(self, error: BaseException) -> None:
        """Take a failed read: the last state is kept until the grace runs out."""
        self.read_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"[:200]
        if not self.stale:
            log.warning("halt.read_failed", error=self.last_error, keeping_last_state_for_s=self.grace_s)
        self.stale = True

    def report_if_unknown(self) -> None:
        """Log once when the grace has run out: from now on no provider is called."""
        if self._reported_unknown or self.known():
            return
        self._reported_unknown = True
        log.error(
            "halt.state_unknown",
            error=self.last_error or "no successful read",
            grace_s=self.grace_s,
            behaving_as="halted for every provider until the halt keys can be read",
        )

    async def read(self, client: aioredis.Redis) -> None:
        """One read of every halt key; any failure is recorded, never raised."""
        keys = [self.keys.global_key, *(self.keys.provider_key(name) for name in self._providers)]
        sent = time.monotonic()
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                values = await client.mget(keys)
        except Exception as error:  # any failure, an ACL refusal or a timeout included, is a missed read
            self.failed(error)
        else:
            raw = [value.encode() if isinstance(value, str) else value for value in values]
            self.apply(raw[0], dict(zip(self._providers, raw[1:], strict=True)), read_at=sent)
        self.report_if_unknown()

    async def watch(self, client: aioredis.Redis) -> None:
        """Poll the halt keys for the daemon's lifetime."""
        try:
            while True:
                await self.read(client)
                await asyncio.sleep(POLL_INTERVAL_S)
        finally:
            # Whoever stopped us, the state goes unknown after the grace and calls stop.
            log.info("halt.watch_stopped", calls_stop_after_s=self.grace_s)

    def describe(self) -> str:
        """Why the halt state is not fresh, for /readyz; empty when it is."""
        if self.fresh():
            return ""
        error = self.last_error or "no successful read yet"
        if not self.known():
            age = time.monotonic() - self.last_read
            since = "ever" if math.isinf(age) else f"{age:.1f} s"
            return f"halt state unknown (no read for {since}; {error}): no new provider calls"
        return f"last halt read failed ({error}): keeping the last state for up to {self.grace_s} s"

    def snapshot(self) -> dict[str, object]:
        age = time.monotonic() - self.last_read
        return {
            "global": msgspec.to_builtins(self.global_order),
            "providers": {name: msgspec.to_builtins(order) for name, order in self.provider_orders.items()},
            "stale": self.stale,
            "known": self.known(),
            "last_read_age_s": None if math.isinf(age) else round(age, 3),
            "last_error": self.last_error,
            "read_errors": self.read_errors,
        }


def _parse(raw: bytes | None) -> HaltOrder | None:
    if raw is None:
        return None
    try:
        return _decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Something wrote the key by hand: a halt is a halt, whatever it says.
        return HaltOrder(reason=raw.decode(errors="replace")[:200], by="unknown", at="unknown")


async def set_halt(
    client: aioredis.Redis, keys: HaltKeys, *, provider: str | None, reason: str, by: str
) -> None:
    order = HaltOrder(reason=reason, by=by, at=datetime.now(UTC).isoformat(timespec="seconds"))
    await client.set(keys.key(provider), _encode(order))


async def clear_halt(client: aioredis.Redis, keys: HaltKeys, *, provider: str | None) -> bool:
    return bool(await client.delete(keys.key(provider)))
