"""The database: URLs, engines, schema state, migrations and the one-run-at-a-time lock
(each dialect's own part of these lives in sync.sink.dialects).

Users write the URLs they know (`sqlite:///sync.db`, `postgresql://user@host/db`); we
pick the async driver. The schema is Alembic's, its revision kept in a version table of
the tool's own (VERSION_TABLE), so the tool shares a warehouse with other applications and
their Alembic: a run on an empty database creates the schema, on one that is behind
migrates it, and refuses only what it cannot write to (a newer revision; a table of
another application with one of its tables' names). Tables of other names are left alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, func, inspect, select
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

import schema
from schema import SCHEMA_HEAD
from schema.views import VIEW_NAMES, create_view_statements
from sync.errors import ConfigError, DatabaseError
from sync.sink.dialects import Dialect, dialect_for_scheme, dialect_named
from sync.sink.dialects.base import configured_schema, connect_error_text

log = structlog.get_logger("testpress_sync.database")

# The tool's own Alembic version table. Alembic's default, alembic_version, is shared by
# every application in a database that uses Alembic, and holds one of them at a time.
VERSION_TABLE = "testpress_sync_version"
# Where versions of the tool before VERSION_TABLE recorded the revision.
LEGACY_VERSION_TABLE = "alembic_version"
# The tool's names: a relation of one of these names that the tool did not make blocks it.
OUR_NAMES = frozenset(schema.metadata.tables) | frozenset(VIEW_NAMES)
# Tables that every revision of the schema has had: with these beside it, a revision of
# ours in alembic_version is the tool's (another application's could be named "0001" too).
_SIGNATURE_TABLES = frozenset({"exams", "attempts", "sync_runs"})


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
    url = url.set(drivername=dialect.async_driver)
    dialect.check_url(url)  # an unknown parameter is a usage error, said before anything runs
    return url


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


def create_engine(url: URL, schema: str | None = None) -> AsyncEngine:
    """An engine for `url` whose tables, views and version table live in `schema`
    (`[database] schema`; PostgreSQL only), None or "" for the database's default."""
    return dialect_of_url(url).create_engine(url, _orjson_text, orjson.loads, schema=schema or None)


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
    current: str | None  # the database's revision of the tool's schema, None if it has none
    head: str  # the newest revision this version of the tool knows
    present: tuple[str, ...]  # the tool's table and view names that exist (OUR_NAMES)
    known: bool  # the current revision is one of ours
    legacy: bool = False  # the revision is recorded in alembic_version, not VERSION_TABLE

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def empty(self) -> bool:
        return self.current is None and not self.present

    @property
    def clash(self) -> bool:
        """Tables of the tool's names that the tool has no record of making."""
        return self.current is None and bool(self.present)


def _read_schema_state(connection: Connection) -> SchemaState:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    present = tuple(sorted(OUR_NAMES & (tables | set(inspector.get_view_names()))))
    current, legacy = None, False
    if VERSION_TABLE in tables:
        current = connection.execute(select(_version_table().c.version_num)).scalar()
    elif LEGACY_VERSION_TABLE in tables and tables >= _SIGNATURE_TABLES:
        current = _our_legacy_revision(connection)
        legacy = current is not None
    return SchemaState(
        current=current,
        head=SCHEMA_HEAD,
        present=present,
        known=current is None or current == SCHEMA_HEAD or _is_our_revision(current),
        legacy=legacy,
    )


def _version_table(name: str = VERSION_TABLE) -> Table:
    """A version table as Alembic defines one (alembic.ddl.impl.version_table_impl)."""
    return Table(
        name,
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name=f"{name}_pkc"),
    )


def _our_legacy_revision(connection: Connection) -> str | None:
    """The revision of ours in alembic_version, if one of its rows is (another
    application's rows, and a revision we do not know, are theirs)."""
    legacy = _version_table(LEGACY_VERSION_TABLE)
    revisions = connection.execute(select(legacy.c.version_num)).scalars().all()
    return next((revision for revision in revisions if revision == SCHEMA_HEAD or _is_our_revision(revision)), None)


def _adopt_legacy_version(connection: Connection, revision: str) -> None:
    """Move our revision from alembic_version to VERSION_TABLE, in the caller's
    transaction; drop alembic_version if no other application's row is left in it."""
    legacy = _version_table(LEGACY_VERSION_TABLE)
    version = _version_table()
    version.create(connection, checkfirst=True)
    connection.execute(version.insert().values(version_num=revision))
    connection.execute(legacy.delete().where(legacy.c.version_num == revision))
    if not connection.execute(select(func.count()).select_from(legacy)).scalar():
        legacy.drop(connection)


def prepare_for_alembic(connection: Connection) -> None:
    """What `alembic upgrade` by hand needs before it runs: the configured schema, and our
    revision in VERSION_TABLE if an older version of the tool left it in alembic_version."""
    state = _read_schema_state(connection)
    if state.empty:
        dialect_named(connection.dialect.name).create_schema(connection)
    if state.legacy and state.current is not None:
        _adopt_legacy_version(connection, state.current)


def _is_our_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for a revision it has never heard of
        return False


def _upgrade(connection: Connection) -> None:
    # env.py keeps the revision in VERSION_TABLE.
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
    dialect_named(connection.dialect.name).create_schema(connection)
    schema.metadata.create_all(connection)
    for statement in create_view_statements(connection.dialect.name):
        connection.exec_driver_sql(statement)
    version = _version_table()
    version.create(connection, checkfirst=True)
    connection.execute(version.insert().values(version_num=SCHEMA_HEAD))


def _bring_to_head(connection: Connection, state: SchemaState) -> None:
    if state.legacy and state.current is not None:
        _adopt_legacy_version(connection, state.current)
    if state.empty:
        _create_head_schema(connection)
    elif not state.up_to_date:
        _upgrade(connection)


async def migrate(engine: AsyncEngine) -> tuple[str | None, str]:
    """Bring the schema to head; returns (revision before, revision after)."""
    state = await schema_state(engine)
    _refuse_foreign(state, engine)
    if state.legacy or not state.up_to_date:
        async with _connected(engine) as connection:
            await connection.run_sync(_bring_to_head, state)
            await connection.commit()
        if state.legacy:
            log.info("version_record_moved", database=describe(engine.url), revision=state.current,
                     source=LEGACY_VERSION_TABLE, target=VERSION_TABLE)  # fmt: skip
    return state.current, state.head


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool = True) -> SchemaState:
    """Make sure the run writes to the schema it was built for. Without auto_migrate (a
    dry run) nothing is written: a database behind is refused, and a revision recorded in
    alembic_version stays there until a run that may write."""
    state = await schema_state(engine)
    _refuse_foreign(state, engine)
    if not auto_migrate:
        if not state.up_to_date:
            raise DatabaseError(
                f"the database schema is at revision {state.current}, this tool needs "
                f"{state.head}: run `testpress-sync migrate`"
            )
        return state
    if state.legacy or not state.up_to_date:
        await migrate(engine)
    return state


def describe_engine(engine: AsyncEngine) -> str:
    """The database for messages: its URL, and the schema when one is configured."""
    schema_name = configured_schema(engine)
    return describe(engine.url) + (f" (schema {schema_name})" if schema_name else "")


def _refuse_foreign(state: SchemaState, engine: AsyncEngine) -> None:
    if not state.known:
        raise DatabaseError(
            f"the database schema is at revision {state.current!r}, which this version of "
            "testpress-sync does not know (a newer version migrated it): upgrade testpress-sync"
        )
    if state.clash:
        names = ", ".join(state.present)
        raise DatabaseError(
            f"{describe_engine(engine)} already has {names}, which testpress-sync did not create (there is "
            f"no {VERSION_TABLE} record): another application's tables have the tool's names. "
            f"Remedy: {clash_remedy(engine.dialect.name)}; tables of other names are left alone"
        )


def clash_remedy(dialect_name: str) -> str:
    if dialect_name == "postgresql":
        return (
            "set [database] schema (TESTPRESS_DATABASE_SCHEMA) to give testpress-sync a schema of "
            "its own, or point TESTPRESS_DATABASE_URL at another database"
        )
    return "point TESTPRESS_DATABASE_URL at another database file"


@asynccontextmanager
async def _connected(engine: AsyncEngine) -> AsyncIterator[Any]:
    try:
        async with engine.connect() as connection:
            yield connection
    except (OperationalError, DBAPIError, OSError) as exc:
        raise DatabaseError(f"database {describe(engine.url)}: {connect_error_text(exc)}") from exc


# --- one run at a time -------------------------------------------------------------------


def run_lock(engine: AsyncEngine) -> AbstractAsyncContextManager[None]:
    """Hold the database's run lock, or raise LockHeldError at once. The lock dies with
    the process, so a killed run never leaves one behind."""
    return dialect_of_url(engine.url).run_lock(engine)
