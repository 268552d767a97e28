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
    add(
        "--sizes",
        default=None,
        help="comma-separated table sizes to measure at, ascending, e.g. 100000,1000000,10000000 "
        "(instead of --small and --rows)",
    )
    add(
        "--seed-with",
        choices=("sql", "python"),
        default="sql",
        help="sql: INSERT ... SELECT over MariaDB's seq_1_to_N (about a minute per few million rows); "
        "python: multi-row INSERTs built here (slow beyond a million)",
    )
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


# -- seeding in SQL: INSERT ... SELECT over MariaDB's SEQUENCE engine (seq_1_to_N), no rows
# through Python. Each column's "random" value is a hash of the id and a salt, so a seed is the
# same every time and the shares match ``subscription_row``'s (2% canceled, 3% past_due, a
# ``--due-fraction`` due within the last day, the rest due within 30 days; a
# ``--history-fraction`` with a past attempt).

SQL_CHUNK = 500_000
"""Rows per INSERT ... SELECT: one transaction's undo log stays bounded."""


def uniform(salt: str) -> str:
    """A SQL expression in [0, 1), fixed for each ``seq`` and ``salt``."""
    return f"(CRC32(CONCAT('{salt}', seq)) / 4294967296)"


def subscriptions_sql(first: int, last: int, due_fraction: float) -> str:
    status = uniform("s")
    canceled = f"{status} < 0.02"
    due = f"{uniform('d')} < {due_fraction!r}"
    when = uniform("w")
    return (
        "INSERT INTO subscriptions (id, status, provider, payment_method, card_brand, amount_minor, "
        "currency, interval_unit, interval_count, paid_cycle, billing_anchor, next_attempt_at) "
        f"SELECT seq, CASE WHEN {canceled} THEN 'canceled' WHEN {status} < 0.05 THEN 'past_due' "
        "ELSE 'active' END, 'sandbox', CONCAT('pm_bench_', seq), "
        f"ELT(1 + FLOOR({uniform('b')} * 6), 'visa', 'visa', 'mastercard', 'mastercard', 'amex', NULL), "
        f"499 + FLOOR({uniform('a')} * 9501), 'EUR', "
        f"IF({uniform('u')} < 0.85, 'month', IF({uniform('u')} < 0.95, 'year', 'week')), 1, "
        f"FLOOR({uniform('p')} * 13), NOW(6) - INTERVAL FLOOR({uniform('n')} * 31536000) SECOND, "
        f"CASE WHEN {canceled} THEN NULL "
        f"WHEN {due} THEN NOW(6) - INTERVAL (1 + FLOOR({when} * 86399999999)) MICROSECOND "
        f"ELSE NOW(6) + INTERVAL (60000000 + FLOOR({when} * 2591940000000)) MICROSECOND END "
        f"FROM seq_{first}_to_{last}"
    )


def history_sql(first: int, last: int, history_fraction: float) -> str:
    paid = f"{uniform('q')} < 0.8"
    age = f"INTERVAL (60 + FLOOR({uniform('g')} * 5183940)) SECOND"
    return (
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, state, outcome, created_at, finished_at) "
        f"SELECT CONCAT('hist:', seq), seq, 0, 'sandbox', 999, 'EUR', CONCAT('pm_bench_', seq), "
        f"IF({paid}, 'succeeded', 'declined'), IF({paid}, 'approved', 'soft_decline'), "
        f"NOW(6) - {age}, NOW(6) - {age} "
        f"FROM seq_{first}_to_{last} WHERE {uniform('h')} < {history_fraction!r}"
    )


async def seed_sql(pool: aiomysql.Pool, first: int, last: int, args: argparse.Namespace) -> float:
    """Subscriptions ``first..last`` and their history, in SQL; return rows/s."""
    started = time.monotonic()
    async with pool.acquire() as connection, connection.cursor() as cursor:
        for start in range(first, last + 1, SQL_CHUNK):
            end = min(start + SQL_CHUNK - 1, last)
            await cursor.execute(subscriptions_sql(start, end, args.due_fraction))
            await cursor.execute(history_sql(start, end, args.history_fraction))
            await connection.commit()
            pace = (end - first + 1) / (time.monotonic() - started)
            log(f"  seeded {end:>11,} subscriptions ({pace:,.0f} rows/s)")
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


async def rows_read(cursor: Any) -> int:
    """This session's index and table reads so far (the ``Handler_read_%`` counters: every
    row or index entry the storage engine handed up, whichever access path)."""
    await cursor.execute("SHOW SESSION STATUS LIKE 'Handler_read%%'")
    return sum(int(value) for _, value in await cursor.fetchall())


async def timed_in_rollback(
    pool: aiomysql.Pool, works: list[Callable[[Any], Awaitable[Any]]], warmups: int
) -> dict[str, float]:
    """Run each ``work(cursor)`` in a transaction that is rolled back; the first ``warmups``
    untimed. Milliseconds (median, p95, max) and InnoDB buffer pool misses (pages read from
    disk) per sample."""
    timings = []
    async with pool.acquire() as connection, connection.cursor() as cursor:
        await cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        misses = reads = 0
        # What reading the counters costs by itself (SHOW STATUS reads rows too), to subtract.
        probe = await rows_read(cursor)
        overhead = await rows_read(cursor) - probe
        for index, work in enumerate(works):
            read_before = await rows_read(cursor)
            before = await buffer_pool_misses(cursor)
            started = time.perf_counter()
            await work(cursor)
            elapsed = time.perf_counter() - started
            await connection.rollback()
            if index >= warmups:
                timings.append(elapsed * 1000)
                misses += await buffer_pool_misses(cursor) - before
                reads += await rows_read(cursor) - read_before - 2 * overhead
    timings.sort()
    return {
        "samples": len(timings),
        "median_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[max(0, int(len(timings) * 0.95) - 1)], 2),
        "max_ms": round(timings[-1], 2),
        "disk_reads": round(misses / len(timings)),
        "rows_read": round(reads / len(timings)),
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


def sizes(args: argparse.Namespace) -> list[int]:
    """The table sizes to measure at, ascending."""
    if args.sizes is None:
        return [args.small, args.rows]
    chosen = [int(part.replace("_", "")) for part in args.sizes.split(",")]
    if chosen != sorted(set(chosen)) or chosen[0] < 1:
        raise SystemExit(f"--sizes must be ascending positive numbers, got {args.sizes!r}")
    return chosen


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
        alone = [pool, second]
        seeder = seed_sql if args.seed_with == "sql" else seed
        report["seed_with"] = args.seed_with
        report["seed_rows_per_s"], report["sizes"] = [], []
        seeded = 0
        for size in sizes(args):
            log(f"seeding up to {size:,} subscriptions")
            report["seed_rows_per_s"].append(round(await seeder(pool, seeded + 1, size, args)))
            seeded = size
            await ensure_alone(alone, args.database)
            log(f"measuring a due batch at {size:,}")
            report["sizes"].append(await batch_cost(pool, args))
            await ensure_alone(alone, args.database)
            if args.json:  # what is measured so far survives an interrupted larger size
                text = json.dumps(report, indent=2, default=str)
                await asyncio.to_thread(Path(args.json).write_text, text)
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
    pace = ", ".join(f"{value:,}" for value in report["seed_rows_per_s"])
    lines.append(f"seeding ({report['seed_with']}): {pace} rows/s")
    lines.append("")
    lines.append(
        f"{'table rows':>12} {'due':>9} {'r_rows':>7}   {'claim, warm':>26}   {'claim, cold':>26}   "
        f"{'whole batch, cold':>26}"
    )
    header = "med / p95 ms  disk  rows"
    lines.append(f"{'':>31}   {header:>26}   {header:>26}   {header:>26}")

    def cell(figure: dict[str, Any]) -> str:
        return (
            f"{figure['median_ms']:>6} / {figure['p95_ms']:<6} {figure['disk_reads']:>5} "
            f"{figure.get('rows_read', '-'):>5}"
        )

    for cost in report["sizes"]:
        lines.append(
            f"{cost['rows']:>12,} {cost['due']:>9,} {cost['analyze']['r_rows']!s:>7}   "
            f"{cell(cost['claim_warm']):>26}   {cell(cost['claim_cold']):>26}   "
            f"{cell(cost['batch_cold']):>26}"
        )
    lines.append("")
    for cost in report["sizes"]:
        for row in cost["explain"]:
            lines.append(
                f"EXPLAIN at {cost['rows']:,}: type={row.get('type')} key={row.get('key')} "
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
