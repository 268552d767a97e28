"""Private clusters for the failover tests: RabbitMQ nodes, Redis with Sentinels, a MariaDB.

Each engine runs under its own names, ports, cookie and data directories, so the
machine's own broker, Redis and MariaDB are never touched. Everything started
here is stopped in a ``finally``, whatever the test did to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port
from tests.tls_servers import RABBITMQ_SERVER, _stop_group, _wait_until_ready, rabbitmq_node_env

# The bare CLI, not /usr/sbin's wrapper: that one switches to the rabbitmq user and its cookie.
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
STARTED_MARKER = "Starting broker... completed"


@dataclass
class RabbitNode:
    name: str
    port: int
    directory: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "rabbitmq.out"

    def launch(self) -> None:
        """Start the node's server; ``wait_started`` waits for it."""
        self.starts += 1
        self.log.write_bytes(b"")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.directory,
            )

    def wait_started(self, timeout: float = 180) -> None:
        assert self.process is not None
        _wait_until_ready(self.process, self.log, STARTED_MARKER, timeout)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [RABBITMQCTL, "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stderr.decode()[-2000:]}"
            )
        return done.stdout.decode()

    def stop(self) -> None:
        """A clean stop, as ``systemctl stop``: the node closes its connections and leaves."""
        self.ctl("stop")
        if self.process is not None:
            self.process.wait(timeout=60)
            _stop_group(self.process)
            self.process = None

    def kill(self) -> None:
        """As a crashed host: SIGKILL to every process of the node, no goodbye to anyone."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            _stop_group(self.process)
            self.process = None

    def terminate(self) -> None:
        if self.process is not None:
            _stop_group(self.process)
            self.process = None


@dataclass
class RabbitCluster:
    nodes: list[RabbitNode]
    user: str
    password: str = field(repr=False)

    def url(self, node: RabbitNode) -> str:
        return f"amqp://{self.user}@{node.address}/"


def _rabbit_node(root: Path, index: int, home: Path, user: str, password: str) -> RabbitNode:
    directory = root / f"node{index}"
    directory.mkdir(parents=True)
    port = free_port()
    name = f"payd-c{index}-{port}@localhost"
    (directory / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        "loopback_users = none\n"
        f"default_user = {user}\n"
        f"default_pass = {password}\n"
        # A node that lost its peers keeps running; the quorum queues decide what it may do.
        "cluster_partition_handling = ignore\n"
    )
    env = rabbitmq_node_env(directory, home, name, port)
    return RabbitNode(name=name, port=port, directory=directory, env=env)


@contextlib.contextmanager
def rabbitmq_cluster(root: Path, *, size: int, user: str, password: str) -> Iterator[RabbitCluster]:
    """``size`` RabbitMQ nodes on this machine joined into one cluster (Erlang cookie of its own).

    Clustering as documented at https://www.rabbitmq.com/docs/clustering#creating:
    ``stop_app``, ``join_cluster`` the first node, ``start_app``.
    """
    home = root / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(os.urandom(16).hex())
    cookie.chmod(0o400)
    nodes = [_rabbit_node(root, index, home, user, password) for index in range(1, size + 1)]
    try:
        for node in nodes:  # started together: each takes seconds of a busy machine's CPU
            node.launch()
        for node in nodes:
            node.wait_started()
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].name)
            node.ctl("start_app")
        yield RabbitCluster(nodes=nodes, user=user, password=password)
    finally:
        for node in nodes:
            node.terminate()


def wait_cluster_member(node: RabbitNode, cluster: RabbitCluster, timeout: float = 120) -> None:
    """Wait until ``node`` runs and every other running node sees it running."""
    node.wait_started(timeout)
    deadline = time.monotonic() + timeout
    while node.name not in cluster.nodes[0 if node is not cluster.nodes[0] else 1].ctl("cluster_status"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name} did not rejoin the cluster")
        time.sleep(0.5)


# -- Redis: a master, a replica and three Sentinels ------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]


@dataclass
class SentinelSet:
    service: str
    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]


def _start(args: list[str], log: Path, marker: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_ready(process, log, marker, timeout=60)
    except BaseException:
        _stop_group(process)
        raise
    return process


def _sentinel_binary() -> list[str]:
    # Debian's redis-sentinel package; redis-server runs as a Sentinel too (redis.io, "Running Sentinel").
    found = shutil.which("redis-sentinel")
    return [found] if found else ["redis-server"]


@contextlib.contextmanager
def redis_with_sentinels(root: Path, *, service: str = "payd") -> Iterator[SentinelSet]:
    """A master, one replica and three Sentinels agreeing (quorum 2) on the master's failure after
    a second, as https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/ sets up."""
    root.mkdir(parents=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        servers = []
        for role in ("master", "replica"):
            port = free_port()
            args = [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            args += ["--dir", str(root)]
            if role == "replica":
                args += ["--replicaof", "127.0.0.1", str(servers[0].port)]
            process = _start(args, root / f"{role}.log", "Ready to accept connections")
            processes.append(process)
            servers.append(RedisServer(port, process))
        sentinels = []
        for index in range(3):
            port = free_port()
            conf = root / f"sentinel{index}.conf"  # Sentinel rewrites its file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor {service} 127.0.0.1 {servers[0].port} 2\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 5000\n"
            )
            args = [*_sentinel_binary(), str(conf)]
            if args[0].endswith("redis-server"):
                args.append("--sentinel")
            process = _start(args, root / f"sentinel{index}.log", "Sentinel ID is")
            processes.append(process)
            sentinels.append(RedisServer(port, process))
        yield SentinelSet(service=service, master=servers[0], replica=servers[1], sentinels=sentinels)
    finally:
        for process in processes:
            _stop_group(process)
