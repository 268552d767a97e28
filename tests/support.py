"""What the tests share: real services, a real sandbox, daemons in-process or as processes.

Nothing here mocks the database, the broker or the provider: tests see what an
operator would, through MySQL rows, RabbitMQ queues and the sandbox's ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomysql
from aiohttp import web

from daemon.config import Config, parse_config
from daemon.secrets import load_secret
from daemon.service import serve
from daemon.supervisor import FaultInjector
from payd_sandbox.behaviour import SandboxBehaviour
from payd_sandbox.gateway import build_app

ROOT = Path(__file__).resolve().parent.parent
PAYD = str(Path(sys.executable).with_name("payd"))
# Overridable so that several checkouts can run the suite at once against shared services.
NAMESPACE = os.environ.get("PAYD_TEST_NAMESPACE", "payd_test")
DATABASE = os.environ.get("PAYD_TEST_DATABASE", "payd_test")
TERMINAL = ("succeeded", "declined", "failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(*, sandbox_url: str, http_port: int, **sections: dict[str, Any]) -> str:
    """A test configuration; ``sections`` override keys, e.g. ``pipeline={"lease_s": 5}``."""
    base: dict[str, dict[str, Any]] = {
        "daemon": {"drain_timeout_s": 10, "log_level": "warning"},
        "mysql": {"database": DATABASE, "pool_size": 6},
        "rabbitmq": {"namespace": NAMESPACE, "prefetch": 500, "reconnect_delay_s": 0.5},
        "redis": {"key_prefix": NAMESPACE},
        "http": {"port": http_port},
        "monitor": {"enabled": False},
        "pipeline": {
            "batch_delay_ms": 2,
            "lease_s": 30,
            "reconcile_interval_s": 0.2,
            "reconcile_backoff_s": [0.5, 1, 2],
            "not_found_grace_s": 5,
            "resend_after_s": 0.5,
        },
        "outbox": {"poll_interval_s": 0.2},
        "providers.sandbox": {
            "kind": "sandbox",
            "base_url": sandbox_url,
            "max_in_flight": 50,
            "timeout_s": 2,
            "connect_timeout_s": 1,
            "retry_backoff_s": 0.05,
        },
    }
    for name, overrides in sections.items():
        base.setdefault(name.replace("__", "."), {}).update(overrides)
    lines = []
    for name, table in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


# -- the sandbox gateway -------------------------------------------------------


class Sandbox:
    """The sandbox gateway running in the test's event loop on a free port."""

    def __init__(self, runner: web.AppRunner, url: str, session: aiohttp.ClientSession) -> None:
        self.runner = runner
        self.url = url
        self._session = session

    async def ledger(self) -> list[dict[str, Any]]:
        async with self._session.get(f"{self.url}/_sandbox/ledger") as response:
            return list((await response.json())["charges"])

    async def refunds(self) -> list[dict[str, Any]]:
        """Every refund the gateway executed (the ledger's ``refunds``)."""
        async with self._session.get(f"{self.url}/_sandbox/ledger") as response:
            return list((await response.json())["refunds"])

    async def stats(self) -> dict[str, Any]:
        async with self._session.get(f"{self.url}/_sandbox/stats") as response:
            return dict(await response.json())

    async def behave(self, **changes: Any) -> None:
        async with self._session.post(f"{self.url}/_sandbox/behaviour", json=changes) as response:
            assert response.status == 200, await response.text()

    async def assert_no_double_charge(self) -> list[dict[str, Any]]:
        """Invariant 1 from the gateway's side: one approval per key and per reference."""
        approved = [c for c in await self.ledger() if c["status"] == "approved"]
        keys = [c["idempotency_key"] for c in approved]
        references = [c["merchant_reference"] for c in approved]
        assert len(keys) == len(set(keys)), "an idempotency key was charged twice"
        assert len(references) == len(set(references)), "a subscription cycle was charged twice"
        return approved


@contextlib.asynccontextmanager
async def running_sandbox(**behaviour: Any) -> AsyncIterator[Sandbox]:
    runner = web.AppRunner(build_app(SandboxBehaviour(**behaviour)), handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:
        try:
            yield Sandbox(runner, f"http://127.0.0.1:{port}", session)
        finally:
            await runner.cleanup()


# -- the database ----------------------------------------------------------------


async def open_test_pool() -> aiomysql.Pool:
    password = load_secret("mysql_password")
    return await aiomysql.create_pool(
        host="127.0.0.1",
        user="payd",
        password=password.reveal() if password else "",
        db=DATABASE,
        autocommit=True,
        maxsize=3,
    )


async def query(pool: aiomysql.Pool, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute(sql, args or None)
        return list(await cursor.fetchall())


async def states(pool: aiomysql.Pool) -> dict[str, str]:
    return {key: state for key, state in await query(pool, "SELECT idempotency_key, state FROM attempts")}


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    """Wait for ``check`` to hold. Timeouts here bound a hang; they are not what a test asserts."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_settled(pool: aiomysql.Pool, keys: Iterable[str], *, timeout: float = 60) -> dict[str, str]:
    """Wait until every key has a terminal attempt row; return key -> state."""
    return await wait_states(lambda: states(pool), keys, TERMINAL, timeout=timeout, what="attempts to settle")


async def wait_states(
    read: Callable[[], Awaitable[dict[str, str]]],
    keys: Iterable[str],
    done: Iterable[str],
    *,
    timeout: float,
    what: str,
) -> dict[str, str]:
    """Wait until ``read()`` shows every key in one of the ``done`` states; return key -> state."""
    wanted, finished = set(keys), set(done)

    async def settled() -> bool:
        current = await read()
        return all(current.get(key) in finished for key in wanted)

    await eventually(settled, timeout=timeout, what=f"{len(wanted)} {what}")
    current = await read()
    return {key: current[key] for key in wanted}


# -- the broker ------------------------------------------------------------------


@dataclass
class Broker:
    """A test's own AMQP connection: publishes requests, reads dead letters and events."""

    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    events: list[dict[str, Any]] = field(default_factory=list)

    async def publish(self, bodies: Iterable[bytes | dict[str, Any]]) -> int:
        count = 0
        for body in bodies:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            await self.channel.default_exchange.publish(
                aio_pika.Message(raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=f"{NAMESPACE}.attempts",
            )
            count += 1
        return count

    async def dead_letters(self) -> list[tuple[bytes, dict[str, Any]]]:
        queue = await self.channel.get_queue(f"{NAMESPACE}.attempts.dead", ensure=False)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append((message.body, dict(message.headers)))
        return found

    async def follow_events(self) -> None:
        """Collect every event published from now on into ``self.events``."""
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await self.channel.get_exchange(f"{NAMESPACE}.events", ensure=False)
        await queue.bind(exchange, routing_key="#")

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event = json.loads(message.body)
            event["routing_key"] = message.routing_key
            self.events.append(event)

        await queue.consume(collect, no_ack=True)


async def reset_broker(url: str | None = None) -> Broker:
    """Declare payd's test topology, empty its queues, and return a test connection (to the
    shared broker, or to the one at ``url``, password included)."""
    from daemon.broker import Topology, broker_url, declare_topology  # noqa: PLC0415
    from daemon.config import RabbitMQSettings  # noqa: PLC0415

    settings = RabbitMQSettings(namespace=NAMESPACE)
    connection = await aio_pika.connect(url or broker_url(settings, load_secret("rabbitmq_password")))
    channel = await connection.channel(publisher_confirms=True)
    topology = Topology.for_namespace(NAMESPACE)
    attempts = await declare_topology(channel, topology, settings.delivery_limit)
    await attempts.purge()
    dead = await channel.get_queue(topology.dead_queue, ensure=False)
    await dead.purge()
    return Broker(connection, channel)


# -- daemons ---------------------------------------------------------------------


@dataclass
class DaemonFactory:
    """Builds configurations around one sandbox, and runs daemons in-process or as processes."""

    sandbox: Sandbox
    workdir: Path
    started: list[DaemonProcess] = field(default_factory=list)

    def config(self, **sections: dict[str, Any]) -> tuple[Config, Path, int]:
        port = free_port()
        text = config_text(sandbox_url=self.sandbox.url, http_port=port, **sections)
        path = self.workdir / f"payd-{port}.toml"
        path.write_text(text)
        return parse_config(text, source=str(path)), path, port

    @contextlib.asynccontextmanager
    async def in_process(self, **sections: dict[str, Any]) -> AsyncIterator[InProcessDaemon]:
        config, _, port = self.config(**sections)
        daemon = InProcessDaemon(config, port)
        await daemon.start()
        try:
            yield daemon
        finally:
            await daemon.stop()

    async def process(self, *, ready: bool = True, **sections: dict[str, Any]) -> DaemonProcess:
        """``payd run`` as a process; by default once ``/readyz`` is 200 (``ready=False``: at once,
        for daemons that must start but cannot be ready)."""
        _, path, port = self.config(**sections)
        daemon = DaemonProcess(path, port)
        self.started.append(daemon)
        if ready:
            await daemon.wait_ready()
        return daemon

    def kill_all(self) -> None:
        for daemon in self.started:
            daemon.kill()


class InProcessDaemon:
    def __init__(self, config: Config, port: int, faults: FaultInjector | None = None) -> None:
        self.config = config
        self.port = port
        self.faults = faults
        self.shutdown = asyncio.Event()
        self.force = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.create_task(
            serve(
                self.config, shutdown=self.shutdown, force=self.force, on_ready=ready.set, faults=self.faults
            )
        )
        done, _ = await asyncio.wait(
            [self.task, asyncio.create_task(ready.wait())], timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        if self.task in done:
            self.task.result()  # raises what went wrong
        assert ready.is_set(), "daemon did not become ready"

    async def status(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/status") as response,
        ):
            return dict(await response.json())

    async def stop(self) -> int:
        assert self.task is not None
        self.shutdown.set()
        return await asyncio.wait_for(self.task, timeout=60)


class DaemonProcess:
    """``payd run`` as a real process, to be signalled or killed like under systemd."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.port = port
        self.log_path = config_path.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [PAYD, "run", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            cwd=ROOT,
        )

    async def wait_ready(self, timeout: float = 30) -> None:
        async def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}: {self.log()}")
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{self.port}/readyz") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=timeout, what="the daemon to be ready", interval=0.2)

    async def status(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/status") as response,
        ):
            return dict(await response.json())

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout} s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def notify_socket(path: Path, *, watchdog_usec: int = 200_000) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET, with a watchdog interval."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    os.environ["NOTIFY_SOCKET"] = str(path)
    os.environ["WATCHDOG_USEC"] = str(watchdog_usec)
    try:
        yield listener
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
        listener.close()


def request(
    key: str,
    *,
    payment_method: str = "pm_ok",
    subscription_id: int | None = None,
    cycle: int | None = None,
    amount_minor: int = 1000,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "idempotency_key": key,
        "amount_minor": amount_minor,
        "currency": "EUR",
        "provider": "sandbox",
        "payment_method": payment_method,
        **extra,
    }
    if subscription_id is not None:
        body["subscription_id"] = subscription_id
        body["cycle"] = 1 if cycle is None else cycle
    return body
