"""systemd's notify protocol: READY, STOPPING, WATCHDOG and EXTEND_TIMEOUT over $NOTIFY_SOCKET.

A no-op outside systemd. The watchdog is pinged from the event loop itself, so
a loop that stops turning stops pinging and systemd restarts the process. It
is also withheld while ``healthy`` says no (a critical duty keeps crashing):
a restart is then the best systemd can do for us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("payd.notify")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        watchdog_usec = env.get("WATCHDOG_USEC")
        watchdog_pid = env.get("WATCHDOG_PID")
        meant_for_us = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s: float | None = (
            int(watchdog_usec) / 1_000_000 / 2 if watchdog_usec and meant_for_us else None
        )

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        # systemd gone or its socket full: nothing useful to do about either.
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(fields).encode(), self._address)

    def ready(self, status: str = "consuming") -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, drain_timeout_s: float) -> None:
        # Ask for the drain's time on top of TimeoutStopSec, so a long drain is not killed.
        self.send("STOPPING=1", "STATUS=draining", f"EXTEND_TIMEOUT_USEC={int((drain_timeout_s + 10) * 1e6)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def watchdog_loop(self, healthy: Callable[[], bool] = lambda: True) -> None:
        if self.watchdog_interval_s is None or self._socket is None:
            return
        withheld = False
        while True:
            if healthy():
                self.watchdog()
                withheld = False
            elif not withheld:
                log.critical("watchdog.withheld", reason="a critical duty keeps crashing")
                withheld = True
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
