"""The database: URLs, engines, migrations and the one-run-at-a-time lock.

Users write the URLs they know (`sqlite:///sync.db`, `postgresql://user@host/db`); we
pick the async driver. The schema is Alembic's: a run on an empty database creates it,
on one that is behind migrates it, and refuses anything it does not recognise.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, event, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import schema
from schema import SCHEMA_HEAD
from schema.views import VIEW_NAMES, create_view_statements
from sync.errors import ConfigError, DatabaseError, LockHeldError, error_text

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
# Any number that is ours alone: the key of the PostgreSQL advisory lock.
_PG_LOCK_KEY = 0x7E57_5915


def database_url_from(text_url: str) -> URL:
    """A user's database URL with the async driver this tool uses."""
    try:
        url = make_url(text_url)
    except ArgumentError:
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL {text_url!r} is not a database URL; "
            "use sqlite:///path.db or postgresql://user@host/db"
        ) from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL: {url.drivername!r} is not supported; "
            "use sqlite:///path.db or postgresql://user@host/db"
        )
    return url.set(drivername=driver)


def missing_sqlite_file(url: URL) -> Path | None:
    """The SQLite file a read-only command would otherwise create empty, if it is missing."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    path = Path(database)
    return None if path.exists() else path


def describe(url: URL) -> str:
    """The URL for messages and logs: the password hidden."""
    return url.render_as_string(hide_password=True)


def _orjson_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: URL) -> AsyncEngine:
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(
            url,
            json_serializer=_orjson_text,
            json_deserializer=orjson.loads,
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        url,
        json_serializer=_orjson_text,
        json_deserializer=orjson.loads,
        pool_size=4,
        pool_pre_ping=True,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
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
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


# --- migrations --------------------------------------------------------------------------


def migrations_dir() -> Path:
    """The Alembic folder: beside the package in a checkout, inside it in a wheel."""
    here = Path(schema.__file__).resolve().parent
    for candidate in (here.parent / "alembic", here / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError(f"the Alembic migrations are missing (looked beside {here})")


def _alembic_config() -> Any:
    # Alembic is imported only when a migration is due: it costs a quarter of a second
    # of start-up that a nightly run on a current schema does not need.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's Alembic revision, None if it has none
    head: str  # the newest revision this version of the tool knows
    has_tables: bool  # any table at all, ours or not
    known: bool  # the current revision is one of ours

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def empty(self) -> bool:
        return self.current is None and not self.has_tables


def _read_schema_state(connection: Connection) -> SchemaState:
    tables = inspect(connection).get_table_names()
    current = None
    if "alembic_version" in tables:
        current = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return SchemaState(
        current=current,
        head=SCHEMA_HEAD,
        has_tables=bool(set(tables) - {"alembic_version"}),
        known=current is None or current == SCHEMA_HEAD or _is_our_revision(current),
    )


def _is_our_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for a revision it has never heard of
        return False


def _upgrade(connection: Connection) -> None:
    from alembic import command

    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def schema_state(engine: AsyncEngine) -> SchemaState:
    async with _connected(engine) as connection:
        return await connection.run_sync(_read_schema_state)


def _missing_parts(connection: Connection) -> list[str]:
    inspector = inspect(connection)
    present = set(inspector.get_table_names())
    missing = []
    for table in schema.metadata.sorted_tables:
        if table.name not in present:
            missing.append(f"table {table.name}")
            continue
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [f"column {table.name}.{column.name}" for column in table.columns if column.name not in columns]
    views = set(inspector.get_view_names())
    missing += [f"view {name}" for name in VIEW_NAMES if name not in views]
    return missing


async def missing_schema_parts(engine: AsyncEngine) -> list[str]:
    """The tables, columns and dashboard views of the head schema that the database lacks
    (renamed or dropped by hand, say); empty when it has them all. Tables, columns and
    views of the user's own are allowed."""
    async with _connected(engine) as connection:
        return await connection.run_sync(_missing_parts)


def _create_head_schema(connection: Connection) -> None:
    """An empty database gets the head schema from the table definitions, stamped at head.

    This is Alembic's own recipe for a new database (create_all, then `stamp head`),
    done without importing Alembic: a quarter of a second of every first run. A test
    proves the result identical to running every migration, on both dialects."""
    schema.metadata.create_all(connection)
    for statement in create_view_statements(connection.dialect.name):
        connection.exec_driver_sql(statement)
    # Alembic's version table, defined as Alembic defines it.
    version = Table(
        "alembic_version",
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(connection, checkfirst=True)
    connection.execute(version.insert().values(version_num=SCHEMA_HEAD))


async def migrate(engine: AsyncEngine) -> tuple[str | None, str]:
    """Bring the schema to head; returns (revision before, revision after)."""
    state = await schema_state(engine)
    _refuse_foreign(state)
    if not state.up_to_date:
        async with _connected(engine) as connection:
            await connection.run_sync(_create_head_schema if state.empty else _upgrade)
            await connection.commit()
    return state.current, state.head


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool = True) -> SchemaState:
    """Make sure the run writes to the schema it was built for."""
    state = await schema_state(engine)
    _refuse_foreign(state)
    if not state.up_to_date:
        if not auto_migrate:
            raise DatabaseError(
                f"the database schema is at revision {state.current}, this tool needs "
                f"{state.head}: run `testpress-sync migrate`"
            )
        await migrate(engine)
    return state


def _refuse_foreign(state: SchemaState) -> None:
    if not state.known:
        raise DatabaseError(
            f"the database schema is at revision {state.current!r}, which this version of "
            "testpress-sync does not know (a newer version migrated it): upgrade testpress-sync"
        )
    if state.current is None and state.has_tables:
        raise DatabaseError(
            "the database already holds tables that testpress-sync did not create; "
            "point TESTPRESS_DATABASE_URL at an empty database or one made by testpress-sync"
        )


@asynccontextmanager
async def _connected(engine: AsyncEngine) -> AsyncIterator[Any]:
    try:
        async with engine.connect() as connection:
            yield connection
    except (OperationalError, DBAPIError, OSError) as exc:
        raise DatabaseError(f"database {describe(engine.url)}: {error_text(exc)}") from exc


# --- one run at a time -------------------------------------------------------------------


@asynccontextmanager
async def run_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold the database's run lock, or raise LockHeldError at once.

    PostgreSQL: a session advisory lock on a connection held for the run. SQLite: flock
    on a file beside the database. Both die with the process, so a killed run never
    leaves a lock behind.
    """
    if engine.url.get_backend_name() == "postgresql":
        async with _connected(engine) as connection:
            got = (await connection.execute(text(f"SELECT pg_try_advisory_lock({_PG_LOCK_KEY})"))).scalar()
            await connection.commit()
            if not got:
                raise LockHeldError(f"another testpress-sync run is writing to {describe(engine.url)}")
            try:
                yield
            finally:
                await connection.execute(text(f"SELECT pg_advisory_unlock({_PG_LOCK_KEY})"))
                await connection.commit()
        return
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
