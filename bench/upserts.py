"""Upsert throughput on the attempts table, beside a plain executemany insert as the floor."""

from __future__ import annotations

import time
from dataclasses import replace

from sqlalchemy import text

from schema import attempts
from sync.model.normalize import AttemptRow, attempt_row, exam_row
from sync.model.resources import ATTEMPTS, EXAMS
from sync.simulator import Dataset
from sync.sink.database import create_engine, database_url_from, migrate
from sync.sink.writer import write_payloads

BATCH = 500


def generated_rows(count: int) -> tuple[list[dict], list[AttemptRow]]:
    dataset = Dataset(exams=max(1, count // 100), attempts_per_exam=100, users=2000)
    base = "http://127.0.0.1:9"
    exams_rows, rows = [], []
    for exam in dataset.exams:
        exams_rows.append(exam_row(dataset.exam_payload(exam, base)))
        rows.extend(attempt_row(dataset.attempt_payload(exam, a, base), exam.id)[0] for a in exam.attempts)
    return exams_rows, rows[:count]


async def measure_upserts(database_url: str, count: int) -> tuple[float, float, float]:
    """Rows/s for: first upsert, unchanged re-upsert, plain executemany insert."""
    from datetime import UTC, datetime

    exam_rows, rows = generated_rows(count)
    engine = create_engine(database_url_from(database_url))
    try:
        await migrate(engine)
        now = datetime.now(UTC)
        async with engine.begin() as connection:
            await write_payloads(connection, EXAMS, {row["id"]: (None, row["raw"]) for row in exam_rows}, now)
        # The writer's path with normalizing taken out: the rows are normalized already.
        by_id = {row["id"]: row for row in rows}
        normalized = replace(ATTEMPTS, normalize=lambda payload, _exam: (by_id[payload["id"]], (), ()))
        items = [(row["id"], (row["exam_id"], row["raw"])) for row in rows]

        async def upsert_all() -> float:
            started = time.perf_counter()
            for start in range(0, len(items), BATCH):
                async with engine.begin() as connection:
                    await write_payloads(connection, normalized, dict(items[start : start + BATCH]), now)
            return len(rows) / (time.perf_counter() - started)

        first = await upsert_all()
        again = await upsert_all()
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM attempts"))
        # The floor: the same rows through SQLAlchemy Core's executemany, no conflict check.
        stamped = [
            {**row, "content_hash": "-", "first_seen_at": now, "last_seen_at": now} for row in rows
        ]
        started = time.perf_counter()
        for start in range(0, len(stamped), BATCH):
            async with engine.begin() as connection:
                await connection.execute(attempts.insert(), stamped[start : start + BATCH])
        floor = len(rows) / (time.perf_counter() - started)
        return first, again, floor
    finally:
        await engine.dispose()
