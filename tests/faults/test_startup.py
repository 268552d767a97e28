"""A dependency that is not there at start-up: one clear line, a non-zero exit, no traceback.

systemd restarts a unit that exits non-zero (``Restart=on-failure``); the
operator reads the journal, where one line naming the dependency and its
address says more than a page of asyncio frames.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import PAYD, ROOT, config_text, free_port

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


def test_redis_on_a_closed_port(tmp_path: Path) -> None:
    """Redis holds the fleet-wide halt; a new instance has no last state to keep, so it must not
    start calling providers without reading it: it exits with a line naming redis."""
    port = free_port()
    _assert_one_line(_payd(tmp_path, "run", redis={"url": f"redis://127.0.0.1:{port}/0"}), "redis", port)
