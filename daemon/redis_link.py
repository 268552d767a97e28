"""The Redis client every part of payd uses: password from the secrets, TLS from ``[redis]``."""

from __future__ import annotations

import redis.asyncio as aioredis

from daemon.config import RedisSettings
from daemon.secrets import Secret
from daemon.tls import Link, naming_tls_failures, redis_tls_options, url_address


def redis_client(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client for ``settings.url``; it connects on first use."""
    tls = settings.effective_tls
    options = redis_tls_options(tls) if tls is not None else {}
    return aioredis.from_url(settings.url, password=password.reveal() if password else None, **options)


async def open_redis(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client that has answered once (``from_url`` alone connects lazily).

    A server that fails TLS verification is a ``TlsLinkError`` (a configuration
    problem: not retried); Redis not answering raises its own error, which
    start-up retries until ``[daemon] startup_timeout_s``. A new instance has no
    last halt state to keep, so it makes no provider call before Redis answers.
    """
    client = redis_client(settings, password)
    try:
        with naming_tls_failures(Link.REDIS, url_address(settings.url)):
            await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client
