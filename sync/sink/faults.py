"""What a database error means for a run: wait and retry, stop, or set the row aside.

Pure functions of the exception, so every rule is tested on real errors without a run.
Each dialect reads its own driver's codes (sync.sink.dialects); what is left is decided
here, alike for every dialect.

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

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from sync.sink.dialects import DIALECTS, DatabaseFault

__all__ = ["DatabaseFault", "classify", "connection_lost", "database_unusable"]


def classify(error: BaseException) -> DatabaseFault | None:
    """What `error` means for the run; None when it is not a database error at all."""
    if isinstance(error, OSError):
        return DatabaseFault.OUTAGE
    if not isinstance(error, DBAPIError):
        return None
    if error.connection_invalidated:
        return DatabaseFault.OUTAGE
    for dialect in DIALECTS.values():
        fault = dialect.fault_of(error.orig)
        if fault is not None:
            return fault
    if isinstance(error, (OperationalError, InterfaceError)):
        return DatabaseFault.OUTAGE  # the driver's own: the connection broke
    return DatabaseFault.ROW


def connection_lost(error: BaseException) -> bool:
    """A database error worth retrying: the database is away, not the statement wrong."""
    return classify(error) is DatabaseFault.OUTAGE


def database_unusable(error: BaseException) -> bool:
    """The database cannot run the sync's statements: no row would be stored."""
    return classify(error) is DatabaseFault.UNUSABLE
