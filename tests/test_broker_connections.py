"""payd publishes on an AMQP connection of its own, apart from the one it consumes on.

On one shared connection the outbox relay's confirms waited seconds behind the
pipeline's deliveries and acks (a 500-event batch took 11 s to confirm while the
pipeline consumed, 0.1 s once it was idle: docs/benchmarks.md). Losing either
connection must still bring both back.
"""

from __future__ import annotations

import asyncio

from daemon.broker import Broker as DaemonBroker
from daemon.config import RabbitMQSettings
from daemon.secrets import load_secret
from tests.support import NAMESPACE, Broker, eventually


async def test_publishing_has_its_own_connection_and_losing_it_reconnects_both(broker: Broker) -> None:
    await broker.follow_events()
    daemon_broker = DaemonBroker(
        RabbitMQSettings(namespace=NAMESPACE, reconnect_delay_s=0.1), load_secret("rabbitmq_password")
    )
    await daemon_broker.connect()
    supervising = asyncio.create_task(daemon_broker.supervise())
    try:
        consuming, publishing = daemon_broker._connection, daemon_broker._publisher
        assert consuming is not None and publishing is not None
        assert publishing is not consuming
        events = daemon_broker.topology.events_exchange
        await daemon_broker.publish(events, "payment.test", b'{"n": 1}', message_id="e1")

        await publishing.close()  # as if the broker dropped it
        await eventually(
            lambda: asyncio.sleep(0, daemon_broker.reconnects == 1 and daemon_broker.connected.is_set()),
            timeout=30,
            what="the broker to reconnect after losing its publishing connection",
        )
        assert daemon_broker._publisher is not publishing, "a new publishing connection"
        assert daemon_broker._connection is not consuming, "the consuming one renewed with it"
        await daemon_broker.publish(events, "payment.test", b'{"n": 2}', message_id="e2")

        async def both_arrived() -> bool:
            return [event.get("n") for event in broker.events] == [1, 2]

        await eventually(both_arrived, timeout=10, what="both events on payd.events")
    finally:
        supervising.cancel()
        await asyncio.gather(supervising, return_exceptions=True)
        await daemon_broker.close()
    assert daemon_broker._connection is None and daemon_broker._publisher is None
    assert publishing.is_closed
