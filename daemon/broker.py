"""RabbitMQ: the topology, the attempt consumer, confirmed publishing, and reconnection.

payd reconnects itself instead of using aio-pika's robust connection, so the
one rule that matters stays visible: a delivery belongs to the channel it came
on. After a reconnect, deliveries from the dead channel are never acked on the
new one (delivery tags are per channel); their acks fail harmlessly, the broker
redelivers them, and the claim step recognises them as duplicates.

With several nodes (``[rabbitmq] urls``), the same rule carries over from one node
to another: losing a node is losing the connection, and payd reconnects to the
next node that answers, trying the lost one last. Confirms are awaited on the new
connection's channel; nothing is acked before its commit, on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, cast

import aio_pika
import aiormq
import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from yarl import URL

from daemon.config import RabbitMQSettings
from daemon.events import OutboxRow, now_iso
from daemon.secrets import Secret
from daemon.tls import Link, TlsLinkError, client_context, naming_tls_failures, url_address

log = structlog.get_logger("payd.broker")

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]

ERROR_HEADER: Final = "x-payd-error"
DEAD_AT_HEADER: Final = "x-payd-dead-at"
"""When payd dead-lettered the message (ISO 8601, UTC): ``payd dead list`` shows its age."""

# What a failed ack/nack/publish on a closed or closing channel can raise.
BROKER_ERRORS: Final = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)


class BrokerUnavailable(Exception):
    """No connection to RabbitMQ right now; the caller keeps its work and tries again."""


class Topology(msgspec.Struct, frozen=True):
    attempts_queue: str
    dead_queue: str
    events_exchange: str

    @classmethod
    def for_namespace(cls, namespace: str) -> Topology:
        return cls(f"{namespace}.attempts", f"{namespace}.attempts.dead", f"{namespace}.events")


def broker_url(settings: RabbitMQSettings, password: Secret | None, node: str | None = None) -> str:
    """``node`` (default: the first configured) with the password; one-shot tools use the default."""
    url = URL(node or settings.nodes[0])
    if password is not None:
        url = url.with_password(password.reveal())
    return str(url)


def node_order(settings: RabbitMQSettings) -> list[str]:
    """The nodes in the order this instance tries them first."""
    nodes = list(settings.nodes)
    if settings.node_order == "shuffled":
        random.shuffle(nodes)
    return nodes


def quorum_arguments(initial_group_size: int | None) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if initial_group_size is not None:
        # https://www.rabbitmq.com/docs/quorum-queues#replication-factor
        arguments["x-quorum-initial-group-size"] = initial_group_size
    return arguments


async def declare_topology(
    channel: AbstractChannel,
    topology: Topology,
    delivery_limit: int,
    initial_group_size: int | None = None,
) -> AbstractQueue:
    """Declare (idempotently) what payd needs; return the attempts queue."""
    quorum = quorum_arguments(initial_group_size)
    await channel.declare_queue(topology.dead_queue, durable=True, arguments=quorum)
    await channel.declare_exchange(topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    return await channel.declare_queue(
        topology.attempts_queue,
        durable=True,
        arguments={
            **quorum,
            # A message redelivered this often (a poison message that kills the
            # process) goes to the dead-letter queue instead of looping forever.
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topology.dead_queue,
        },
    )


class Delivery(AbstractIncomingMessage):
    """One delivery as the pipeline reads it, built straight from aiormq's frame.

    aio-pika's ``IncomingMessage`` copies and checks some twenty properties through its
    own ``__setattr__`` and runs the handler in a task of its own: tens of microseconds
    per delivery, a tenth of an attempt's CPU at saturation, for fields payd never
    reads. This one holds what payd reads (body, headers, message id, tag) and builds
    aio-pika's message only if something else is asked of it. Acks, nacks and rejects go
    to the channel the delivery came on, as aio-pika's do.
    """

    __slots__ = (
        "_full",
        "_processed",
        "_raw",
        "body",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "redelivered",
        "routing_key",
    )

    def __init__(self, raw: aiormq.abc.DeliveredMessage) -> None:
        properties = raw.header.properties
        self._raw = raw
        self._full: aio_pika.IncomingMessage | None = None
        self._processed = False
        self.body = raw.body
        self.headers = properties.headers or {}
        self.message_id = properties.message_id
        self.delivery_tag = raw.delivery_tag
        self.redelivered = raw.redelivered
        self.routing_key = raw.routing_key
        self.exchange = raw.exchange
        self.consumer_tag = raw.consumer_tag

    def _message(self) -> aio_pika.IncomingMessage:
        if self._full is None:
            self._full = aio_pika.IncomingMessage(self._raw)
        return self._full

    def __getattr__(self, name: str) -> Any:
        # The properties payd does not read (content type, timestamp, ...), from aio-pika.
        return getattr(self._message(), name)

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._raw.channel
        if channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError
        return channel

    @property
    def processed(self) -> bool:
        return self._processed

    @property
    def properties(self) -> aiormq.spec.Basic.Properties:
        return self._raw.header.properties

    def info(self) -> aio_pika.abc.MessageInfo:
        return self._message().info()

    @property
    def locked(self) -> bool:
        return True  # a delivery is read, never edited

    def lock(self) -> None:
        """Deliveries are always locked."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.body)

    def process(
        self, requeue: bool = False, reject_on_redelivered: bool = False, ignore_processed: bool = False
    ) -> aio_pika.abc.AbstractProcessContext:
        return aio_pika.message.ProcessContext(
            cast(aio_pika.IncomingMessage, self),
            requeue=requeue,
            reject_on_redelivered=reject_on_redelivered,
            ignore_processed=ignore_processed,
        )

    def _settling(self) -> aiormq.abc.AbstractChannel:
        if self._processed:
            raise aio_pika.exceptions.MessageProcessError("Message already processed", self)
        self._processed = True
        return self.channel

    async def ack(self, multiple: bool = False) -> None:
        channel = self._settling()
        if self.delivery_tag is not None:
            await channel.basic_ack(delivery_tag=self.delivery_tag, multiple=multiple)
            if not multiple:
                _unsettled_of(channel).settled(self.delivery_tag)

    async def reject(self, requeue: bool = False) -> None:
        channel = self._settling()
        if self.delivery_tag is not None:
            await channel.basic_reject(delivery_tag=self.delivery_tag, requeue=requeue)
            _unsettled_of(channel).settled(self.delivery_tag)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        channel = self._settling()
        if self.delivery_tag is not None:
            await channel.basic_nack(delivery_tag=self.delivery_tag, multiple=multiple, requeue=requeue)
            if not multiple:
                _unsettled_of(channel).settled(self.delivery_tag)


async def consume(queue: AbstractQueue, on_message: OnMessage) -> str:
    """Consume ``queue`` at the aiormq level: each delivery becomes a ``Delivery``, its tag
    registered for ``settle_batch``, and ``on_message`` runs in aiormq's task for it
    (aio-pika's consumer would add a second task and its ``IncomingMessage``)."""
    channel = cast(aiormq.Channel, await queue.channel.get_underlay_channel())

    async def deliver(raw: aiormq.abc.DeliveredMessage) -> None:
        delivery = Delivery(raw)
        if delivery.delivery_tag is not None:
            _unsettled_of(raw.channel).delivered(delivery.delivery_tag)
        await on_message(delivery)

    consuming = await channel.basic_consume(queue.name, deliver, no_ack=False)
    if consuming.consumer_tag is None:  # pamqp types it optional; the broker always sends one
        raise aiormq.exceptions.AMQPError("the broker gave the consumer no tag")
    return consuming.consumer_tag


class Broker:
    """Owns the AMQP connection and its two channels: one consumes, one publishes with confirms."""

    def __init__(
        self,
        settings: RabbitMQSettings,
        password: Secret | None,
        on_reconnect: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._on_reconnect = on_reconnect
        self.topology = Topology.for_namespace(settings.namespace)
        self._password = password
        self._nodes = node_order(settings)
        tls = settings.effective_tls
        self._tls = client_context(Link.RABBITMQ, tls) if tls is not None else None
        self.node: str | None = None
        """``host:port`` of the node in use; None while disconnected."""
        self._connection: AbstractConnection | None = None
        """The consuming connection: deliveries of the attempts queue and their acks."""
        self._publisher: AbstractConnection | None = None
        """The publishing connection: events, requests and dead letters, with confirms. Apart
        from the consuming one, so confirms do not queue behind thousands of deliveries and
        acks on one socket (the outbox relay's confirms took seconds while the pipeline
        consumed; docs/benchmarks.md)."""
        self._publish_channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._on_message: OnMessage | None = None
        self._paused = False
        self._lost = asyncio.Event()
        self._closing = False
        self.connected = asyncio.Event()
        self.reconnects = 0

    @property
    def nodes(self) -> tuple[str, ...]:
        """``host:port`` of every configured node, in this instance's order."""
        return tuple(url_address(node) for node in self._nodes)

    async def connect(self) -> None:
        """Connect to the first node that answers, in order; raise the last node's error if none does."""
        failure: BaseException | None = None
        for node in list(self._nodes):
            try:
                await self._connect_to(node)
            except (TimeoutError, *BROKER_ERRORS, OSError) as error:
                if len(self._nodes) > 1:
                    log.warning("broker.node_unreachable", node=url_address(node), error=type(error).__name__)
                failure = error
                continue
            return
        assert failure is not None
        raise failure

    def _try_last(self, address: str) -> None:
        """A node just lost goes to the end of the order: if it is stopping, it may still accept
        a connection it will close again a moment later."""
        lost = [node for node in self._nodes if url_address(node) == address]
        self._nodes = [node for node in self._nodes if url_address(node) != address] + lost

    async def _open(self, node: str, name: str) -> AbstractConnection:
        with naming_tls_failures(Link.RABBITMQ, url_address(node)):
            return await aio_pika.connect(
                broker_url(self.settings, self._password, node),
                client_properties={"connection_name": name},
                ssl_context=self._tls,
                timeout=self.settings.connect_timeout_s,
            )

    async def _connect_to(self, node: str) -> None:
        """Connect to one node (a consuming and a publishing connection), open channels, declare
        the topology, and resume consuming if we were."""
        address = url_address(node)
        connection = await self._open(node, "payd")
        publisher: AbstractConnection | None = None
        try:
            publisher = await self._open(node, "payd-publish")
            consume_channel = await connection.channel(publisher_confirms=False)
            await consume_channel.set_qos(prefetch_count=self.settings.prefetch)
            self._publish_channel = await publisher.channel(publisher_confirms=True)
            self._queue = await asyncio.wait_for(
                declare_topology(
                    consume_channel,
                    self.topology,
                    self.settings.delivery_limit,
                    self.settings.quorum_initial_group_size,
                ),
                # A node cut off from the cluster's majority cannot answer for a quorum queue.
                timeout=self.settings.connect_timeout_s * 2,
            )
        except BaseException:
            for link in (connection, publisher):
                if link is not None:
                    with contextlib.suppress(*BROKER_ERRORS, asyncio.TimeoutError):
                        await asyncio.wait_for(link.close(), timeout=2)
            raise
        self._lost.clear()

        def lost(*_: Any) -> None:
            # Only the current connection's channels count: closing an old one
            # during a reconnect must not trigger another reconnect. A channel
            # closed by the broker (a precondition failure) also means starting
            # over, since it leaves the connection half-useful.
            if self._connection is connection and not self._closing:
                self.connected.clear()
                self._lost.set()

        for closable in (connection, publisher, consume_channel, self._publish_channel):
            closable.close_callbacks.add(lost)
        self._connection = connection
        self._publisher = publisher
        if self._on_message is not None and not self._paused:
            self._consumer_tag = await consume(self._queue, self._on_message)
        self.node = address
        self.connected.set()

    async def supervise(self) -> None:
        """Runs for the daemon's lifetime: reconnects with backoff whenever the link drops."""
        while True:
            await self._lost.wait()
            self.connected.clear()
            if self.node is not None:
                log.warning("broker.node_lost", node=self.node)
                self._try_last(self.node)
            self.node = None
            old, self._connection = self._connection, None
            old_publisher, self._publisher = self._publisher, None
            self._consumer_tag = None
            for link in (old, old_publisher):
                if link is not None:
                    with contextlib.suppress(*BROKER_ERRORS, asyncio.TimeoutError):
                        await asyncio.wait_for(link.close(), timeout=2)
            delay = self.settings.reconnect_delay_s
            while True:
                log.warning("broker.reconnecting", delay_s=delay)
                await asyncio.sleep(delay)
                try:
                    await self.connect()
                except (TimeoutError, TlsLinkError, *BROKER_ERRORS, OSError) as error:
                    # A TLS failure says what is wrong (a CA, a name); other errors only their kind.
                    reason = str(error) if isinstance(error, TlsLinkError) else type(error).__name__
                    log.warning("broker.reconnect_failed", error=reason)
                    delay = min(delay * 2, 30.0)
                    continue
                self.reconnects += 1
                self._on_reconnect()
                log.info("broker.reconnected", node=self.node, reconnects=self.reconnects)
                break

    async def start_consuming(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        if self._queue is not None and self.connected.is_set():
            self._consumer_tag = await consume(self._queue, on_message)

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in the attempts and dead-letter queues (a re-declare with the same
        arguments is idempotent and answers with the count)."""
        channel = self._channel()
        depths = {}
        for name in (self.topology.attempts_queue, self.topology.dead_queue):
            # passive=True: a queue that vanished would close the channel, not be re-created here.
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            depths[name] = int(result.message_count or 0) if result is not None else 0
        return depths

    async def stop_consuming(self) -> None:
        """Stop new deliveries; those already delivered stay ours to settle."""
        self._on_message = None
        await self._cancel_consumer()

    async def pause_consuming(self) -> None:
        """Take no new deliveries for now (those already delivered stay ours to settle), also
        across reconnects, until ``resume_consuming``; the queue keeps the rest for others."""
        self._paused = True
        await self._cancel_consumer()

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is not None and self._queue is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._queue.cancel(tag)

    async def resume_consuming(self) -> None:
        """Undo ``pause_consuming``; a no-op once ``stop_consuming`` (the drain) has run."""
        self._paused = False
        if (
            self._on_message is not None
            and self._consumer_tag is None
            and self._queue is not None
            and self.connected.is_set()
        ):
            self._consumer_tag = await consume(self._queue, self._on_message)

    def _channel(self) -> AbstractChannel:
        if not self.connected.is_set() or self._publish_channel is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        return self._publish_channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish one persistent message and wait for the broker's confirm.

        Goes to aiormq directly with ``wait=False``: the channel lock is released
        once the frames are queued instead of after they reach the socket, so
        concurrent publishes pipeline. The broker's confirm, awaited here, is
        what proves the message is safe; the socket write proves nothing more.
        """
        # The concrete aiormq channel: its abstract type does not declare ``wait``.
        channel = cast(aiormq.Channel, await self._channel().get_underlay_channel())
        properties = aiormq.spec.Basic.Properties(
            message_id=message_id,
            headers=headers,
            content_type="application/json",
            delivery_mode=2,  # persistent
        )
        try:
            confirmation = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=exchange == "",  # a queue that does not exist must not swallow it
                wait=False,
            )
        except BROKER_ERRORS as error:
            raise BrokerUnavailable(f"publish failed: {type(error).__name__}") from error
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            # Nack, Reject, or the message came back unroutable: not safe, the caller keeps it.
            raise BrokerUnavailable(f"publish not confirmed: {type(confirmation).__name__}")

    async def publish_outbox(self, rows: Sequence[OutboxRow]) -> None:
        """Publish outbox rows concurrently; raise if any was not confirmed."""
        await asyncio.gather(
            *(
                self.publish(
                    self.topology.events_exchange if row.target == "events" else "",
                    row.routing_key if row.target == "events" else self.topology.attempts_queue,
                    row.payload,
                    message_id=row.event_id,
                )
                for row in rows
            )
        )

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str, instance_id: str) -> None:
        """Move an invalid request to the dead-letter queue with its reason, then ack it."""
        headers = {key: _republishable(value) for key, value in (message.headers or {}).items()}
        headers[ERROR_HEADER] = reason
        headers[DEAD_AT_HEADER] = now_iso()
        headers["x-payd-instance"] = instance_id
        await self.publish(
            "",
            self.topology.dead_queue,
            message.body,
            message_id=message.message_id,
            headers=headers,
        )
        await settle(message, ack=True)

    async def close(self) -> None:
        self._closing = True
        self.connected.clear()
        self.node = None
        links = (self._connection, self._publisher)
        self._connection = self._publisher = None
        for link in links:
            if link is not None:
                with contextlib.suppress(*BROKER_ERRORS, asyncio.TimeoutError):
                    await asyncio.wait_for(link.close(), timeout=5)


def _republishable(value: Any) -> Any:
    """A sender's header value as it can be published again: pamqp decodes a long string
    that is not UTF-8 to bytes, which it cannot encode; as a byte array it travels unchanged."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _republishable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_republishable(item) for item in value]
    return value


def delivery_channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a delivery came on can still settle it (aio-pika raises once closed)."""
    try:
        return not message.channel.is_closed
    except BROKER_ERRORS:
        return False


async def settle(message: AbstractIncomingMessage, *, ack: bool, requeue: bool = True) -> bool:
    """Ack (or nack: requeue, or dead-letter with ``requeue=False``) a delivery on the channel
    it came on; False if that channel is gone.

    A delivery whose channel died is requeued by the broker on its own; it will
    come back as a duplicate, which the claim step stops.
    """
    tag = message.delivery_tag
    if tag is None:
        return True
    try:
        channel = message.channel  # raises if the channel it came on has closed
        # wait=False: an ack is fire-and-forget in AMQP; waiting for the socket write
        # would only cost event-loop turns per message.
        if ack:
            await channel.basic_ack(delivery_tag=tag, wait=False)
        else:
            await channel.basic_nack(delivery_tag=tag, requeue=requeue, wait=False)
    except BROKER_ERRORS:
        return False
    # Only now: the frame is queued, ahead of any multiple ack computed from here on.
    _unsettled_of(channel).settled(tag)
    return True


# -- acking many deliveries in one frame ------------------------------------------------
#
# A record batch settles tens of deliveries at once. ``basic.ack`` with ``multiple`` acks
# every unsettled delivery up to its tag on that channel, so it is used only where it is
# provably the same as acking each: every delivery tag below it on the channel is either
# in the batch or already settled. Delivery tags count 1, 2, 3... per channel; each is
# registered (``consume``) before payd's handler sees the delivery, and removed only
# after its own settle frame is queued, so a tag still in ``_Unsettled`` is one nobody
# has settled yet. Anything unexpected (tags registered out of order) turns the channel
# back to one ack per delivery.


class _Unsettled:
    """The delivery tags of one channel not yet settled, in delivery order."""

    __slots__ = ("__weakref__", "last", "order", "pending", "trusted")

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.order: deque[int] = deque()
        """Registered tags in increasing order; settled ones leave it lazily from the front."""
        self.last = 0
        self.trusted = True
        """False once tags arrived other than 1, 2, 3...: no multiple ack on this channel."""

    def delivered(self, tag: int) -> None:
        if tag != self.last + 1:
            self.trusted = False
        self.last = max(self.last, tag)
        self.pending.add(tag)
        self.order.append(tag)

    def settled(self, tag: int) -> None:
        self.pending.discard(tag)
        order = self.order
        while order and order[0] not in self.pending:
            order.popleft()
        if len(order) > 2 * len(self.pending) + 1024:
            # A delivery held long at the front keeps settled tags behind it: drop them.
            self.order = deque(sorted(self.pending))

    def lowest_other(self, mine: set[int]) -> int | None:
        """The lowest unsettled tag that is not in ``mine``; None if there is none."""
        pending = self.pending
        for tag in self.order:
            if tag in pending and tag not in mine:
                return tag
        return None


_UNSETTLED: weakref.WeakKeyDictionary[Any, _Unsettled] = weakref.WeakKeyDictionary()


def _unsettled_of(channel: Any) -> _Unsettled:
    unsettled = _UNSETTLED.get(channel)
    if unsettled is None:
        unsettled = _UNSETTLED[channel] = _Unsettled()
    return unsettled


class Settled(msgspec.Struct, kw_only=True):
    stale: int = 0
    """Deliveries whose channel had closed (the broker redelivers them)."""
    frames: int = 0
    """Ack and nack frames sent."""


async def settle_batch(outcomes: Sequence[tuple[AbstractIncomingMessage, bool]]) -> Settled:
    """Settle many deliveries, ``(message, ack)``: nacks (requeue) one by one, then acks,
    as one ``multiple`` ack for those below every other unsettled delivery of their channel
    and one by one for the rest. The same as ``settle`` on each, in fewer frames."""
    done = Settled()
    acks: dict[Any, list[AbstractIncomingMessage]] = {}
    for message, ack in outcomes:
        if ack:
            try:
                channel = message.channel
            except BROKER_ERRORS:
                done.stale += 1
                continue
            acks.setdefault(channel, []).append(message)
        elif await settle(message, ack=False):
            done.frames += 1
        else:
            done.stale += 1
    for channel, messages in acks.items():
        await _ack_all(channel, messages, done)
    return done


async def _ack_all(channel: Any, messages: list[AbstractIncomingMessage], done: Settled) -> None:
    unsettled = _unsettled_of(channel)
    tags = {m.delivery_tag for m in messages if m.delivery_tag is not None}
    below: list[int] = []
    if unsettled.trusted and len(tags) > 1:
        lowest = unsettled.lowest_other(tags)
        below = [tag for tag in tags if lowest is None or tag < lowest]
    rest = messages
    if len(below) > 1:
        try:
            await channel.basic_ack(delivery_tag=max(below), multiple=True, wait=False)
        except BROKER_ERRORS:
            done.stale += len(messages)
            return
        done.frames += 1
        for tag in below:
            unsettled.settled(tag)
        covered = set(below)
        rest = [m for m in messages if m.delivery_tag not in covered]
    for message in rest:
        if await settle(message, ack=True):
            done.frames += 1
        else:
            done.stale += 1
