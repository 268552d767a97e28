"""Acking a record batch in fewer frames must ack exactly the deliveries it would ack one by one.

Against the real RabbitMQ: deliveries are consumed as payd does (``consume``), settled with
``settle_batch``, then the channel is closed, so every delivery the broker still counts
unacked comes back on the queue. A ``multiple`` ack that reached below an unsettled
delivery would make that delivery vanish instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from daemon.broker import _Unsettled, broker_url, consume, settle, settle_batch
from daemon.config import RabbitMQSettings
from daemon.secrets import load_secret
from tests.support import NAMESPACE

QUEUE = f"{NAMESPACE}.ack-frames"


@pytest.fixture
async def connection() -> AsyncIterator[AbstractConnection]:
    settings = RabbitMQSettings(namespace=NAMESPACE)
    connection = await aio_pika.connect(broker_url(settings, load_secret("rabbitmq_password")))
    async with connection.channel() as channel:
        queue = await channel.declare_queue(QUEUE, durable=False, auto_delete=False)
        await queue.purge()
    yield connection
    async with connection.channel() as channel:
        await channel.queue_delete(QUEUE)
    await connection.close()


async def deliver(
    connection: AbstractConnection, count: int
) -> tuple[AbstractChannel, list[AbstractIncomingMessage]]:
    """Publish ``count`` messages (bodies b"0".."count-1") and take them on a tracked consumer."""
    async with connection.channel(publisher_confirms=True) as publisher:
        for n in range(count):
            await publisher.default_exchange.publish(aio_pika.Message(str(n).encode()), routing_key=QUEUE)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=count + 10)
    received: list[AbstractIncomingMessage] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append(message)
        if len(received) >= count:
            arrived.set()

    await consume(await channel.get_queue(QUEUE, ensure=False), on_message)
    await asyncio.wait_for(arrived.wait(), 10)
    assert [m.delivery_tag for m in received] == list(range(1, count + 1))
    return channel, received


async def left_unacked(connection: AbstractConnection, channel: AbstractChannel) -> list[int]:
    """Close the consuming channel (the broker requeues what it still counts unacked) and
    read back what is on the queue."""
    await channel.close()
    back: list[int] = []
    async with connection.channel() as reader:
        queue = await reader.get_queue(QUEUE, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            back.append(int(message.body))
    return sorted(back)


async def test_a_gap_stops_the_multiple_ack(connection: AbstractConnection) -> None:
    """Deliveries 0, 1, 3, 4 acked while 2 is still being worked on (5 too): 0 and 1 go in
    one frame, 3 and 4 one by one, and 2 and 5 are still the broker's."""
    channel, messages = await deliver(connection, 6)
    done = await settle_batch([(messages[i], True) for i in (3, 0, 4, 1)])
    assert (done.frames, done.stale) == (3, 0)
    assert await left_unacked(connection, channel) == [2, 5]


async def test_a_contiguous_batch_is_one_frame(connection: AbstractConnection) -> None:
    channel, messages = await deliver(connection, 8)
    done = await settle_batch([(m, True) for m in messages[:5]])
    assert (done.frames, done.stale) == (1, 0)
    assert await left_unacked(connection, channel) == [5, 6, 7]


async def test_a_delivery_settled_elsewhere_does_not_block_and_is_not_acked_twice(
    connection: AbstractConnection,
) -> None:
    """One delivery acked on its own first (a duplicate's ack), one requeued in the batch (a
    release): the rest go in one frame, and the released one comes back, redelivered."""
    channel, messages = await deliver(connection, 6)
    assert await settle(messages[1], ack=True)
    done = await settle_batch([(messages[0], True), (messages[2], False), (messages[3], True)])
    # The nack, then one multiple ack for 0 and 3 (1 is settled, 2 was requeued first).
    assert (done.frames, done.stale) == (2, 0)
    assert await left_unacked(connection, channel) == [2, 4, 5]


async def test_concurrent_batches_ack_only_their_own(connection: AbstractConnection) -> None:
    """Two batches settled at once, interleaved tags: each acks only its deliveries."""
    channel, messages = await deliver(connection, 9)
    first = settle_batch([(messages[i], True) for i in (0, 2, 4)])
    second = settle_batch([(messages[i], True) for i in (1, 3, 7)])
    await asyncio.gather(first, second)
    assert await left_unacked(connection, channel) == [5, 6, 8]


async def test_a_closed_channel_counts_stale(connection: AbstractConnection) -> None:
    channel, messages = await deliver(connection, 3)
    await channel.close()
    done = await settle_batch([(m, True) for m in messages])
    assert (done.frames, done.stale) == (0, 3)


async def test_a_delivery_reads_as_aio_pikas_message(connection: AbstractConnection) -> None:
    """What payd's consumer hands on says what aio-pika's own message says of the same
    delivery (the fields payd reads directly, the rest through aio-pika), and settles once."""
    sent = aio_pika.Message(
        b'{"x": 1}',
        headers={"x-payd-error": "why", "n": 3},
        message_id="m-1",
        content_type="application/json",
        correlation_id="c-1",
        app_id="tests",
    )
    async with connection.channel(publisher_confirms=True) as publisher:
        for _ in range(2):
            await publisher.default_exchange.publish(sent, routing_key=QUEUE)
    async with connection.channel() as reader:
        theirs = await (await reader.get_queue(QUEUE, ensure=False)).get(no_ack=True)
    channel = await connection.channel()
    got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await got.put(message)

    await consume(await channel.get_queue(QUEUE, ensure=False), on_message)
    ours = await asyncio.wait_for(got.get(), 10)
    for name in ("body", "headers", "message_id", "content_type", "correlation_id", "app_id", "routing_key"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.headers == {"x-payd-error": "why", "n": 3}
    assert ours.redelivered is False
    assert ours.delivery_tag == 1
    assert not ours.processed
    await ours.ack()
    assert ours.processed
    with pytest.raises(aio_pika.exceptions.MessageProcessError):
        await ours.ack()
    assert await left_unacked(connection, channel) == []
    with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
        _ = ours.channel


def test_the_register_stays_small_behind_a_long_held_delivery() -> None:
    """One delivery held while thousands after it are settled: the register keeps the
    unsettled ones only (bounded memory), and still in order."""
    unsettled = _Unsettled()
    for tag in range(1, 10_001):
        unsettled.delivered(tag)
    for tag in range(2, 10_001):
        if tag % 1000:
            unsettled.settled(tag)
    assert len(unsettled.order) <= 2 * len(unsettled.pending) + 1024
    held = [tag for tag in unsettled.order if tag in unsettled.pending]
    assert held == sorted(unsettled.pending) == [1, *range(1000, 10_001, 1000)]
    assert unsettled.lowest_other({1}) == 1000
    assert unsettled.trusted
