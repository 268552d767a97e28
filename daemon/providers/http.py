"""HTTP plumbing shared by adapters: one session per provider, and transport errors classified.

The one question that matters after a failed call is whether the request may
have reached the provider. A failure to connect means it did not (a clean
provider error, safe to retry); anything after the request was written means
it may have (unknown, to be reconciled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from daemon.models import ChargeResult, Outcome
from daemon.providers.base import ProviderConfig

# Raised before any byte of the request left this process.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


class HttpResponse:
    """Status, headers and body of a completed exchange."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def open_session(config: ProviderConfig) -> aiohttp.ClientSession:
    """A keep-alive session sized to the provider's in-flight limit."""
    connector = aiohttp.TCPConnector(
        limit=config.max_in_flight,
        limit_per_host=config.max_in_flight,
        keepalive_timeout=30,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=config.timeout_s,
        connect=config.connect_timeout_s,
        sock_connect=config.connect_timeout_s,
    )
    return aiohttp.ClientSession(
        base_url=config.base_url.rstrip("/") + "/",
        connector=connector,
        timeout=timeout,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "payd"},
    )


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> HttpResponse | ChargeResult:
    """Perform one request; a transport failure comes back as a classified ``ChargeResult``."""
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["data"] = body
    try:
        async with session.request(method, path.lstrip("/"), **kwargs) as response:
            payload = await response.read()
            return HttpResponse(response.status, response.headers, payload)
    except _NOT_SENT as error:
        return ChargeResult(
            outcome=Outcome.PROVIDER_ERROR, reason=f"not sent: {type(error).__name__}", reached_provider=False
        )
    except TimeoutError:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason="timed out after the request was sent")
    except aiohttp.ClientError as error:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"connection lost: {type(error).__name__}")


def retry_after_seconds(headers: Mapping[str, str], default: float = 1.0) -> float:
    """``Retry-After`` in seconds (only the delta-seconds form is used by gateways)."""
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default
