"""Alembic environment, async, for SQLite and PostgreSQL alike.

Two ways in: `testpress-sync migrate` hands over an open connection in
``config.attributes["connection"]``; a plain `alembic upgrade head` builds an engine from
TESTPRESS_DATABASE_URL (any URL form testpress-sync accepts).
"""

from __future__ import annotations

import asyncio
import logging.config
import os

from alembic import context
from sqlalchemy.engine import Connection

from schema.tables import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    from sync.sink.database import create_engine, database_url_from

    url = database_url_from(os.environ.get("TESTPRESS_DATABASE_URL", "sqlite:///testpress.db"))
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
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
