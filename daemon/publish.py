"""``payd publish FILE|-``: attempt requests from JSON lines onto ``payd.attempts``.

Lines are published as they are, byte for byte: validation is the daemon's
job, and an invalid line ends in the dead-letter queue with its reason, which
is what a sender would see too. ``--check`` validates locally instead, with
the daemon's own ``decode_request``, and publishes nothing.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TextIO

from daemon.broker import Broker
from daemon.config import Config
from daemon.pipeline.intake import Invalid, decode_request
from daemon.secrets import load_secret

WINDOW = 256
"""Publishes awaiting their confirm at once: enough to keep the broker busy."""


def read_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines as bytes: a line that is not UTF-8 is the daemon's to judge, not a crash here."""
    for number, line in enumerate(stream, start=1):
        stripped = line.strip()
        if stripped:
            yield number, stripped


def check_lines(config: Config, lines: Iterable[tuple[int, bytes]], out: TextIO) -> int:
    bad = 0
    for number, body in lines:
        decoded = decode_request(body, config.providers)
        if isinstance(decoded, Invalid):
            bad += 1
            print(f"line {number}: {decoded.reason}", file=out)
    return 1 if bad else 0


async def publish_lines(
    config: Config, lines: Iterable[tuple[int, bytes]], *, progress: TextIO | None = sys.stderr
) -> int:
    broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"))
    await broker.connect()
    queue = broker.topology.attempts_queue
    sent = 0
    started = last_report = time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    try:
        for _number, body in lines:
            if len(pending) >= WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.create_task(broker.publish("", queue, body)))
            sent += 1
            if progress is not None and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                print(
                    f"published {sent} ({sent / (last_report - started):.0f}/s)",
                    file=progress,
                    flush=True,
                )
        if pending:
            await asyncio.gather(*pending)
    finally:
        await broker.close()
    if progress is not None:
        print(f"published {sent} requests to {queue}, every one confirmed", file=progress)
    return 0
