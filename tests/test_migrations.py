"""The schema: Alembic migrations on both dialects, and how a run treats a database."""

from __future__ import annotations

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import SCHEMA_HEAD, metadata
from schema.views import VIEW_NAMES
from sync.database import (
    create_engine,
    database_url_from,
    ensure_schema,
    migrate,
    migrations_dir,
    schema_state,
)
from sync.errors import DatabaseError


def test_schema_head_constant_is_alembics_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


async def test_migrations_create_every_table_and_view(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
        views = set(await connection.run_sync(lambda c: inspect(c).get_view_names()))
        columns = {
            name: {column["name"] for column in await connection.run_sync(lambda c, n=name: inspect(c).get_columns(n))}
            for name in metadata.tables
        }
    assert set(metadata.tables) | {"alembic_version"} == tables
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
        await connection.execute(text("UPDATE alembic_version SET version_num = 'base-of-nothing'"))
    with pytest.raises(DatabaseError, match="does not know"):
        await migrate(engine)
    async with engine.begin() as connection:
        await connection.execute(text(f"UPDATE alembic_version SET version_num = '{SCHEMA_HEAD}'"))
    assert (await schema_state(engine)).up_to_date


async def test_downgraded_database_is_migrated_back_by_a_run(engine: AsyncEngine) -> None:
    from alembic import command

    def downgrade(connection: object) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    async with engine.connect() as connection:
        await connection.run_sync(downgrade)
        await connection.commit()
    state = await ensure_schema(engine)
    assert state.current is None and (await schema_state(engine)).up_to_date


async def test_foreign_tables_are_refused(database_url: str) -> None:
    engine = create_engine(database_url_from(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE exams (id INTEGER PRIMARY KEY, name TEXT)"))
        with pytest.raises(DatabaseError, match="did not create"):
            await ensure_schema(engine)
    finally:
        await engine.dispose()
