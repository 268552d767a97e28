"""The Redis client every part of payd uses: password from the secrets, TLS from ``[redis]``.

With ``[redis] sentinels``, the client asks the Sentinels for the master of
``sentinel_service`` and asks again whenever a connection fails, so the halt and
the fleet rate limits follow the master through a failover. While no master
answers, callers see connection errors, as with a single Redis that is down, and
the halt watch's fail-safe applies (``daemon/halt.py``).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.sentinel import Sentinel
from yarl import URL

from daemon.config import RedisSettings
from daemon.secrets import Secret, load_secret
from daemon.tls import Link, naming_tls_failures, redis_tls_options, url_address

log = structlog.get_logger("payd.redis")

# A Sentinel that does not answer within this long is skipped for the next one.
SENTINEL_TIMEOUT_S = 2.0


def redis_client(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client for ``settings.url`` or the Sentinels' master; it connects on first use."""
    tls = settings.effective_tls
    options = redis_tls_options(tls) if tls is not None else {}
    if settings.sentinels:
        return _sentinel_master(settings, password, options)
    return aioredis.from_url(settings.url, password=password.reveal() if password else None, **options)


def _sentinel_master(settings: RedisSettings, password: Secret | None, tls: dict[str, Any]) -> aioredis.Redis:
    """The master through redis-py's ``Sentinel`` (https://redis.io/docs/latest/develop/clients/
    sentinel-client-spec/: ask each Sentinel ``SENTINEL get-master-addr-by-name``, check the
    answer with ``ROLE``); the Sentinels share the link's TLS settings and have their own
    optional password, the secret ``redis_sentinel_password``."""
    url = URL(settings.url)
    ssl = {"ssl": True, **tls} if tls else {}
    sentinel_password = load_secret("redis_sentinel_password")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves its __init__ unannotated
        [_host_port(address) for address in settings.sentinels],
        sentinel_kwargs={
            "password": sentinel_password.reveal() if sentinel_password else None,
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            **ssl,
        },
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.sentinel_service,
        db=int(url.path.strip("/") or 0),
        username=url.user or None,
        password=password.reveal() if password else None,
        socket_connect_timeout=SENTINEL_TIMEOUT_S,
        **ssl,
    )
    return client


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def redis_address(settings: RedisSettings) -> str:
    """Where Redis is, for messages: the URL's address, or the Sentinels' service."""
    if settings.sentinels:
        return f"{settings.sentinel_service} via Sentinels {', '.join(settings.sentinels)}"
    return url_address(settings.url)


async def open_redis(settings: RedisSettings, password: Secret | None) -> aioredis.Redis:
    """A client that has been tried once (``from_url`` alone connects lazily).

    A server that fails TLS verification is a ``TlsLinkError``: a configuration
    problem, fatal at start-up. Redis merely not answering is not: the instance
    starts with its halt state unknown, which stops every provider call until
    the halt watch reads the keys (``daemon.halt``), and ``/readyz`` says why.
    """
    client = redis_client(settings, password)
    try:
        with naming_tls_failures(Link.REDIS, redis_address(settings)):
            await client.ping()
    except (redis.exceptions.RedisError, OSError) as error:
        log.warning(
            "startup.redis_unreachable",
            address=redis_address(settings),
            error=repr(error),
            consequence="no provider call until the halt state is read",
        )
    except BaseException:
        await client.aclose()
        raise
    return client
