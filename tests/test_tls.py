"""Encrypted links: TLS to MySQL, ``amqps://`` to RabbitMQ, ``rediss://`` to Redis.

Against private TLS-only servers (``tests/tls_servers.py``) and certificates made
here, never the shared services. Expected TLS behaviour is Python's ``ssl`` module
(https://docs.python.org/3/library/ssl.html#ssl.SSLContext.check_hostname): the
chain must lead to a trusted CA, and the name connected to must be in the
certificate's subjectAltName (RFC 6125 section 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pymysql
import pytest
import structlog.testing

from daemon import operate
from daemon.broker import Broker, broker_url
from daemon.config import Config, ConfigError, TlsSettings, parse_config
from daemon.redis_link import open_redis
from daemon.secrets import Secret, load_secret
from daemon.storage.db import _create_pool, close_pool, open_pool, transaction
from daemon.tls import Link, TlsLinkError, client_context, log_plaintext_links
from tests.support import (
    NAMESPACE,
    PAYD,
    ROOT,
    DaemonFactory,
    DaemonProcess,
    Sandbox,
    config_text,
    eventually,
    free_port,
    request,
)
from tests.tls_servers import (
    RABBITMQ_SERVER,
    Pki,
    PrivateServer,
    make_pki,
    private_mariadb,
    private_rabbitmq,
    private_redis,
)

DATABASE = "payd"  # on the private MariaDB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mariadb(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    with private_mariadb(tmp_path_factory.mktemp("tls") / "mariadb", pki, DATABASE) as server:
        yield server


@pytest.fixture(scope="module")
def rabbitmq(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    if not RABBITMQ_SERVER.exists():
        pytest.skip(f"a private RabbitMQ node needs {RABBITMQ_SERVER}")
    with private_rabbitmq(tmp_path_factory.mktemp("tls") / "rabbitmq", pki) as server:
        yield server


@pytest.fixture(scope="module")
def redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    with private_redis(tmp_path_factory.mktemp("tls") / "redis", pki) as server:
        yield server


@pytest.fixture
def servers(
    monkeypatch: pytest.MonkeyPatch,
    pki: Pki,
    mariadb: PrivateServer,
    rabbitmq: PrivateServer,
    redis: PrivateServer,
) -> dict[Link, PrivateServer]:
    """The three private servers, with their secrets where payd looks for secrets (the environment)."""
    monkeypatch.setenv("PAYD_MYSQL_PASSWORD", mariadb.password)
    monkeypatch.setenv("PAYD_RABBITMQ_PASSWORD", rabbitmq.password)
    monkeypatch.setenv("PAYD_RABBITMQ_TLS_KEY_PASSWORD", pki.client_key_password)
    monkeypatch.setenv("PAYD_REDIS_TLS_KEY_PASSWORD", pki.client_key_password)
    return {Link.MYSQL: mariadb, Link.RABBITMQ: rabbitmq, Link.REDIS: redis}


def tls_sections(
    pki: Pki,
    servers: dict[Link, PrivateServer],
    *,
    host: str = "localhost",
    ca: Path | None = None,
    verify_hostname: bool = True,
) -> dict[str, dict[str, Any]]:
    """Configuration for all three links on TLS. MySQL sends no client certificate (it is
    optional); RabbitMQ and Redis require one, and its key is encrypted."""
    verify = {"ca_file": str(ca or pki.ca), "verify_hostname": verify_hostname}
    client = {**verify, "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    return {
        "mysql": {"host": host, "port": servers[Link.MYSQL].port, "database": DATABASE},
        "mysql__tls": verify,
        "rabbitmq": {"url": f"amqps://payd@{host}:{servers[Link.RABBITMQ].port}/"},
        "rabbitmq__tls": client,
        "redis": {"url": f"rediss://{host}:{servers[Link.REDIS].port}/0"},
        "redis__tls": client,
    }


def tls_config(pki: Pki, servers: dict[Link, PrivateServer], **options: Any) -> Config:
    return parse_config(quiet_config(**tls_sections(pki, servers, **options)))


def quiet_config(**sections: dict[str, Any]) -> str:
    """A configuration whose sandbox and control port nothing here uses."""
    return config_text(sandbox_url="http://127.0.0.1:1", http_port=0, **sections)


async def round_trip(link: Link, config: Config) -> None:
    """Open one link the way the daemon does, make it answer once, close it."""
    if link is Link.MYSQL:
        pool = await open_pool(config.mysql, load_secret("mysql_password"))
        try:
            async with transaction(pool) as cursor:
                await cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
                ((_, version),) = await cursor.fetchall()
                assert version.startswith("TLS"), version
        finally:
            await close_pool(pool)
    elif link is Link.RABBITMQ:
        broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"))
        await broker.connect()
        try:
            depths = await broker.queue_depths()
            assert set(depths) == {broker.topology.attempts_queue, broker.topology.dead_queue}
        finally:
            await broker.close()
    else:
        client = await open_redis(config.redis, None)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


# -- the links work, and only with the right server ------------------------------------


async def test_a_daemon_charges_with_every_link_on_tls(
    daemons: DaemonFactory, sandbox: Sandbox, pki: Pki, servers: dict[Link, PrivateServer]
) -> None:
    """All three links on verified TLS, end to end: ``payd migrate`` builds the schema on a
    TLS-only MariaDB; a daemon takes a request from a TLS-only RabbitMQ that demands a client
    certificate, charges it at the sandbox once and records it; ``payd halt`` writes to a
    TLS-only Redis (client certificate, encrypted key) and the daemon's halt watch reads it
    back. Fails on code without ``[*.tls]`` (an unknown key) or that ignores it (no plain port)."""
    sections = tls_sections(pki, servers)
    config, path, _ = daemons.config(**sections)
    migrate = [PAYD, "migrate", "--config", str(path)]
    await asyncio.to_thread(subprocess.run, migrate, check=True, capture_output=True, timeout=120)

    async with daemons.in_process(**sections) as daemon:
        connection = await aio_pika.connect(
            broker_url(config.rabbitmq, load_secret("rabbitmq_password")),
            ssl_context=client_context(Link.RABBITMQ, config.rabbitmq.tls or TlsSettings()),
        )
        async with connection, connection.channel() as channel:
            body = json.dumps(request("tls-charge-1")).encode()
            queue = f"{NAMESPACE}.attempts"
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)

        pool = await open_pool(config.mysql, load_secret("mysql_password"))
        try:

            async def succeeded() -> bool:
                async with transaction(pool) as cursor:
                    await cursor.execute("SELECT state FROM attempts WHERE idempotency_key = 'tls-charge-1'")
                    return await cursor.fetchall() == (("succeeded",),)

            await eventually(succeeded, timeout=60, what="the attempt to succeed over TLS links")
        finally:
            await close_pool(pool)
        approved = await sandbox.assert_no_double_charge()
        assert [charge["idempotency_key"] for charge in approved] == ["tls-charge-1"]

        assert await operate.halt(config, provider=None, reason="tls test") == 0

        async def halted() -> bool:
            halt = (await daemon.status())["halt"]
            return bool(halt["global"]) and not halt["stale"]

        await eventually(halted, timeout=30, what="the daemon to read the halt over rediss://")
        assert await operate.resume(config, provider=None) == 0


@pytest.mark.parametrize("link", list(Link))
async def test_a_wrong_ca_fails_naming_the_link(
    link: Link, pki: Pki, servers: dict[Link, PrivateServer]
) -> None:
    """Trusting a CA that did not sign the server's certificate fails the handshake with a
    ``TlsLinkError`` that names the link and says the certificate did not verify; the same
    configuration with the right CA makes a round trip (so the failure is the CA's)."""
    await round_trip(link, tls_config(pki, servers))
    with pytest.raises(TlsLinkError) as failure:
        await round_trip(link, tls_config(pki, servers, ca=pki.other_ca))
    assert failure.value.link is link
    assert "certificate verify failed" in failure.value.reason
    assert str(failure.value).startswith(f"{link} at localhost:{servers[link].port}: TLS handshake failed")


@pytest.mark.parametrize("link", list(Link))
async def test_a_host_name_mismatch_fails_naming_the_link(
    link: Link, pki: Pki, servers: dict[Link, PrivateServer]
) -> None:
    """The server's certificate names ``localhost`` only: reaching it as ``127.0.0.1`` is a
    mismatch, refused with the link named, although the CA is right."""
    with pytest.raises(TlsLinkError) as failure:
        await round_trip(link, tls_config(pki, servers, host="127.0.0.1"))
    assert failure.value.link is link
    assert "mismatch" in failure.value.reason, failure.value.reason


@pytest.mark.parametrize("link", list(Link))
async def test_verify_hostname_false_still_verifies_the_chain(
    link: Link, pki: Pki, servers: dict[Link, PrivateServer]
) -> None:
    """``verify_hostname = false`` accepts the name mismatch and nothing more: the same
    address with a wrong CA is still refused."""
    by_address = {"host": "127.0.0.1", "verify_hostname": False}
    await round_trip(link, tls_config(pki, servers, **by_address))
    with pytest.raises(TlsLinkError):
        await round_trip(link, tls_config(pki, servers, **by_address, ca=pki.other_ca))


async def test_a_daemon_whose_broker_fails_verification_exits_2_naming_it(
    sandbox: Sandbox, pki: Pki, servers: dict[Link, PrivateServer], tmp_path: Path
) -> None:
    """``payd run`` does not retry a handshake that cannot succeed (a refused connection gets
    30 s of retries): it exits 2, a configuration error, and says which link failed and why."""
    sections = tls_sections(pki, servers)
    sections["rabbitmq__tls"] = {**sections["rabbitmq__tls"], "ca_file": str(pki.other_ca)}
    path, port = tmp_path / "payd.toml", free_port()
    path.write_text(config_text(sandbox_url=sandbox.url, http_port=port, **sections))
    daemon = DaemonProcess(path, port)
    try:
        assert await daemon.wait_exit(timeout=60) == 2, daemon.log()
    finally:
        daemon.kill()
    assert f"rabbitmq at localhost:{servers[Link.RABBITMQ].port}: TLS handshake failed" in daemon.log()


async def test_a_broker_reconnect_that_fails_verification_is_retried_and_named(
    daemons: DaemonFactory, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After start-up a verification failure is not fatal but loud: the broker goes away and
    an impostor (right name, another CA) answers on its port; the daemon stays up, keeps
    trying, logs each failure naming the link and the reason, and ``/readyz`` stays red.
    MySQL and Redis are the shared ones here; only the broker is private, since it is stopped."""
    with contextlib.ExitStack() as stack:
        rabbitmq = stack.enter_context(private_rabbitmq(tmp_path / "rabbitmq", pki))
        monkeypatch.setenv("PAYD_RABBITMQ_TLS_KEY_PASSWORD", pki.client_key_password)
        monkeypatch.setenv("PAYD_RABBITMQ_PASSWORD", rabbitmq.password)
        tls = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        sections = {
            "rabbitmq": {"url": f"amqps://payd@localhost:{rabbitmq.port}/", "reconnect_delay_s": 0.2},
            "rabbitmq__tls": tls,
        }
        # A real process, judged by its JSON log: capturing structlog in-process depends on
        # what earlier tests configured (loggers are cached on first use).
        daemon = await daemons.process(**sections)
        stack.close()  # the broker stops; its port is free for the impostor
        impostor_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        impostor_tls.load_cert_chain(pki.impostor_cert, pki.impostor_key)
        impostor = await asyncio.start_server(
            lambda _reader, writer: writer.close(), "127.0.0.1", rabbitmq.port, ssl=impostor_tls
        )
        try:

            def refusals() -> list[str]:
                lines = (json.loads(line) for line in daemon.log().splitlines() if line.startswith("{"))
                return [
                    str(e.get("error")) for e in lines if e.get("event") == "broker.reconnect_failed"
                    and "TLS handshake failed" in str(e.get("error"))
                ]  # fmt: skip

            async def refused_twice() -> bool:
                return len(refusals()) >= 2

            # Reconnect delays double up to 30 s while the node takes its time to stop on a
            # busy machine; two refusals can then be a minute or more apart.
            await eventually(refused_twice, timeout=180, what="two reconnects refused by verification")
            assert (await daemon.status())["ready"]["broker_connected"] is False
        finally:
            impostor.close()
            await impostor.wait_closed()
    assert refusals()[0].startswith(f"rabbitmq at localhost:{rabbitmq.port}: TLS handshake failed: ")
    assert "certificate verify failed" in refusals()[0]


async def test_mysql_refuses_a_server_that_does_not_offer_tls(tmp_path: Path, pki: Pki) -> None:
    """aiomysql asked for TLS carries on in the clear when the server does not offer it, which
    is what a man in the middle would show it. payd drops such a connection and says so."""
    with private_mariadb(tmp_path / "plain", None, DATABASE) as plain:
        settings = parse_config(
            config_text(
                sandbox_url="http://127.0.0.1:1",
                http_port=0,
                mysql={"host": "localhost", "port": plain.port, "database": DATABASE},
                mysql__tls={"ca_file": str(pki.ca)},
            )
        ).mysql
        password = Secret(plain.password, "test")
        with pytest.raises(TlsLinkError) as failure:
            await open_pool(settings, password)
        # A connection the pool opens later (after a restart of the server, say) is refused by
        # the transaction helper, as a database error the pipeline already copes with.
        pool = await _create_pool(settings, password)  # the pool before open_pool's own check
        try:
            with pytest.raises(pymysql.err.OperationalError, match="did not offer TLS"):
                async with transaction(pool) as cursor:
                    await cursor.execute("SELECT 1")
        finally:
            await close_pool(pool)
    assert failure.value.link is Link.MYSQL
    assert "did not offer TLS" in failure.value.reason


# -- configuration and payd check-config -----------------------------------------------------


def check_config(
    tmp_path: Path, text: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.toml"
    path.write_text(text)
    return subprocess.run(
        [PAYD, "check-config", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


REMOTE_PLAIN = {
    "mysql": {"host": "10.20.0.7"},
    "rabbitmq": {"url": "amqp://payd@mq.internal:5672/"},
    "redis": {"url": "redis://10.20.0.9:6379/0"},
}
LOOPBACK_PLAIN = {
    "mysql": {"host": "127.0.0.1"},
    "rabbitmq": {"url": "amqp://payd@localhost:5672/"},
    "redis": {"url": "redis://[::1]:6379/0"},
}


def remote_tls(pki: Pki) -> dict[str, dict[str, Any]]:
    return {
        "mysql": {"host": "10.20.0.7"},
        "mysql__tls": {"ca_file": str(pki.ca)},
        "rabbitmq": {"url": "amqps://payd@mq.internal:5671/"},
        "redis": {"url": "rediss://10.20.0.9:6380/0"},
        "redis__tls": {"ca_file": str(pki.ca)},
    }


def test_check_config_warns_for_each_remote_link_without_tls(tmp_path: Path) -> None:
    """A link to another host in the clear is named with its host, one warning per link."""
    result = check_config(tmp_path, quiet_config(**REMOTE_PLAIN))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert [line.split(":")[1].strip() for line in warnings] == ["mysql", "rabbitmq", "redis"]
    for host in ("10.20.0.7", "mq.internal", "10.20.0.9"):
        assert any(host in line for line in warnings), (host, warnings)


def test_payd_run_logs_each_remote_link_without_tls() -> None:
    """The journal of ``payd run`` carries the check-config warning, one event per link."""
    with structlog.testing.capture_logs() as logs:
        log_plaintext_links(parse_config(quiet_config(**REMOTE_PLAIN)))
    events = [(e["event"], e["link"], e["host"]) for e in logs if e["log_level"] == "warning"]
    assert events == [
        ("tls.plaintext_link", "mysql", "10.20.0.7"),
        ("tls.plaintext_link", "rabbitmq", "mq.internal"),
        ("tls.plaintext_link", "redis", "10.20.0.9"),
    ]


@pytest.mark.parametrize("case", ["loopback", "remote with tls"])
def test_check_config_does_not_warn_for_loopback_or_tls(case: str, tmp_path: Path, pki: Pki) -> None:
    """Loopback links (``localhost``, 127.0.0.1, ::1) and encrypted remote links are fine."""
    sections = LOOPBACK_PLAIN if case == "loopback" else remote_tls(pki)
    result = check_config(tmp_path, quiet_config(**sections))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_check_config_loads_the_tls_files_and_never_shows_the_passphrase(tmp_path: Path, pki: Pki) -> None:
    """check-config builds each TLS context: a missing CA file or an encrypted key without its
    passphrase exits 2 naming the key; with the passphrase (a secret) it passes and the
    passphrase appears nowhere in the output."""
    client = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    base = {"redis": {"url": "rediss://localhost:6380/0"}, "redis__tls": client}
    text = quiet_config(**base)

    locked = check_config(tmp_path, text)
    assert locked.returncode == 2
    assert "redis.tls.cert_file" in locked.stderr and "redis_tls_key_password" in locked.stderr

    missing_ca = {**base, "redis__tls": {**client, "ca_file": str(tmp_path / "nowhere.pem")}}
    result = check_config(tmp_path, quiet_config(**missing_ca))
    assert result.returncode == 2 and "redis.tls.ca_file" in result.stderr

    unlocked = check_config(tmp_path, text, env={"PAYD_REDIS_TLS_KEY_PASSWORD": pki.client_key_password})
    assert unlocked.returncode == 0, unlocked.stderr
    assert "redis_tls_key_password: set (environment PAYD_REDIS_TLS_KEY_PASSWORD)" in unlocked.stdout
    assert pki.client_key_password not in unlocked.stdout + unlocked.stderr


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"rabbitmq__tls": {"ca_file": "/ca.pem"}}, "rabbitmq.tls: the url is not amqps://"),
        ({"redis__tls": {"ca_file": "/ca.pem"}}, "redis.tls: the url is not rediss://"),
        ({"mysql__tls": {"key_file": "/client.key"}}, "mysql.tls.key_file: needs cert_file"),
        ({"mysql__tls": {"verify": False}}, "mysql.tls: Object contains unknown field `verify`"),
    ],
)
def test_tls_tables_that_would_not_take_effect_are_errors(sections: dict[str, Any], named: str) -> None:
    """A TLS table on a plain URL would leave the link in the clear while looking encrypted;
    a key without its certificate is half a client identity. Both are refused by key."""
    with pytest.raises(ConfigError) as error:
        parse_config(quiet_config(**sections))
    assert named in str(error.value)


def test_every_tls_key_and_secret_is_documented() -> None:
    """The shared ``[LINK.tls]`` keys and the key passphrase secrets appear in docs/configuration.md."""
    import msgspec  # noqa: PLC0415

    docs = (ROOT / "docs" / "configuration.md").read_text()
    keys = [field.name for field in msgspec.structs.fields(TlsSettings)]
    missing = [key for key in keys if f"| `{key}` |" not in docs]
    missing += [f"{link}_tls_key_password" for link in Link if f"`{link}_tls_key_password`" not in docs]
    assert not missing, missing
