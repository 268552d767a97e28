"""AMQP for the locust load test: publish attempt requests, follow ``payment.*`` events.

pika's ``BlockingConnection`` is used under gevent: locust monkey-patches
``socket`` and ``select`` before this module is imported, so the connection's
waits (the socket reads, the publisher confirm) yield to other greenlets
instead of blocking the process. That keeps to one widely used, pure-Python
client that supports publisher confirms, rather than a hand-written AMQP
codec on raw sockets. A connection is never shared between greenlets: each
simulated sender owns one (as real senders do), and the event follower owns
its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger("payd.locust")
# pika narrates every connection's life at INFO; locust's output is for the numbers.
logging.getLogger("pika").setLevel(logging.WARNING)

AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` filled in, unless the URL already carries one."""
    parts = urlsplit(url)
    if password is None or parts.password is not None or parts.username is None:
        return url
    host = parts.hostname or "127.0.0.1"
    netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def masked(url: str) -> str:
    """``url`` fit for a log line: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, name: str) -> pika.BlockingConnection:
    parameters = pika.URLParameters(url)
    parameters.client_properties = {"connection_name": name}
    parameters.heartbeat = 30
    parameters.blocked_connection_timeout = 30
    return pika.BlockingConnection(parameters)


class AttemptPublisher:
    """One sender's connection: persistent publishes to ``<namespace>.attempts``, each confirmed."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self._connection = connect(url, name)
        self._channel: BlockingChannel = self._connection.channel()
        self._channel.confirm_delivery()
        self._routing_key = f"{namespace}.attempts"

    def publish(self, body: bytes, message_id: str) -> None:
        """Return once the broker confirmed the message; raise if it refused or lost it."""
        self._channel.basic_publish(
            exchange="",
            routing_key=self._routing_key,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json", delivery_mode=2, message_id=message_id
            ),
            mandatory=True,  # an absent queue is an error (UnroutableError), not a silent drop
        )

    def close(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except AMQP_ERRORS:
            pass


class EventFollower:
    """Follows ``<namespace>.events`` with an exclusive queue bound to ``payment.#``.

    ``run`` turns until ``stop``; it calls ``on_event(event, size)`` for each
    event and ``on_tick()`` about every ``tick_s`` so the caller can expire
    what waits too long.
    """

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self._connection = connect(url, name)
        self._channel: BlockingChannel = self._connection.channel()
        exchange = f"{namespace}.events"
        # Declared with payd's own arguments (idempotent), so the test may start first.
        self._channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        declared = self._channel.queue_declare("", exclusive=True, auto_delete=True)
        self.queue = str(declared.method.queue)
        self._channel.queue_bind(self.queue, exchange, routing_key="payment.#")
        self._running = True

    def run(self, on_event: Callable[[dict[str, Any], int], None], on_tick: Callable[[], None]) -> None:
        def deliver(_channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
            try:
                event = json.loads(body)
            except ValueError:
                log.warning("payd.events carried a body that is not JSON: %r", body[:200])
                return
            on_event(event, len(body))

        self._channel.basic_consume(self.queue, deliver, auto_ack=True)
        while self._running:
            self._connection.process_data_events(time_limit=0.2)
            on_tick()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self._running = False
        try:
            if self._connection.is_open:
                self._connection.close()
        except AMQP_ERRORS:
            pass
