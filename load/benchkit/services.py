"""The processes and state a benchmark run needs: config, database, queues, sandbox, daemon.

Every child process is started through ``setpriv --pdeathsig KILL`` when that
tool exists, so even a harness killed with SIGKILL leaves nothing behind; on
every ordinary exit path the caller stops them itself (``ManagedProcess.kill``
is idempotent and safe in ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pymysql
from aio_pika.exceptions import ChannelClosed
from yarl import URL

REPO = Path(__file__).resolve().parents[2]
PAYD = str(REPO / ".venv" / "bin" / "payd")
# One benchmark at a time per database: PAYD_BENCH_DATABASE (which must exist, granted to the
# payd user) gives a run a database, namespace (queues, exchange, Redis keys) and lock of its own.
DATABASE = os.environ.get("PAYD_BENCH_DATABASE", "payd_bench")
NAMESPACE = DATABASE
AMQP_URL = "amqp://payd@127.0.0.1:5672/"


class BenchError(Exception):
    """The benchmark cannot go on; the message says what to look at."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the tiny race is acceptable on loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def secret(name: str) -> str:
    """A payd secret the way payd finds it (``PAYD_NAME``, else ``$CREDENTIALS_DIRECTORY/name``).

    Read here rather than imported from ``daemon.secrets``, so the harness keeps
    working while that module is being edited (``--rev`` runs another version).
    """
    value = os.environ.get(f"PAYD_{name.upper()}")
    if value is not None:
        return value
    path = Path(os.environ.get("CREDENTIALS_DIRECTORY", str(REPO / ".secrets"))) / name
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError:
        raise BenchError(f"secret {name}: neither PAYD_{name.upper()} nor {path} is readable") from None


def amqp_url() -> str:
    return str(URL(AMQP_URL).with_password(secret("rabbitmq_password")))


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The knobs a run turns; everything else in the config is fixed below."""

    control_port: int
    sandbox_port: int
    max_in_flight: int
    timeout_s: float
    prefetch: int
    batch_size: int
    pool_size: int
    drain_timeout_s: float
    batch_delay_ms: float | None = None
    """None: payd's own default."""


REDIS_URL = "redis://127.0.0.1:6379/13"
"""A Redis database of the benchmark's own: fleet-wide halt keys and limits that the test
suite sets in database 0 must not stop (or throttle) a benchmark running beside it."""

# Sections only newer payd knows, with what the benchmark wants in them. An older
# --rev refuses unknown sections, so write_config drops the ones it does not know.
OPTIONAL_SECTIONS = {
    # aiomonitor's console listens on fixed ports: it would collide with a developer's daemon.
    "monitor": "enabled = false",
    # The renewal scheduler would renew whatever subscriptions another bench left in payd_bench.
    "subscriptions": "scheduler = false",
}


def write_config(code: PaydCode, path: Path, settings: DaemonSettings) -> None:
    """Write the run's config, checked by ``payd check-config`` of the payd that will run."""
    optional = dict(OPTIONAL_SECTIONS)
    while True:
        path.write_text(config_toml(settings, optional))
        done = subprocess.run(
            [PAYD, "--config", str(path), "check-config"],
            capture_output=True,
            text=True,
            check=False,
            env=code.env(),
            cwd=path.parent,
        )
        if done.returncode == 0:
            return
        unknown = [name for name in optional if f"unknown field `{name}`" in done.stderr]
        if not unknown:
            raise BenchError(f"payd check-config refused the benchmark's config:\n{done.stderr}")
        for name in unknown:
            del optional[name]


def config_toml(settings: DaemonSettings, optional: dict[str, str]) -> str:
    # lease_s must exceed twice the provider timeout (the config refuses otherwise).
    lease_s = max(120.0, 4 * settings.timeout_s)
    extra = "".join(f"\n[{name}]\n{body}\n" for name, body in optional.items())
    batch_delay = "" if settings.batch_delay_ms is None else f"\nbatch_delay_ms = {settings.batch_delay_ms}"
    return f"""\
# Written by load/bench.py for one run; deleted afterwards.
[daemon]
drain_timeout_s = {settings.drain_timeout_s}
log_level = "warning"   # one info line per attempt would dominate the profile
log_format = "json"

[mysql]
host = "127.0.0.1"
port = 3306
user = "payd"
database = "{DATABASE}"
pool_size = {settings.pool_size}

[rabbitmq]
url = "{AMQP_URL}"
namespace = "{NAMESPACE}"
prefetch = {settings.prefetch}

[redis]
url = "{REDIS_URL}"

[http]
host = "127.0.0.1"
port = {settings.control_port}

[pipeline]
claim_batch_size = {settings.batch_size}
record_batch_size = {settings.batch_size}{batch_delay}
lease_s = {lease_s}

[providers.sandbox]
kind = "sandbox"
base_url = "http://127.0.0.1:{settings.sandbox_port}"
max_in_flight = {settings.max_in_flight}
timeout_s = {settings.timeout_s}
{extra}"""


# --- which payd ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PaydCode:
    """The payd the children run: the working tree, or an extracted snapshot of a git revision.

    A snapshot keeps a benchmark stable while others edit ``daemon/``: its
    directory goes first on PYTHONPATH, ahead of the editable install, and so does
    its ``sandbox/`` (the gateway, ``payd_sandbox``) when the revision has one.
    """

    facts: dict[str, Any]
    pythonpath: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.pythonpath is not None:
            paths = [self.pythonpath, self.pythonpath / "sandbox"]
            env["PYTHONPATH"] = os.pathsep.join(str(path) for path in paths if path.exists())
        return env


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def working_tree() -> PaydCode:
    dirty = bool(_git("status", "--porcelain", "--", "daemon", "sandbox").strip())
    return PaydCode(
        {"source": "working tree", "commit": _git("rev-parse", "HEAD").strip(), "daemon_dirty": dirty}
    )


def snapshot(rev: str, into: Path) -> PaydCode:
    """Extract ``daemon/`` (and ``sandbox/payd_sandbox/`` if it has one) as of ``rev`` into
    ``into`` (git archive; the repository is untouched)."""
    try:
        commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    except subprocess.CalledProcessError as error:
        raise BenchError(f"--rev {rev}: not a commit: {error.stderr.strip()}") from None
    paths = ["daemon"]
    if _git("ls-tree", "--name-only", commit, "sandbox/payd_sandbox").strip():
        paths.append("sandbox/payd_sandbox")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    _write_dist_info(into, _git("show", f"{commit}:pyproject.toml"))
    code = PaydCode({"source": f"git {rev}", "commit": commit, "daemon_dirty": False}, pythonpath=into)
    # Prove the children will import the snapshot, not the editable install.
    found = subprocess.run(
        [sys.executable, "-c", "import daemon; print(daemon.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=code.env(),
        cwd=into,
    ).stdout.strip()
    if not found.startswith(str(into)):
        raise BenchError(f"--rev: children would import {found}, not the snapshot in {into}")
    return code


def _write_dist_info(into: Path, pyproject_text: str) -> None:
    """Give the snapshot its own dist-info, so entry points come from the same revision.

    payd finds provider kinds through ``payd.providers`` entry points. The
    installed (editable) payd's list may name modules the snapshot does not
    have; importlib.metadata takes the first distribution of a name on
    sys.path, and PYTHONPATH comes first, so this one wins.
    """
    project = tomllib.loads(pyproject_text)["project"]
    info = into / f"payd-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: payd\nVersion: {project['version']}\n")
    sections = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    lines = []
    for group, entries in sections.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))


# --- child processes -----------------------------------------------------------------------


class ManagedProcess:
    """A child process with its output in a log file, measurable through its pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(log_path, "wb") as log:
            # setpriv execs the command, so the pid we get is payd's own.
            self.popen = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log_path.parent,  # not the repo root, whose daemon/ would shadow a --rev snapshot
            )
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; return (exit code, seconds taken).

        The exit code is None when the process had to be killed.
        """
        started = time.monotonic()
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
        if not await self.wait(timeout_s):
            self.kill()
            return None, time.monotonic() - started
        return self.popen.returncode, time.monotonic() - started

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to exit; True if it did."""
        try:
            await asyncio.to_thread(self.popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """Idempotent last resort, for ``finally`` blocks."""
        if self.running():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


async def start_sandbox(
    code: PaydCode, workdir: Path, *, latency_ms: float, latency_dist: str, hang_s: float, seed: int
) -> tuple[ManagedProcess, int]:
    """Start ``payd sandbox`` on a port it picks itself; return it and that port."""
    argv = [
        PAYD,
        "sandbox",
        "--port",
        "0",
        "--latency-ms",
        str(latency_ms),
        "--latency-dist",
        latency_dist,
        "--hang-s",
        str(hang_s),
        "--seed",
        str(seed),
    ]
    sandbox = ManagedProcess("sandbox", argv, workdir / "sandbox.log", code.env())
    marker = "listening on http://127.0.0.1:"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = sandbox.log_path.read_text(errors="replace")
        if marker in text:
            port = text.split(marker, 1)[1].split()[0].rstrip("/")
            return sandbox, int(port)
        if not sandbox.running():
            break
        await asyncio.sleep(0.05)
    sandbox.kill()
    raise BenchError(f"sandbox did not start:\n{sandbox.log_tail()}")


def run_migrate(code: PaydCode, config_path: Path) -> None:
    done = subprocess.run(
        [PAYD, "--config", str(config_path), "migrate"],
        capture_output=True,
        text=True,
        check=False,
        env=code.env(),
        cwd=config_path.parent,
    )
    if done.returncode != 0:
        raise BenchError(f"payd migrate failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def start_daemon(code: PaydCode, workdir: Path, config_path: Path) -> ManagedProcess:
    argv = [PAYD, "--config", str(config_path), "run"]
    return ManagedProcess("daemon", argv, workdir / "daemon.log", code.env())


async def wait_ready(daemon: ManagedProcess, control_url: str, timeout_s: float = 60) -> None:
    """Until ``GET /readyz`` answers 200; fail early if the daemon exits."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if not daemon.running():
                raise BenchError(f"daemon exited with {daemon.popen.returncode}:\n{daemon.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{control_url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise BenchError(f"daemon not ready after {timeout_s:.0f} s:\n{daemon.log_tail()}")


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    """GET and decode JSON, within the session's timeout."""
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


# --- state left by earlier runs -------------------------------------------------------------


def connect_mysql() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host="127.0.0.1",
        port=3306,
        user="payd",
        password=secret("mysql_password"),
        database=DATABASE,
        connect_timeout=5,
    )


def truncate_tables() -> None:
    """Empty ``attempts`` and ``outbox``: every run starts from the same table sizes."""
    connection = connect_mysql()
    try:
        with connection.cursor() as cursor:
            for table in ("attempts", "outbox"):
                cursor.execute(f"TRUNCATE TABLE {table}")
    finally:
        connection.close()


def attempt_states(key_prefix: str) -> dict[str, int]:
    """This run's ``attempts`` rows by state, the rows of anything else, and outbox rows left.

    Read after the daemon stopped. Rows with other keys mean something else
    wrote to payd_bench during the run, and the figures are not this run's alone.
    """
    connection = connect_mysql()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT IF(idempotency_key LIKE %s, state, 'rows_not_from_this_run'), COUNT(*) "
                "FROM attempts GROUP BY 1",
                (key_prefix + "%",),
            )
            states = {str(state): int(count) for state, count in cursor.fetchall()}
            cursor.execute("SELECT COUNT(*) FROM outbox")
            row = cursor.fetchone()
            states["outbox_rows_left"] = int(row[0]) if row else 0
        return states
    finally:
        connection.close()


class DatabaseLock:
    """MySQL's named lock ``payd_bench`` for the length of a run: one benchmark at a time.

    Every run empties the same tables and queues, so a second one would wreck
    the first. The lock lives with its connection, so a killed harness frees it.
    """

    NAME = DATABASE

    def __init__(self) -> None:
        self._connection: pymysql.connections.Connection[Any] | None = None

    def acquire(self) -> None:
        connection = connect_mysql()
        with connection.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, 0)", (self.NAME,))
            row = cursor.fetchone()
        if not row or row[0] != 1:
            connection.close()
            raise BenchError(
                f"another benchmark holds the MySQL lock {self.NAME!r}: one run at a time on {DATABASE}"
            )
        self._connection = connection

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def purge_queues() -> dict[str, int]:
    """Drop messages an aborted earlier run left in the bench queues; return how many.

    Declared passively: the daemon declares them (quorum queues with arguments
    we must not contradict), and on the very first run they do not exist yet.
    """
    purged: dict[str, int] = {}
    connection = await aio_pika.connect(amqp_url(), client_properties={"connection_name": "payd-bench-purge"})
    try:
        for name in (f"{NAMESPACE}.attempts", f"{NAMESPACE}.attempts.dead"):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelClosed:
                continue  # not declared yet; the channel closed itself
            result = await queue.purge()
            purged[name] = int(result.message_count or 0)
            await channel.close()
    finally:
        await connection.close()
    return purged


def commit_times(key_prefix: str) -> dict[str, float]:
    """When each finished attempt's outcome was committed (``finished_at``), as epoch seconds.

    payd's sessions run with time_zone +00:00, so the naive DATETIME is UTC.
    """
    connection = connect_mysql()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT idempotency_key, finished_at FROM attempts "
                "WHERE idempotency_key LIKE %s AND finished_at IS NOT NULL",
                (key_prefix + "%",),
            )
            return {str(key): at.replace(tzinfo=UTC).timestamp() for key, at in cursor.fetchall()}
    finally:
        connection.close()


def mysql_version() -> str:
    connection = connect_mysql()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            row = cursor.fetchone()
        return str(row[0]) if row else "?"
    finally:
        connection.close()


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft open-file limit (children inherit it) to cover ``needed``.

    The daemon holds one socket per provider call in flight and the sandbox one
    per connection, so a run with 5,000 in flight needs well over 5,000 each.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, needed * 2))
    if target < needed:
        raise BenchError(
            f"open-file limit too low: need {needed}, hard limit {hard}; raise it (ulimit -Hn) and retry"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    print(f"raised the open-file soft limit from {soft} to {target}", file=sys.stderr)
    return target
