"""Request-rate limits per provider: a local token bucket, or one shared by the fleet through Redis.

A provider's account-wide quota (e.g. Stripe's live-mode request limit) is
shared by every payd instance, so it is enforced in Redis. To keep the hot
path free of a Redis round trip per call, an instance takes tokens in small
chunks and spends them locally. If Redis cannot be reached, the instance
falls back to a local bucket at ``fallback_rate_per_s`` and says so in its
metrics, rather than either stopping or exceeding the quota on its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol

import redis.asyncio as aioredis
import structlog

from daemon.config import ProviderConfig
from daemon.redis_errors import REDIS_ERRORS

log = structlog.get_logger("payd.ratelimit")


class RateLimit(Protocol):
    async def take(self) -> None:
        """Wait until one call may start."""


class Unlimited:
    async def take(self) -> None:
        return None


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; waiters queue fairly."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self._burst = max(1.0, burst)
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now

    def try_take(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        async with self._lock:
            # Tokens arrive with time, not with an event: sleep until the next one is due.
            while not self.try_take():  # noqa: ASYNC110
                await asyncio.sleep((1 - self._tokens) / self.rate_per_s)


# Server-side token bucket; Redis' own clock, so instances' clocks do not matter.
_TAKE_SCRIPT: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return granted
"""


class FleetTokenBucket:
    """A token bucket in Redis shared by every instance, spent locally in chunks."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key: str,
        rate_per_s: float,
        burst: float,
        fallback_rate_per_s: float,
    ) -> None:
        self._client = client
        self._key = key
        self.rate_per_s = rate_per_s
        self._burst = max(1.0, burst)
        # Small chunks keep the fleet close to fair; at least one round trip per 50 ms of quota.
        self._chunk = max(1, int(rate_per_s / 20))
        self._local = 0
        self._lock = asyncio.Lock()
        self._fallback = TokenBucket(fallback_rate_per_s, fallback_rate_per_s)
        self._script = client.register_script(_TAKE_SCRIPT)
        self.redis_ok = True

    async def take(self) -> None:
        if self._local > 0:
            self._local -= 1
            return
        async with self._lock:
            while self._local <= 0:
                granted = await self._ask()
                if granted is None:
                    await self._fallback.take()
                    return
                if granted == 0:
                    await asyncio.sleep(self._chunk / self.rate_per_s / 2)
                self._local += granted
            self._local -= 1

    async def _ask(self) -> int | None:
        try:
            granted = int(
                await self._script(keys=[self._key], args=[self.rate_per_s, self._burst, self._chunk])
            )
        except REDIS_ERRORS as error:
            if self.redis_ok:
                log.warning("ratelimit.redis_unreachable", key=self._key, error=repr(error))
            self.redis_ok = False
            return None
        if not self.redis_ok:
            log.info("ratelimit.redis_back", key=self._key)
        self.redis_ok = True
        return granted


def rate_limit_for(name: str, config: ProviderConfig, client: aioredis.Redis, key_prefix: str) -> RateLimit:
    """The rate limit a provider's configuration asks for: fleet-wide, local, or none."""
    if config.fleet_rate_per_s is not None:
        return FleetTokenBucket(
            client,
            key=f"{key_prefix}:ratelimit:{name}",
            rate_per_s=config.fleet_rate_per_s,
            burst=config.burst or config.fleet_rate_per_s,
            fallback_rate_per_s=config.fallback_rate_per_s or config.fleet_rate_per_s / 4,
        )
    if config.rate_per_s is not None:
        return TokenBucket(config.rate_per_s, config.burst or config.rate_per_s)
    return Unlimited()
