"""A private MariaDB server for fault tests: frozen, stopped or killed without touching the shared one.

Started from scratch in a temporary directory (``mariadb-install-db``, then
``mariadbd --no-defaults`` on a free loopback port, grants skipped so payd's
usual user and password are accepted), migrated with ``payd migrate``, and
always stopped in the caller's ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import PAYD, config_text, free_port

DATABASE = "payd_fault"


@dataclass
class PrivateMariaDB:
    port: int
    process: subprocess.Popen[bytes]
    datadir: Path
    command: list[str]
    log: Path

    def crash_and_restart(self, down_s: float) -> None:
        """SIGKILL (no clean shutdown: InnoDB recovers at the next start), ``down_s`` without a
        server, then the same server again on the same port and data."""
        self.thaw()
        self.process.kill()
        self.process.wait()
        time.sleep(down_s)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.process, self.log)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and accepted, nothing is answered (a hung server)."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    @property
    def mysql_section(self) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "database": DATABASE}


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mariadbd exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"mariadbd did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def private_mariadb() -> Iterator[PrivateMariaDB]:
    root = Path(tempfile.mkdtemp(prefix="payd-mariadb-"))
    datadir, log = root / "data", root / "mariadbd.log"
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--skip-test-db"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    command = [
        "mariadbd",
        "--no-defaults",
        f"--datadir={datadir}",
        f"--port={port}",
        "--bind-address=127.0.0.1",
        f"--socket={root / 'mariadbd.sock'}",
        f"--pid-file={root / 'mariadbd.pid'}",
        "--skip-grant-tables",
        "--skip-log-bin",
        "--innodb-buffer-pool-size=32M",
    ]
    if os.geteuid() == 0:
        command.append("--user=root")  # mariadbd refuses to run as root unless told
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    server = PrivateMariaDB(port=port, process=process, datadir=datadir, command=command, log=log)
    try:
        _wait_listening(port, process, log)
        subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                "-h127.0.0.1",
                f"-P{port}",
                "-uroot",
                "-e",
                f"CREATE DATABASE {DATABASE}",
            ],
            check=True,
            capture_output=True,
        )
        config = root / "migrate.toml"
        config.write_text(
            config_text(sandbox_url="http://127.0.0.1:1", http_port=0, mysql=server.mysql_section)
        )
        subprocess.run([PAYD, "migrate", "--config", str(config)], check=True, capture_output=True)
        yield server
    finally:
        server.thaw()  # a stopped process cannot act on SIGTERM
        server.process.terminate()  # the one running now, after any restart
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        shutil.rmtree(root, ignore_errors=True)
