"""Reading and writing SQL text and rows: the migration splitter, rows decoded by name and type."""

from __future__ import annotations

from datetime import datetime, timedelta

import aiomysql
import msgspec
import pytest

from daemon.config import MySQLSettings
from daemon.metrics import Metrics
from daemon.models import AttemptState
from daemon.secrets import load_secret
from daemon.storage.attempts import request_from_row
from daemon.storage.db import fetch_all, fetch_one, transaction
from daemon.storage.identity import instance_identity
from daemon.storage.migrate import Migration, available_migrations
from daemon.storage.sqlsplit import split_statements
from daemon.subscriptions.dispatch import existing_attempts
from daemon.subscriptions.model import SubscriptionStatus
from daemon.subscriptions.netbudget import NetworkCounters
from daemon.subscriptions.periods import IntervalUnit
from daemon.subscriptions.store import subscription_from_row
from tests.support import DATABASE, query


def test_a_semicolon_inside_a_string_does_not_end_the_statement() -> None:
    """A ``;`` in a quoted literal, a doubled quote, a backslash escape or a quoted name stays
    in its statement (MySQL 8.0 manual 11.1, 11.2); splitting on every ``;`` cut them apart."""
    sql = (
        "CREATE TABLE t (c INT COMMENT 'one; two');\n"
        "INSERT INTO t VALUES ('it''s; fine'), (\"a \\\"; b\");\n"
        "SELECT `odd;name` FROM t;"
    )
    assert Migration(version=1, name="t", sql=sql).statements() == [
        "CREATE TABLE t (c INT COMMENT 'one; two')",
        "INSERT INTO t VALUES ('it''s; fine'), (\"a \\\"; b\")",
        "SELECT `odd;name` FROM t",
    ]


def test_comments_are_left_out_and_their_semicolons_ignored() -> None:
    """``-- ``, ``#`` and ``/* */`` comments (MySQL 8.0 manual 11.7) neither end a statement
    nor reach the server; ``--`` not followed by a space is an operator, and ``/*! */`` is
    kept because the server executes it."""
    sql = (
        "-- header; with a semicolon\n"
        "SELECT 1 -- trailing; note\n"
        "  , 2 # hash; note\n"
        "  , 3 /* block; note */ , 5--1;\n"
        "SELECT /*!50700 SQL_NO_CACHE */ 4;\n"
        "/* only a comment; */"
    )
    assert [" ".join(s.split()) for s in split_statements(sql)] == [
        "SELECT 1 , 2 , 3 , 5--1",
        "SELECT /*!50700 SQL_NO_CACHE */ 4",
    ]


def test_every_shipped_migration_splits_into_statements_the_server_accepts_as_written() -> None:
    """The shipped files keep their statement count: the splitter changes nothing for them."""
    counts = {m.version: len(m.statements()) for m in available_migrations()}
    assert counts[1] == 3 and counts[2] == 8 and counts[4] == 12


async def test_a_migration_with_a_semicolon_in_a_string_runs_on_the_server(db: aiomysql.Pool) -> None:
    """Run through MariaDB: the comment holding ``;`` arrives whole, as the file wrote it."""
    migration = Migration(
        version=9999,
        name="probe",
        sql=(
            "CREATE TEMPORARY TABLE split_probe (c INT COMMENT 'before; after');\n"
            "INSERT INTO split_probe VALUES (1);"
        ),
    )
    async with transaction(db) as cursor:
        for statement in migration.statements():
            await cursor.execute(statement)
        await cursor.execute("SHOW FULL COLUMNS FROM split_probe")
        columns = await cursor.fetchall()
        await cursor.execute("DROP TEMPORARY TABLE split_probe")
    assert columns[0][-1] == "before; after"


def test_a_request_row_of_the_wrong_type_is_refused_where_it_is_read() -> None:
    """A value of the wrong type (an amount as text) fails as the row is read, naming the
    field; built positionally it became a request whose amount was a string, sent on to a
    provider. ``_read_requests`` parks such a row instead of stopping its scan."""
    good = ("k-1", 7, 2, "sandbox", 999, "EUR", "pm_ok", None, '{"a": "b"}')
    assert request_from_row(good).metadata == {"a": "b"}
    with pytest.raises(msgspec.ValidationError, match="int"):
        request_from_row(("k-1", 7, 2, "sandbox", "999", "EUR", "pm_ok", None, None))


def test_a_subscription_row_is_decoded_by_name() -> None:
    """Each column lands on the field of its name, and one that may not be NULL is refused by
    that name (read by position, a NULL amount went unnoticed into the schedule)."""
    when = datetime(2026, 1, 31)
    row = (1, "active", None, "sandbox", "pm_ok", "visa", None, 999, "EUR", "month", 1, 2, when, 0)
    row += (when, when, None, 0, 0, None, None, None, None, None, None)
    sub = subscription_from_row(row)
    assert (sub.status, sub.interval_unit, sub.amount_minor, sub.next_attempt_at) == (
        SubscriptionStatus.ACTIVE,
        IntervalUnit.MONTH,
        999,
        when,
    )
    with pytest.raises(msgspec.ValidationError, match=r"amount_minor"):
        subscription_from_row((*row[:7], None, *row[8:]))


class _Probe(msgspec.Struct, array_like=True, frozen=True):
    number: int
    text: str | None
    moment: datetime
    state: AttemptState


async def test_rows_from_the_server_decode_into_typed_structs(db: aiomysql.Pool) -> None:
    """``fetch_all``/``fetch_one`` over what MariaDB really returns: integers, NULL, DATETIME(6)
    and an enum's text each become the field's type; a missing row is an error, not None."""
    async with transaction(db) as cursor:
        await cursor.execute("SELECT 1, NULL, NOW(6), 'unknown' UNION ALL SELECT 2, 'x', NOW(6), 'queued'")
        rows = await fetch_all(cursor, _Probe)
        await cursor.execute("SELECT COUNT(*), 'y', NOW(6), 'failed' FROM attempts WHERE id = -1")
        one = await fetch_one(cursor, _Probe)
        await cursor.execute("SELECT 1, 'z', NOW(6), 'failed' FROM attempts WHERE id = -1")
        with pytest.raises(LookupError):
            await fetch_one(cursor, _Probe)
    assert [(r.number, r.text, r.state) for r in rows] == [
        (1, None, AttemptState.UNKNOWN),
        (2, "x", AttemptState.QUEUED),
    ]
    assert isinstance(rows[0].moment, datetime) and one.number == 0 and one.state is AttemptState.FAILED


async def test_network_counters_are_read_by_name_as_integers(db: aiomysql.Pool) -> None:
    """The counters query decodes into its row struct: a MySQL SUM is a DECIMAL, so each count
    is cast to an integer in SQL, and the oldest decline is a datetime (NULL when none is in the
    window). Read by position, the DECIMALs went through ``int()`` one by one."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, provider, amount_minor, currency, payment_method, state, "
        "outcome, created_at) VALUES "
        "('nb-1', 'other_psp', 500, 'EUR', 'pm_rows', 'declined', 'soft_decline', NOW(6) - INTERVAL 2 HOUR), "
        "('nb-2', 'other_psp', 500, 'EUR', 'pm_rows', 'declined', 'hard_decline', NOW(6) - INTERVAL 3 DAY), "
        "('nb-3', 'other_psp', 500, 'EUR', 'pm_rows', 'queued', NULL, NOW(6) - INTERVAL 1 HOUR), "
        "('nb-4', 'other_psp', 700, 'EUR', 'pm_rows', 'unknown', 'unknown', NOW(6) - INTERVAL 1 HOUR), "
        "('nb-5', 'other_psp', 500, 'EUR', 'pm_rows', 'succeeded', 'approved', NOW(6) - INTERVAL 1 HOUR)",
    )
    async with transaction(db) as cursor:
        await cursor.execute("SELECT NOW(6)")
        (now,) = await cursor.fetchone()
        counters = await NetworkCounters.load(cursor, ["pm_rows", "pm_none"], now=now)
    counts = counters._counts
    assert set(counts) == {("pm_rows", 500, "EUR"), ("pm_rows", 700, "EUR")}
    five = counts[("pm_rows", 500, "EUR")]
    assert (five.declines_24h, five.declines_30d, five.pending_24h, five.pending_30d) == (1, 2, 1, 1)
    assert all(type(n) is int for n in (five.declines_24h, five.declines_30d, five.declines_before))
    assert five.oldest_24h is not None and now - five.oldest_24h > timedelta(hours=1)
    assert five.oldest_30d is not None and now - five.oldest_30d > timedelta(days=2)
    seven = counts[("pm_rows", 700, "EUR")]
    assert (seven.declines_30d, seven.pending_24h, seven.oldest_30d) == (0, 1, None)


async def test_existing_attempts_are_read_by_name(db: aiomysql.Pool) -> None:
    """A dispatch's look at keys it already has: the request and the state by name; a row with
    a request column of the wrong type is refused naming it instead of becoming a request."""
    await query(
        db,
        "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency, "
        "payment_method, metadata, state, outcome) VALUES "
        "('ex-1', 3, 2, 'sandbox', 999, 'EUR', 'pm_ok', '{\"a\": \"b\"}', 'declined', 'soft_decline')",
    )
    async with transaction(db) as cursor:
        found = await existing_attempts(cursor, ["ex-1", "ex-none"])
    assert list(found) == ["ex-1"]
    assert found["ex-1"].state is AttemptState.DECLINED
    request = found["ex-1"].request
    assert (request.subscription_id, request.cycle, request.amount_minor, request.metadata) == (
        3,
        2,
        999,
        {"a": "b"},
    )


async def test_a_lock_answer_is_read_by_name(db: aiomysql.Pool) -> None:
    """``GET_LOCK`` answers 1 or 0 through a row struct: the identity lock is held once, and a
    second holder of the same instance id is told it is not (and takes over nothing)."""
    settings = MySQLSettings(database=DATABASE, acquire_timeout_s=30)
    password = load_secret("mysql_password")
    metrics = Metrics()
    # The second waits out LOCK_WAIT_S for the lock before it answers 0.
    async with (
        instance_identity(settings, password, db, instance_id="rows-probe", metrics=metrics) as first,
        instance_identity(settings, password, db, instance_id="rows-probe", metrics=metrics) as second,
    ):
        assert (first, second) == (True, False)
