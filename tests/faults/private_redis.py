"""A Redis of the test's own on a free port, to refuse, freeze and stop: never the shared 6379."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.support import eventually, free_port

ADMIN_USER = "ops"
ADMIN_PASSWORD = "ops-password-for-tests"


class PrivateRedis:
    """redis-server without persistence. ``admin`` is a separate ACL user with every right, so
    the test can still write halts and lift restrictions while the daemon's user is refused."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = aioredis.from_url(
            self.url, username=ADMIN_USER, password=ADMIN_PASSWORD, socket_timeout=5
        )

    async def start(self) -> None:
        self._spawn()
        await eventually(self._answers, timeout=10, what="the private redis-server to answer")

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                # The admin user, there from the start (also after a restart).
                "--user", ADMIN_USER, "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def _answers(self) -> bool:
        try:
            return bool(await self.admin.ping())
        except (OSError, aioredis.ConnectionError):
            return False

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL also ends a frozen (SIGSTOPped) process
            self.process.wait()
        self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.admin.aclose(), 5)
