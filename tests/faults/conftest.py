"""Fixtures the fault tests share: a private MariaDB, and a pool on it for the test's own reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiomysql
import pytest

from tests.faults.mariadb import DATABASE, PrivateMariaDB, private_mariadb


@pytest.fixture
def mariadb() -> Iterator[PrivateMariaDB]:
    with private_mariadb() as server:
        yield server


@pytest.fixture
async def fault_db(mariadb: PrivateMariaDB) -> AsyncIterator[aiomysql.Pool]:
    pool = await aiomysql.create_pool(
        host="127.0.0.1", port=mariadb.port, user="payd", password="", db=DATABASE, autocommit=True, maxsize=2
    )
    yield pool
    pool.close()
    await pool.wait_closed()
