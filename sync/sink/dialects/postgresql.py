"""PostgreSQL: asyncpg, `$n` placeholders, a session advisory lock for the run, NUL
characters dropped, and SQLSTATE classes for errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sync.errors import DatabaseError, LockHeldError, error_text
from sync.sink.dialects.base import DatabaseFault, Dialect

# Any number that is ours alone: the key of the advisory lock.
_LOCK_KEY = 0x7E57_5915
# SQLSTATE prefixes. Away: 08 connection exceptions, 57P operator intervention
# (shutdown, restart, cannot connect now), 53 insufficient resources, 55000 the database
# not accepting connections. Unusable: 42 a statement naming what does not exist, or
# that the user may not run; 25006 a read-only transaction (a standby, a read-only user).
_OUTAGE = ("08", "57P", "53", "55000")
_UNUSABLE = ("42", "25006")


class PostgreSQL(Dialect):
    name = "postgresql"
    async_driver = "postgresql+asyncpg"
    url_schemes = frozenset(
        {"postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+asyncpg"}
    )

    def placeholders(self, count: int) -> list[str]:
        return [f"${n}" for n in range(1, count + 1)]

    # asyncpg takes aware datetimes, Decimals and ints as they are: no converters.

    async def run(self, connection: AsyncConnection, method: str, sql: str, parameters: Any) -> Any:
        # exec_driver_sql: the asyncpg adapter is what opens the transaction, and its
        # overhead per statement is a fifth of SQLite's adapter's.
        result = await connection.exec_driver_sql(sql, parameters)
        return result.all() if method == "execute_fetchall" else None

    async def lookup(
        self, connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
    ) -> list[Any]:
        # A join, not `key = ANY($1)`: PostgreSQL soon runs a prepared statement with a
        # generic plan made while the table was small, a sequential scan that compares
        # every row with every key (10 ms a batch for 2,000 users, where the join takes a
        # fraction of one, whatever the plan).
        kind = table.c[key].type.compile(dialect=connection.dialect)
        sql = (
            f"SELECT t.{key}, {columns} FROM {table.name} AS t "
            f"JOIN unnest($1::{kind}[]) AS wanted (key) ON t.{key} = wanted.key"
        )
        return list((await connection.exec_driver_sql(sql, (list(keys),))).all())

    def holds_nul(self) -> bool:
        return False  # text and jsonb cannot hold a NUL character

    def create_engine(
        self, url: URL, json_serializer: Callable[[Any], str], json_deserializer: Callable[[Any], Any]
    ) -> AsyncEngine:
        return create_async_engine(
            url,
            json_serializer=json_serializer,
            json_deserializer=json_deserializer,
            pool_size=4,
            pool_pre_ping=True,
        )

    @asynccontextmanager
    async def run_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        """A session advisory lock on a connection held for the run: it dies with the
        connection, so a killed run never leaves a lock behind."""
        try:
            connection = await engine.connect()
        except (OperationalError, DBAPIError, OSError) as exc:
            where = engine.url.render_as_string(hide_password=True)
            raise DatabaseError(f"database {where}: {error_text(exc)}") from exc
        try:
            got = (await connection.execute(text(f"SELECT pg_try_advisory_lock({_LOCK_KEY})"))).scalar()
            await connection.commit()
            if not got:
                where = engine.url.render_as_string(hide_password=True)
                raise LockHeldError(f"another testpress-sync run is writing to {where}")
            try:
                yield
            finally:
                await connection.execute(text(f"SELECT pg_advisory_unlock({_LOCK_KEY})"))
                await connection.commit()
        finally:
            await connection.close()

    def fault_of(self, driver_error: BaseException | None) -> DatabaseFault | None:
        sqlstate = getattr(driver_error, "sqlstate", None)
        if not isinstance(sqlstate, str):
            return None
        if sqlstate.startswith(_OUTAGE):
            return DatabaseFault.OUTAGE
        if sqlstate.startswith(_UNUSABLE):
            return DatabaseFault.UNUSABLE
        return None  # the class of the error decides (sync.sink.faults)
