"""Writes: batched upserts, deletion marks, run records and errors.

The caller owns the transaction; these functions only batch and upsert. An upsert is
one `INSERT … ON CONFLICT DO UPDATE … WHERE <something differs>` per batch, in each
dialect's own spelling, so a row whose values did not change is not rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from schema import (
    ATTEMPT_CONTENT_COLUMNS,
    EXAM_CONTENT_COLUMNS,
    attempts,
    exams,
    sync_errors,
    sync_progress,
    sync_runs,
    users,
)
from sync.normalize import AttemptRow, ExamRow, UserRow

# Ids per IN (...) list: well under SQLite's and asyncpg's limits on bound parameters.
_CHUNK = 2000


@dataclass
class RowCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def add(self, other: RowCounts) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


def _insert(connection: AsyncConnection, table: Table) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


async def _upsert(
    connection: AsyncConnection,
    table: Table,
    key: str,
    rows: Sequence[dict[str, Any]],
    content: Sequence[str],
    now: datetime,
    *,
    keep_known: bool = False,
) -> RowCounts:
    """Insert new rows, update changed ones, leave the rest alone; count each kind.

    keep_known: a null in the new row keeps the stored value (a user seen once with a
    name and once as a bare username keeps the name)."""
    if not rows:
        return RowCounts()
    keys = [row[key] for row in rows]
    existing: set[Any] = set()
    for chunk in _chunks(keys):
        result = await connection.execute(select(table.c[key]).where(table.c[key].in_(chunk)))
        existing.update(result.scalars())

    statement = _insert(connection, table)
    excluded = statement.excluded

    def incoming(name: str) -> Any:
        return func.coalesce(excluded[name], table.c[name]) if keep_known else excluded[name]

    changed = [table.c[name].is_distinct_from(incoming(name)) for name in content]
    new_values: dict[str, Any] = {name: incoming(name) for name in content}
    new_values["last_seen_at"] = excluded.last_seen_at
    if "deleted_at" in table.c:
        changed.append(table.c.deleted_at.is_not(None))
        new_values["deleted_at"] = None
    statement = statement.on_conflict_do_update(
        index_elements=[key], set_=new_values, where=or_(*changed)
    ).returning(table.c[key])
    params = [{**row, "first_seen_at": now, "last_seen_at": now} for row in rows]
    written = set((await connection.execute(statement, params)).scalars())
    inserted = len(written - existing)
    updated = len(written & existing)
    return RowCounts(inserted=inserted, updated=updated, unchanged=len(rows) - inserted - updated)


def _last_per_key(rows: Iterable[Any], key: str) -> list[Any]:
    """One row per key (the last wins): a statement may not touch a row twice."""
    return list({row[key]: row for row in rows}.values())


async def upsert_exams(
    connection: AsyncConnection, rows: Iterable[ExamRow], now: datetime
) -> RowCounts:
    return await _upsert(
        connection, exams, "id", _last_per_key(rows, "id"), EXAM_CONTENT_COLUMNS, now
    )


async def upsert_attempts(
    connection: AsyncConnection, rows: Iterable[AttemptRow], now: datetime
) -> RowCounts:
    return await _upsert(
        connection, attempts, "id", _last_per_key(rows, "id"), ATTEMPT_CONTENT_COLUMNS, now
    )


async def upsert_users(
    connection: AsyncConnection, rows: Iterable[UserRow], now: datetime
) -> RowCounts:
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        known = merged.setdefault(row["username"], dict(row))
        for name, value in row.items():
            if value is not None:
                known[name] = value
    content = ("user_id", "display_name", "first_name", "last_name")
    return await _upsert(
        connection, users, "username", list(merged.values()), content, now, keep_known=True
    )


# --- deletion marks ----------------------------------------------------------------------


async def _mark_missing(
    connection: AsyncConnection, table: Table, live: Any, present: frozenset[int], now: datetime
) -> int:
    """Set deleted_at on the rows `live` selects whose id is not in `present`."""
    stored = set((await connection.execute(live)).scalars())
    missing = sorted(stored - present)
    for chunk in _chunks(missing):
        await connection.execute(update(table).where(table.c.id.in_(chunk)).values(deleted_at=now))
    return len(missing)


async def mark_exams_deleted(
    connection: AsyncConnection, present: frozenset[int], now: datetime, course: str | None
) -> int:
    """Exams a complete listing no longer shows (within the course, if the run had one)."""
    live = select(exams.c.id).where(exams.c.deleted_at.is_(None))
    if course is not None:
        live = live.where(exams.c.course == course)
    return await _mark_missing(connection, exams, live, present, now)


async def mark_attempts_deleted(
    connection: AsyncConnection, exam_id: int, present: frozenset[int], now: datetime
) -> int:
    """Attempts of `exam_id` that a complete fetch of its attempts no longer shows."""
    live = select(attempts.c.id).where(
        attempts.c.exam_id == exam_id, attempts.c.deleted_at.is_(None)
    )
    return await _mark_missing(connection, attempts, live, present, now)


async def set_attempts_status(connection: AsyncConnection, exam_id: int, status: str) -> None:
    await connection.execute(
        update(exams)
        .where(exams.c.id == exam_id, exams.c.attempts_status.is_distinct_from(status))
        .values(attempts_status=status)
    )


# --- runs, progress, errors --------------------------------------------------------------


async def start_run(
    connection: AsyncConnection, mode: str, now: datetime, *, resumed_from: int | None = None
) -> int:
    result = await connection.execute(
        sync_runs.insert()
        .values(mode=mode, started_at=now, status="running", resumed_from=resumed_from)
        .returning(sync_runs.c.id)
    )
    return int(result.scalar_one())


async def close_abandoned_runs(connection: AsyncConnection, now: datetime) -> int:
    """Runs still marked running when no run holds the lock: their process died."""
    result = await connection.execute(
        update(sync_runs)
        .where(sync_runs.c.status == "running")
        .values(
            status="interrupted",
            finished_at=now,
            error="the run ended without recording its outcome (killed, machine stopped, or database unreachable at the end)",
        )
    )
    return int(result.rowcount or 0)


async def finish_run(
    connection: AsyncConnection, run_id: int, *, status: str, now: datetime, **values: Any
) -> None:
    await connection.execute(
        update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(status=status, finished_at=now, **values)
    )


async def record_error(
    connection: AsyncConnection,
    run_id: int,
    *,
    entity: str,
    key: str | None,
    message: str,
    now: datetime,
    http_status: int | None = None,
    payload: Any = None,
) -> None:
    await connection.execute(
        sync_errors.insert().values(
            run_id=run_id,
            entity=entity,
            key=key,
            http_status=http_status,
            message=message,
            payload=payload,
            created_at=now,
        )
    )


async def record_progress(
    connection: AsyncConnection, run_id: int, exam_id: int, now: datetime
) -> None:
    await connection.execute(
        sync_progress.insert().values(run_id=run_id, exam_id=exam_id, completed_at=now)
    )


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
