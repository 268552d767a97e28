"""Real InnoDB deadlocks inside the claim and record transactions, and the retry that absorbs them.

A second connection (the rival), in a transaction of its own, holds a row the transaction under
test is about to need and then asks for a row that transaction already holds. Each waits for the
other; InnoDB's deadlock detector finds the cycle at once and rolls one transaction back whole
with error 1213, ER_LOCK_DEADLOCK, "Deadlock found when trying to get lock; try restarting
transaction" (https://mariadb.com/kb/en/mariadb-error-code-reference/; deadlocks and how InnoDB
breaks them: https://mariadb.com/kb/en/innodb-lock-modes/). The victim is the smaller
transaction, measured by the rows it changed
(https://dev.mysql.com/doc/refman/8.0/en/innodb-deadlock-detection.html), so the rival first
writes a few hundred rows of ballast: the transaction under test is the one rolled back.

Nothing is timed: the rival asks for its second row when the transaction under test is about to
run the statement that waits for the rival (an event on its cursor), so the cycle closes whichever
request reaches the server first. The database is not mocked: only ``transaction`` in
``daemon.storage.attempts`` is wrapped, to count the tries, to see the error each one ended with,
and to set the rival up before each try. The server's own ``Innodb_deadlocks`` counter
(https://mariadb.com/kb/en/innodb-status-variables/) must grow by at least as many deadlocks as
the tries that ended in 1213.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import aiomysql
import msgspec
import pymysql
import pytest

from daemon.config import MySQLSettings, SubscriptionSettings
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.secrets import load_secret
from daemon.storage import attempts
from daemon.storage.attempts import DEADLOCK_RETRIES, Record, claim_attempts, record_outcomes
from daemon.storage.db import Cursor, Row, close_pool, open_pool, transaction
from daemon.subscriptions.policy import SubscriptionPolicy
from tests.support import DATABASE, query, request

ER_LOCK_DEADLOCK: Final = 1213
BALLAST_ROWS: Final = 300
"""Rows the rival writes first: many more than any batch here, so InnoDB rolls the batch back."""
BOUND_S: Final = 15.0
Statement = tuple[str, Sequence[Any]]


class _Tripwire:
    """The transaction's cursor, which calls ``fire`` once, just before the first statement that
    contains ``trigger`` goes to the server."""

    def __init__(self, cursor: Cursor, trigger: str, fire: Callable[[], None]) -> None:
        self._cursor = cursor
        self._trigger = trigger
        self._fire: Callable[[], None] | None = fire

    async def execute(self, query: str, args: Any = None) -> int:
        if self._fire is not None and self._trigger in query:
            fire, self._fire = self._fire, None
            fire()
        return await self._cursor.execute(query, args)

    async def executemany(self, query: str, args: Any) -> int:
        return await self._cursor.executemany(query, args)

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Sequence[Sequence[Any]]:
        return self._cursor.description

    @property
    def lastrowid(self) -> int:
        return self._cursor.lastrowid

    async def fetchone(self) -> Row | None:
        return await self._cursor.fetchone()

    async def fetchall(self) -> Sequence[Row]:
        return await self._cursor.fetchall()


class Crossing:
    """Deadlocks the first ``times`` tries of every transaction ``daemon.storage.attempts`` opens.

    Before each such try's first statement the rival begins a transaction, writes its ballast and
    runs ``hold`` (locking what the try will need). When the try is about to run the statement
    containing ``trigger``, by which time it holds the row ``take`` locks, the rival runs
    ``take`` and then rolls back, leaving nothing behind.
    """

    def __init__(
        self,
        settings: MySQLSettings,
        *,
        hold: Sequence[Statement],
        take: Statement,
        trigger: str,
        times: int,
    ) -> None:
        self._settings = settings
        self._hold = hold
        self._take = take
        self._trigger = trigger
        self._times = times
        self.tries = 0
        self.errors: list[int | None] = []
        """Per try that failed, the server's error code (None: not a server error)."""
        self.rival_errors: list[BaseException] = []

    @asynccontextmanager
    async def transaction(self, pool: aiomysql.Pool) -> AsyncIterator[Cursor]:
        """Stands in for ``daemon.storage.db.transaction`` inside ``daemon.storage.attempts``."""
        self.tries += 1
        if self.tries > self._times:
            async with self._failures_counted(), transaction(pool) as cursor:
                yield cursor
            return
        rival = await self._rival()
        taking: list[asyncio.Task[None]] = []
        try:
            async with self._failures_counted(), transaction(pool) as cursor:
                yield _Tripwire(
                    cursor,
                    self._trigger,
                    lambda: taking.append(asyncio.create_task(self._take_then_leave(rival))),
                )
        finally:
            try:
                if taking:
                    await taking[0]
                else:
                    await rival.rollback()
            finally:
                rival.close()

    @asynccontextmanager
    async def _failures_counted(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException as error:
            self.errors.append(error.args[0] if isinstance(error, pymysql.err.MySQLError) else None)
            raise

    async def _rival(self) -> aiomysql.Connection:
        password = load_secret("mysql_password")
        rival = await aiomysql.connect(
            host=self._settings.host,
            port=self._settings.port,
            user=self._settings.user,
            password=password.reveal() if password else "",
            db=self._settings.database,
            autocommit=False,
        )
        try:
            async with rival.cursor() as cursor:
                await cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                await cursor.execute("START TRANSACTION")
                await cursor.execute(
                    "INSERT INTO deadlock_ballast (id) VALUES " + ", ".join(["(%s)"] * BALLAST_ROWS),
                    list(range(BALLAST_ROWS)),
                )
                for sql, args in self._hold:
                    await cursor.execute(sql, args)
        except BaseException:
            rival.close()
            raise
        return rival

    async def _take_then_leave(self, rival: aiomysql.Connection) -> None:
        try:
            async with rival.cursor() as cursor:
                await cursor.execute(*self._take)
                await cursor.fetchall()
        except pymysql.err.MySQLError as error:
            self.rival_errors.append(error)  # the rival was the victim: no retry to prove
        await rival.rollback()


@pytest.fixture
def settings() -> MySQLSettings:
    return MySQLSettings(database=DATABASE, pool_size=4)


@pytest.fixture
async def pool(db: aiomysql.Pool, settings: MySQLSettings) -> AsyncIterator[aiomysql.Pool]:
    """A pool like the daemon's (transactions, READ COMMITTED), over tables ``db`` emptied, with
    the rival's ballast table."""
    await query(db, "CREATE TABLE IF NOT EXISTS deadlock_ballast (id INT PRIMARY KEY)")
    daemon_pool = await open_pool(settings, load_secret("mysql_password"))
    yield daemon_pool
    await close_pool(daemon_pool)
    await query(db, "DROP TABLE IF EXISTS deadlock_ballast")


async def _server_deadlocks(db: aiomysql.Pool) -> int:
    [(_, value)] = await query(db, "SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
    return int(value)


def _cross(monkeypatch: pytest.MonkeyPatch, crossing: Crossing) -> Crossing:
    monkeypatch.setattr(attempts, "transaction", crossing.transaction)
    return crossing


async def _assert_deadlocked(
    db: aiomysql.Pool, crossing: Crossing, deadlocks_before: int, times: int
) -> None:
    """The first ``times`` tries each ended in a real deadlock the server counted."""
    assert not crossing.rival_errors, f"InnoDB rolled the rival back instead: {crossing.rival_errors!r}"
    assert crossing.errors == [ER_LOCK_DEADLOCK] * times
    assert await _server_deadlocks(db) - deadlocks_before >= times


# -- record_outcomes -----------------------------------------------------------------------

SUBSCRIPTION: Final = 7001
RENEWAL: Final = "dl-renewal"
ONE_OFF: Final = "dl-one-off"
POLICY: Final = SubscriptionPolicy(SubscriptionSettings())


async def _claimed_batch(db: aiomysql.Pool, pool: aiomysql.Pool) -> list[Record]:
    """A due subscription waiting on its renewal, and the renewal and a one-off charge claimed,
    as the pipeline has them after the provider answered: approved, and declined."""
    await query(
        db,
        "INSERT INTO subscriptions (id, provider, payment_method, amount_minor, currency, "
        "billing_anchor, next_attempt_at, pending_key) VALUES (%s, 'sandbox', 'pm_ok', 1000, 'EUR', "
        "NOW(6) - INTERVAL 1 MINUTE, NOW(6) - INTERVAL 1 MINUTE, %s)",
        SUBSCRIPTION,
        RENEWAL,
    )
    requests = [
        msgspec.convert(request(RENEWAL, subscription_id=SUBSCRIPTION, cycle=1), AttemptRequest),
        msgspec.convert(request(ONE_OFF, payment_method="pm_insufficient_funds"), AttemptRequest),
    ]
    claim = await claim_attempts(pool, requests, claimed_by="dl/1", lease_s=30)
    results = {
        RENEWAL: ChargeResult(outcome=Outcome.APPROVED, provider_ref="ch_dl"),
        ONE_OFF: ChargeResult(outcome=Outcome.SOFT_DECLINE, decline_code="insufficient_funds"),
    }
    return [
        Record(
            attempt_id=claim.claimed[r.idempotency_key], request=r, result=results[r.idempotency_key], tries=1
        )
        for r in requests
    ]


def _record_crossing(settings: MySQLSettings, records: Sequence[Record], *, times: int) -> Crossing:
    """The rival locks the subscription the batch will lock after its attempt rows, then asks for
    the renewal's attempt row, which the batch locked first."""
    renewal_id = next(r.attempt_id for r in records if r.request.idempotency_key == RENEWAL)
    return Crossing(
        settings,
        hold=[("SELECT id FROM subscriptions WHERE id = %s FOR UPDATE", (SUBSCRIPTION,))],
        take=("SELECT id FROM attempts WHERE id = %s FOR UPDATE", (renewal_id,)),
        trigger="FROM subscriptions",
        times=times,
    )


async def _events(db: aiomysql.Pool) -> Counter[tuple[str, str | None]]:
    rows = await query(db, "SELECT routing_key, payload FROM outbox WHERE target = 'events'")
    return Counter((key, json.loads(payload).get("idempotency_key")) for key, payload in rows)


async def _attempt_rows(db: aiomysql.Pool) -> dict[str, tuple[Any, ...]]:
    rows = await query(db, "SELECT idempotency_key, state, tries, claimed_by FROM attempts")
    return {row[0]: tuple(row[1:]) for row in rows}


async def _subscription(db: aiomysql.Pool) -> tuple[Any, ...]:
    [row] = await query(
        db, "SELECT status, paid_cycle, pending_key, chain_ref FROM subscriptions WHERE id = %s", SUBSCRIPTION
    )
    return tuple(row)


async def test_a_record_batch_that_deadlocks_is_written_again_and_exactly_once(
    db: aiomysql.Pool, pool: aiomysql.Pool, settings: MySQLSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record transaction locks its attempt rows, writes them, then locks their
    subscriptions; the rival holds the subscription and asks for the renewal's attempt row. The
    server rolls the batch back with 1213 (ER_LOCK_DEADLOCK,
    https://mariadb.com/kb/en/mariadb-error-code-reference/, https://mariadb.com/kb/en/innodb-lock-modes/)
    and ``record_outcomes`` writes it again: each attempt settled once (tries counted once), one
    payment event each, the subscription renewed once with its chain, one subscription event.
    Fails without the retry loop: the 1213 reaches the caller."""
    records = await _claimed_batch(db, pool)
    crossing = _cross(monkeypatch, _record_crossing(settings, records, times=1))
    deadlocks_before = await _server_deadlocks(db)

    async with asyncio.timeout(BOUND_S):
        outcome = await record_outcomes(pool, records, unknown_recheck_s=60, policy=POLICY)

    await _assert_deadlocked(db, crossing, deadlocks_before, times=1)
    assert crossing.tries == 2, "one deadlocked try, then one that committed"
    assert [r.request.idempotency_key for r in outcome.applied] == [RENEWAL, ONE_OFF]
    assert not outcome.skipped
    assert await _attempt_rows(db) == {
        RENEWAL: ("succeeded", 1, "dl/1"),
        ONE_OFF: ("declined", 1, "dl/1"),
    }
    assert await _events(db) == Counter(
        {
            ("payment.succeeded", RENEWAL): 1,
            ("payment.declined", ONE_OFF): 1,
            ("subscription.renewed", RENEWAL): 1,
        }
    )
    assert await _subscription(db) == ("active", 1, None, "ch_dl")


# -- claim_attempts ------------------------------------------------------------------------

CLAIM_RENEWAL: Final = "dl-claim-renewal"
CLAIM_ONE_OFF: Final = "dl-claim-one-off"
RIVAL: Final = "dl-claim-rival"
CYCLE: Final = 3


def _claim_requests() -> list[AttemptRequest]:
    return [
        msgspec.convert(request(CLAIM_RENEWAL, subscription_id=SUBSCRIPTION, cycle=CYCLE), AttemptRequest),
        msgspec.convert(request(CLAIM_ONE_OFF), AttemptRequest),
    ]


async def _queued_tries(db: aiomysql.Pool) -> None:
    """Two queued tries of one subscription cycle: the renewal, released earlier and now
    delivered again, and the rival's. Queued rows hold no place in the (subscription, cycle)
    unique key; an in_flight one does.

    The rows exist before the claim so that neither transaction inserts a key into a unique
    index next to the other's: an INSERT's duplicate check on a key an earlier test left
    delete-marked (not yet purged) takes next-key locks, and the claim would wait at its INSERT
    instead of at the statement the rival is set up for."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, state) VALUES (%s, %s, %s, 'sandbox', 1000, 'EUR', 'pm_ok', 'queued'), "
        "(%s, %s, %s, 'sandbox', 1000, 'EUR', 'pm_ok', 'queued')",
        CLAIM_RENEWAL,
        SUBSCRIPTION,
        CYCLE,
        RIVAL,
        SUBSCRIPTION,
        CYCLE,
    )


def _claim_crossing(settings: MySQLSettings, *, times: int) -> Crossing:
    """The rival moves its try of the cycle to in_flight (uncommitted), so the claim, having
    written and locked its rows, must wait for the rival to move the renewal to in_flight (the
    (subscription, cycle) unique key's duplicate check). The rival then asks for the renewal's
    row, which the claim holds."""
    return Crossing(
        settings,
        hold=[
            (
                "UPDATE attempts SET state = 'in_flight', claimed_by = 'rival' WHERE idempotency_key = %s",
                (RIVAL,),
            )
        ],
        take=("SELECT id FROM attempts WHERE idempotency_key = %s FOR UPDATE", (CLAIM_RENEWAL,)),
        trigger="SET state = 'in_flight'",
        times=times,
    )


async def _claim_rows(db: aiomysql.Pool) -> list[tuple[Any, ...]]:
    return await query(db, "SELECT idempotency_key, state, claimed_by FROM attempts ORDER BY idempotency_key")


async def test_a_claim_that_deadlocks_is_claimed_again_and_exactly_once(
    db: aiomysql.Pool, pool: aiomysql.Pool, settings: MySQLSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal released earlier is delivered again while a rival moves another try of the same
    subscription cycle to in_flight. The claim writes and locks its rows; moving the renewal to
    in_flight waits for the rival's row in the (subscription, cycle) unique key, and the rival
    asks for the renewal's row. The server rolls the claim back with 1213 (ER_LOCK_DEADLOCK,
    https://mariadb.com/kb/en/mariadb-error-code-reference/, https://mariadb.com/kb/en/innodb-lock-modes/),
    the rival gives up its try, and ``claim_attempts`` claims again: one row per key, in flight
    under this claim, with the ids the outcome names; the rival's try still queued; no event,
    no refusal. Fails without the retry loop: the 1213 reaches the caller."""
    await _queued_tries(db)
    crossing = _cross(monkeypatch, _claim_crossing(settings, times=1))
    deadlocks_before = await _server_deadlocks(db)

    async with asyncio.timeout(BOUND_S):
        outcome = await claim_attempts(pool, _claim_requests(), claimed_by="dl/2", lease_s=30)

    await _assert_deadlocked(db, crossing, deadlocks_before, times=1)
    assert crossing.tries == 2, "one deadlocked try, then one that committed"
    assert set(outcome.claimed) == {CLAIM_RENEWAL, CLAIM_ONE_OFF}
    assert not (outcome.already or outcome.mismatched or outcome.cycle_taken or outcome.altered)
    assert await _claim_rows(db) == [
        (CLAIM_ONE_OFF, "in_flight", "dl/2"),
        (CLAIM_RENEWAL, "in_flight", "dl/2"),
        (RIVAL, "queued", None),
    ]
    ids = dict(await query(db, "SELECT idempotency_key, id FROM attempts WHERE claimed_by = 'dl/2'"))
    assert ids == outcome.claimed
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)]


# -- beyond DEADLOCK_RETRIES ---------------------------------------------------------------


async def test_a_record_batch_that_keeps_deadlocking_fails_with_1213_and_writes_nothing(
    db: aiomysql.Pool, pool: aiomysql.Pool, settings: MySQLSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try of the record transaction meets a new rival and a new real deadlock (1213,
    ER_LOCK_DEADLOCK, https://mariadb.com/kb/en/mariadb-error-code-reference/). After
    ``DEADLOCK_RETRIES`` retries the error reaches the caller, as the server's 1213, and not a
    row of the batch was written: attempts still in flight with no tries, no event, the
    subscription untouched. Fails without the retry loop (a single try)."""
    records = await _claimed_batch(db, pool)
    crossing = _cross(monkeypatch, _record_crossing(settings, records, times=DEADLOCK_RETRIES + 1))
    deadlocks_before = await _server_deadlocks(db)

    async with asyncio.timeout(BOUND_S):
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await record_outcomes(pool, records, unknown_recheck_s=60, policy=POLICY)

    assert raised.value.args[0] == ER_LOCK_DEADLOCK
    await _assert_deadlocked(db, crossing, deadlocks_before, times=DEADLOCK_RETRIES + 1)
    assert crossing.tries == DEADLOCK_RETRIES + 1
    assert await _attempt_rows(db) == {RENEWAL: ("in_flight", 0, "dl/1"), ONE_OFF: ("in_flight", 0, "dl/1")}
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert await _subscription(db) == ("active", 0, RENEWAL, None)


async def test_a_claim_that_keeps_deadlocking_fails_with_1213_and_writes_nothing(
    db: aiomysql.Pool, pool: aiomysql.Pool, settings: MySQLSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try of the claim meets a new rival and a new real deadlock (1213, ER_LOCK_DEADLOCK,
    https://mariadb.com/kb/en/mariadb-error-code-reference/). After ``DEADLOCK_RETRIES`` retries
    the error reaches the caller (the pipeline would put the batch back on the queue) and nothing
    of the claim was written: no write-ahead row for the new key, the released renewal still
    queued, so a redelivery claims afresh. Fails without the retry loop (a single try)."""
    await _queued_tries(db)
    crossing = _cross(monkeypatch, _claim_crossing(settings, times=DEADLOCK_RETRIES + 1))
    deadlocks_before = await _server_deadlocks(db)

    async with asyncio.timeout(BOUND_S):
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await claim_attempts(pool, _claim_requests(), claimed_by="dl/3", lease_s=30)

    assert raised.value.args[0] == ER_LOCK_DEADLOCK
    await _assert_deadlocked(db, crossing, deadlocks_before, times=DEADLOCK_RETRIES + 1)
    assert crossing.tries == DEADLOCK_RETRIES + 1
    assert await _claim_rows(db) == [(CLAIM_RENEWAL, "queued", None), (RIVAL, "queued", None)]
    assert await query(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
