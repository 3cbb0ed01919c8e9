"""Reads and writes of the sink, for any resource spec and any dialect: which stored
rows a batch would change, the upserts, deletion marks, run records and errors.

The caller owns the transaction; these functions only batch and upsert. Dialect
differences (placeholders, converters, lookups, the NUL policy) come from
sync.sink.dialects.

Upserts are the hot path of a sync, so they skip SQLAlchemy's per-value type processing
and go straight to the driver's executemany, with values converted once, here. Which rows
to write is decided by the writer from `stored_digests`: one SELECT per batch reads the
stored `content_hash` (a digest of the payload a row was written from), and only new and
changed rows are sent, as `INSERT … ON CONFLICT DO UPDATE`. A second run over unchanged
data writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from schema import metadata, sync_errors, sync_progress, sync_runs, users
from sync.model.normalize import UserRow
from sync.model.resources import Resource
from sync.model.run import SUCCESSFUL, RowCounts, RunRecord
from sync.sink.dialects import Dialect, dialect_of
from sync.sink.dialects.base import Converter

# Keys per IN (...) list: well under SQLite's limit on bound parameters.
_CHUNK = 2000
_USER_FIELDS = ("user_id", "display_name", "first_name", "last_name")
_user_fields = itemgetter(*_USER_FIELDS)


def table_of(resource: Resource) -> Table:
    return metadata.tables[resource.table]


# --- values as the driver takes them -------------------------------------------------------


@dataclass(frozen=True)
class _Upsert:
    """The upsert of one table in one dialect: its SQL and how to turn a row into values.

    Content columns are grouped by the conversion they need, and the SQL names them in
    that order, so a row becomes values through a few C-level itemgetters instead of a
    Python step per column (this runs for every attempt)."""

    sql: str
    groups: tuple[tuple[Callable[[Any], tuple[Any, ...]], Converter | None], ...]

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
def _payload_upsert(resource: Resource, dialect: Dialect) -> _Upsert:
    """Content columns (raw last), content_hash, first/last seen."""
    table, key = table_of(resource), resource.id_field
    by_converter: dict[Converter | None, list[str]] = {}
    for name in resource.content_columns:
        if name != "raw":
            by_converter.setdefault(dialect.converter(table.c[name].type), []).append(name)
    ordered = [name for names in by_converter.values() for name in names]
    names = [*ordered, "raw", "content_hash", "first_seen_at", "last_seen_at"]
    refreshed = [name for name in names if name not in (key, "first_seen_at")]
    sql = dialect.upsert_sql(table.name, names, key, refreshed, also=", deleted_at = NULL")
    groups = tuple((_picker(names), convert) for convert, names in by_converter.items())
    return _Upsert(sql, groups)


def without_nul(value: Any) -> Any:
    """`value` with NUL characters removed from every string in it."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


# --- payload rows: lookup, then upsert ---------------------------------------------------


async def _stored(
    connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
) -> list[Any]:
    """`columns` of the stored rows whose `key` is among `keys`, one query per chunk."""
    dialect = dialect_of(connection)
    found: list[Any] = []
    for start in range(0, len(keys), _CHUNK):
        found.extend(await dialect.lookup(connection, table, key, columns, keys[start : start + _CHUNK]))
    return found


async def stored_digests(
    connection: AsyncConnection, resource: Resource, ids: Sequence[int]
) -> dict[int, tuple[str | None, bool]]:
    """id → (content_hash, marked deleted) of the stored rows among `ids`."""
    rows = await _stored(connection, table_of(resource), resource.id_field, "content_hash, deleted_at IS NOT NULL", ids)
    return {ident: (digest, bool(gone)) for ident, digest, gone in rows}


class RowBatch:
    """Rows of one resource for one upsert statement. Each row becomes the driver's values
    as it is added, so a batch never holds its normalized rows (a dict per attempt) and
    the values at once: one pass, as little memory as the values need."""

    def __init__(self, connection: AsyncConnection, resource: Resource, now: datetime) -> None:
        dialect = dialect_of(connection)
        self.resource = resource
        self.values: list[tuple[Any, ...]] = []
        # Values of the movable unique columns this batch writes: value → id of the row.
        self.unique: dict[str, dict[Any, int]] = {column: {} for column in resource.movable_unique_columns}
        self._plan = _payload_upsert(resource, dialect)
        self._stamp = dialect.stamp(now)
        self._holds_nul = dialect.holds_nul()

    def add(self, row: Mapping[str, Any], raw_json: bytes, digest: str) -> None:
        """`row` as normalized from a payload whose JSON is `raw_json` and digest `digest`."""
        values = self._plan.values(row)
        if not self._holds_nul and b"\\u0000" in raw_json:
            raw_json = orjson.dumps(without_nul(row["raw"]))
            values = [without_nul(value) for value in values]
        values += (raw_json.decode(), digest, self._stamp, self._stamp)
        self.values.append(tuple(values))
        for column, wanted in self.unique.items():
            if row[column] is not None:
                wanted[row[column]] = row[self.resource.id_field]


async def upsert_rows(connection: AsyncConnection, batch: RowBatch) -> None:
    """Insert or rewrite the batch's rows (the writer chose them: new, changed, or seen again
    after being marked deleted), in one executemany."""
    if not batch.values:
        return
    for column, wanted in batch.unique.items():
        if wanted:
            await _free_unique_values(connection, batch.resource, column, wanted)
    await dialect_of(connection).run(connection, "executemany", batch._plan.sql, batch.values)


async def _free_unique_values(connection: AsyncConnection, resource: Resource, column: str, wanted: dict[Any, int]) -> None:
    """Slugs are unique, but Testpress may give a slug to another exam (one was deleted,
    or two swapped names). A stored row holding a value that an incoming item now has is
    given a placeholder `value#id` first; its own next sighting restores its real value."""
    table, key = table_of(resource), resource.id_field
    for value, holder in await _stored(connection, table, column, key, list(wanted)):
        if holder != wanted[value]:
            await connection.execute(update(table).where(table.c[key] == holder).values({column: f"{value}#{holder}"}))


# --- users, merged field by field ----------------------------------------------------------


def _overlay(fresh: tuple[Any, ...], known: tuple[Any, ...]) -> tuple[Any, ...]:
    """`fresh` where it says something, `known` where it is None."""
    return tuple(new if new is not None else old for new, old in zip(fresh, known, strict=True))


@cache
def _user_upsert(dialect: Dialect) -> str:
    names = ["username", *_USER_FIELDS, "first_seen_at", "last_seen_at"]
    return dialect.upsert_sql("users", names, "username", [*_USER_FIELDS, "last_seen_at"])


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
        for username, *values in await _stored(connection, users, "username", ", ".join(_USER_FIELDS), list(merged))
    }
    dialect = dialect_of(connection)
    stamp = dialect.stamp(now)
    holds_nul = dialect.holds_nul()
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
        to_write.append(record if holds_nul else tuple(without_nul(value) for value in record))
    if to_write and write:
        await dialect.run(connection, "executemany", _user_upsert(dialect), to_write)
    return counts


# --- deletion marks and fetch outcomes ----------------------------------------------------


async def _mark_deleted(
    connection: AsyncConnection, table: Table, ids: Sequence[int], now: datetime, write: bool
) -> int:
    for chunk in _chunks(sorted(ids) if write else []):
        await connection.execute(update(table).where(table.c.id.in_(chunk)).values(deleted_at=now))
    return len(ids)


async def mark_missing_deleted(
    connection: AsyncConnection,
    resource: Resource,
    present: frozenset[int],
    now: datetime,
    scope: Mapping[str, Any],
    *,
    write: bool = True,
) -> int:
    """Rows of a top-level resource that a complete listing no longer shows, within the
    listing's `scope` (the filters it was walked with, by column)."""
    table = table_of(resource)
    live = select(table.c[resource.id_field]).where(table.c.deleted_at.is_(None))
    for column, value in scope.items():
        live = live.where(table.c[column] == value)
    missing = set((await connection.execute(live)).scalars()) - present
    return await _mark_deleted(connection, table, list(missing), now, write)


async def mark_missing_children_deleted(
    connection: AsyncConnection,
    resource: Resource,
    present_by_parent: Mapping[int, frozenset[int]],
    now: datetime,
    *,
    write: bool = True,
) -> int:
    """Rows that a complete walk of their parent's listing no longer shows, for every
    parent in `present_by_parent` (parent id → the ids the walk showed)."""
    assert resource.parent_column is not None, f"{resource.name} has no parent"
    table, parent = table_of(resource), resource.parent_column
    dialect = dialect_of(connection)
    missing: list[int] = []
    for chunk in _chunks(list(present_by_parent)):
        marks = ", ".join(dialect.placeholders(len(chunk)))
        sql = f"SELECT id, {parent} FROM {table.name} WHERE {parent} IN ({marks}) AND deleted_at IS NULL"
        live = await dialect.run(connection, "execute_fetchall", sql, tuple(chunk))
        missing.extend(ident for ident, parent_id in live if ident not in present_by_parent[parent_id])
    return await _mark_deleted(connection, table, missing, now, write)


async def set_listing_status(connection: AsyncConnection, resource: Resource, statuses: Mapping[int, str]) -> None:
    """How fetching each parent's listing of `resource` ended, on the parent's row (for
    attempts: exams.attempts_status); rows already holding the status are untouched."""
    assert resource.parent_table is not None and resource.parent_status_column is not None
    table, column = resource.parent_table, resource.parent_status_column
    by_status: dict[str, list[int]] = {}
    for parent_id, status in statuses.items():
        by_status.setdefault(status, []).append(parent_id)
    dialect = dialect_of(connection)
    for status, parent_ids in by_status.items():
        for chunk in _chunks(parent_ids):
            first, *ids, last = dialect.placeholders(len(chunk) + 2)
            sql = (
                f"UPDATE {table} SET {column} = {first} WHERE id IN ({', '.join(ids)}) "
                f"AND ({column} IS NULL OR {column} <> {last})"
            )
            await dialect.run(connection, "execute", sql, (status, *chunk, status))


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


async def resume_point(connection: AsyncConnection) -> tuple[int | None, frozenset[int]]:
    """The last unfinished backfill, and the exams whose attempts it (and the backfills
    that resumed it) stored completely."""
    last = (
        await connection.execute(
            select(sync_runs.c.id, sync_runs.c.status, sync_runs.c.resumed_from)
            .where(sync_runs.c.mode == "backfill")
            .order_by(sync_runs.c.id.desc())
            .limit(1)
        )
    ).first()
    if last is None or last.status in SUCCESSFUL:
        return None, frozenset()
    chain = [last.id]
    parent = last.resumed_from
    while parent is not None:
        chain.append(parent)
        parent = (
            await connection.execute(select(sync_runs.c.resumed_from).where(sync_runs.c.id == parent))
        ).scalar()
    done = await connection.execute(select(sync_progress.c.exam_id).where(sync_progress.c.run_id.in_(chain)))
    return last.id, frozenset(done.scalars())


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


async def row_counts(connection: AsyncConnection) -> dict[str, int]:
    """Rows per table of the schema."""
    return {
        name: (await connection.execute(select(func.count()).select_from(table))).scalar_one()
        for name, table in metadata.tables.items()
    }


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:  # for Core statements
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
