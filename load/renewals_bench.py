"""Renewal scheduler benchmark: a due batch's cost as the table grows, and the dispatch rate.

    export CREDENTIALS_DIRECTORY=$PWD/.secrets
    .venv/bin/python load/renewals_bench.py --rows 1000000 --small 100000

1. Migrates database ``payd_bench`` and empties its payd tables.
2. Seeds ``--small`` subscriptions (multi-row INSERTs, progress on stderr),
   a quarter of them due, plus a history of past attempts for the budget index.
3. Measures one due batch there: EXPLAIN and ANALYZE of the claim query; the
   claim's time (locking read, rolled back) on a warm cache (the same batch
   again and again) and cold (successive keyset pages, each read once, as a
   pass reads them), and a whole dispatch batch, cold (claim, budget, attempt
   rows, outbox, subscription update; rolled back). Each figure comes with the
   InnoDB buffer-pool misses (pages read from disk) per batch.
4. Seeds up to ``--rows`` and measures the same again: the figures stay flat.
5. Dispatch rate: scheduler(s) alone into the outbox (1, then N instances),
   the outbox relay alone into RabbitMQ (queue ``payd_renewals_bench.attempts``),
   then both at once end to end, each over ``--dispatch-rows`` due renewals.
6. Empties the tables and deletes the queues again (``--keep`` keeps the
   tables), so other runs against ``payd_bench`` do not find a million
   subscriptions to renew.

Prints a report (and ``--json FILE``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiomysql
import msgspec
import pymysql
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.broker import Broker, broker_url  # noqa: E402
from daemon.config import MySQLSettings, OutboxSettings, RabbitMQSettings, SubscriptionSettings  # noqa: E402
from daemon.metrics import Metrics  # noqa: E402
from daemon.pipeline.relay import OutboxRelay  # noqa: E402
from daemon.secrets import load_secret  # noqa: E402
from daemon.storage.db import close_pool, open_pool  # noqa: E402
from daemon.storage.migrate import migrate  # noqa: E402
from daemon.subscriptions.policy import SubscriptionPolicy  # noqa: E402
from daemon.subscriptions.scheduler import BatchResult, RenewalScheduler  # noqa: E402
from daemon.subscriptions.store import SUBSCRIPTION_COLUMNS, claim_due, database_now  # noqa: E402

SEED_BATCH = 5000
BRANDS = ["visa", "visa", "mastercard", "mastercard", "amex", None]
UNITS = ["month"] * 17 + ["year"] * 2 + ["week"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load/renewals_bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--rows", type=int, default=1_000_000, help="subscriptions at the large size")
    add("--small", type=int, default=100_000, help="subscriptions at the small size")
    add("--due-fraction", type=float, default=0.25, help="share of seeded subscriptions already due")
    add("--history-fraction", type=float, default=0.2, help="share with a past attempt (budget index)")
    add("--batch-size", type=int, default=1000, help="scheduler batch size")
    add("--samples", type=int, default=30, help="timed repetitions per cost figure")
    add("--schedulers", type=int, default=2, help="concurrent scheduler instances for the rate")
    add("--dispatch-rows", type=int, default=25_000, help="due renewals per rate phase")
    add("--relay-batch", type=int, default=1000, help="outbox relay batch size")
    add("--database", default="payd_bench")
    add("--namespace", default="payd_renewals_bench", help="RabbitMQ namespace of the bench queues")
    add("--keep", action="store_true", help="keep the seeded tables afterwards")
    add("--force", action="store_true", help="run even if other sessions use the database")
    add("--json", metavar="FILE", help="also write the figures here")
    return parser


# -- seeding ---------------------------------------------------------------------------------


def subscription_row(sid: int, rng: random.Random, due_fraction: float) -> list[Any]:
    roll = rng.random()
    status = "canceled" if roll < 0.02 else "past_due" if roll < 0.05 else "active"
    if status == "canceled":
        next_us = None
    elif rng.random() < due_fraction:
        next_us = -rng.randrange(1, 86_400_000_000)  # due within the last day
    else:
        next_us = rng.randrange(60_000_000, 30 * 86_400_000_000)  # the next 30 days
    return [
        sid,
        status,
        f"pm_bench_{sid}",
        rng.choice(BRANDS),
        rng.randrange(499, 10_000),
        rng.choice(UNITS),
        rng.randrange(0, 13),
        rng.randrange(0, 365 * 86_400),
        next_us,
    ]


SUBSCRIPTION_ROW = (
    "(%s, %s, 'sandbox', %s, %s, %s, 'EUR', %s, 1, %s, NOW(6) - INTERVAL %s SECOND, "
    "NOW(6) + INTERVAL %s MICROSECOND)"
)


async def seed(pool: aiomysql.Pool, first: int, last: int, args: argparse.Namespace) -> float:
    """Insert subscriptions ``first..last`` (and some attempt history); return rows/s."""
    rng = random.Random(first)
    started = reported = time.monotonic()
    done = 0

    async def insert(ids: range) -> None:
        rows = [subscription_row(sid, rng, args.due_fraction) for sid in ids]
        history = [history_row(sid, rng) for sid in ids if rng.random() < args.history_fraction]
        async with pool.acquire() as connection, connection.cursor() as cursor:
            await cursor.execute(
                "INSERT INTO subscriptions (id, status, provider, payment_method, card_brand, amount_minor, "
                "currency, interval_unit, interval_count, paid_cycle, billing_anchor, next_attempt_at) "
                "VALUES " + ", ".join([SUBSCRIPTION_ROW] * len(rows)),
                [value for row in rows for value in row],
            )
            if history:
                await cursor.execute(
                    "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, "
                    "currency, payment_method, state, outcome, created_at, finished_at) VALUES "
                    + ", ".join([HISTORY_ROW] * len(history)),
                    [value for row in history for value in row],
                )
            await connection.commit()

    chunks = [range(start, min(start + SEED_BATCH, last + 1)) for start in range(first, last + 1, SEED_BATCH)]
    for index in range(0, len(chunks), 2):  # two connections: one formats while the other inserts
        pair = chunks[index : index + 2]
        await asyncio.gather(*(insert(chunk) for chunk in pair))
        done += sum(len(chunk) for chunk in pair)
        if time.monotonic() - reported >= 2 or done == last - first + 1:
            reported = time.monotonic()
            log(f"  seeded {first + done - 1:>9,} subscriptions ({done / (reported - started):,.0f} rows/s)")
    return (last - first + 1) / (time.monotonic() - started)


HISTORY_ROW = (
    "(%s, %s, %s, 'sandbox', 999, 'EUR', %s, %s, %s, "
    "NOW(6) - INTERVAL %s SECOND, NOW(6) - INTERVAL %s SECOND)"
)


def history_row(sid: int, rng: random.Random) -> list[Any]:
    """A past attempt on the subscription's payment method, within the last 60 days."""
    paid = rng.random() < 0.8
    age_s = rng.randrange(60, 60 * 86_400)
    state, outcome = ("succeeded", "approved") if paid else ("declined", "soft_decline")
    return [f"hist:{sid}", sid, 0, f"pm_bench_{sid}", state, outcome, age_s, age_s]


# -- a due batch's cost ---------------------------------------------------------------------------

CLAIM_SQL = (
    f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions FORCE INDEX (ix_subscriptions_due) "
    "WHERE next_attempt_at <= NOW(6) ORDER BY next_attempt_at, id LIMIT {limit}"
)


async def buffer_pool_misses(cursor: Any) -> int:
    await cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_reads'")
    return int((await cursor.fetchone())[1])


async def timed_in_rollback(
    pool: aiomysql.Pool, works: list[Callable[[Any], Awaitable[Any]]], warmups: int
) -> dict[str, float]:
    """Run each ``work(cursor)`` in a transaction that is rolled back; the first ``warmups``
    untimed. Milliseconds (median, p95, max) and InnoDB buffer pool misses (pages read from
    disk) per sample."""
    timings = []
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        misses = 0
        for index, work in enumerate(works):
            before = await buffer_pool_misses(cursor)
            started = time.perf_counter()
            await work(cursor)
            elapsed = time.perf_counter() - started
            await connection.rollback()
            if index >= warmups:
                timings.append(elapsed * 1000)
                misses += await buffer_pool_misses(cursor) - before
    timings.sort()
    return {
        "samples": len(timings),
        "median_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[max(0, int(len(timings) * 0.95) - 1)], 2),
        "max_ms": round(timings[-1], 2),
        "disk_reads": round(misses / len(timings)),
    }


async def batch_cost(pool: aiomysql.Pool, args: argparse.Namespace) -> dict[str, Any]:
    limit = args.batch_size
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SELECT COUNT(*), SUM(next_attempt_at <= NOW(6)) FROM subscriptions")
        total, due = await cursor.fetchone()
        await cursor.execute("EXPLAIN " + CLAIM_SQL.format(limit=limit) + " FOR UPDATE SKIP LOCKED")
        names = [d[0] for d in cursor.description]
        explain = [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
        try:  # MariaDB's ANALYZE runs the query and reports the rows it really read (r_rows)
            await cursor.execute("ANALYZE FORMAT=JSON " + CLAIM_SQL.format(limit=limit))
            (analyze_json,) = await cursor.fetchone()
            table = _find_table(json.loads(analyze_json))
        except pymysql.err.ProgrammingError:
            table = {}
        # Where successive batches start: the keyset cursors a pass over the due rows moves
        # through (read from the index alone, so the rows themselves stay uncached).
        await cursor.execute(
            "SELECT next_attempt_at, id FROM subscriptions FORCE INDEX (ix_subscriptions_due) "
            "WHERE next_attempt_at <= NOW(6) ORDER BY next_attempt_at, id"
        )
        starts = [tuple(row) for row in (await cursor.fetchall())[limit - 1 :: limit]]
        await connection.rollback()
    cold = min(args.samples, (len(starts) - 2) // 2)  # distinct pages for each of two figures
    if cold < 2:
        raise SystemExit(f"only {len(starts)} due batches at {total:,} rows: raise --due-fraction")

    def claim_at(after: Any) -> Callable[[Any], Awaitable[Any]]:
        async def work(cursor: Any) -> None:
            await claim_due(cursor, now=await database_now(cursor), limit=limit, after=after)

        return work

    settings = msgspec.convert({"batch_size": limit}, SubscriptionSettings)
    scheduler = RenewalScheduler(
        pool=pool, settings=settings, policy=SubscriptionPolicy(settings), providers={"sandbox"}
    )

    def batch_at(after: Any) -> Callable[[Any], Awaitable[Any]]:
        async def work(cursor: Any) -> None:
            now = await database_now(cursor)
            subs = await claim_due(cursor, now=now, limit=limit, after=after)
            await scheduler._dispatch(cursor, subs, now=now, result=BatchResult())  # the batch's body

        return work

    return {
        "rows": int(total),
        "due": int(due),
        "explain": explain,
        "analyze": {
            "r_rows": table.get("r_rows"),
            "r_filtered": table.get("r_filtered"),
            "r_total_time_ms": table.get("r_total_time_ms"),
            "access_type": table.get("access_type"),
            "key": table.get("key"),
        },
        "claim_warm": await timed_in_rollback(pool, [claim_at(None)] * (args.samples + 3), warmups=3),
        "claim_cold": await timed_in_rollback(pool, [claim_at(a) for a in starts[: cold + 1]], warmups=1),
        "batch_cold": await timed_in_rollback(
            pool, [batch_at(a) for a in starts[cold + 1 : 2 * cold + 2]], warmups=1
        ),
    }


def _find_table(block: Any) -> dict[str, Any]:
    if isinstance(block, dict):
        if "table" in block and isinstance(block["table"], dict):
            return dict(block["table"])
        for value in block.values():
            found = _find_table(value)
            if found:
                return found
    if isinstance(block, list):
        for value in block:
            found = _find_table(value)
            if found:
                return found
    return {}


# -- dispatch rate --------------------------------------------------------------------------------


def cpu_seconds(names: tuple[str, ...] = ("mariadbd", "mysqld", "beam.smp")) -> dict[str, float]:
    """CPU time (user + system) of the database and broker processes, and of this one."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name in names or entry.name == str(os.getpid()):
            fields = stat[stat.rindex(")") + 2 :].split()
            key = "bench (python)" if entry.name == str(os.getpid()) else name
            found[key] = found.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return found


async def dispatch(schedulers: list[RenewalScheduler], rows: int, batch: int) -> int:
    """Run the schedulers side by side until ``rows`` renewals are dispatched (or none is due)."""
    remaining = rows

    async def worker(scheduler: RenewalScheduler) -> int:
        # As RenewalScheduler.run_pass does: each batch continues from the last row of the
        # previous one (keyset), instead of rescanning the index entries just moved away.
        nonlocal remaining
        mine = 0
        after = None
        while remaining > 0:
            result = await scheduler.dispatch_batch(limit=min(batch, remaining), after=after)
            remaining -= result.dispatched
            mine += result.dispatched
            if result.claimed == 0:
                break
            after = result.last
        return mine

    return sum(await asyncio.gather(*(worker(s) for s in schedulers)))


async def rate(name: str, work: Callable[[], Awaitable[int]], unit: str = "renewals") -> dict[str, Any]:
    cpu_before = cpu_seconds()
    started = time.monotonic()
    count = await work()
    elapsed = time.monotonic() - started
    cpu_after = cpu_seconds()
    cpu = {k: round(cpu_after.get(k, 0) - v, 1) for k, v in cpu_before.items()}
    figure = {"phase": name, unit: count, "seconds": round(elapsed, 2), "per_second": round(count / elapsed)}
    figure["cpu_s"] = cpu
    log(f"  {name}: {count:,} {unit} in {elapsed:.1f} s = {count / elapsed:,.0f}/s  cpu {cpu}")
    return figure


async def dispatch_rates(pools: list[aiomysql.Pool], args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = msgspec.convert(
        {"batch_size": args.batch_size, "dispatch_rate_per_s": 1e9}, SubscriptionSettings
    )
    policy = SubscriptionPolicy(settings)

    def schedulers(count: int, wake: Callable[[], None] = lambda: None) -> list[RenewalScheduler]:
        return [
            RenewalScheduler(
                pool=pools[i % len(pools)],
                settings=settings,
                policy=policy,
                providers={"sandbox"},
                on_dispatched=wake,
            )
            for i in range(count)
        ]

    rabbitmq = RabbitMQSettings(namespace=args.namespace)
    broker = Broker(rabbitmq, load_secret("rabbitmq_password"))
    await broker.connect()  # declares the bench topology
    inspector = await aio_pika.connect(broker_url(rabbitmq, load_secret("rabbitmq_password")))
    channel = await inspector.channel()
    topology = broker.topology
    await (await channel.declare_queue(topology.attempts_queue, passive=True)).purge()
    relay = OutboxRelay(
        pool=pools[0], broker=broker, settings=OutboxSettings(batch_size=args.relay_batch), metrics=Metrics()
    )
    figures = []
    try:
        n = args.dispatch_rows
        figures.append(
            await rate("1 scheduler -> outbox", lambda: dispatch(schedulers(1), n, args.batch_size))
        )
        figures.append(
            await rate(
                f"{args.schedulers} schedulers -> outbox",
                lambda: dispatch(schedulers(args.schedulers), n, args.batch_size),
            )
        )
        figures.append(await rate("relay: outbox -> RabbitMQ", relay.publish_pending, "messages"))

        async def end_to_end() -> int:
            relay_task = asyncio.create_task(relay.run())
            try:
                sent = await dispatch(schedulers(args.schedulers, relay.wake), n, args.batch_size)
                while await outbox_rows(pools[0]):  # noqa: ASYNC110 (polling another process's table)
                    await asyncio.sleep(0.02)
                return sent
            finally:
                relay_task.cancel()
                await asyncio.gather(relay_task, return_exceptions=True)

        figures.append(
            await rate(f"{args.schedulers} schedulers + relay -> RabbitMQ (end to end)", end_to_end)
        )
        figures[-1]["queue_depth"] = await queue_depth(channel, topology.attempts_queue)
    finally:
        for queue in (topology.attempts_queue, topology.dead_queue):
            await channel.queue_delete(queue)
        await channel.exchange_delete(topology.events_exchange)
        await inspector.close()
        await broker.close()
    return figures


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


async def outbox_rows(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SELECT COUNT(*) FROM outbox")
        (count,) = await cursor.fetchone()
        await connection.rollback()
    return int(count)


# -- the run --------------------------------------------------------------------------------------


async def others_connected(settings: MySQLSettings) -> int:
    """Sessions on the bench database besides this check's own (another bench, a daemon)."""
    password = load_secret("mysql_password")
    connection = await aiomysql.connect(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        db=settings.database,
        password=password.reveal() if password else "",
    )
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(
                "SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() "
                "AND id <> CONNECTION_ID()"
            )
            (count,) = await cursor.fetchone()
    finally:
        connection.close()
    return int(count)


async def ensure_alone(pools: list[aiomysql.Pool], database: str) -> None:
    """Abort if anyone else is connected: another daemon on this database would dispatch and
    relay the bench's rows (and this bench theirs), and every figure would be wrong."""
    async with pools[0].acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE()")
        (count,) = await cursor.fetchone()
        await connection.rollback()
    others = int(count) - sum(pool.size for pool in pools)
    if others > 0:
        raise SystemExit(
            f"{others} other session(s) connected to {database} during the run; figures discarded"
        )


async def empty_tables(pool: aiomysql.Pool) -> None:
    async with pool.acquire() as connection, connection.cursor() as cursor:
        for table in ("subscriptions", "attempts", "outbox"):
            await cursor.execute(f"TRUNCATE TABLE {table}")


async def remove_own_rows(pool: aiomysql.Pool) -> None:
    """With others connected: take away this bench's rows only (it seeds every subscription;
    its attempts are ``renew:`` and ``hist:`` keys, its outbox rows renewal requests)."""
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("TRUNCATE TABLE subscriptions")
        for statement in (
            "DELETE FROM attempts WHERE idempotency_key LIKE 'renew:%%' OR idempotency_key LIKE 'hist:%%' "
            "LIMIT 20000",
            "DELETE FROM outbox WHERE target = 'attempts' LIMIT 20000",
        ):
            while True:
                await cursor.execute(statement)
                await connection.commit()
                if cursor.rowcount == 0:
                    break


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = MySQLSettings(database=args.database, pool_size=8)
    if await others_connected(settings) and not args.force:
        raise SystemExit(f"other sessions are using {args.database}; wait for them or pass --force")
    password = load_secret("mysql_password")
    pool = await open_pool(settings, password)
    second = await open_pool(settings, password)
    report: dict[str, Any] = {
        "command": " ".join(["load/renewals_bench.py", *sys.argv[1:]]),
        "when": datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
    }
    try:
        await migrate(pool, progress=lambda line: log(f"  {line}"))
        await empty_tables(pool)
        log(f"seeding {args.small:,} subscriptions")
        report["seed_rows_per_s"] = round(await seed(pool, 1, args.small, args))
        alone = [pool, second]
        await ensure_alone(alone, args.database)
        log("measuring a due batch at the small size")
        report["small"] = await batch_cost(pool, args)
        log(f"seeding up to {args.rows:,} subscriptions")
        report["seed_rows_per_s_large"] = round(await seed(pool, args.small + 1, args.rows, args))
        await ensure_alone(alone, args.database)
        log("measuring a due batch at the large size")
        report["large"] = await batch_cost(pool, args)
        await ensure_alone(alone, args.database)
        log("measuring the dispatch rate")
        report["rates"] = await dispatch_rates(alone, args)
        await ensure_alone(alone, args.database)
    except BaseException:
        # Interrupted, failed, or someone else turned up: leave nothing a daemon could renew,
        # and nothing of anyone else's touched.
        if not args.keep:
            await remove_own_rows(pool)
        raise
    else:
        if not args.keep:
            await empty_tables(pool)
    finally:
        await close_pool(second)
        await close_pool(pool)
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"renewals bench: {report['command']}  ({report['cpus']} CPUs, batch {report['batch_size']})"]
    lines.append(f"seeding: {report['seed_rows_per_s']:,} and {report['seed_rows_per_s_large']:,} rows/s")
    lines.append("")
    lines.append(
        f"{'table rows':>12} {'due':>9} {'r_rows':>7}   {'claim, warm':>20}   {'claim, cold':>20}   "
        f"{'whole batch, cold':>20}"
    )
    lines.append(
        f"{'':>31}   {'med / p95 ms  reads':>20}   {'med / p95 ms  reads':>20}   {'med / p95 ms  reads':>20}"
    )

    def cell(figure: dict[str, Any]) -> str:
        return f"{figure['median_ms']:>6} / {figure['p95_ms']:<6} {figure['disk_reads']:>5}"

    for size in ("small", "large"):
        cost = report[size]
        lines.append(
            f"{cost['rows']:>12,} {cost['due']:>9,} {cost['analyze']['r_rows']!s:>7}   "
            f"{cell(cost['claim_warm']):>20}   {cell(cost['claim_cold']):>20}   "
            f"{cell(cost['batch_cold']):>20}"
        )
    lines.append("")
    for size in ("small", "large"):
        for row in report[size]["explain"]:
            lines.append(
                f"EXPLAIN at {report[size]['rows']:,}: type={row.get('type')} key={row.get('key')} "
                f"rows={row.get('rows')} Extra={row.get('Extra')}"
            )
    lines.append("")
    for figure in report["rates"]:
        unit = "renewals" if "renewals" in figure else "messages"
        lines.append(
            f"{figure['phase']:<52} {figure[unit]:>8,} {unit} {figure['seconds']:>7} s "
            f"{figure['per_second']:>8,}/s  cpu-s {figure['cpu_s']}"
        )
    return "\n".join(lines)


def main() -> int:
    args = build_parser().parse_args()
    os.environ.setdefault("CREDENTIALS_DIRECTORY", str(ROOT / ".secrets"))
    report = uvloop.run(run(args))
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
