"""``payd rollback``: the dry run, the paced and resumable publishing of a run, and its report.

A run publishes one refund request per frozen item, on ``payd.attempts`` as
``payd refund`` does, each confirmed by the broker before it counts as sent.
Before each publish it checks the fleet's halt the way the daemons do
(``daemon/halt.py``: a halt key, global or for the item's provider, or halt
keys that cannot be read, means halted) and takes a token from the provider's
bucket (at most ``--rate`` a second, and never faster than the provider's
configured ``rate_per_s`` / ``fleet_rate_per_s``). The token comes first, so a
halt set while the run waits for it is seen before the publish. Each publish
waits for the broker's confirm at most ``--confirm-timeout`` seconds: one not
confirmed by then is not counted as sent and the run stops (a broker under a
resource alarm confirms nothing); publishing it again on resume is the same
refund. SIGINT or SIGTERM stop it after the publish in progress (waits for a
token, a halt or the outcomes end at once); a second signal stops it at once.

Resuming needs no bookkeeping to be exact: the refund key of an item is
``rollback:RUN:KEY`` and its amount was frozen, so an item published twice
(the run was killed after the confirm, before ``published_at`` was written) is
the same request twice, which the daemon's claim deduplicates; and invariant 7
refuses any refund beyond the charge. ``published_at`` only saves a resumed run
from publishing again what it knows it sent, and an item whose refund key the
daemon already holds is not published again either.

A run holds a named lock (``GET_LOCK``) on a connection of its own and checks it
every ``LOCK_CHECK_S``; one whose lock is gone stops like an interrupted run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import math
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TextIO

import aiomysql
import msgspec
import pymysql
import redis.asyncio as aioredis

from daemon.broker import Broker, BrokerUnavailable
from daemon.config import Config
from daemon.halt import POLL_INTERVAL_S, HaltKeys, HaltState
from daemon.models import RefundRequest
from daemon.operator.rollback import (
    Preview,
    Report,
    RollbackError,
    Run,
    Selection,
    check_names,
    create_run,
    find_run,
    parse_amount,
    parse_moment,
    preview,
    read_keys,
    report,
)
from daemon.pipeline.intake import Invalid, decode_request
from daemon.providers.base import refunding
from daemon.providers.registry import create_provider
from daemon.redis_link import redis_client
from daemon.secrets import load_secret
from daemon.storage.db import DB_ERRORS, close_pool, fetch_all, open_pool, placeholders, transaction
from daemon.tokenbucket import TokenBucket

PAGE: Final = 500
"""Items read at once; published one by one."""
MARK_EVERY: Final = 100
"""Confirmed publishes recorded (``published_at``) together."""
PROGRESS_EVERY_S: Final = 1.0
DEFAULT_RATE: Final = 50.0
LOCK_CHECK_S: Final = 5.0
"""How often a run checks that it still holds its lock (one cheap query on the lock's connection)."""
DEFAULT_CONFIRM_S: Final = 10.0
"""How long one publish waits for the broker's confirm (``--confirm-timeout``)."""
OUTCOME_POLL_S: Final = 1.0
"""``--wait`` reads the run's report this often at most (one grouped query over its items)."""


class Ended(enum.StrEnum):
    DONE = "done"
    INTERRUPTED = "interrupted"
    HALTED = "halted"


def pace(config: Config, provider: str, cap: float) -> float:
    """Refunds a second for one provider: ``cap``, lowered to the provider's configured rate."""
    settings = config.providers.get(provider)
    limits = [cap]
    if settings is not None:
        limits.extend(rate for rate in (settings.fleet_rate_per_s, settings.rate_per_s) if rate is not None)
    return min(limits)


class HaltGate:
    """The fleet's halt as ``daemon/halt.py`` defines it, read at most every POLL_INTERVAL_S."""

    def __init__(self, config: Config, client: aioredis.Redis, providers: set[str], err: TextIO) -> None:
        self.state = HaltState(
            sorted(providers | set(config.providers)),
            HaltKeys(config.redis.key_prefix),
            grace_s=config.redis.halt_grace_s,
        )
        self._client = client
        self._err = err
        self._read_at = -math.inf

    async def _refresh(self) -> None:
        if time.monotonic() - self._read_at >= POLL_INTERVAL_S:
            self._read_at = time.monotonic()
            await self.state.read(self._client)

    def _why(self, provider: str) -> str:
        order = self.state.global_order or self.state.provider_orders.get(provider)
        if order is None:
            return f"the halt state cannot be read ({self.state.last_error or 'no read yet'})"
        scope = "the fleet is halted" if self.state.global_order else f"provider {provider} is halted"
        return f"{scope} ({order.reason}, by {order.by} at {order.at})"

    async def clear(self, provider: str, stop: asyncio.Event, *, wait: bool) -> Ended:
        """DONE when a refund to ``provider`` may be published now; otherwise why not."""
        said = False
        while True:
            await self._refresh()
            if not self.state.blocks(provider):
                if said:
                    print("halt lifted: publishing again", file=self._err, flush=True)
                return Ended.DONE
            if not wait:
                print(f"{self._why(provider)}: stopping, nothing more is published", file=self._err)
                return Ended.HALTED
            if not said:
                print(
                    f"{self._why(provider)}: nothing is published while halted; waiting for payd resume "
                    "(Ctrl-C stops; run the same command again to resume)",
                    file=self._err,
                    flush=True,
                )
                said = True
            try:
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
            except TimeoutError:
                continue
            return Ended.INTERRUPTED


async def unless_stopped(work: Coroutine[Any, Any, object], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first: True when it ended, False when it was
    stopped (and cancelled)."""
    if stop.is_set():
        work.close()
        return False
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, stopped):
            waiting.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its exception, if it raised one
    return True


async def refunding_providers(config: Config, err: TextIO) -> frozenset[str]:
    """The configured providers whose adapter can refund: the daemon's own test
    (``daemon.pipeline.reversals.can_refund``); a charge of any other provider would be refused
    as ``refunds_unsupported``. An adapter that cannot be built here counts as unable, said."""
    able = set()
    for name, settings in config.providers.items():
        try:
            provider = create_provider(name, settings)
        except Exception as error:  # a missing secret, a broken plugin: said, and left out
            print(f"payd rollback: provider {name}: cannot tell whether it refunds ({error})", file=err)
            continue
        try:
            if refunding(provider) is not None:
                able.add(name)
        finally:
            await provider.close()
    return frozenset(able)


class Progress:
    """``published N of M (P%), R/s, ETA S`` on stderr, at most once a second."""

    def __init__(self, run: str, total: int, err: TextIO) -> None:
        self.run, self.total, self._err = run, total, err
        self.published = self.skipped = 0
        self._started = self._shown = time.monotonic()

    def line(self) -> str:
        done = self.published + self.skipped
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.published / elapsed
        left = self.total - done
        eta = f"{left / rate:.0f}s" if rate > 0 else "-"
        share = 100 * done // self.total if self.total else 100
        return (
            f"rollback {self.run}: published {done} of {self.total} ({share}%), {rate:.0f}/s, ETA {eta}"
            + (f" ({self.skipped} already with the daemon)" if self.skipped else "")
        )

    def tick(self) -> None:
        if time.monotonic() - self._shown >= PROGRESS_EVERY_S:
            self._shown = time.monotonic()
            print(self.line(), file=self._err, flush=True)


class _Pending(msgspec.Struct, frozen=True, array_like=True):
    attempt_id: int
    charge_key: str
    refund_key: str
    provider: str
    remaining_minor: int
    held: str | None
    """The state of the refund under this key, if the daemon already has it."""


async def _to_publish(pool: aiomysql.Pool, run: Run, after: int) -> list[_Pending]:
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT i.attempt_id, i.charge_key, i.refund_key, i.provider, i.remaining_minor, r.state "
            "FROM rollback_items i LEFT JOIN reversals r ON r.idempotency_key = i.refund_key "
            "WHERE i.run_id = %s AND i.published_at IS NULL AND i.remaining_minor > 0 AND i.attempt_id > %s "
            "ORDER BY i.attempt_id LIMIT %s",
            (run.id, after, PAGE),
        )
        return await fetch_all(cursor, _Pending)


async def _mark(pool: aiomysql.Pool, run: Run, attempt_ids: list[int]) -> None:
    if not attempt_ids:
        return
    async with transaction(pool) as cursor:
        await cursor.execute(
            "UPDATE rollback_items SET published_at = NOW(6) "  # noqa: S608 (placeholders only)
            f"WHERE run_id = %s AND attempt_id IN ({placeholders(len(attempt_ids))})",
            (run.id, *attempt_ids),
        )
    attempt_ids.clear()


async def publish_run(
    pool: aiomysql.Pool,
    broker: Broker,
    gate: HaltGate,
    run: Run,
    *,
    buckets: dict[str, TokenBucket],
    stop: asyncio.Event,
    wait_on_halt: bool,
    err: TextIO,
    confirm_s: float = DEFAULT_CONFIRM_S,
) -> Ended:
    """Publish every item not yet published (see module); return why it ended."""
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT COUNT(*) FROM rollback_items WHERE run_id = %s AND published_at IS NULL "
            "AND remaining_minor > 0",
            (run.id,),
        )
        (total,) = await cursor.fetchone() or (0,)
    progress = Progress(run.name, total, err)
    confirmed: list[int] = []
    after, ended = 0, Ended.DONE
    try:
        while ended is Ended.DONE and (page := await _to_publish(pool, run, after)):
            for item in page:
                if item.held is not None:  # sent before, its publish not recorded: not again
                    confirmed.append(item.attempt_id)
                    progress.skipped += 1
                else:
                    # The token first: a halt set while waiting for it is read before the publish.
                    if not await unless_stopped(buckets[item.provider].take(), stop):
                        ended = Ended.INTERRUPTED
                        break
                    ended = await gate.clear(item.provider, stop, wait=wait_on_halt)
                    if ended is Ended.DONE and stop.is_set():
                        ended = Ended.INTERRUPTED
                    if ended is not Ended.DONE:
                        break
                    request = RefundRequest(
                        operation="refund",
                        idempotency_key=item.refund_key,
                        original_idempotency_key=item.charge_key,
                        amount_minor=item.remaining_minor,
                        reason=run.reason,
                    )
                    try:
                        async with asyncio.timeout(confirm_s):
                            await broker.publish(
                                "", broker.topology.attempts_queue, msgspec.json.encode(request)
                            )
                    except TimeoutError:
                        # Not counted as sent: a resume publishes it again, the same key (one refund).
                        raise BrokerUnavailable(
                            f"refund {item.refund_key} not confirmed within {confirm_s:g}s"
                        ) from None
                    confirmed.append(item.attempt_id)
                    progress.published += 1
                after = item.attempt_id
                if len(confirmed) >= MARK_EVERY:
                    await _mark(pool, run, confirmed)
                progress.tick()
    finally:
        # Shielded: a cancellation must not lose the record of what the broker confirmed.
        await asyncio.shield(_mark(pool, run, confirmed))
    print(progress.line(), file=err, flush=True)
    return ended


async def wait_for_outcomes(
    pool: aiomysql.Pool, run: Run, *, timeout_s: float, stop: asyncio.Event, err: TextIO
) -> Report:
    """Read the report until nothing published is pending or unknown, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    shown = -math.inf
    while True:
        asked = time.monotonic()
        async with transaction(pool) as cursor:
            now = await report(cursor, run)
        # A large run's report is a query of seconds: the database spends at most a third of its time on it.
        pause = max(OUTCOME_POLL_S, 2 * (time.monotonic() - asked))
        open_ = now.counts["pending"] + now.counts["unknown"]
        if open_ == 0 or time.monotonic() >= deadline or stop.is_set():
            return now
        if time.monotonic() - shown >= 2 * PROGRESS_EVERY_S:
            shown = time.monotonic()
            counts = now.counts
            print(
                f"rollback {run.name}: waiting for outcomes: reversed {counts['reversed']}, refused "
                f"{counts['refused']}, unknown {counts['unknown']}, pending {counts['pending']} "
                f"({deadline - time.monotonic():.0f}s left of --wait)",
                file=err,
                flush=True,
            )
        try:
            await asyncio.wait_for(stop.wait(), min(pause, max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            continue


# -- rendering -------------------------------------------------------------------------------


def render_preview(found: Preview, out: TextIO) -> None:
    print(f"selection: {', '.join(f'{k}={v}' for k, v in found.selection.items())}", file=out)
    print(f"would reverse {found.charges} succeeded charges:", file=out)
    print(
        f"  {'currency':<8} {'provider':<16} {'charges':>9} {'charged':>14} "
        f"{'reversed/held':>14} {'to refund':>14}",
        file=out,
    )
    for group in [*found.by_provider, *found.by_currency]:
        provider = group.provider or "(all)"
        print(
            f"  {group.currency:<8} {provider:<16} {group.charges:>9} {group.charged_minor:>14} "
            f"{group.reserved_minor:>14} {group.to_reverse_minor:>14}",
            file=out,
        )
    already = sum(group.already_reversed for group in found.by_currency)
    if already:
        print(
            f"already wholly reversed or held: {already} charges (nothing would be sent for them)", file=out
        )
    for group in found.cannot_refund:
        print(
            f"cannot refund through payd (provider {group.provider}: not configured here, or its adapter "
            f"has no refunds; left out of a run): {group.charges} charges, {group.charged_minor} "
            f"{group.currency} charged, {group.to_reverse_minor} {group.currency} unrefunded",
            file=out,
        )
    for missing in found.unselected_keys:
        print(f"not selected: {missing.key}: {missing.why}", file=out)
    print("nothing was published (--dry-run)", file=out)


_LABELS: Final = {
    "reversed": "reversed",
    "already_reversed": "already reversed",
    "refused": "refused",
    "unknown": "unknown",
    "pending": "pending",
    "not_published": "not published",
}


def render_report(found: Report, out: TextIO) -> None:
    selection = ", ".join(f"{k}={v}" for k, v in found.selection.items())
    print(
        f"rollback {found.run}: {found.items} charges (selection: {selection}; started "
        f"{found.created_at.isoformat(timespec='seconds')} by {found.created_by or '-'}; reason: "
        f"{found.reason or '-'})",
        file=out,
    )
    for outcome, label in _LABELS.items():
        amounts = ", ".join(f"{t.amount_minor} {t.currency}" for t in found.tallies if t.outcome == outcome)
        print(f"  {label:<17} {found.counts[outcome]:>9}  {amounts}".rstrip(), file=out)
    for refusal in found.refusals:
        print(f"  refused {refusal.decline_code or '-'}: {refusal.charges}, e.g. {refusal.example}", file=out)
    for item in [*found.refused, *found.unknown]:
        print(f"  {item.state}: {item.charge_key} (refund {item.refund_key}): {item.reason or '-'}", file=out)
    if found.counts["pending"]:
        print(
            "  pending: published, the daemon has not finished them (payd rollback --report again later)",
            file=out,
        )
    if found.counts["not_published"]:
        print(f"  not published: run payd rollback --run {found.run} again to resume", file=out)


def _print_json(value: object, out: TextIO) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode(), file=out)


# -- the command -----------------------------------------------------------------------------


class Order(msgspec.Struct, frozen=True, kw_only=True):
    """What the operator asked of ``payd rollback``."""

    selection: Selection
    run: str | None
    dry_run: bool = False
    report_only: bool = False
    reason: str | None = None
    rate_per_s: float = DEFAULT_RATE
    wait_s: float | None = None
    stop_if_halted: bool = False
    as_json: bool = False
    operator: str | None = None
    confirm_s: float = DEFAULT_CONFIRM_S


def order_from_args(config: Config, args: argparse.Namespace, *, operator: str | None) -> Order:
    """The command line's order, checked: a usage problem raises ``RollbackError`` naming it."""
    run = args.report if args.report is not None else args.run
    check_names(run, args.currency, args.rate)
    if not args.confirm_timeout > 0:
        raise RollbackError(f"--confirm-timeout {args.confirm_timeout}: seconds, more than 0")
    keys = read_keys(args.keys, "arguments")
    if args.keys_file:
        try:
            keys += read_keys(Path(args.keys_file).read_text().splitlines(), args.keys_file)
        except OSError as error:
            raise RollbackError(f"--keys-file: {error}") from None
    low, high = parse_amount(args.amount_minor) if args.amount_minor else (None, None)
    selection = Selection(
        provider=args.provider,
        since=parse_moment("--since", args.since) if args.since else None,
        until=parse_moment("--until", args.until) if args.until else None,
        plan=args.plan,
        amount_min=low,
        amount_max=high,
        currency=args.currency,
        keys=tuple(keys),
    )
    if not args.dry_run and run is None:
        raise RollbackError("name the run (--run NAME: its refund keys and its resume), or --dry-run")
    if args.dry_run and selection.empty():
        raise RollbackError("name at least one filter (never every charge by accident)")
    if args.reason is not None:
        # Judged as the daemon's intake will judge each refund: a refused reason would dead-letter them all.
        sample = {"operation": "refund", "idempotency_key": "k", "original_idempotency_key": "k"}
        decoded = decode_request(
            msgspec.json.encode({**sample, "amount_minor": 1, "reason": args.reason}), config.providers
        )
        if isinstance(decoded, Invalid):
            raise RollbackError(f"--reason: {decoded.reason}")
    return Order(
        selection=selection,
        run=run,
        dry_run=args.dry_run,
        report_only=args.report is not None,
        reason=args.reason,
        rate_per_s=args.rate,
        wait_s=args.wait,
        stop_if_halted=args.stop_if_halted,
        as_json=args.json,
        operator=operator,
        confirm_s=args.confirm_timeout,
    )


async def rollback(
    config: Config, order: Order, stop: asyncio.Event, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Exit 0: a dry run or report, or everything published and nothing refused so far (with
    ``--wait``: every charge reversed or already reversed; without it, published is not yet
    reversed); 1 refused, interrupted, halted or not finished; 2 a usage problem."""
    # Unbounded statements: freezing or summing a selection of millions may take a while.
    pool = await open_pool(config.mysql, load_secret("mysql_password"), bounded=False)
    try:
        return await _rollback(config, pool, order, stop, out=out, err=err)
    except RollbackError as error:
        print(f"payd rollback: {error}", file=err)
        return 2
    finally:
        await close_pool(pool)


async def _rollback(
    config: Config, pool: aiomysql.Pool, order: Order, stop: asyncio.Event, *, out: TextIO, err: TextIO
) -> int:
    if order.dry_run:
        refundable = await refunding_providers(config, err)
        async with transaction(pool) as cursor:
            found = await preview(cursor, order.selection, refundable)
        _print_json(found, out) if order.as_json else render_preview(found, out)
        return 0
    assert order.run is not None
    async with transaction(pool) as cursor:
        run = await find_run(cursor, order.run)
    if order.report_only:
        if run is None:
            print(f"payd rollback: no run named {order.run}", file=err)
            return 1
        return await _report(pool, run, order, out)
    async with _one_process(pool, order.run) as lock:
        if lock is None:
            print(
                f"payd rollback: run {order.run} is being run by another process right now; "
                "follow it with payd rollback --report",
                file=err,
            )
            return 1
        keeper = asyncio.create_task(lock.keep(stop, err))
        try:
            return await _publish(
                config,
                pool,
                await _start_or_resume(config, pool, run, order, err),
                order,
                stop,
                err=err,
                out=out,
            )
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)


class RunLock:
    """The run's named lock, held on one connection of its own. The server frees it with the
    connection (``wait_timeout``, a failover, a killed session), so ``keep`` uses that
    connection every ``LOCK_CHECK_S`` (which also keeps it from idling out) and says when the
    lock is no longer ours."""

    def __init__(self, connection: aiomysql.Connection, name: str) -> None:
        self._connection = connection
        self._name = name
        self.lost: str | None = None
        """Why the lock is no longer held, once it is not."""

    async def held(self) -> bool:
        try:
            async with asyncio.timeout(LOCK_CHECK_S), self._connection.cursor() as cursor:
                await cursor.execute("SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self._name,))
                (ours,) = await cursor.fetchone() or (None,)
        except (*DB_ERRORS, pymysql.err.InterfaceError) as error:
            self.lost = f"its database connection failed: {type(error).__name__}: {error}"
            return False
        if ours != 1:
            self.lost = "the database no longer holds it for this process"
            return False
        return True

    async def keep(self, stop: asyncio.Event, err: TextIO) -> None:
        """Check the lock until it is lost, then stop the run (after the publish in progress)."""
        while True:
            await asyncio.sleep(LOCK_CHECK_S)
            if not await self.held():
                print(
                    f"payd rollback: lost the run's lock ({self.lost}): stopping, so two processes never "
                    "run it at once",
                    file=err,
                    flush=True,
                )
                stop.set()
                return

    async def release(self) -> None:
        # A lock already lost (its connection gone) needs no release: the server freed it.
        with contextlib.suppress(*DB_ERRORS, pymysql.err.InterfaceError):
            async with asyncio.timeout(LOCK_CHECK_S), self._connection.cursor() as cursor:
                await cursor.execute("SELECT RELEASE_LOCK(%s)", (self._name,))


@asynccontextmanager
async def _one_process(pool: aiomysql.Pool, run: str) -> AsyncIterator[RunLock | None]:
    """A named lock held on one connection for the run's life (None: another process holds it):
    two processes running the same run would be safe (the keys deduplicate) but would pace and
    report twice. The server frees the lock with the connection, a process killed included."""
    connection = await pool.acquire()
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(
                "SELECT CONCAT('payd.rollback.', LEFT(SHA2(CONCAT(DATABASE(), ':', %s), 256), 40))", (run,)
            )
            (name,) = await cursor.fetchone()
            await cursor.execute("SELECT GET_LOCK(%s, 0)", (name,))
            (locked,) = await cursor.fetchone()
        lock = RunLock(connection, name) if locked == 1 else None
        try:
            yield lock
        finally:
            if lock is not None:
                await lock.release()
                if lock.lost is not None:
                    connection.close()  # perhaps cut mid-query: not for the pool's reuse
    finally:
        pool.release(connection)


async def _publish(
    config: Config,
    pool: aiomysql.Pool,
    run: Run,
    order: Order,
    stop: asyncio.Event,
    *,
    out: TextIO,
    err: TextIO,
) -> int:
    providers = await _providers(pool, run)
    client = redis_client(config.redis, load_secret("redis_password"))
    broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"))
    await broker.connect()
    try:
        buckets = {name: TokenBucket(pace(config, name, order.rate_per_s), capacity=1) for name in providers}
        gate = HaltGate(config, client, providers, err)
        ended = await publish_run(
            pool,
            broker,
            gate,
            run,
            buckets=buckets,
            stop=stop,
            wait_on_halt=not order.stop_if_halted,
            err=err,
            confirm_s=order.confirm_s,
        )
    except BrokerUnavailable as error:
        # What the broker confirmed is recorded (publish_run's finally); the rest waits for a resume.
        print(f"payd rollback: lost the broker ({error}); run the same command again to resume", file=err)
        return 1
    finally:
        await broker.close()
        await client.aclose()
    if ended is not Ended.DONE:
        print(f"rollback {run.name} {ended.value}; run the same command again to resume", file=err)
    elif order.wait_s:
        await wait_for_outcomes(pool, run, timeout_s=order.wait_s, stop=stop, err=err)
    code = await _report(pool, run, order, out)
    return 1 if ended is not Ended.DONE else code


async def _start_or_resume(
    config: Config, pool: aiomysql.Pool, run: Run | None, order: Order, err: TextIO
) -> Run:
    assert order.run is not None
    if run is not None:
        if not order.selection.empty() and order.selection.recorded() != run.selection:
            raise RollbackError(
                f"run {run.name} exists with another selection "
                f"({', '.join(f'{k}={v}' for k, v in run.selection.items())}): "
                "give no filters to resume it, or choose another --run name"
            )
        print(f"resuming rollback {run.name}", file=err)
        return run
    if order.selection.empty():
        raise RollbackError(
            "name at least one filter (never every charge by accident); see payd rollback --help"
        )
    refundable = await refunding_providers(config, err)
    print(
        "only charges of providers payd can refund through are selected: "
        f"{', '.join(sorted(refundable)) or 'none'} (the dry run counts the others apart)",
        file=err,
    )
    try:
        async with transaction(pool) as cursor:
            _, frozen = await create_run(
                cursor,
                order.run,
                order.selection,
                reason=order.reason or f"rollback {order.run}",
                created_by=order.operator,
                refundable=refundable,
            )
            created = await find_run(cursor, order.run)
    except pymysql.err.IntegrityError:
        raise RollbackError(
            f"run {order.run} was created by someone else just now; run again to resume it"
        ) from None
    assert created is not None
    print(f"rollback {created.name}: {frozen} succeeded charges selected and frozen", file=err)
    return created


async def _providers(pool: aiomysql.Pool, run: Run) -> set[str]:
    async with transaction(pool) as cursor:
        await cursor.execute("SELECT DISTINCT provider FROM rollback_items WHERE run_id = %s", (run.id,))
        return {provider for (provider,) in await cursor.fetchall()}


async def _report(pool: aiomysql.Pool, run: Run, order: Order, out: TextIO) -> int:
    async with transaction(pool) as cursor:
        found = await report(cursor, run)
    _print_json(found, out) if order.as_json else render_report(found, out)
    if order.report_only:
        return 0
    counts = found.counts
    finished = counts["not_published"] == 0 and (
        not order.wait_s or counts["pending"] + counts["unknown"] == 0
    )
    return 0 if finished and counts["refused"] == 0 else 1
