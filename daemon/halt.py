"""The emergency stop: a fleet-wide halt, global or per provider, kept in Redis.

``payd halt`` (or ``POST /admin/halt``) writes a key; every instance polls the
keys four times a second, so within one second no instance starts a new
provider call (charges, lookups and re-sends alike). Calls already on the wire
finish. Attempts already claimed wait in memory (their rows stay in_flight
under a live lease), and when a claim would run out they go back to the queue;
nothing is failed. ``payd resume`` deletes the key.

If Redis cannot be reached, an instance keeps the last halt state it read: a
halted fleet stays halted rather than resuming on a network blip, and a
running fleet keeps running rather than stopping every payment because the
halt store is down. Either way ``/readyz`` and ``payd_halt_state_stale`` say
the state may be old.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import msgspec
import redis.asyncio as aioredis
import structlog

from daemon.redis_errors import REDIS_ERRORS

log = structlog.get_logger("payd.halt")

POLL_INTERVAL_S: Final = 0.25


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
    """This instance's view of the halt keys, refreshed by ``watch``."""

    def __init__(self, providers: Iterable[str], keys: HaltKeys) -> None:
        self._providers = list(providers)
        self.keys = keys
        self.global_order: HaltOrder | None = None
        self.provider_orders: dict[str, HaltOrder] = {}
        self.stale = False
        self.last_read = 0.0
        self._changed = asyncio.Event()

    def blocks(self, provider: str) -> bool:
        return self.global_order is not None or provider in self.provider_orders

    async def wait_for_change(self, at_most_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(at_most_s, 0.001))

    def apply(self, global_raw: bytes | None, provider_raw: dict[str, bytes | None]) -> None:
        before = (self.global_order, dict(self.provider_orders))
        self.global_order = _parse(global_raw)
        self.provider_orders = {
            name: order for name, raw in provider_raw.items() if (order := _parse(raw)) is not None
        }
        self.stale = False
        self.last_read = time.monotonic()
        if (self.global_order, self.provider_orders) != before:
            log.warning(
                "halt.changed",
                global_halt=self.global_order is not None,
                halted_providers=sorted(self.provider_orders),
            )
            self._changed.set()

    async def watch(self, client: aioredis.Redis) -> None:
        """Poll the halt keys for the daemon's lifetime."""
        keys = [self.keys.global_key, *(self.keys.provider_key(name) for name in self._providers)]
        while True:
            try:
                values = await client.mget(keys)
            except REDIS_ERRORS as error:
                if not self.stale:
                    log.warning("halt.redis_unreachable", error=repr(error), keeping_last_state=True)
                self.stale = True
            else:
                raw = [value.encode() if isinstance(value, str) else value for value in values]
                self.apply(raw[0], dict(zip(self._providers, raw[1:], strict=True)))
            await asyncio.sleep(POLL_INTERVAL_S)

    def snapshot(self) -> dict[str, object]:
        return {
            "global": msgspec.to_builtins(self.global_order),
            "providers": {name: msgspec.to_builtins(order) for name, order in self.provider_orders.items()},
            "stale": self.stale,
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
