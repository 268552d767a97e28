"""The systems a run can measure: payd itself, or one of its peers in ``load/peers/``.

A peer does payd's job on the same workload (the same sandbox, RabbitMQ and
``payd_bench.attempts`` table, the same ``payment.*`` events on
``payd_bench.events``) so that ``load/bench.py`` measures it with the same
clock, the same /proc readings and the same ledger check. Each peer consumes a
queue of its own: payd's quorum queue carries arguments a peer would contradict.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from benchkit.services import NAMESPACE, REPO, BenchError, ManagedProcess, amqp_url

SYSTEMS = ("payd", "lean", "celery")

CELERY_EMBED = b',{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'


@dataclass(frozen=True, kw_only=True)
class PeerSettings:
    sandbox_url: str
    prefetch: int
    pool_size: int
    batch_size: int
    timeout_s: float
    drain_timeout_s: float
    celery_threads: int
    batch_delay_ms: float | None = None
    """The lean pipeline's record wait; None: its own default."""


def queue_of(system: str) -> str:
    return f"{NAMESPACE}.attempts" if system == "payd" else f"{NAMESPACE}.peer.{system}"


def plain_message(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(
        body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


def celery_message(body: bytes) -> aio_pika.Message:
    """A Celery protocol-2 task message calling ``peers.charge(request)``.

    Protocol 2 (docs.celeryq.dev, "Message Protocol"): the task name and id in the
    headers, the body a JSON ``[args, kwargs, embed]``.
    """
    task_id = str(uuid.uuid4())
    return aio_pika.Message(
        b"[[" + body + b"]" + CELERY_EMBED,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=task_id,
        headers={
            "lang": "py",
            "task": "peers.charge",
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": "",
            "kwargsrepr": "",
            "origin": "payd-bench",
            "ignore_result": True,
        },
    )


def message_factory(system: str) -> Callable[[bytes], aio_pika.Message]:
    return celery_message if system == "celery" else plain_message


def start_peer(system: str, workdir: Path, settings: PeerSettings) -> tuple[ManagedProcess, Path]:
    """Start the peer; return it and the file it writes once it consumes."""
    ready = workdir / f"{system}.ready"
    queue = queue_of(system)
    events = f"{NAMESPACE}.events"
    python = str(REPO / ".venv" / "bin" / "python")
    if system == "lean":
        argv = [
            python,
            str(REPO / "load" / "peers" / "lean.py"),
            "--amqp-url",
            amqp_url(),
            "--queue",
            queue,
            "--events-exchange",
            events,
            "--sandbox-url",
            settings.sandbox_url,
            "--ready-file",
            str(ready),
            "--prefetch",
            str(settings.prefetch),
            "--pool-size",
            str(settings.pool_size),
            "--batch-size",
            str(settings.batch_size),
            "--timeout-s",
            str(settings.timeout_s),
            "--drain-s",
            str(settings.drain_timeout_s),
        ]
        if settings.batch_delay_ms is not None:
            argv += ["--batch-delay-ms", str(settings.batch_delay_ms)]
        return ManagedProcess(system, argv, workdir / f"{system}.log"), ready
    if system == "celery":
        argv = [
            str(REPO / ".venv" / "bin" / "celery"),
            "-A",
            "peers.celery_peer",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(settings.celery_threads),
            "--loglevel",
            "WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-Q",
            queue,
        ]
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO / "load"),
            "PEER_QUEUE": queue,
            "PEER_EVENTS_EXCHANGE": events,
            "PEER_SANDBOX_URL": settings.sandbox_url,
            "PEER_AMQP_URL": amqp_url(),
            "PEER_TIMEOUT_S": str(settings.timeout_s),
            "PEER_READY_FILE": str(ready),
            **_credentials_env(),
        }
        return ManagedProcess(system, argv, workdir / f"{system}.log", env), ready
    raise BenchError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


def _credentials_env() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name == "CREDENTIALS_DIRECTORY" or name.startswith("PAYD_")
    }


async def wait_peer_ready(peer: ManagedProcess, ready: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not peer.running():
            raise BenchError(f"{peer.name} exited with {peer.popen.returncode}:\n{peer.log_tail()}")
        if await asyncio.to_thread(ready.exists):
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"{peer.name} not ready after {timeout_s:.0f} s:\n{peer.log_tail()}")


async def purge_peer_queues() -> dict[str, int]:
    """Drop what an aborted earlier run left in the peers' queues (declared passively)."""
    purged: dict[str, int] = {}
    connection = await aio_pika.connect(amqp_url(), client_properties={"connection_name": "payd-bench-purge"})
    try:
        for system in SYSTEMS[1:]:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(queue_of(system), passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue
            result = await queue.purge()
            purged[queue_of(system)] = int(result.message_count or 0)
            await channel.close()
    finally:
        await connection.close()
    return purged


def describe(system: str) -> str:
    return {
        "payd": "payd run",
        "lean": "load/peers/lean.py (consume, POST, batched INSERT, confirmed event, ack)",
        "celery": "Celery 5 worker, threads pool (load/peers/celery_peer.py)",
    }[system]
