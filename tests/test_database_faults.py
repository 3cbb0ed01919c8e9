"""How database errors are told apart: real errors from real SQLite and real PostgreSQL.

SQLite reports a missing column and a busy file with the same exception class
(OperationalError), so these tests provoke each error for real and check what the writer
would make of it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sync.sink.faults import DatabaseFault, classify, connection_lost, database_unusable


def insert_user(username: str) -> str:
    return (
        "INSERT INTO users (username, first_seen_at, last_seen_at) "
        f"VALUES ('{username}', '2024-01-01', '2024-01-01')"
    )


async def error_of(engine: AsyncEngine, *statements: str) -> DBAPIError:
    """The error the last of `statements` raises, in a transaction rolled back after."""
    async with engine.connect() as connection:
        for statement in statements[:-1]:
            await connection.execute(text(statement))
        with pytest.raises(DBAPIError) as caught:
            await connection.execute(text(statements[-1]))
        await connection.rollback()
    return caught.value


async def test_a_missing_table_or_column_makes_the_database_unusable(engine: AsyncEngine) -> None:
    missing_table = await error_of(engine, "INSERT INTO attempt_rows (id) VALUES (1)")
    missing_column = await error_of(engine, "INSERT INTO users (username, nickname) VALUES ('a', 'b')")
    for error in (missing_table, missing_column):
        assert classify(error) is DatabaseFault.UNUSABLE, error
        assert database_unusable(error) and not connection_lost(error)


async def test_a_row_the_database_refuses_is_the_rows_fault(engine: AsyncEngine) -> None:
    duplicate = await error_of(engine, insert_user("twice"), insert_user("twice"))
    missing_exam = await error_of(
        engine,
        "INSERT INTO attempts (id, exam_id, raw, content_hash, first_seen_at, last_seen_at) "
        "VALUES (1, 999, '{}', 'x', '2024-01-01', '2024-01-01')",
    )
    for error in (duplicate, missing_exam):
        assert classify(error) is DatabaseFault.ROW, error
        assert not database_unusable(error) and not connection_lost(error)


async def test_a_trigger_that_fails_on_some_rows_is_the_rows_fault(engine: AsyncEngine) -> None:
    async def refusing_trigger(connection: AsyncConnection) -> None:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the institute''s trigger'; END $$"
            ))  # fmt: skip
            await connection.execute(text(
                "CREATE TRIGGER refused BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse()"
            ))  # fmt: skip
        else:  # SQLite's generic SQLITE_ERROR, as an overflow in a trigger's arithmetic raises
            await connection.execute(text(
                "CREATE TRIGGER refused BEFORE INSERT ON users "
                "BEGIN SELECT abs(-9223372036854775807 - 1); END"
            ))  # fmt: skip

    async with engine.begin() as connection:
        await refusing_trigger(connection)
    error = await error_of(engine, insert_user("someone"))
    assert classify(error) is DatabaseFault.ROW, error


async def test_a_database_that_may_not_be_written_is_unusable(engine: AsyncEngine, tmp_path: Path) -> None:
    if engine.dialect.name == "postgresql":
        error = await error_of(engine, "SET TRANSACTION READ ONLY", insert_user("a"))
    else:
        read_only = create_async_engine(f"sqlite+aiosqlite:///file:{engine.url.database}?mode=ro&uri=true")
        try:
            error = await error_of(read_only, insert_user("a"))
        finally:
            await read_only.dispose()
    assert classify(error) is DatabaseFault.UNUSABLE, error


async def test_a_locked_sqlite_file_is_an_outage_worth_waiting_for(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (n INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")  # another program writing, past our busy timeout
    impatient = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0})
    try:
        error = await error_of(impatient, "INSERT INTO t VALUES (1)")
    finally:
        await impatient.dispose()
        holder.close()
    assert "locked" in str(error.orig)
    assert classify(error) is DatabaseFault.OUTAGE and connection_lost(error)


def test_an_unopenable_sqlite_file_is_an_outage(tmp_path: Path) -> None:
    # The folder is not there: a volume not mounted yet, say. Provoked with the sqlite3
    # module and wrapped as SQLAlchemy wraps it: aiosqlite's thread for a connection that
    # never opened outlives the test's loop.
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect(tmp_path / "unmounted" / "sync.db")
    error = DBAPIError.instance(None, None, caught.value, sqlite3.Error)
    assert isinstance(error, DBAPIError) and caught.value.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN
    assert classify(error) is DatabaseFault.OUTAGE


@pytest.mark.parametrize(
    ("error", "fault"),
    [(ConnectionResetError("reset by peer"), DatabaseFault.OUTAGE), (ValueError("not ours"), None)],
)
def test_errors_that_are_not_the_drivers(error: BaseException, fault: DatabaseFault | None) -> None:
    assert classify(error) is fault

