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

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

from sync.errors import error_text
from sync.sink.dialects import DIALECTS, DatabaseFault

__all__ = ["DatabaseFault", "classify", "connection_lost", "database_unusable", "in_own_transaction"]

log = structlog.get_logger("testpress_sync.database")
T = TypeVar("T")


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


def _database_retrying(seconds: float) -> AsyncRetrying:
    """Tries of a transaction while the database is away (OUTAGE), for `seconds` at most,
    each on a fresh connection, logged; any other error ends them at once."""
    return AsyncRetrying(
        retry=retry_if_exception(connection_lost),
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=_log_database_retry,
        reraise=True,
    )


async def in_own_transaction(engine: AsyncEngine, seconds: float, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """`work` in a transaction of its own, tried again while the database is away: the
    bookkeeping around a run rides out what its batches ride out."""
    async for attempt in _database_retrying(seconds):
        with attempt:
            async with engine.begin() as connection:
                return await work(connection)
    raise AssertionError("unreachable: tenacity reraises the last error")


def _log_database_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("database_unreachable_retrying", error=error_text(error) if error else None,
                attempt=state.attempt_number, wait=round(state.upcoming_sleep, 2))  # fmt: skip
