"""The schema: Alembic migrations on both dialects, and how a run treats a database."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import OPEN_STATES, SCHEMA_HEAD, metadata, sync_state
from schema.view_history import views_0002
from schema.views import VIEW_NAMES
from sync.errors import DatabaseError
from sync.model.plan import SyncState
from sync.sink.database import (
    VERSION_TABLE,
    create_engine,
    database_url_from,
    ensure_schema,
    migrate,
    migrations_dir,
    schema_state,
)
from sync.sink.store import columns_of, read_sync_state
from tests.conftest import fresh_postgres_database
from tests.helpers import downgrade_to, upgrade_to


def test_schema_head_constant_is_alembics_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


# What revision 0002 created, and 0003 downgrades to: views_0002 takes four of its views
# from schema/views.py, so a change to one of those there must freeze its 0002 text first.
VIEWS_0002_SHA256 = {
    "sqlite": "e588611d2a76323c33fef52fd049262c044b165c45c6ba136e605bae84ae230b",
    "postgresql": "0254f98f7b3b453fcd2ffc0644413a7ba85829639657c3ceba69d6a8b7bfaa6f",
}


def test_the_views_of_revision_0002_stay_as_0002_made_them() -> None:
    for dialect, digest in VIEWS_0002_SHA256.items():
        assert hashlib.sha256("\n".join(views_0002(dialect)).encode()).hexdigest() == digest, (
            f"views_0002({dialect!r}) changed: freeze the 0002 text of the view you changed in schema/view_history.py"
        )


def test_the_open_attempts_query_keeps_the_predicate_of_its_index() -> None:
    """SQLite uses the partial index ix_attempts_open only for a query whose predicate is
    the index's own text; databases migrated to 0004 keep 0004's, whatever the code says."""
    spec = importlib.util.spec_from_file_location("revision_0004", migrations_dir() / "versions" / "0004_open_attempts_index.py")
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    assert OPEN_STATES == revision.OPEN_STATES_0004


async def test_migrations_create_every_table_and_view(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
        views = set(await connection.run_sync(lambda c: inspect(c).get_view_names()))
        columns = {
            name: {column["name"] for column in await connection.run_sync(lambda c, n=name: inspect(c).get_columns(n))}
            for name in metadata.tables
        }
    assert set(metadata.tables) | {VERSION_TABLE} == tables
    assert set(VIEW_NAMES) <= views
    for name, table in metadata.tables.items():
        assert columns[name] == {column.name for column in table.columns}, name


async def test_an_empty_database_is_migrated_and_a_current_one_left_alone(database_url: str) -> None:
    engine = create_engine(database_url_from(database_url))
    try:
        before = await ensure_schema(engine)
        after = await ensure_schema(engine)
    finally:
        await engine.dispose()
    assert (before.current, before.empty) == (None, True)
    assert (after.current, after.up_to_date) == (SCHEMA_HEAD, True)


async def test_a_database_behind_is_brought_up_to_date(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'base-of-nothing'"))
    with pytest.raises(DatabaseError, match="does not know"):
        await migrate(engine)
    async with engine.begin() as connection:
        await connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '{SCHEMA_HEAD}'"))
    assert (await schema_state(engine)).up_to_date


async def test_downgraded_database_is_migrated_back_by_a_run(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(downgrade_to("base"))
        await connection.commit()
    state = await ensure_schema(engine)
    assert state.current is None and (await schema_state(engine)).up_to_date


async def test_0005_keeps_the_incremental_state_and_records_no_rules_yet(engine: AsyncEngine) -> None:
    """A database at 0004 keeps its watermark through 0005; the rules are unknown (null)
    until the next full walk records them, so no run is made a full walk for the upgrade."""
    moment = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    async with engine.connect() as connection:
        await connection.run_sync(downgrade_to("0004"))
        await connection.execute(
            text("INSERT INTO sync_state (resource, watermark, last_full_at, updated_at) VALUES ('attempts', :at, :at, :at)"),
            {"at": moment if engine.dialect.name == "postgresql" else "2026-12-01 02:00:00.000000"},
        )
        await connection.commit()
    assert (await migrate(engine))[1] == SCHEMA_HEAD
    async with engine.connect() as connection:
        state = await read_sync_state(connection, "attempts")
    assert state == SyncState(watermark=moment, last_full_at=moment, rules=None)
    # And back: the state stays, the rules go.
    async with engine.connect() as connection:
        await connection.execute(text("UPDATE sync_state SET rules = 'recorded'"))
        await connection.run_sync(downgrade_to("0004"))
        await connection.commit()
        columns = await columns_of(connection, sync_state)
        assert "rules" not in columns
        assert await read_sync_state(connection, "attempts", columns) == SyncState(watermark=moment, last_full_at=moment)


async def test_0007_names_the_admin_attempts_stored_before_it(engine: AsyncEngine) -> None:
    """Before 0007 admin attempts kept a null username; the upgrade fills in the one users
    holds for their user_id, and leaves alone a name already there or a user not stored."""
    at = "'2026-12-01 02:00:00'"
    async with engine.connect() as connection:
        await connection.run_sync(downgrade_to("0006"))
        for statement in (
            f"INSERT INTO users (username, user_id, first_seen_at, last_seen_at) VALUES ('asha', 7, {at}, {at})",
            f"INSERT INTO exams (id, raw, content_hash, first_seen_at, last_seen_at) VALUES (1, '{{}}', 'h', {at}, {at})",
            *(f"INSERT INTO attempts (id, exam_id, username, user_id, raw, content_hash, first_seen_at, last_seen_at) "
              f"VALUES ({ident}, 1, {name}, {user_id}, '{{}}', 'h', {at}, {at})"
              for ident, name, user_id in ((1, "NULL", 7), (2, "NULL", 8), (3, "'bob'", 7), (4, "'carl'", "NULL"))),
        ):  # fmt: skip
            await connection.execute(text(statement))
        await connection.commit()
    assert (await migrate(engine))[1] == SCHEMA_HEAD
    async with engine.connect() as connection:
        names = dict((await connection.execute(text("SELECT id, username FROM attempts"))).all())
    assert names == {1: "asha", 2: None, 3: "bob", 4: "carl"}


def _schema_fingerprint(connection: Connection) -> dict[str, Any]:
    """Everything about a schema that a migration could get wrong, as comparable data."""
    inspector = inspect(connection)
    found: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        found[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table),
            "foreign keys": sorted(map(repr, inspector.get_foreign_keys(table))),
            # A partial index's predicate is SQL text (a TextClause): compared as text.
            "indexes": sorted(
                repr({**index, "dialect_options": {key: str(value) for key, value in index.get("dialect_options", {}).items()}})
                for index in inspector.get_indexes(table)
            ),
            "unique": sorted(map(repr, inspector.get_unique_constraints(table))),
        }
    for view in sorted(inspector.get_view_names()):
        found[f"view {view}"] = inspector.get_view_definition(view)
    if connection.dialect.name == "sqlite":  # the DDL itself, word for word
        found["sqlite_master"] = [
            # A table that a migration rebuilt was renamed into place, and SQLite then
            # writes its name quoted: the same identifier, so the quotes are dropped.
            (kind, name, table, re.sub(rf'^CREATE TABLE "{name}" \(', f"CREATE TABLE {name} (", sql or ""))
            for kind, name, table, sql in connection.exec_driver_sql(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
            ).all()
        ]
    found["revision"] = connection.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
    return found


async def test_a_new_database_gets_exactly_the_schema_the_migrations_build(
    database_url: str, tmp_path: Path
) -> None:
    """An empty database is created from the table definitions and stamped (no Alembic
    import); that must equal running every migration from base."""

    async def fingerprint(url: str, *, through_alembic: bool) -> dict[str, Any]:
        engine = create_engine(database_url_from(url))
        try:
            if through_alembic:
                async with engine.connect() as connection:
                    await connection.run_sync(upgrade_to("head"))
                    await connection.commit()
            else:
                await migrate(engine)
            async with engine.connect() as connection:
                return await connection.run_sync(_schema_fingerprint)
        finally:
            await engine.dispose()

    created = await fingerprint(database_url, through_alembic=False)
    if database_url.startswith("sqlite"):
        migrated = await fingerprint(f"sqlite:///{tmp_path / 'migrated.db'}", through_alembic=True)
    else:
        with fresh_postgres_database() as other:
            migrated = await fingerprint(other, through_alembic=True)
    assert set(created) >= set(metadata.tables) | {f"view {name}" for name in VIEW_NAMES}
    assert created == migrated


async def test_foreign_tables_are_refused(database_url: str) -> None:
    engine = create_engine(database_url_from(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE exams (id INTEGER PRIMARY KEY, name TEXT)"))
        with pytest.raises(DatabaseError, match="did not create"):
            await ensure_schema(engine)
    finally:
        await engine.dispose()


async def test_a_0001_database_with_data_is_upgraded_keeping_every_row(database_url: str) -> None:
    """Upgrading rebuilds tables on SQLite: rows, keys and foreign keys survive it."""
    engine = create_engine(database_url_from(database_url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(upgrade_to("0001"))
            await connection.commit()
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO exams (id, slug, raw, content_hash, first_seen_at, last_seen_at) "
                "VALUES (7, 'mock-7', '{}', 'h', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            ))
            await connection.execute(text(
                "INSERT INTO attempts (id, exam_id, username, raw, content_hash, first_seen_at, last_seen_at) "
                "VALUES (70, 7, 'asha', '{}', 'h', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            ))
            await connection.execute(text(
                "INSERT INTO users (username, user_id, first_seen_at, last_seen_at) "
                "VALUES ('asha', 77, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            ))
        await migrate(engine)
        async with engine.connect() as connection:
            exam = (await connection.execute(text("SELECT id, slug, source FROM exams"))).one()
            attempt = (await connection.execute(text("SELECT id, exam_id, result FROM attempts"))).one()
            user = (await connection.execute(text("SELECT username, user_id, email FROM users"))).one()
            rows = (await connection.execute(text("SELECT exam_id, attempt_count FROM exam_summary"))).all()
        assert (tuple(exam), tuple(attempt), tuple(user)) == ((7, "mock-7", None), (70, 7, None), ("asha", 77, None))
        assert [tuple(row) for row in rows] == [(7, 1)]
        assert (await schema_state(engine)).up_to_date
    finally:
        await engine.dispose()
