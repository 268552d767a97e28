"""The Redis client every part of payd uses: password from the secrets, TLS from ``[redis]``."""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions

from daemon.config import RedisSettings
from daemon.secrets import Secret
from daemon.tls import Link, naming_tls_failures, redis_tls_options, url_address


def redis_client(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client for ``settings.url``; it connects on first use."""
    tls = settings.effective_tls
    options = redis_tls_options(tls) if tls is not None else {}
    return aioredis.from_url(settings.url, password=password.reveal() if password else None, **options)


async def open_redis(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client whose TLS link has been tried once: a server that fails verification is a
    ``TlsLinkError``. Redis merely being down is not an error here; the halt watch copes."""
    client = redis_client(settings, password)
    if settings.effective_tls is None:
        return client
    try:
        with naming_tls_failures(Link.REDIS, url_address(settings.url)):
            await client.ping()
    except (redis.exceptions.RedisError, OSError):
        pass  # unreachable: the same as without TLS
    except BaseException:
        await client.aclose()
        raise
    return client
