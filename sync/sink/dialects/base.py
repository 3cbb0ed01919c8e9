"""What a database dialect must provide. Everything that differs between SQLite and
PostgreSQL lives in one module per dialect beside this one; the store, the writer and
the database module ask the dialect and never name one.

A new dialect is one module that subclasses `Dialect`, registered in `__init__.py`,
plus its tests.
"""

from __future__ import annotations

import enum
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Table
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import TypeEngine

from schema.types import RawJSON
from sync.errors import error_text

Converter = Callable[[Any], Any]

# The engine's execution option that carries `[database] schema`: engines and their
# connections carry it along, so whatever holds one can tell which schema it is for.
SCHEMA_OPTION = "testpress_schema"
# The execution option of an engine whose transactions write after they read (the
# nightly writer's: stored digests, then upserts). A dialect whose database has a single
# writer takes the write lock when such a transaction begins (sqlite.py), so that another
# writer (the webhook receiver) is waited for rather than failing the transaction.
WRITES_OPTION = "testpress_writes"


def connect_error_text(error: BaseException) -> str:
    """One line for a connection that failed, with what to check where the driver's own
    words leave it open (a timeout says nothing; a refused certificate names no setting)."""
    text = error_text(error)
    original = getattr(error, "orig", None) or error
    if isinstance(original, ssl.SSLCertVerificationError):
        return f"{text} (is sslrootcert the CA that signed the server's certificate, for this host name?)"
    if isinstance(original, TimeoutError):
        return "TimeoutError: no answer in time (connect_timeout in the URL; 60 s if not given)"
    return text


def configured_schema(bind: AsyncEngine | Connection) -> str | None:
    """The schema the engine was made for (`[database] schema`), None if it was not set."""
    schema = bind.get_execution_options().get(SCHEMA_OPTION)
    return schema if isinstance(schema, str) else None


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class DatabaseFault(enum.Enum):
    """What a database error means for a run (see sync.sink.faults)."""

    OUTAGE = "outage"
    UNUSABLE = "unusable"
    ROW = "row"


class Dialect(ABC):
    name: str  # SQLAlchemy's name of the dialect
    async_driver: str  # the drivername this tool connects with
    url_schemes: frozenset[str]  # the drivernames users may write in a URL

    # --- statements ----------------------------------------------------------------------

    @abstractmethod
    def placeholders(self, count: int) -> list[str]:
        """`count` bound-parameter markers in the driver's own style."""

    def converter(self, column_type: TypeEngine[Any]) -> Converter | None:
        """How a value of `column_type` is turned into what the driver takes (None: as is).
        JSON goes as its text on every dialect: statements run on the driver, which does
        not serialize (the `raw` column's text is made once, by the writer)."""
        if isinstance(column_type, RawJSON):
            return _json_text
        return None

    def stamp(self, moment: datetime) -> Any:
        """A timestamp as the driver takes it."""
        return moment

    def upsert_sql(
        self,
        table: str,
        names: Sequence[str],
        key: str,
        refreshed: Sequence[str],
        *,
        kept: Sequence[str] = (),
        revived: bool = False,
        where: str = "",
    ) -> str:
        """INSERT of `names`; when `key` exists, `refreshed` are set from the new row,
        `kept` too unless the new row has null there, `deleted_at` is cleared if `revived`,
        and all of it only if `where` (SQL, the stored row by the table's name, the new one
        as `excluded`) holds."""
        sets = [f"{name} = excluded.{name}" for name in refreshed]
        sets += [f"{name} = COALESCE(excluded.{name}, {table}.{name})" for name in kept]
        if revived:
            sets.append("deleted_at = NULL")
        return (
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(self.placeholders(len(names)))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}{f' WHERE {where}' if where else ''}"
        )

    @abstractmethod
    async def run(self, connection: AsyncConnection, method: str, sql: str, parameters: Any) -> Any:
        """`sql` (in this dialect's placeholders) as aiosqlite's `method` names it:
        "execute", "executemany" (a list of rows) or "execute_fetchall" (returns the rows).
        Errors are SQLAlchemy's DBAPIError, as from any other statement."""

    @abstractmethod
    async def lookup(
        self, connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
    ) -> list[Any]:
        """(key, *columns) of the rows whose `key` is among `keys` (a few thousand at most)."""

    # --- values it cannot hold -----------------------------------------------------------

    def holds_nul(self) -> bool:
        """Whether text and JSON columns can hold a NUL character."""
        return True

    # --- connections, locks, errors ------------------------------------------------------

    def check_url(self, url: URL) -> None:
        """Raise ConfigError for what in `url` this dialect cannot honour."""
        return None

    @abstractmethod
    def create_engine(
        self,
        url: URL,
        json_serializer: Callable[[Any], str],
        json_deserializer: Callable[[Any], Any],
        schema: str | None = None,
    ) -> AsyncEngine:
        """An engine for `url`, tuned for this dialect, whose tables live in `schema`
        (None: where the database puts them by default)."""

    def create_schema(self, connection: Connection) -> None:
        """Create the engine's schema if it is missing, before the tables are created in it."""
        return None

    @abstractmethod
    def run_lock(self, engine: AsyncEngine) -> AbstractAsyncContextManager[None]:
        """Held for a whole run; raises LockHeldError at once if another run holds it."""

    @abstractmethod
    def fault_of(self, driver_error: BaseException | None) -> DatabaseFault | None:
        """What an error of this dialect's driver means; None if it is not this driver's."""

    def missing_file(self, url: URL) -> Any:
        """For a file database: the file a read-only command would otherwise create."""
        return None
