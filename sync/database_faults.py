"""What a database error means for a run: wait and retry, stop, or set the row aside.

Pure functions of the exception, so every rule is tested on real errors without a run.

    OUTAGE    the database is away or busy for now (a lost connection, a locked or
              unreadable file): the writer retries the whole transaction
    UNUSABLE  the database cannot run the sync's own statements (a table or column
              missing, no permission to write, a read-only or corrupt file): every row
              would fail the same way, so the run stops at once and says why
    ROW       the database refused something in this batch (a constraint of the user's
              own, a value it cannot hold): the writer writes the batch again row by
              row and records the rows it refuses in sync_errors
"""

from __future__ import annotations

import enum

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError


class DatabaseFault(enum.Enum):
    OUTAGE = "outage"
    UNUSABLE = "unusable"
    ROW = "row"


# SQLite's primary result codes (the low byte of sqlite3.Error.sqlite_errorcode).
# SQLite reports a wrong statement and a busy file alike as OperationalError, so the
# code, not the class, tells them apart.
_SQLITE_OUTAGE = frozenset({
    5,  # BUSY: another connection holds the lock past busy_timeout
    6,  # LOCKED
    7,  # NOMEM
    10,  # IOERR: the disk or the network file system failed
    13,  # FULL: the disk is full; space may come back
    14,  # CANTOPEN: the file or its folder is not there (an unmounted volume)
    15,  # PROTOCOL: a locking race
})  # fmt: skip
_SQLITE_ROW = frozenset({
    18,  # TOOBIG: a value larger than the database allows
    19,  # CONSTRAINT: a CHECK, NOT NULL, UNIQUE, foreign key or trigger of the user's
    20,  # MISMATCH: a value of the wrong type for the column
    25,  # RANGE
})  # fmt: skip
# The rest (ERROR: no such table or column; PERM, READONLY, AUTH; CORRUPT, NOTADB) mean
# the database cannot take the sync's writes at all. One exception: SQLITE_ERROR also
# comes from a user's trigger that fails on some rows only (an integer overflow in its
# arithmetic); those messages do not name a missing table or column.
_SQLITE_SCHEMA_TEXT = ("no such table", "no such column", "has no column named", "no such function")

# PostgreSQL SQLSTATE prefixes. Away: 08 connection exceptions, 57P operator intervention
# (shutdown, restart, cannot connect now), 53 insufficient resources, 55000 the database
# not accepting connections. Unusable: 42 a statement naming what does not exist, or
# that the user may not run; 25006 a read-only transaction (a standby, a read-only user).
_POSTGRES_OUTAGE = ("08", "57P", "53", "55000")
_POSTGRES_UNUSABLE = ("42", "25006")


def classify(error: BaseException) -> DatabaseFault | None:
    """What `error` means for the run; None when it is not a database error at all."""
    if isinstance(error, OSError):
        return DatabaseFault.OUTAGE
    if not isinstance(error, DBAPIError):
        return None
    if error.connection_invalidated:
        return DatabaseFault.OUTAGE
    sqlite_code = getattr(error.orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        return _sqlite_fault(sqlite_code & 0xFF, str(error.orig))
    sqlstate = getattr(error.orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_POSTGRES_OUTAGE):
        return DatabaseFault.OUTAGE
    if isinstance(sqlstate, str) and sqlstate.startswith(_POSTGRES_UNUSABLE):
        return DatabaseFault.UNUSABLE
    if isinstance(error, (OperationalError, InterfaceError)):
        return DatabaseFault.OUTAGE  # the driver's own: the connection broke
    return DatabaseFault.ROW


def _sqlite_fault(code: int, message: str) -> DatabaseFault:
    if code in _SQLITE_OUTAGE:
        return DatabaseFault.OUTAGE
    if code in _SQLITE_ROW:
        return DatabaseFault.ROW
    if code == 1 and not any(text in message for text in _SQLITE_SCHEMA_TEXT):
        return DatabaseFault.ROW  # a user's trigger failing on this row
    return DatabaseFault.UNUSABLE


def connection_lost(error: BaseException) -> bool:
    """A database error worth retrying: the database is away, not the statement wrong."""
    return classify(error) is DatabaseFault.OUTAGE


def database_unusable(error: BaseException) -> bool:
    """The database cannot run the sync's statements: no row would be stored."""
    return classify(error) is DatabaseFault.UNUSABLE
