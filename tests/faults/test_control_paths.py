"""No control path is open without the control token, and control errors are clear answers.

Over real connections: raw HTTP to the control endpoint, telnet to the aiomonitor
console, TCP to where its web UI would listen.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import aiomysql
import pytest
import redis.asyncio as aioredis

from daemon.config import ConfigError, MonitorSettings, load_config
from daemon.halt import HaltKeys
from daemon.secrets import load_secret
from tests.faults.console import open_console
from tests.support import NAMESPACE, ROOT, Broker, DaemonFactory, Sandbox, free_port

KEYS = HaltKeys(NAMESPACE)


def _token() -> str:
    token = load_secret("control_token")
    assert token is not None, "the tests need the control_token secret"
    return token.reveal()


async def _raw_post(port: int, path: str, authorization: bytes) -> tuple[int, bytes]:
    """An HTTP/1.1 request written byte for byte, so the header can carry any bytes at all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: " + authorization + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_non_ascii_authorization_header_is_refused_not_a_server_error(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A bearer value with non-ASCII bytes (UTF-8 or not) is a wrong token: 401, never a 500 from
    comparing it; wrong schemes and near-miss tokens are refused the same way, the right one passes.
    (RFC 9110 section 5.5: field values may carry obs-text bytes 0x80-0xFF.)"""
    token = _token().encode()
    async with daemons.in_process() as daemon:
        for authorization in (
            "Bearer jeton-été".encode(),
            b"Bearer \xff\xfe" + token,
            b"Bearer " + token + b"x",
            b"Basic " + token,
            token,
        ):
            status, body = await _raw_post(daemon.port, "/admin/resume", authorization)
            assert status == 401, (authorization, status, body)
        status, body = await _raw_post(daemon.port, "/admin/resume", b"bearer " + token)
        assert status == 200, body  # RFC 9110 section 11.1: the scheme name is case-insensitive


async def test_admin_actions_during_a_redis_outage_answer_503_with_a_reason(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """With Redis unreachable, /admin/resume and /admin/halt answer 503 with an error that names
    Redis (not a 500 traceback), and /readyz says the halt state is unknown."""
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    headers = {"Authorization": f"Bearer {_token()}"}
    async with daemons.in_process(redis={"url": nothing_listens}) as daemon:
        base = f"http://127.0.0.1:{daemon.port}"
        async with aiohttp.ClientSession() as session:
            for path in ("/admin/resume", "/admin/halt"):
                async with session.post(f"{base}{path}", json={}, headers=headers) as response:
                    assert response.status == 503, await response.text()
                    assert "Redis" in (await response.json())["error"]
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 503
                assert "unknown" in (await response.json())["reasons"]["halt_state_fresh"]


async def test_the_console_asks_for_the_token_before_any_command(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A console session that does not give the control token runs nothing: a `halt` typed
    instead is refused and the connection closed, and no halt key is written."""
    redis = aioredis.from_url("redis://127.0.0.1:6379/0")
    await redis.delete(KEYS.global_key)
    port = free_port()
    try:
        async with daemons.in_process(monitor={"enabled": True, "port": port}):
            console = await open_console(port)
            await console.read_until("control token:", timeout=5)
            answer = await console.send("halt --reason intruder", "not authorised")
            assert "not authorised" in answer, answer
            console.close()
            await asyncio.sleep(0.5)
            assert await redis.get(KEYS.global_key) is None, "an unauthenticated console halted the fleet"
    finally:
        await redis.delete(KEYS.global_key)
        await redis.aclose()


async def test_the_monitor_web_ui_is_off_unless_asked_for(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """aiomonitor's web UI (no authentication; it can cancel any task, the halt watcher too)
    does not listen when only the console is enabled."""
    webui_port = free_port()
    async with daemons.in_process(monitor={"enabled": True, "port": free_port(), "webui_port": webui_port}):
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", webui_port)
            writer.close()


async def test_the_console_will_not_start_without_a_control_token(
    db: aiomysql.Pool,
    broker: Broker,
    sandbox: Sandbox,
    daemons: DaemonFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked for a console but given no token to guard it with, payd refuses to start."""
    credentials = Path(os.environ["CREDENTIALS_DIRECTORY"])  # set by the run (or conftest)
    limited = tmp_path / "credentials"
    shutil.copytree(credentials, limited, ignore=shutil.ignore_patterns("control_token"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(limited))
    monkeypatch.delenv("PAYD_CONTROL_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="control token"):
        async with daemons.in_process(monitor={"enabled": True, "port": free_port()}):
            pass


def test_no_control_path_is_open_by_default() -> None:
    """The defaults and the shipped config.toml (copied to /etc/payd by the install steps) leave
    the console and its web UI off."""
    for settings in (MonitorSettings(), load_config(ROOT / "config.toml").monitor):
        assert settings.enabled is False
        assert settings.webui is False
