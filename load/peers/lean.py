"""The lean asyncio pipeline: payd's job with none of payd's guarantees, as a yardstick.

    .venv/bin/python load/peers/lean.py --queue Q --events-exchange X --sandbox-url URL --ready-file F

consume -> POST to the sandbox -> batched INSERT of the outcome -> confirmed event -> ack.
Nothing else: no write-ahead claim (a crash mid-call forgets the attempt), no
outbox (a crash between commit and publish loses the event), no per-provider
limit beyond the prefetch, no breaker, no rate limit, no reconciliation (a
timeout is simply ``failed``). It is built from the same libraries as payd
(uvloop, aio-pika, aiohttp, aiomysql, msgspec), so the difference in CPU per
attempt is the price of payd's durable work, not of a faster stack.

The benchmark harness (``load/bench.py --system lean``) starts it; SIGTERM stops
consuming, lets the calls in flight finish, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomysql
import msgspec
import uvloop
from aio_pika.abc import AbstractIncomingMessage

INSERT = (
    "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency,"
    " payment_method, state, outcome, decline_code, provider_ref, finished_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NOW(6))"
    # A redelivered message after a crash writes its outcome again.
    " ON DUPLICATE KEY UPDATE state = VALUES(state), finished_at = VALUES(finished_at)"
)


class Request(msgspec.Struct, frozen=True):
    idempotency_key: str
    amount_minor: int
    currency: str
    provider: str
    payment_method: str
    subscription_id: int | None = None
    cycle: int | None = None


class Charge(msgspec.Struct, frozen=True):
    id: str
    status: str
    decline_code: str | None = None


class Done(msgspec.Struct, frozen=True):
    request: Request
    state: str
    outcome: str
    decline_code: str | None
    provider_ref: str | None


decode_request = msgspec.json.Decoder(Request).decode
decode_charge = msgspec.json.Decoder(Charge).decode
encode = msgspec.json.Encoder().encode


def secret(name: str) -> str:
    value = os.environ.get(f"PAYD_{name.upper()}")
    if value is not None:
        return value
    return (Path(os.environ["CREDENTIALS_DIRECTORY"]) / name).read_text().rstrip("\r\n")


class LeanPipeline:
    def __init__(self, args: argparse.Namespace, pool: aiomysql.Pool, http: aiohttp.ClientSession) -> None:
        self.args = args
        self.pool = pool
        self.http = http
        self.pending: list[tuple[Done, AbstractIncomingMessage]] = []
        self.wake = asyncio.Event()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.events: aio_pika.abc.AbstractExchange | None = None
        self.flushed = asyncio.Event()
        """Set while nothing waits to be recorded."""
        self.flushed.set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self.attempt(message))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def attempt(self, message: AbstractIncomingMessage) -> None:
        request = decode_request(message.body)
        reference = (
            f"{request.subscription_id}:{request.cycle}"
            if request.subscription_id is not None
            else request.idempotency_key
        )
        body = encode(
            {
                "amount_minor": request.amount_minor,
                "currency": request.currency,
                "payment_method": request.payment_method,
                "merchant_reference": reference,
                "customer_ref": None,
                "metadata": {},
            }
        )
        headers = {"Idempotency-Key": request.idempotency_key, "Content-Type": "application/json"}
        try:
            async with self.http.post("/v1/charges", data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            done = Done(request, "failed", "error", None, None)
            print(f"lean: {request.idempotency_key}: {error!r}", file=sys.stderr)
        else:
            if status in (200, 402):
                charge = decode_charge(payload)
                approved = charge.status == "approved"
                done = Done(
                    request,
                    "succeeded" if approved else "declined",
                    "approved" if approved else "declined",
                    charge.decline_code,
                    charge.id,
                )
            else:
                done = Done(request, "failed", f"http_{status}", None, None)
        self.pending.append((done, message))
        self.flushed.clear()
        self.wake.set()

    async def record_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            await asyncio.sleep(self.args.batch_delay_ms / 1000)
            while self.pending:
                batch = self.pending[: self.args.batch_size]
                del self.pending[: len(batch)]
                await self.record(batch)
            self.flushed.set()

    async def record(self, batch: list[tuple[Done, AbstractIncomingMessage]]) -> None:
        rows = [
            (
                d.request.idempotency_key,
                d.request.subscription_id,
                d.request.cycle,
                d.request.provider,
                d.request.amount_minor,
                d.request.currency,
                d.request.payment_method,
                d.state,
                d.outcome,
                d.decline_code,
                d.provider_ref,
            )
            for d, _ in batch
        ]
        async with self.pool.acquire() as connection, connection.cursor() as cursor:
            await cursor.executemany(INSERT, rows)
            await connection.commit()
        assert self.events is not None
        publishes = [
            self.events.publish(
                aio_pika.Message(
                    encode(
                        {
                            "type": f"payment.{d.state}",
                            "idempotency_key": d.request.idempotency_key,
                            "subscription_id": d.request.subscription_id,
                            "cycle": d.request.cycle,
                            "provider": d.request.provider,
                            "amount_minor": d.request.amount_minor,
                            "currency": d.request.currency,
                            "outcome": d.outcome,
                            "decline_code": d.decline_code,
                            "provider_ref": d.provider_ref,
                        }
                    ),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=f"payment.{d.state}",
            )
            for d, _ in batch
        ]
        await asyncio.gather(*publishes)
        for _, message in batch:
            await message.ack()


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pool = await aiomysql.create_pool(
        host=args.mysql_host,
        port=args.mysql_port,
        user="payd",
        password=secret("mysql_password"),
        db=args.database,
        minsize=1,
        maxsize=args.pool_size,
        autocommit=False,
    )
    connection = await aio_pika.connect_robust(args.amqp_url)
    http = aiohttp.ClientSession(
        base_url=args.sandbox_url,
        timeout=aiohttp.ClientTimeout(total=args.timeout_s),
        connector=aiohttp.TCPConnector(limit=0),
    )
    lean = LeanPipeline(args, pool, http)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=args.prefetch)
    publish_channel = await connection.channel(publisher_confirms=True)
    lean.events = await publish_channel.declare_exchange(
        args.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await consume_channel.declare_queue(args.queue, durable=True)
    recorder = asyncio.create_task(lean.record_forever())
    tag = await queue.consume(lean.on_message)
    await asyncio.to_thread(Path(args.ready_file).write_text, "ready\n")
    print(f"lean: consuming {args.queue}", file=sys.stderr, flush=True)
    await stop.wait()
    await queue.cancel(tag)
    if lean.in_flight:
        await asyncio.wait(lean.in_flight, timeout=args.drain_s)
    await lean.flushed.wait()
    recorder.cancel()
    await http.close()
    await connection.close()
    pool.close()
    await pool.wait_closed()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="load/peers/lean.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--amqp-url", required=True)
    add("--queue", required=True)
    add("--events-exchange", required=True)
    add("--sandbox-url", required=True)
    add("--ready-file", required=True)
    add("--mysql-host", default="127.0.0.1")
    add("--mysql-port", type=int, default=3306)
    add("--database", default="payd_bench")
    add("--prefetch", type=int, default=1000)
    add("--pool-size", type=int, default=8)
    add("--batch-size", type=int, default=250)
    add("--batch-delay-ms", type=float, default=2.0)
    add("--timeout-s", type=float, default=10.0)
    add("--drain-s", type=float, default=30.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options: Any = parse()
    sys.exit(uvloop.run(main(options)))
