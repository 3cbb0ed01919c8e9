"""The database: URLs, engines, schema state, migrations and the one-run-at-a-time lock
(each dialect's own part of these lives in sync.sink.dialects).

Users write the URLs they know (`sqlite:///sync.db`, `postgresql://user@host/db`); we
pick the async driver. The schema is Alembic's: a run on an empty database creates it,
on one that is behind migrates it, and refuses anything it does not recognise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

import schema
from schema import SCHEMA_HEAD
from schema.views import VIEW_NAMES, create_view_statements
from sync.errors import ConfigError, DatabaseError, error_text
from sync.sink.dialects import Dialect, dialect_for_scheme, dialect_named


def database_url_from(text_url: str) -> URL:
    """A user's database URL with the async driver this tool uses."""
    try:
        url = make_url(text_url)
    except ArgumentError:
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL {text_url!r} is not a database URL; "
            "use sqlite:///path.db or postgresql://user@host/db"
        ) from None
    dialect = dialect_for_scheme(url.drivername)
    if dialect is None:
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL: {url.drivername!r} is not supported; "
            "use sqlite:///path.db or postgresql://user@host/db"
        )
    return url.set(drivername=dialect.async_driver)


def dialect_of_url(url: URL) -> Dialect:
    return dialect_named(url.get_backend_name())


def missing_database_file(url: URL) -> Path | None:
    """The database file a read-only command would otherwise create empty, if it is missing."""
    return dialect_of_url(url).missing_file(url)


def describe(url: URL) -> str:
    """The URL for messages and logs: the password hidden."""
    return url.render_as_string(hide_password=True)


def _orjson_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: URL) -> AsyncEngine:
    return dialect_of_url(url).create_engine(url, _orjson_text, orjson.loads)


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


def run_lock(engine: AsyncEngine) -> AbstractAsyncContextManager[None]:
    """Hold the database's run lock, or raise LockHeldError at once. The lock dies with
    the process, so a killed run never leaves one behind."""
    return dialect_of_url(engine.url).run_lock(engine)
