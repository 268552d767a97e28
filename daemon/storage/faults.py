"""What a database error means for the batch that met it, in a failover.

Every such error already releases its batch (the claim requeues it, the record
retries it) and closes the connection it happened on; this table says which
errors also mean the pool's other connections are suspect. A primary that turned
read-only was demoted: behind a virtual IP or DNS name, connections opened before
the switch still reach it, so they are dropped and the next ones reach the new
primary.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Final

import pymysql


class DbFault(enum.StrEnum):
    LOST_CONNECTION = "lost_connection"
    """The server went away mid-statement: the transaction did not commit; try again elsewhere."""
    READ_ONLY = "read_only"
    """This server no longer takes writes: it was demoted; every idle connection to it is stale."""
    CONFLICT = "conflict"
    """A deadlock, a lock wait timeout or a cluster certification failure: rolled back, retryable."""


# Server and client error numbers, from the MariaDB and MySQL references:
# https://mariadb.com/kb/en/mariadb-error-code-reference/ and
# https://dev.mysql.com/doc/mysql-errors/8.0/en/server-error-reference.html (client: CR_*).
FAULTS: Final[dict[int, DbFault]] = {
    2002: DbFault.LOST_CONNECTION,  # CR_CONNECTION_ERROR
    2003: DbFault.LOST_CONNECTION,  # CR_CONN_HOST_ERROR: the address does not answer (yet)
    2006: DbFault.LOST_CONNECTION,  # CR_SERVER_GONE_ERROR
    2013: DbFault.LOST_CONNECTION,  # CR_SERVER_LOST
    2055: DbFault.LOST_CONNECTION,  # CR_SERVER_LOST_EXTENDED
    1927: DbFault.LOST_CONNECTION,  # ER_CONNECTION_KILLED (MariaDB)
    4031: DbFault.LOST_CONNECTION,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
    1053: DbFault.LOST_CONNECTION,  # ER_SERVER_SHUTDOWN
    1290: DbFault.READ_ONLY,  # ER_OPTION_PREVENTS_STATEMENT (--read-only, --super-read-only)
    1792: DbFault.READ_ONLY,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    1836: DbFault.READ_ONLY,  # ER_READ_ONLY_MODE
    1213: DbFault.CONFLICT,  # ER_LOCK_DEADLOCK; also Galera's certification failure
    1205: DbFault.CONFLICT,  # ER_LOCK_WAIT_TIMEOUT
    3101: DbFault.CONFLICT,  # ER_TRANSACTION_ROLLBACK_DURING_COMMIT (Group Replication conflict)
    1047: DbFault.CONFLICT,  # ER_UNKNOWN_COM_ERROR: a Galera node outside the primary component
}


def classify(error: BaseException) -> DbFault | None:
    """The failover meaning of ``error``, or None for an error that is not about the server's state."""
    if isinstance(error, OSError | asyncio.TimeoutError | pymysql.err.InterfaceError):
        return DbFault.LOST_CONNECTION  # InterfaceError: the connection was already closed
    if isinstance(error, pymysql.err.MySQLError) and error.args and isinstance(error.args[0], int):
        return FAULTS.get(error.args[0])
    return None
