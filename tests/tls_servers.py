"""Throwaway certificates and private TLS-only MariaDB, RabbitMQ and Redis servers for tests.

Each server runs on free ports with its own data directory and is stopped by its
owner's finalizer; the shared services on 3306/5672/6379 are never touched. The
server certificate names ``localhost`` only, so connecting to ``127.0.0.1`` is a
host-name mismatch by construction.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
"""Debian's script that runs a node in the foreground as the calling user (``/usr/sbin``'s
wrapper would switch to the rabbitmq user and its shared node's settings)."""


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed the servers' and the client's certificates."""
    other_ca: Path
    """A CA that signed nothing here: trusting only it must fail."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    """Encrypted with ``client_key_password``."""
    client_key_password: str
    impostor_cert: Path
    """Names ``localhost`` too, but signed by ``other_ca``: a server payd must not trust."""
    impostor_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN=payd test {name}",
    )
    return cert, key


def _signed(directory: Path, name: str, ca: tuple[Path, Path], extensions: str, *key_options: str) -> Path:
    request, cert, ext = directory / f"{name}.csr", directory / f"{name}.pem", directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        *key_options,
        "-keyout",
        directory / f"{name}.key",
        "-out",
        request,
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return cert


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    password = secrets.token_hex(12)
    server = _signed(directory, "server", ca, "subjectAltName=DNS:localhost\n", "-nodes")
    impostor = _signed(directory, "impostor", other_ca, "subjectAltName=DNS:localhost\n", "-nodes")
    client = _signed(directory, "client", ca, "extendedKeyUsage=clientAuth\n", "-passout", f"pass:{password}")
    for path in directory.iterdir():
        path.chmod(0o644)  # servers that drop privileges must still read their key
    return Pki(
        ca=ca[0],
        other_ca=other_ca[0],
        server_cert=server,
        server_key=directory / "server.key",
        client_cert=client,
        client_key=directory / "client.key",
        client_key_password=password,
        impostor_cert=impostor,
        impostor_key=directory / "impostor.key",
    )


# -- processes ------------------------------------------------------------------------


@contextlib.contextmanager
def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server in its own session, so its children (RabbitMQ's beam) stop with it."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
        )
    try:
        yield process
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    # The group may outlive its leader (beam.smp under RabbitMQ's shell script).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_until_ready(process: subprocess.Popen[bytes], log: Path, marker: str, timeout: float) -> None:
    """Wait for the server's own word that it is ready (a port that answers might be someone
    else's: free ports are only free when asked)."""
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited {process.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.args[0]} not ready after {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def _as_root() -> list[str]:
    # mariadbd refuses to run as root unless told so; as another user the option is moot.
    return ["--user=root"] if os.geteuid() == 0 else []


@dataclass(frozen=True)
class PrivateServer:
    port: int
    password: str


@contextlib.contextmanager
def private_mariadb(directory: Path, pki: Pki | None, database: str) -> Iterator[PrivateServer]:
    """MariaDB with TLS (``pki``) or without it (``None``); user ``payd`` requires TLS when on."""
    directory.mkdir(parents=True)
    data, sock = directory / "data", directory / "mariadb.sock"
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            f"--datadir={data}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *_as_root(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    tls = []
    if pki is not None:
        tls = [f"--ssl-cert={pki.server_cert}", f"--ssl-key={pki.server_key}", f"--ssl-ca={pki.ca}"]
    args = [
        "mariadbd",
        "--no-defaults",
        f"--datadir={data}",
        f"--port={port}",
        "--bind-address=127.0.0.1",
        f"--socket={sock}",
        f"--pid-file={directory / 'mariadb.pid'}",
        "--skip-log-bin",
        "--innodb-buffer-pool-size=32M",
        "--skip-name-resolve",
        *_as_root(),
        *tls,
    ]
    password = secrets.token_hex(16)
    with _process(args, directory / "mariadb.log") as process:
        _wait_until_ready(process, directory / "mariadb.log", "ready for connections", timeout=120)
        require = "REQUIRE SSL" if pki else ""
        subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                "-uroot",
                f"--socket={sock}",
                "-e",
                f"CREATE USER 'payd'@'%' IDENTIFIED BY '{password}' {require}; CREATE DATABASE {database}; "
                f"GRANT ALL ON {database}.* TO 'payd'@'%';",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield PrivateServer(port=port, password=password)


@contextlib.contextmanager
def private_redis(directory: Path, pki: Pki) -> Iterator[PrivateServer]:
    """Redis listening on TLS only, requiring a client certificate signed by ``pki.ca``."""
    directory.mkdir(parents=True)
    port = free_port()
    args = [
        "redis-server",
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--tls-ca-cert-file",
        str(pki.ca),
        "--tls-auth-clients",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    with _process(args, directory / "redis.log") as process:
        _wait_until_ready(process, directory / "redis.log", "Ready to accept connections", timeout=60)
        yield PrivateServer(port=port, password="")


def rabbitmq_node_env(directory: Path, home: Path, name: str, node_port: int) -> dict[str, str]:
    """The environment of a RabbitMQ node of its own: name, ports, cookie (``home``), and every
    file under ``directory`` (``rabbitmq.conf`` written by the caller; no plugins)."""
    (directory / "enabled_plugins").write_text("[].\n")
    (directory / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's, which names the shared node
    return {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(node_port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
    }


@dataclass(frozen=True)
class PrivateRabbitMQ(PrivateServer):
    """A node of the test's own; ``ctl`` runs ``rabbitmqctl`` against it, never the shared node."""

    node: str
    env: dict[str, str]
    process_group: int
    """The node's process group (its shell script and beam): signal it to freeze the node."""

    def ctl(self, *args: str) -> None:
        ctl = RABBITMQ_SERVER.with_name("rabbitmqctl")
        subprocess.run(
            [str(ctl), "-q", "-n", self.node, *args],
            check=True,
            capture_output=True,
            timeout=120,
            env=self.env,
        )


@contextlib.contextmanager
def rabbitmq_node(directory: Path, listeners: str, *, name: str) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of its own: node name, ports, Erlang cookie (through ``HOME``), data and
    log directories; ``listeners`` is the rabbitmq.conf text for its AMQP listener on ``{port}``.
    User ``payd`` with a random password, allowed from anywhere."""
    home = directory / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    port, password = free_port(), secrets.token_hex(16)
    (directory / "rabbitmq.conf").write_text(
        listeners.format(port=port)
        + f"loopback_users = none\ndefault_user = payd\ndefault_pass = {password}\n"
    )
    node = f"{name}-{port}@localhost"
    env = rabbitmq_node_env(directory, home, node, free_port())
    log = directory / "rabbitmq.out"
    with _process([str(RABBITMQ_SERVER)], log, env=env, cwd=directory) as process:
        _wait_until_ready(process, log, "Starting broker... completed", timeout=120)
        yield PrivateRabbitMQ(port=port, password=password, node=node, env=env, process_group=process.pid)


@contextlib.contextmanager
def private_rabbitmq(directory: Path, pki: Pki) -> Iterator[PrivateServer]:
    """A RabbitMQ node of its own with a TLS listener only, requiring a client certificate
    signed by ``pki.ca``."""
    # https://www.rabbitmq.com/docs/ssl#enabling-tls (listeners.ssl, ssl_options.*)
    listeners = (
        "listeners.tcp = none\n"
        "listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {pki.ca}\n"
        f"ssl_options.certfile = {pki.server_cert}\n"
        f"ssl_options.keyfile = {pki.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    with rabbitmq_node(directory, listeners, name="payd-tls-test") as server:
        yield server
