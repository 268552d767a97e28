"""A fleet on a three-node RabbitMQ cluster loses the node each instance uses, and keeps working.

The cluster is private (its own node names, ports, Erlang cookie and data); the
machine's broker is not touched. Started once for the module: a node takes many
seconds to start on a small machine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import aiohttp
import aiomysql
import pytest

from daemon.secrets import load_secret
from tests.faults.clusters import RabbitCluster, RabbitNode, rabbitmq_cluster, wait_cluster_member
from tests.support import (
    NAMESPACE,
    PAYD,
    DaemonFactory,
    DaemonProcess,
    Sandbox,
    eventually,
    query,
    request,
    wait_settled,
)

CLUSTER_NAMESPACE = f"{NAMESPACE}_cluster"
# The bound: an instance whose node disappears works through another within 10 s.
RECONNECT_BOUND_S = 10.0
BATCH = 300


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    secret = load_secret("rabbitmq_password")
    assert secret is not None, "the tests need the rabbitmq_password secret"
    with rabbitmq_cluster(
        tmp_path_factory.mktemp("rabbit-cluster"), size=3, user="payd", password=secret.reveal()
    ) as cluster:
        yield cluster


async def _publish(cluster: RabbitCluster, node: RabbitNode, bodies: list[bytes]) -> None:
    """Publish with confirms through ``node``: once confirmed, the quorum queue holds them."""
    connection = await aio_pika.connect(f"amqp://{cluster.user}:{cluster.password}@{node.address}/")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=f"{CLUSTER_NAMESPACE}.attempts",
                )
                for body in bodies
            )
        )


async def _metrics(daemon: DaemonProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
    ):
        return await response.text()


async def _attempts_queue(node: RabbitNode) -> dict[str, Any]:
    """The attempts queue's leader and members, as ``rabbitmqctl list_queues`` reports them."""
    listing = await asyncio.to_thread(
        node.ctl, "list_queues", "-q", "--formatter", "json", "name", "leader", "members"
    )
    for queue in json.loads(listing):
        if queue["name"] == f"{CLUSTER_NAMESPACE}.attempts":
            return dict(queue)
    raise AssertionError(f"no attempts queue in {listing!r}")


async def test_each_instance_works_through_a_surviving_node_when_its_node_stops_or_dies(
    rabbit: RabbitCluster, daemons: DaemonFactory, sandbox: Sandbox, db: aiomysql.Pool
) -> None:
    """Two instances, each given the three nodes in a different order, run while the node each
    uses is stopped (the first being the attempts queue's leader) and then killed. Each moves to a
    surviving node within the issue's 10 s, shown by /status and payd_broker_node_info, and keeps
    working: every attempt ends terminal and the sandbox charged no key twice. Fails on the code
    that knew one broker URL: the instance stays on its dead node and /status names no other."""
    c1, c2, c3 = rabbit.nodes
    await sandbox.behave(latency_ms=150)  # attempts are in flight when a node goes
    common = {
        "namespace": CLUSTER_NAMESPACE,
        "reconnect_delay_s": 0.5,
        "connect_timeout_s": 2,
        "quorum_initial_group_size": 3,
    }
    a = await daemons.process(
        rabbitmq={**common, "urls": [rabbit.url(n) for n in (c1, c2, c3)]},
        providers__sandbox={"max_in_flight": 20},
    )
    b = await daemons.process(
        rabbitmq={**common, "urls": [rabbit.url(n) for n in (c2, c3, c1)]},
        providers__sandbox={"max_in_flight": 20},
    )
    assert (await a.status())["broker_node"] == c1.address
    assert (await b.status())["broker_node"] == c2.address
    assert f'payd_broker_node_info{{node="{c1.address}"}} 1.0' in await _metrics(a)
    queue = await _attempts_queue(c2)
    assert queue["leader"] == c1.name, "the attempts queue is led by the node that declared it"
    # A replica on each node (quorum_initial_group_size = 3): any one of them may go.
    assert sorted(queue["members"]) == sorted(n.name for n in rabbit.nodes)

    run = uuid.uuid4().hex[:8]
    keys: list[str] = []

    async def through(fault: Callable[[], None], node: RabbitNode, affected: list[DaemonProcess]) -> None:
        phase = len(keys) // BATCH
        batch = [f"cl-{run}-{phase}-{i}" for i in range(BATCH)]
        keys.extend(batch)
        survivor = next(n for n in rabbit.nodes if n is not node and n.process is not None)
        await _publish(rabbit, survivor, [json.dumps(request(key)).encode() for key in batch])

        async def started() -> bool:
            rows = await query(
                db, "SELECT COUNT(*) FROM attempts WHERE idempotency_key LIKE %s", f"cl-{run}-{phase}-%"
            )
            return int(rows[0][0]) >= BATCH // 10

        await eventually(started, timeout=60, what="the batch to be under way")
        before = {daemon.port: (await daemon.status())["broker_reconnects"] for daemon in affected}
        for daemon in affected:
            assert (await daemon.status())["broker_node"] == node.address
        faulted = time.monotonic()
        await asyncio.to_thread(fault)
        for daemon in affected:
            await eventually(
                _moved_off(daemon, node, before[daemon.port]),
                timeout=RECONNECT_BOUND_S,
                what=f"the instance on {node.name} to reconnect to another node",
            )
            # Reported, not asserted (docs/scaling.md records it): run with -s to see it.
            print(
                f"{fault.__name__} {node.name}: instance {daemon.port} on another node after "
                f"{time.monotonic() - faulted:.1f} s (the fault itself included)"
            )
        await wait_settled(db, batch, timeout=120)

    await through(c1.stop, c1, [a])  # the queue's leader, stopped cleanly
    await asyncio.to_thread(_restart, c1, rabbit)
    await through(c2.kill, c2, [a, b])  # now the node both use: killed
    await asyncio.to_thread(_restart, c2, rabbit)
    await through(c3.stop, c3, [a, b])

    settled = await wait_settled(db, keys, timeout=120)
    assert set(settled.values()) == {"succeeded"}
    approved = await sandbox.assert_no_double_charge()
    assert {charge["idempotency_key"] for charge in approved} == set(keys)
    for daemon in (a, b):
        status = await daemon.status()
        assert status["broker_reconnects"] >= 1 and status["broker_node"] in {c1.address, c2.address}
        assert status["ready"]["broker_connected"]
    config_path = next(daemons.workdir.glob(f"payd-{a.port}.toml"))
    printed = await asyncio.to_thread(
        subprocess.run,
        [PAYD, "status", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert f"broker     {(await a.status())['broker_node']}  reconnects=" in printed.stdout


def _moved_off(daemon: DaemonProcess, node: RabbitNode, reconnects: int) -> Callable[[], Awaitable[bool]]:
    async def moved() -> bool:
        status = await daemon.status()
        return status["broker_node"] not in (None, node.address) and status["broker_reconnects"] > reconnects

    return moved


def _restart(node: RabbitNode, cluster: RabbitCluster) -> None:
    node.launch()
    wait_cluster_member(node, cluster)
