"""Dashboard views and the schema reference: the same answers on SQLite and PostgreSQL,
and the right ones."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import metadata
from sync.model.admin_rows import PiiPolicy
from sync.model.resources import ATTEMPT_DETAILS, admin_resources
from sync.model.run import utc_now
from sync.simulator import SimulatorServer
from sync.simulator.admin import attempt_detail
from sync.sink.database import create_engine, database_url_from
from sync.sink.writer import write_payloads
from tests.conftest import fresh_postgres_database
from tests.helpers import sync_once

DOCS = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
ORDER = {
    "exam_summary": "exam_id",
    "user_results": "username, exam_id",
    "attempts_per_day": "day, exam_id",
    # By name: a subject's id may be null, and the databases sort nulls apart.
    "subject_performance": "exam_id, subject_name",
    "student_subjects": "user_id, subject_name",
}


def comparable(value: Any) -> Any:
    """One spelling for both databases: text timestamps and days, numbers to 4 places."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, (Decimal, float)):
        return round(float(value), 4)
    if hasattr(value, "isoformat"):  # a PostgreSQL DATE
        return value.isoformat()
    return value


@pytest.fixture
async def both(simulator: SimulatorServer, tmp_path: Path) -> AsyncIterator[dict[str, AsyncEngine]]:
    """The same synced data in SQLite and in PostgreSQL."""
    with fresh_postgres_database() as postgres_url:
        urls = {"sqlite": f"sqlite:///{tmp_path / 'views.db'}", "postgresql": postgres_url}
        engines = {}
        for kind, url in urls.items():
            summary = await sync_once(simulator, url)
            assert summary.status == "succeeded"
            engines[kind] = create_engine(database_url_from(url))
            await add_attempt_details(simulator, engines[kind])
        try:
            yield engines
        finally:
            for engine in engines.values():
                await engine.dispose()


async def add_attempt_details(simulator: SimulatorServer, engine: AsyncEngine) -> None:
    """Each stored attempt's details, as the admin detail route serves them, through the
    writer's write path: the subject views and their examples need rows. (The sync above
    reads the student API, whose attempts the exam summary is checked against; an admin
    run would add the attempts of the exams this login may not see.)"""
    dataset, base = simulator.dataset, simulator.base_url
    items = {
        attempt.id: (None, attempt_detail(dataset, exam, attempt, base))
        for exam in dataset.exams
        if not (exam.forbidden or exam.vanished)
        for attempt in exam.attempts
    }
    details = admin_resources(PiiPolicy())[ATTEMPT_DETAILS]
    async with engine.begin() as connection:
        outcome = await write_payloads(connection, details, items, utc_now())
    assert outcome.counts.inserted == len(items) and not outcome.malformed


async def rows(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        return [tuple(comparable(v) for v in row) for row in (await connection.exec_driver_sql(sql)).all()]


@pytest.mark.parametrize("view", sorted(ORDER))
async def test_each_view_gives_the_same_answer_on_both_databases(both: dict[str, AsyncEngine], view: str) -> None:
    sql = f"SELECT * FROM {view} ORDER BY {ORDER[view]}"
    on_sqlite, on_postgres = await rows(both["sqlite"], sql), await rows(both["postgresql"], sql)
    assert on_sqlite and on_sqlite == on_postgres


async def test_exam_summary_matches_the_served_data(both: dict[str, AsyncEngine], simulator: SimulatorServer) -> None:
    dataset, base = simulator.dataset, simulator.base_url
    for engine in both.values():
        summary = {
            row[0]: row
            for row in await rows(engine, "SELECT exam_id, attempt_count, distinct_users, completed_count, best_score, completion_rate FROM exam_summary")
        }
        for exam in dataset.exams:
            served = [] if exam.forbidden else [dataset.attempt_payload(exam, a, base) for a in exam.attempts]
            completed = [p for p in served if p["state"] == "Completed"]
            best = max((float(p["score"]) for p in completed), default=None)
            rate = round(len(completed) / len(served), 4) if served else None
            users = len({p["user"]["username"] for p in served})
            assert summary[exam.id] == (exam.id, len(served), users, len(completed), best, rate)


async def test_user_results_add_up_to_the_attempts(both: dict[str, AsyncEngine]) -> None:
    for engine in both.values():
        (total,) = await rows(engine, "SELECT SUM(attempt_count) FROM user_results")
        (attempts,) = await rows(engine, "SELECT COUNT(*) FROM attempts WHERE deleted_at IS NULL")
        assert total == attempts


async def test_student_subjects_leave_out_the_attempts_of_deleted_exams(
    both: dict[str, AsyncEngine], simulator: SimulatorServer
) -> None:
    """As every view does (revision 0006; 0002's counted them)."""
    exam = next(exam for exam in simulator.dataset.exams if not (exam.forbidden or exam.vanished) and exam.attempts)
    live_pairs = """
        SELECT COUNT(*) FROM (SELECT DISTINCT a.user_id, a.username, s.subject_id, s.subject_name, s.attempt_id
        FROM attempt_subjects s JOIN attempts a ON a.id = s.attempt_id AND a.deleted_at IS NULL
        JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL) AS pairs"""
    for engine in both.values():
        (before,) = await rows(engine, "SELECT SUM(attempt_count) FROM student_subjects")
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE exams SET deleted_at = last_seen_at WHERE id = :id"), {"id": exam.id})
        (after,) = await rows(engine, "SELECT SUM(attempt_count) FROM student_subjects")
        (expected,) = await rows(engine, live_pairs)
        assert after == expected < before


# --- the schema reference ------------------------------------------------------------------


def test_schema_reference_documents_every_column() -> None:
    document = DOCS.read_text()
    for name, table in metadata.tables.items():
        section = document.split(f"### {name} ")[1].split("\n### ")[0]
        for column in table.columns:
            assert re.search(rf"^\| {column.name}\b|, {column.name}\b", section, re.MULTILINE), f"{name}.{column.name}"


def sql_examples() -> list[tuple[str, str]]:
    return re.findall(r"```sql ?(\w*)\n(.*?)```", DOCS.read_text(), re.DOTALL)


async def test_every_example_query_runs(both: dict[str, AsyncEngine]) -> None:
    examples = sql_examples()
    assert len(examples) >= 6
    for dialect, sql in examples:
        targets = [dialect] if dialect else list(both)
        answers = [await rows(both[target], sql) for target in targets]
        if not dialect:
            assert answers[0] == answers[1], sql
        assert answers[0] or "this week" in sql or "now()" in sql or "'now'" in sql, sql
