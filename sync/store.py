"""Writes: batched upserts, deletion marks, run records and errors.

The caller owns the transaction; these functions only batch and upsert.

Upserts are the hot path of a sync, so they skip SQLAlchemy's per-value type processing
and go straight to the driver's executemany, with values converted once, here. Which rows
to write is decided in Python: one SELECT per batch reads the stored `content_hash` (a
digest of the payload a row was written from), and only new and changed rows are sent,
as `INSERT … ON CONFLICT DO UPDATE` in each dialect's spelling. A row whose payload did not
change is not rewritten, and a second run over unchanged data writes nothing. Attempts
arrive as fetched and are normalized only once the lookup shows them new or changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import cache
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import Table, select, update
from sqlalchemy.exc import DBAPIError
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
from schema.types import ExactDecimal, UTCDateTime
from sync.errors import RecordError
from sync.normalize import NORMALIZER_VERSION, AttemptRow, ExamRow, Payload, UserRow
from sync.report import SUCCESSFUL, RunRecord

# Keys per IN (...) list: well under SQLite's limit on bound parameters.
_CHUNK = 2000
# Rows normalized between two turns of the event loop: with larger batches, one
# uninterrupted pass kept responses waiting past their latency and idled the fetchers.
_YIELD_EVERY = 250
_USER_FIELDS = ("user_id", "display_name", "first_name", "last_name")
_user_fields = itemgetter(*_USER_FIELDS)


@dataclass
class RowCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def add(self, other: RowCounts) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


# --- values as the driver takes them -------------------------------------------------------


def _sqlite_timestamp(value: datetime | None) -> str | None:
    # SQLAlchemy's own SQLite DateTime text, so Core reads these back as datetimes.
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # "YYYY-MM-DD HH:MM:SS.ffffff", no zone


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _converter(table: Table, name: str, dialect: str) -> Callable[[Any], Any] | None:
    kind = table.c[name].type
    if dialect == "sqlite" and isinstance(kind, UTCDateTime):
        return _sqlite_timestamp
    if dialect == "sqlite" and isinstance(kind, ExactDecimal):
        return _text_or_none  # NUMERIC affinity parses the exact decimal text
    return None  # asyncpg takes aware datetimes, Decimals and ints as they are


def _placeholders(dialect: str, count: int) -> list[str]:
    return [f"${n}" for n in range(1, count + 1)] if dialect == "postgresql" else ["?"] * count


@dataclass(frozen=True)
class _Upsert:
    """The upsert of one table in one dialect: its SQL and how to turn a row into values.

    Content columns are grouped by the conversion they need, and the SQL names them in
    that order, so a row becomes values through a few C-level itemgetters instead of a
    Python step per column (this runs for every attempt)."""

    sql: str
    groups: tuple[tuple[Callable[[Any], tuple[Any, ...]], Callable[[Any], Any] | None], ...]
    stamp: Callable[[datetime], Any]

    def values(self, row: Mapping[str, Any]) -> list[Any]:
        values: list[Any] = []
        for pick, convert in self.groups:
            picked = pick(row)
            values.extend(picked if convert is None else map(convert, picked))
        return values


def _picker(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    if len(names) == 1:  # itemgetter of one name returns the value, not a 1-tuple
        name = names[0]
        return lambda row: (row[name],)
    return itemgetter(*names)


@cache
def _payload_upsert(table: Table, key: str, content: tuple[str, ...], dialect: str) -> _Upsert:
    """For exams and attempts: content columns (raw last), content_hash, first/last seen."""
    by_converter: dict[Callable[[Any], Any] | None, list[str]] = {}
    for name in content:
        if name != "raw":
            by_converter.setdefault(_converter(table, name, dialect), []).append(name)
    ordered = [name for names in by_converter.values() for name in names]
    names = [*ordered, "raw", "content_hash", "first_seen_at", "last_seen_at"]
    refreshed = [name for name in names if name not in (key, "first_seen_at")]
    sql = (
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"VALUES ({', '.join(_placeholders(dialect, len(names)))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in refreshed)
        + ", deleted_at = NULL"
    )
    stamp = _sqlite_timestamp if dialect == "sqlite" else (lambda moment: moment)
    groups = tuple((_picker(names), convert) for convert, names in by_converter.items())
    return _Upsert(sql, groups, stamp)


@cache
def _user_upsert(dialect: str) -> str:
    names = ["username", *_USER_FIELDS, "first_seen_at", "last_seen_at"]
    return (
        f"INSERT INTO users ({', '.join(names)}) "
        f"VALUES ({', '.join(_placeholders(dialect, len(names)))}) "
        "ON CONFLICT (username) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in [*_USER_FIELDS, "last_seen_at"])
    )


def without_nul(value: Any) -> Any:
    """`value` with NUL characters removed from every string in it."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


def content_hash(raw_json: bytes) -> str:
    """The digest a row is compared by: its payload, and the rules that normalized it."""
    return hashlib.blake2b(NORMALIZER_VERSION + raw_json, digest_size=16).hexdigest()


# --- statements on the driver's connection -------------------------------------------------
#
# SQLAlchemy's aiosqlite adapter spends four hops to its driver thread on a statement
# (open a cursor, execute, fetch, close it): ~230 µs of CPU, against ~45 µs for aiosqlite's
# own execute_fetchall or executemany in one hop. A batch runs up to nine statements, so on
# SQLite its lookups, upserts and marks go to the driver connection directly, inside the
# transaction that SQLAlchemy began on it: 12% less CPU for a first run at zero latency.
# PostgreSQL keeps exec_driver_sql: the asyncpg adapter is what opens the transaction,
# and its overhead is a fifth of this.


async def _run_sql(connection: AsyncConnection, method: str, sql: str, parameters: Any) -> Any:
    """`sql` (in the dialect's placeholders) as aiosqlite's `method` names it: "execute",
    "executemany" (a list of rows) or "execute_fetchall" (which returns the rows).

    On SQLite it runs on the aiosqlite connection under `connection`, in its transaction,
    and an error is wrapped as SQLAlchemy wraps it (OperationalError, IntegrityError …),
    so the writer tells outages from refused rows the same way on both paths."""
    if connection.dialect.name != "sqlite":
        result = await connection.exec_driver_sql(sql, parameters)
        return result.all() if method == "execute_fetchall" else None
    driver = (await connection.get_raw_connection()).driver_connection
    try:
        return await getattr(driver, method)(sql, parameters)
    except sqlite3.Error as error:
        raise DBAPIError.instance(
            sql, None, error, sqlite3.Error, hide_parameters=True, dialect=connection.dialect
        ) from error


async def _stored(
    connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
) -> list[Any]:
    """`columns` of the stored rows whose `key` is among `keys`, one query per chunk."""
    found: list[Any] = []
    dialect = connection.dialect.name
    for start in range(0, len(keys), _CHUNK):
        chunk = list(keys[start : start + _CHUNK])
        if dialect == "postgresql":
            # A join, not `key = ANY($1)`: PostgreSQL soon runs a prepared statement with
            # a generic plan made while the table was small, a sequential scan that
            # compares every row with every key (10 ms a batch for 2,000 users, where
            # the join takes a fraction of one, whatever the plan).
            kind = table.c[key].type.compile(dialect=connection.dialect)
            sql = (
                f"SELECT t.{key}, {columns} FROM {table.name} AS t "
                f"JOIN unnest($1::{kind}[]) AS wanted (key) ON t.{key} = wanted.key"
            )
            found.extend((await connection.exec_driver_sql(sql, (chunk,))).all())
        else:
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT {key}, {columns} FROM {table.name} WHERE {key} IN ({marks})"
            found.extend(await _run_sql(connection, "execute_fetchall", sql, tuple(chunk)))
    return found


# Turns an incoming payload (by its id) into the row to store and what else came with it
# (an attempt's user); raises RecordError for a payload that cannot be stored.
Normalizer = Callable[[int, Payload], tuple[Mapping[str, Any], Any]]


@dataclass
class PayloadOutcome:
    counts: RowCounts
    extras: list[Any]  # what the normalizer returned beside each row written
    malformed: list[tuple[int, Payload, RecordError]]  # (id, payload, why), not written


async def upsert_payloads(
    connection: AsyncConnection,
    table: Table,
    content: tuple[str, ...],
    payloads: Mapping[int, Payload],
    normalize: Normalizer,
    now: datetime,
    *,
    write: bool = True,
) -> PayloadOutcome:
    """Insert new payloads, rewrite changed ones (or deleted ones seen again), count the rest.

    A payload whose digest matches its stored row is not even normalized: on the nightly
    run over mostly unchanged data, normalizing is most of the work saved. The others are
    normalized here, after the lookup; one that raises RecordError is returned in
    `malformed` and not written. With write=False only count (a dry run)."""
    if not payloads:
        return PayloadOutcome(RowCounts(), [], [])
    dialect = connection.dialect.name
    plan = _payload_upsert(table, "id", content, dialect)
    stored = {
        ident: (digest, gone)
        for ident, digest, gone in await _stored(
            connection, table, "id", "content_hash, deleted_at IS NOT NULL", list(payloads)
        )
    }
    stamp = plan.stamp(now)
    outcome = PayloadOutcome(RowCounts(), [], [])
    counts = outcome.counts
    to_write = []
    for number, (ident, payload) in enumerate(payloads.items(), 1):
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        raw_json = orjson.dumps(payload)
        digest = content_hash(raw_json)
        before = stored.get(ident)
        if before is not None and before[0] == digest and not before[1]:
            counts.unchanged += 1
            continue
        try:
            row, extra = normalize(ident, payload)
        except RecordError as error:
            outcome.malformed.append((ident, payload, error))
            continue
        if before is None:
            counts.inserted += 1
        else:
            counts.updated += 1
        outcome.extras.append(extra)
        values = plan.values(row)
        stored_json = raw_json
        if dialect == "postgresql" and b"\\u0000" in raw_json:
            # PostgreSQL's text and jsonb cannot hold a NUL character: it is dropped.
            stored_json = orjson.dumps(without_nul(payload))
            values = [without_nul(value) for value in values]
        values += (stored_json.decode(), digest, stamp, stamp)
        to_write.append(tuple(values))
    if to_write and write:
        await _run_sql(connection, "executemany", plan.sql, to_write)
    return outcome


async def _upsert_payload_rows(
    connection: AsyncConnection,
    table: Table,
    content: tuple[str, ...],
    rows: Iterable[Any],
    now: datetime,
    write: bool,
) -> RowCounts:
    """upsert_payloads for rows normalized already."""
    unique = {row["id"]: row for row in rows}  # one statement may not touch a row twice
    payloads = {ident: row["raw"] for ident, row in unique.items()}
    outcome = await upsert_payloads(
        connection, table, content, payloads, lambda ident, _: (unique[ident], None), now, write=write
    )
    return outcome.counts


async def upsert_exams(
    connection: AsyncConnection, rows: Iterable[ExamRow], now: datetime, *, write: bool = True
) -> RowCounts:
    rows = list(rows)
    if write:
        await _free_slugs(connection, {row["slug"]: row["id"] for row in rows})
    return await _upsert_payload_rows(connection, exams, EXAM_CONTENT_COLUMNS, rows, now, write)


async def _free_slugs(connection: AsyncConnection, wanted: dict[str, int]) -> None:
    """Slugs are unique, but Testpress may give a slug to another exam (one was deleted,
    or two swapped names). A stored row holding a slug that an incoming exam now has is
    given a placeholder `slug#id` first; its own next sighting restores its real slug."""
    if not wanted:
        return
    holders = await _stored(connection, exams, "slug", "id", list(wanted))
    for slug, holder in holders:
        if holder != wanted[slug]:
            await connection.execute(
                update(exams).where(exams.c.id == holder).values(slug=f"{slug}#{holder}")
            )


async def upsert_attempts(
    connection: AsyncConnection, rows: Iterable[AttemptRow], now: datetime, *, write: bool = True
) -> RowCounts:
    return await _upsert_payload_rows(connection, attempts, ATTEMPT_CONTENT_COLUMNS, rows, now, write)


async def upsert_attempt_payloads(
    connection: AsyncConnection,
    payloads: Mapping[int, Payload],
    normalize: Normalizer,
    now: datetime,
    *,
    write: bool = True,
) -> PayloadOutcome:
    """Attempts as fetched (id → payload), normalized only when new or changed; the
    outcome's extras are the users of the attempts written."""
    return await upsert_payloads(
        connection, attempts, ATTEMPT_CONTENT_COLUMNS, payloads, normalize, now, write=write
    )


def _overlay(fresh: tuple[Any, ...], known: tuple[Any, ...]) -> tuple[Any, ...]:
    """`fresh` where it says something, `known` where it is None."""
    return tuple(new if new is not None else old for new, old in zip(fresh, known, strict=True))


async def upsert_users(
    connection: AsyncConnection, rows: Iterable[UserRow], now: datetime, *, write: bool = True
) -> RowCounts:
    """Users by username. A field the new sighting lacks keeps its stored value: a user
    seen once with a name and once as a bare username keeps the name."""
    merged: dict[str, tuple[Any, ...]] = {}
    for user in rows:
        row = cast(Mapping[str, Any], user)
        fields = _user_fields(row)
        known = merged.get(row["username"])
        if known is None:
            merged[row["username"]] = fields
        elif known != fields:  # the same user seen twice, once with less: keep what is known
            merged[row["username"]] = _overlay(fields, known)
    if not merged:
        return RowCounts()
    stored = {
        username: tuple(values)
        for username, *values in await _stored(
            connection, users, "username", ", ".join(_USER_FIELDS), list(merged)
        )
    }
    dialect = connection.dialect.name
    stamp = _sqlite_timestamp(now) if dialect == "sqlite" else now
    counts = RowCounts()
    to_write = []
    for username, fresh in merged.items():
        before = stored.get(username)
        if before is None:
            counts.inserted += 1
            values = tuple(fresh)
        elif fresh == before:  # the usual case, checked without building a merged tuple
            counts.unchanged += 1
            continue
        else:
            values = _overlay(fresh, before)
            if values == before:
                counts.unchanged += 1
                continue
            counts.updated += 1
        record = (username, *values, stamp, stamp)
        to_write.append(tuple(without_nul(value) for value in record) if dialect == "postgresql" else record)
    if to_write and write:
        await _run_sql(connection, "executemany", _user_upsert(dialect), to_write)
    return counts


# --- deletion marks and fetch outcomes ----------------------------------------------------


async def _mark_deleted(
    connection: AsyncConnection, table: Table, ids: Sequence[int], now: datetime, write: bool
) -> int:
    for chunk in _chunks(sorted(ids) if write else []):
        await connection.execute(update(table).where(table.c.id.in_(chunk)).values(deleted_at=now))
    return len(ids)


async def mark_exams_deleted(
    connection: AsyncConnection,
    present: frozenset[int],
    now: datetime,
    course: str | None,
    *,
    write: bool = True,
) -> int:
    """Exams a complete listing no longer shows (within the course, if the run had one)."""
    live = select(exams.c.id).where(exams.c.deleted_at.is_(None))
    if course is not None:
        live = live.where(exams.c.course == course)
    missing = set((await connection.execute(live)).scalars()) - present
    return await _mark_deleted(connection, exams, list(missing), now, write)


async def mark_attempts_deleted(
    connection: AsyncConnection,
    present_by_exam: dict[int, frozenset[int]],
    now: datetime,
    *,
    write: bool = True,
) -> int:
    """Attempts that a complete fetch of their exam's attempts no longer shows, for every
    exam in `present_by_exam` (exam id → the attempt ids the fetch showed)."""
    missing: list[int] = []
    dialect = connection.dialect.name
    for chunk in _chunks(list(present_by_exam)):
        marks = ", ".join(_placeholders(dialect, len(chunk)))
        sql = f"SELECT id, exam_id FROM attempts WHERE exam_id IN ({marks}) AND deleted_at IS NULL"
        live = await _run_sql(connection, "execute_fetchall", sql, tuple(chunk))
        missing.extend(ident for ident, exam_id in live if ident not in present_by_exam[exam_id])
    return await _mark_deleted(connection, attempts, missing, now, write)


async def set_attempts_status(connection: AsyncConnection, statuses: dict[int, str]) -> None:
    """exams.attempts_status for each exam id; rows already holding the status are untouched."""
    by_status: dict[str, list[int]] = {}
    for exam_id, status in statuses.items():
        by_status.setdefault(status, []).append(exam_id)
    dialect = connection.dialect.name
    for status, exam_ids in by_status.items():
        for chunk in _chunks(exam_ids):
            first, *ids, last = _placeholders(dialect, len(chunk) + 2)
            sql = (
                f"UPDATE exams SET attempts_status = {first} WHERE id IN ({', '.join(ids)}) "
                f"AND (attempts_status IS NULL OR attempts_status <> {last})"
            )
            await _run_sql(connection, "execute", sql, (status, *chunk, status))


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
        update(sync_runs).where(sync_runs.c.id == run_id).values(status=status, finished_at=now, **values)
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
    connection: AsyncConnection, run_id: int, exam_ids: Sequence[int], now: datetime
) -> None:
    """These exams are stored completely by this run (for `backfill --resume`)."""
    if exam_ids:
        await connection.execute(
            sync_progress.insert(),
            [{"run_id": run_id, "exam_id": exam_id, "completed_at": now} for exam_id in exam_ids],
        )


async def recent_runs(connection: AsyncConnection, limit: int) -> list[RunRecord]:
    """The last `limit` runs, newest first."""
    names = [name for name in RunRecord.__dataclass_fields__]
    result = await connection.execute(
        select(*(sync_runs.c[name] for name in names)).order_by(sync_runs.c.id.desc()).limit(limit)
    )
    return [RunRecord(**row._mapping) for row in result]


async def last_success_finished_at(connection: AsyncConnection) -> datetime | None:
    result = await connection.execute(
        select(sync_runs.c.finished_at)
        .where(sync_runs.c.status.in_(SUCCESSFUL))
        .order_by(sync_runs.c.id.desc())
        .limit(1)
    )
    return result.scalar()


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:  # for Core statements
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
