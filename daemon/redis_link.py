"""The Redis client every part of payd uses: password from the secrets, TLS from ``[redis]``."""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from daemon.config import RedisSettings
from daemon.secrets import Secret
from daemon.tls import Link, naming_tls_failures, redis_tls_options, url_address

log = structlog.get_logger("payd.redis")


def redis_client(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client for ``settings.url``; it connects on first use."""
    tls = settings.effective_tls
    options = redis_tls_options(tls) if tls is not None else {}
    return aioredis.from_url(settings.url, password=password.reveal() if password else None, **options)


async def open_redis(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client that has been tried once (``from_url`` alone connects lazily).

    A server that fails TLS verification is a ``TlsLinkError``: a configuration
    problem, fatal at start-up. Redis merely not answering is not: the instance
    starts with its halt state unknown, which stops every provider call until
    the halt watch reads the keys (``daemon.halt``), and ``/readyz`` says why.
    """
    client = redis_client(settings, password)
    try:
        with naming_tls_failures(Link.REDIS, url_address(settings.url)):
            await client.ping()
    except (redis.exceptions.RedisError, OSError) as error:
        log.warning(
            "startup.redis_unreachable",
            address=url_address(settings.url),
            error=repr(error),
            consequence="no provider call until the halt state is read",
        )
    except BaseException:
        await client.aclose()
        raise
    return client
