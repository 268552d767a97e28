"""The systemd notify protocol, checked against a real datagram socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomysql

from daemon.notify import SystemdNotifier
from tests.support import Broker, DaemonFactory, InProcessDaemon, notify_socket


async def test_daemon_sends_ready_watchdog_stopping_in_order(
    tmp_path: Path, db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """READY once consuming, WATCHDOG pings while alive, STOPPING (with a timeout extension
    covering the drain) when the drain starts."""
    with notify_socket(tmp_path / "notify.sock") as listener:
        config, _, port = daemons.config()
        daemon = InProcessDaemon(config, port)
        await daemon.start()
        await asyncio.sleep(0.5)
        assert await daemon.stop() == 0
        messages = []
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except BlockingIOError:
                break
    kinds = [m.splitlines()[0] for m in messages]
    assert "READY=1" in kinds and "STOPPING=1" in kinds
    ready, stopping = kinds.index("READY=1"), kinds.index("STOPPING=1")
    assert ready < stopping
    assert kinds.count("WATCHDOG=1") >= 2, "pinged every WATCHDOG_USEC/2 while running"
    assert "EXTEND_TIMEOUT_USEC=20000000" in messages[stopping], "drain 10 s + 10 s margin"


def test_notifier_is_silent_outside_systemd() -> None:
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    notifier.ready()  # no socket, no error
    assert notifier.watchdog_interval_s is None


def test_watchdog_ignored_when_meant_for_another_process() -> None:
    notifier = SystemdNotifier(environ={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval_s is None
