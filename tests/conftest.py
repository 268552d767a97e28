"""Fixtures over the real services: MariaDB, RabbitMQ and the sandbox gateway over HTTP."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import pytest

from daemon.logs import configure_logging
from tests.support import (
    PAYD,
    ROOT,
    Broker,
    DaemonFactory,
    Sandbox,
    config_text,
    open_test_pool,
    query,
    reset_broker,
    running_sandbox,
)
from tests.tls_servers import RABBITMQ_SERVER, PrivateRabbitMQ, rabbitmq_node

if not os.environ.get("CREDENTIALS_DIRECTORY") and (ROOT / ".secrets").is_dir():
    os.environ["CREDENTIALS_DIRECTORY"] = str(ROOT / ".secrets")

configure_logging("warning", "console")


@pytest.fixture(scope="session", autouse=True)
def migrated(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test database carries the current schema (``payd migrate`` is idempotent)."""
    path: Path = tmp_path_factory.mktemp("config") / "migrate.toml"
    path.write_text(config_text(sandbox_url="http://127.0.0.1:1", http_port=0))
    subprocess.run([PAYD, "migrate", "--config", str(path)], check=True, capture_output=True)


@pytest.fixture
async def db() -> AsyncIterator[aiomysql.Pool]:
    pool = await open_test_pool()
    for table in ("attempts", "outbox", "subscriptions", "reversals"):
        await query(pool, f"DELETE FROM {table}")
    yield pool
    pool.close()
    await pool.wait_closed()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    test_broker = await reset_broker()
    yield test_broker
    await test_broker.connection.close()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as gateway:
        yield gateway


@pytest.fixture
def daemons(sandbox: Sandbox, tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(sandbox, tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture
def private_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of the test's own (plain AMQP), whose password the daemons are given:
    stopping or freezing it affects nobody else's tests."""
    if not RABBITMQ_SERVER.exists():
        pytest.skip("rabbitmq-server is not installed")
    listener = "listeners.tcp.default = 127.0.0.1:{port}\n"
    with rabbitmq_node(tmp_path / "rabbitmq", listener, name="payd-test-broker") as node:
        monkeypatch.setenv("PAYD_RABBITMQ_PASSWORD", node.password)
        yield node
