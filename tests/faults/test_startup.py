"""A dependency that is not there at start-up: one clear line, a non-zero exit, no traceback.

systemd restarts a unit that exits non-zero (``Restart=on-failure``); the
operator reads the journal, where one line naming the dependency and its
address says more than a page of asyncio frames.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest

from tests.faults.private_redis import PrivateRedis
from tests.support import (
    PAYD,
    ROOT,
    Broker,
    DaemonFactory,
    Sandbox,
    config_text,
    eventually,
    free_port,
    request,
    wait_settled,
)

pytestmark = pytest.mark.slow


def _payd(tmp_path: Path, command: str, **sections: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "payd.toml"
    daemon = {"startup_timeout_s": 1, "log_level": "warning"}
    path.write_text(
        config_text(sandbox_url="http://127.0.0.1:1", http_port=free_port(), daemon=daemon, **sections)
    )
    # The bound only stops a daemon that wrongly keeps running; the grace period is 1 s.
    return subprocess.run(
        [PAYD, command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], dependency: str, port: int) -> None:
    assert result.returncode != 0, "systemd restarts only a unit that failed"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"payd: cannot reach {dependency} at 127\.0\.0\.1:{port} \(.+\)", lines[0]), lines[0]


@pytest.mark.parametrize("command", ["run", "migrate"])
def test_mysql_on_a_closed_port(tmp_path: Path, command: str) -> None:
    """Nothing listens on the MySQL port: after the grace period, one line names mysql and the
    address, and the exit status is non-zero."""
    port = free_port()
    _assert_one_line(_payd(tmp_path, command, mysql={"port": port}), "mysql", port)


def test_rabbitmq_on_a_closed_port(tmp_path: Path) -> None:
    """MySQL answers, RabbitMQ does not: the line names rabbitmq, without the URL's credentials."""
    port = free_port()
    result = _payd(tmp_path, "run", rabbitmq={"url": f"amqp://payd:hunter2@127.0.0.1:{port}/"})
    _assert_one_line(result, "rabbitmq", port)
    assert "hunter2" not in result.stderr + result.stdout


async def test_redis_absent_at_start_up_means_no_provider_call_until_it_answers(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Redis holds the fleet-wide halt, and a new instance has no last state to keep. It starts
    anyway (so /readyz can say what is wrong), but calls no provider until it has read the halt
    keys: /readyz is 503 naming the halt state, the gateway sees nothing, and once Redis
    answers the attempt is charged once."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)  # its port is chosen; nothing listens there yet
    try:
        daemon = await daemons.process(ready=False, redis={"url": server.url})
        await broker.publish([request("redis-absent-1", subscription_id=81_000)])

        async def unready_for_the_halt_state() -> bool:
            assert daemon.process.poll() is None, daemon.log()
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{daemon.port}/readyz") as response,
                ):
                    body = await response.json()
            except aiohttp.ClientError:
                return False  # not listening yet
            return response.status == 503 and "halt_state_fresh" in body.get("reasons", {})

        await eventually(unready_for_the_halt_state, timeout=30, what="/readyz naming the halt state")
        await asyncio.sleep(2)
        assert (await sandbox.stats())["requests"] == 0, "a provider was called before the halt was read"
        await server.start()
        settled = await wait_settled(db, ["redis-absent-1"], timeout=60)
        assert settled == {"redis-absent-1": "succeeded"}
        assert len(await sandbox.assert_no_double_charge()) == 1
    finally:
        server.stop()
