"""Start-up dependencies: how long to wait for them, and the one line that says which one failed.

A daemon that cannot reach MySQL, RabbitMQ or Redis within its grace period
exits non-zero (systemd restarts it) with ``payd: cannot reach mysql at
127.0.0.1:3306 (...)`` on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pymysql
import structlog
from yarl import URL

log = structlog.get_logger("payd")


class DependencyUnavailable(Exception):
    """A service payd needs did not answer at start-up; ``str()`` is the line for the operator."""

    def __init__(self, dependency: str, address: str, error: BaseException) -> None:
        super().__init__(f"cannot reach {dependency} at {address} ({describe_error(error)})")
        self.dependency = dependency
        self.address = address


def describe_error(error: BaseException) -> str:
    """Short and secret-free: the driver's message, not its repr or a traceback."""
    if isinstance(error, pymysql.err.MySQLError) and len(error.args) == 2:
        return f"{error.args[1]}"  # (code, message): the message names the cause
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def url_address(url: str) -> str:
    """``host:port`` of a service URL; user and password never appear."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}" if parsed.port else f"{parsed.host}"


async def with_retries(
    what: str,
    address: str,
    action: Callable[[], Awaitable[Any]],
    *,
    give_up_after: float,
    errors: tuple[type[BaseException], ...],
) -> Any:
    """Retry ``action`` with backoff for ``give_up_after`` seconds, then raise DependencyUnavailable."""
    deadline = time.monotonic() + give_up_after
    delay = 0.5
    while True:
        try:
            return await action()
        except errors as error:
            if time.monotonic() + delay > deadline:
                raise DependencyUnavailable(what, address, error) from error
            log.warning(
                "startup.waiting", dependency=what, address=address, error=repr(error), retry_in_s=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
