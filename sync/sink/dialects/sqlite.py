"""SQLite, the embedded default: aiosqlite, `?n` placeholders, timestamps and decimals as
text, a file lock for the run, and SQLite's result codes for errors."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Date, Table, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeEngine

from schema.types import ExactDecimal, UTCDateTime
from sync.errors import ConfigError, DatabaseError, LockHeldError
from sync.sink.dialects.base import WRITES_OPTION, Converter, DatabaseFault, Dialect

# SQLite's primary result codes (the low byte of sqlite3.Error.sqlite_errorcode).
# SQLite reports a wrong statement and a busy file alike as OperationalError, so the
# code, not the class, tells them apart.
_OUTAGE = frozenset({
    5,  # BUSY: another connection holds the lock past busy_timeout
    6,  # LOCKED
    7,  # NOMEM
    10,  # IOERR: the disk or the network file system failed
    13,  # FULL: the disk is full; space may come back
    14,  # CANTOPEN: the file or its folder is not there (an unmounted volume)
    15,  # PROTOCOL: a locking race
})  # fmt: skip
_ROW = frozenset({
    18,  # TOOBIG: a value larger than the database allows
    19,  # CONSTRAINT: a CHECK, NOT NULL, UNIQUE, foreign key or trigger of the user's
    20,  # MISMATCH: a value of the wrong type for the column
    25,  # RANGE
})  # fmt: skip
# The rest (ERROR: no such table or column; PERM, READONLY, AUTH; CORRUPT, NOTADB) mean
# the database cannot take the sync's writes at all. One exception: SQLITE_ERROR also
# comes from a user's trigger that fails on some rows only (an integer overflow in its
# arithmetic); those messages do not name a missing table or column.
_SCHEMA_TEXT = ("no such table", "no such column", "has no column named", "no such function")


def sqlite_timestamp(value: datetime | None) -> str | None:
    # SQLAlchemy's own SQLite DateTime text, so Core reads these back as datetimes.
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # "YYYY-MM-DD HH:MM:SS.ffffff", no zone. %-formatting of the fields takes 0.55 µs,
    # isoformat() 0.78 (it formats the zone, then we cut it): three per attempt.
    return _STAMP % (value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond)


_STAMP = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def _date_text(value: date | None) -> str | None:
    return None if value is None else value.isoformat()


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


class SQLite(Dialect):
    name = "sqlite"
    async_driver = "sqlite+aiosqlite"
    url_schemes = frozenset({"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"})

    def placeholders(self, count: int) -> list[str]:
        # Numbered, as PostgreSQL's are: a statement may name one value twice (a webhook
        # delivery's user_id, to look its username up in users).
        return [f"?{n}" for n in range(1, count + 1)]

    def converter(self, column_type: TypeEngine[Any]) -> Converter | None:
        if isinstance(column_type, UTCDateTime):
            return sqlite_timestamp
        if isinstance(column_type, ExactDecimal):
            return _text_or_none  # NUMERIC affinity parses the exact decimal text
        if isinstance(column_type, Date):
            return _date_text  # SQLAlchemy's own SQLite DATE text
        return super().converter(column_type)

    def stamp(self, moment: datetime) -> Any:
        return sqlite_timestamp(moment)

    # SQLAlchemy's aiosqlite adapter spends four hops to its driver thread on a statement
    # (open a cursor, execute, fetch, close it): ~230 µs of CPU, against ~45 µs for
    # aiosqlite's own execute_fetchall or executemany in one hop. So a batch's lookups,
    # upserts and marks go to the driver connection directly, inside the transaction that
    # SQLAlchemy began on it: 12% less CPU for a first run at zero latency.
    async def run(self, connection: AsyncConnection, method: str, sql: str, parameters: Any) -> Any:
        driver = (await connection.get_raw_connection()).driver_connection
        try:
            return await getattr(driver, method)(sql, parameters)
        except sqlite3.Error as error:
            # Wrapped as SQLAlchemy wraps it, so the writer tells outages from refused
            # rows the same way on every path.
            raise DBAPIError.instance(
                sql, None, error, sqlite3.Error, hide_parameters=True, dialect=connection.dialect
            ) from error

    async def lookup(
        self, connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
    ) -> list[Any]:
        marks = ", ".join("?" * len(keys))
        sql = f"SELECT {key}, {columns} FROM {table.name} WHERE {key} IN ({marks})"
        return list(await self.run(connection, "execute_fetchall", sql, tuple(keys)))

    def create_engine(
        self,
        url: URL,
        json_serializer: Callable[[Any], str],
        json_deserializer: Callable[[Any], Any],
        schema: str | None = None,
    ) -> AsyncEngine:
        if schema is not None:
            # Refused, not ignored: whoever sets it expects the tables kept apart, and a
            # SQLite file has no schemas to keep them in (one file per institute does that).
            raise ConfigError(
                "database.schema (TESTPRESS_DATABASE_SCHEMA) is a PostgreSQL setting; SQLite has no "
                "schemas: unset it, or give each institute a database file of its own"
            )
        engine = create_async_engine(
            url,
            json_serializer=json_serializer,
            json_deserializer=json_deserializer,
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _pragmas)
        event.listen(engine.sync_engine, "begin", _begin)
        return engine

    @asynccontextmanager
    async def run_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        """flock on a file beside the database: it dies with the process, so a killed run
        never leaves a lock behind."""
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(database).with_name(Path(database).name + ".lock")
        if not lock_path.parent.is_dir():
            raise DatabaseError(
                f"the folder {lock_path.parent} of the SQLite database does not exist: "
                "create it, or point TESTPRESS_DATABASE_URL at another path"
            )
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeldError(f"another testpress-sync run is writing to {database}") from None
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(descriptor)

    def fault_of(self, driver_error: BaseException | None) -> DatabaseFault | None:
        code = getattr(driver_error, "sqlite_errorcode", None)
        if not isinstance(code, int):
            return None
        code &= 0xFF
        if code in _OUTAGE:
            return DatabaseFault.OUTAGE
        if code in _ROW:
            return DatabaseFault.ROW
        if code == 1 and not any(text in str(driver_error) for text in _SCHEMA_TEXT):
            return DatabaseFault.ROW  # a user's trigger failing on this row
        return DatabaseFault.UNUSABLE

    def missing_file(self, url: URL) -> Path | None:
        database = url.database
        if not database or database == ":memory:":
            return None
        path = Path(database)
        return None if path.exists() else path


_CACHE_KIB = 8192  # per connection; the writer's is the one that fills it


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The sqlite3 module opens transactions on its own, late (at the first write) and
    # not for SAVEPOINT; we turn that off and BEGIN ourselves (below), so a transaction
    # spans all its statements and savepoints work. (SQLAlchemy's documented recipe.)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: dashboards can read while a sync writes. Foreign keys are off by default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # SQLite's default page cache is 2 MB: too small to keep the attempts' indexes hot once
    # they pass a few hundred MB, and every miss is a read syscall. 8 MB took a W2 full
    # walk's system CPU from 2.8 to 1.6 s (the username index grows in random order).
    cursor.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    cursor.close()


def _begin(connection: Any) -> None:
    # A deferred transaction that reads, then writes, fails at once (SQLITE_BUSY, busy
    # timeout or not) if another connection committed in between; IMMEDIATE takes the
    # write lock up front, waiting for the other writer (the webhook receiver) instead.
    immediate = connection.get_execution_options().get(WRITES_OPTION)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
