"""The provider's front end dies with calls on the wire, then comes back.

Between payd and the sandbox gateway sits a TCP relay of the test's own (a
load balancer, say). The test kills it while charges are in flight: payd's
sockets are reset after the requests were sent, the gateway goes on and
charges. Those attempts may have charged, so they must end ``unknown`` and be
reconciled by asking the provider (invariant 3), never re-sent blindly; while
the front end is down, lookups fail and are tried again; once it is back every
attempt ends ``succeeded`` and the gateway's ledger shows each charged once.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiomysql
import pytest

from tests.support import (
    Broker,
    DaemonFactory,
    Sandbox,
    eventually,
    free_port,
    query,
    request,
    wait_settled,
)

pytestmark = pytest.mark.slow


class FrontEnd:
    """A TCP relay to ``target_port`` on a fixed port, that can be killed (every connection
    reset at once, the listener gone) and started again."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()  # RST: the client sees the connection die, not a clean close
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self.writers |= {client_writer, upstream_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
        self.writers -= {client_writer, upstream_writer}


async def test_a_front_end_killed_mid_call_leaves_unknowns_that_reconcile_to_one_charge_each(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Kill the provider's front end with calls on the wire: no attempt fails or is charged twice;
    the cut calls go through unknown and settle by lookup once the front end is back."""
    await sandbox.behave(latency_ms=1500)
    front = FrontEnd(int(sandbox.url.rsplit(":", 1)[1]))
    await front.start()
    try:
        daemon = await daemons.process(
            providers__sandbox={
                "base_url": f"http://127.0.0.1:{front.port}",
                "max_in_flight": 20,
                "timeout_s": 5,
                "slot_hold_s": 1,  # the cut calls' slots come back soon; the hold has its own test
            },
            pipeline={"reconcile_interval_s": 0.2, "reconcile_backoff_s": [0.5, 1, 2]},
        )
        keys = [f"cut-{i}" for i in range(40)]
        await broker.publish(request(key, subscription_id=83_000 + i) for i, key in enumerate(keys))

        async def calls_on_the_wire() -> bool:
            return int((await sandbox.stats())["in_flight"]) >= 10

        await eventually(calls_on_the_wire, timeout=30, what="charges in flight at the gateway")
        await front.kill()
        await asyncio.sleep(3)  # the cut calls are recorded unknown; lookups fail to connect
        await front.start()

        settled = await wait_settled(db, keys, timeout=120)
        assert set(settled.values()) == {"succeeded"}, settled
        charged = await sandbox.assert_no_double_charge()
        assert len(charged) == len(keys)
        # The cut calls were not simply re-sent: each went through unknown and a lookup.
        through_unknown = await query(
            db, "SELECT COUNT(*) FROM attempts WHERE idempotency_key LIKE 'cut-%%' AND reconcile_tries > 0"
        )
        assert through_unknown[0][0] >= 10, through_unknown
        assert daemon.process.poll() is None, "the daemon survived the cut"
    finally:
        if front.server is not None:
            await front.kill()
