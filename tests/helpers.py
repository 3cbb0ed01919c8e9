"""Shared test helpers: one sync run in-process, and what the server says should be stored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schema import attempts, exams, sync_errors
from sync.config import Settings
from sync.model.resources import ATTEMPTS, EXAMS
from sync.model.run import RowCounts
from sync.ops.logs import Redactor
from sync.run import RunOptions, RunSummary, run_sync
from sync.simulator import SimulatorServer
from sync.sink.database import create_engine, database_url_from, ensure_schema
from sync.sink.writer import write_payloads
from sync.source.client import TestpressClient, open_session
from tests.conftest import fast_settings

T = TypeVar("T")

DEFAULT_RUN = RunOptions()


async def sync_once(
    simulator: SimulatorServer, database_url: str, options: RunOptions = DEFAULT_RUN, **http: Any
) -> RunSummary:
    settings = fast_settings(simulator.base_url, database_url, **http)
    return await sync_with(settings, options)


async def sync_with(settings: Settings, options: RunOptions = DEFAULT_RUN) -> RunSummary:
    engine = create_engine(database_url_from(settings.database_url))
    try:
        await ensure_schema(engine)
        async with open_session(settings.api, settings.http) as session:
            client = TestpressClient(session, settings.api, settings.http, Redactor())
            return await run_sync(engine, client, settings, Redactor(), options)
    finally:
        await engine.dispose()


def _utc(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(UTC)


async def stored_rows(engine: AsyncEngine) -> tuple[dict[int, Any], dict[int, Any]]:
    async with engine.connect() as connection:
        exam_rows = {row.id: row for row in (await connection.execute(select(exams))).all()}
        attempt_rows = {row.id: row for row in (await connection.execute(select(attempts))).all()}
    return exam_rows, attempt_rows


async def assert_matches_server(engine: AsyncEngine, simulator: SimulatorServer) -> None:
    """Every live exam and attempt the server serves is stored, with the served values;
    nothing else is live."""
    dataset, base = simulator.dataset, simulator.base_url
    exam_rows, attempt_rows = await stored_rows(engine)
    live_exams = {exam_id for exam_id, row in exam_rows.items() if row.deleted_at is None}
    assert live_exams == {exam.id for exam in dataset.exams}
    expected_attempts: set[int] = set()
    for exam in dataset.exams:
        payload = dataset.exam_payload(exam, base)
        row = exam_rows[exam.id]
        assert row.raw == payload
        assert (row.slug, row.title, row.course) == (payload["slug"], payload["title"], payload["course"])
        assert row.start_date == _utc(payload["start_date"]) and row.end_date == _utc(payload["end_date"])
        assert row.created == _utc(payload["created"])
        assert row.negative_marks == Decimal(payload["negative_marks"])
        assert row.attempts_status == ("forbidden" if exam.forbidden else "not_found" if exam.vanished else "ok")
        if exam.forbidden or exam.vanished:
            continue
        for attempt in exam.attempts:
            served = dataset.attempt_payload(exam, attempt, base)
            stored = attempt_rows[attempt.id]
            expected_attempts.add(attempt.id)
            assert stored.raw == served
            assert stored.exam_id == exam.id and stored.deleted_at is None
            assert stored.username == served["user"]["username"] and stored.user_id == served["user"]["id"]
            assert stored.state == served["state"] and stored.date == _utc(served["date"])
            assert stored.score == Decimal(str(served["score"]))
            assert stored.percentile == Decimal(str(served["percentile"]))
            assert stored.rank == (None if served["rank"] == "NA" else served["rank"])
    live_attempts = {
        attempt_id
        for attempt_id, row in attempt_rows.items()
        if row.deleted_at is None and row.exam_id in {e.id for e in dataset.exams if not (e.forbidden or e.vanished)}
    }
    assert live_attempts == expected_attempts


async def error_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return (await connection.execute(select(sync_errors).order_by(sync_errors.c.id))).all()


async def one_value(engine: AsyncEngine, statement: Any) -> Any:
    """The single value `statement` selects."""
    async with engine.connect() as connection:
        return (await connection.execute(statement)).scalar_one()


def on_engine(database_url: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """`work(engine)` on a fresh engine and event loop, for tests that are not async
    (those that drive the CLI); the engine is disposed afterwards."""

    async def run() -> T:
        engine = create_engine(database_url_from(database_url))
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def select_rows(database_url: str, statement: Any) -> list[Any]:
    async def fetch(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as connection:
            return list((await connection.execute(statement)).all())

    return on_engine(database_url, fetch)


def select_value(database_url: str, statement: Any) -> Any:
    rows = select_rows(database_url, statement)
    return rows[0][0] if rows else None


async def upsert_exams(connection: AsyncConnection, rows: Iterable[Mapping[str, Any]], now: datetime) -> RowCounts:
    """Exams (normalized rows, by their payloads) through the writer's one write path."""
    items = {row["id"]: (None, row["raw"]) for row in rows}
    return (await write_payloads(connection, EXAMS, items, now)).counts


async def upsert_attempts(connection: AsyncConnection, rows: Iterable[Mapping[str, Any]], now: datetime) -> RowCounts:
    """Attempts (normalized rows, by their payloads) through the writer's one write path."""
    items = {row["id"]: (row["exam_id"], row["raw"]) for row in rows}
    return (await write_payloads(connection, ATTEMPTS, items, now)).counts


def upgrade_to(revision: str) -> Callable[[Connection], None]:
    """For `connection.run_sync`: Alembic's upgrade of that connection's database to
    `revision` (an older schema, for the tests of what a migration does to it)."""
    return _alembic("upgrade", revision)


def downgrade_to(revision: str) -> Callable[[Connection], None]:
    """For `connection.run_sync`: Alembic's downgrade of that connection's database to
    `revision` ("base": no schema at all)."""
    return _alembic("downgrade", revision)


def _alembic(direction: str, revision: str) -> Callable[[Connection], None]:
    from alembic.config import Config

    from alembic import command
    from sync.sink.database import migrations_dir

    def run(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)

    return run
