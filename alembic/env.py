"""Alembic environment, async, for SQLite and PostgreSQL alike.

Two ways in: `testpress-sync migrate` hands over an open connection in
``config.attributes["connection"]``; a plain `alembic upgrade head` builds an engine from
TESTPRESS_DATABASE_URL (any URL form testpress-sync accepts) and TESTPRESS_DATABASE_SCHEMA.

The revision is kept in the tool's own version table (VERSION_TABLE), not in
alembic_version, which other applications in the same database may use.
"""

from __future__ import annotations

import asyncio
import logging.config
import os

from sqlalchemy.engine import Connection

from alembic import context
from schema.tables import metadata
from sync.sink.database import VERSION_TABLE

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # Unqualified: it goes where the tables go, the connection's schema (search_path).
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    from sync.sink.database import create_engine, database_url_from, prepare_for_alembic

    url = database_url_from(os.environ.get("TESTPRESS_DATABASE_URL", "sqlite:///testpress.db"))
    engine = create_engine(url, schema=os.environ.get("TESTPRESS_DATABASE_SCHEMA"))
    try:
        async with engine.connect() as connection:
            # `testpress-sync migrate` does these before it hands over its connection.
            await connection.run_sync(prepare_for_alembic)
            await connection.run_sync(_configure_and_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")

_connection = config.attributes.get("connection")
if _connection is None:
    asyncio.run(_run_with_own_engine())
else:
    _configure_and_run(_connection)
