"""Reading and writing SQL text and rows: the migration splitter, rows decoded by name and type."""

from __future__ import annotations

import aiomysql

from daemon.storage.db import transaction
from daemon.storage.migrate import Migration, available_migrations
from daemon.storage.sqlsplit import split_statements


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
