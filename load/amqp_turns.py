"""How many event-loop turns one AMQP operation costs when the loop is busy.

    .venv/bin/python load/amqp_turns.py

A callback that burns 1 ms and re-schedules itself makes every loop turn cost
about 1 ms, standing in for a daemon loop busy with thousands of attempts; the
milliseconds per operation are then roughly the loop turns it needs. It
compares what payd does (aio-pika ``message.ack()`` one after another,
confirmed publishes through aio-pika) with aiormq's ``wait=False`` variants.
Uses a private auto-delete queue on the local RabbitMQ; nothing else is
touched. See docs/benchmarks.md, "Bottlenecks found".
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from benchkit.services import amqp_url

TURN_S = 0.001
MESSAGES = 300


def make_turns_slow(loop: asyncio.AbstractEventLoop) -> None:
    """Every loop iteration from now on runs this once: a 1 ms busy wait."""

    def burn() -> None:
        end = time.perf_counter() + TURN_S
        while time.perf_counter() < end:
            pass
        loop.call_soon(burn)

    loop.call_soon(burn)


def report(label: str, started: float, count: int) -> None:
    per_op_ms = (time.perf_counter() - started) / count * 1000
    print(f"{label:<48} {per_op_ms:5.2f} ms each = ~{per_op_ms / (TURN_S * 1000):.1f} loop turns")


async def receive(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int
) -> list[AbstractIncomingMessage]:
    received: list[AbstractIncomingMessage] = []
    all_in = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append(message)
        if len(received) == count:
            all_in.set()

    await channel.set_qos(prefetch_count=count)
    await (await channel.get_queue(queue)).consume(on_message)
    await all_in.wait()
    return received


async def main() -> None:
    connection = await aio_pika.connect(amqp_url(), client_properties={"connection_name": "payd-amqp-turns"})
    try:
        publisher = await connection.channel(publisher_confirms=True)
        queue = await publisher.declare_queue("", exclusive=True, auto_delete=True)
        await asyncio.gather(
            *(publisher.default_exchange.publish(aio_pika.Message(b"x"), queue.name) for _ in range(MESSAGES))
        )
        consumer = await connection.channel(publisher_confirms=False)
        messages = await receive(consumer, queue.name, MESSAGES)
        make_turns_slow(asyncio.get_running_loop())

        half = MESSAGES // 2
        started = time.perf_counter()
        for message in messages[:half]:
            await message.ack()
        report("sequential aio-pika message.ack()", started, half)

        raw_consumer = await consumer.get_underlay_channel()
        started = time.perf_counter()
        for message in messages[half:]:
            assert message.delivery_tag is not None
            await raw_consumer.basic_ack(message.delivery_tag, wait=False)
        report("sequential aiormq basic_ack(wait=False)", started, MESSAGES - half)

        started = time.perf_counter()
        await asyncio.gather(
            *(publisher.default_exchange.publish(aio_pika.Message(b"y"), queue.name) for _ in range(200))
        )
        report("200 concurrent aio-pika confirmed publishes", started, 200)

        raw_publisher = await publisher.get_underlay_channel()
        started = time.perf_counter()
        await asyncio.gather(
            # aiormq's Channel takes wait=; its abstract base class does not declare it.
            *(raw_publisher.basic_publish(b"y", routing_key=queue.name, wait=False) for _ in range(200))  # type: ignore[call-arg]
        )
        report("200 concurrent aiormq basic_publish(wait=False)", started, 200)
    finally:
        await connection.close()


if __name__ == "__main__":
    os.environ.setdefault("CREDENTIALS_DIRECTORY", str(Path(__file__).resolve().parents[1] / ".secrets"))
    uvloop.run(main())
