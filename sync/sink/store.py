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

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    Text,
    bindparam,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from schema import (
    OPEN_STATES,
    attempts,
    exams,
    metadata,
    sync_errors,
    sync_progress,
    sync_runs,
    sync_state,
    users,
)
from sync.model.admin_rows import ATTEMPT_PERSONAL_KEYS, DETAIL_TABLES, PERSONAL_KEYS, PiiPolicy
from sync.model.normalize import UserRow
from sync.model.plan import SyncState
from sync.model.resources import Resource
from sync.model.run import SUCCESSFUL, RowCounts, RunRecord
from sync.model.webhook import WEBHOOK_SOURCE
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
    username_at: int | None = None  # where the username goes among the values, if looked up

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
    table, key = table_of(resource), resource.key_column
    by_converter: dict[Converter | None, list[str]] = {}
    for name in resource.content_columns:
        if name != "raw":
            by_converter.setdefault(dialect.converter(table.c[name].type), []).append(name)
    ordered = [name for names in by_converter.values() for name in names]
    names = [*ordered, "raw", "content_hash", "first_seen_at", "last_seen_at"]
    kept = resource.kept_when_unserved  # the spec says why
    refreshed = [name for name in names if name not in (key, "first_seen_at", *kept)]
    where = ""
    if resource.keeps_webhook_completions:  # the spec says why
        where = (
            f"NOT (COALESCE({table.name}.source, '') = '{WEBHOOK_SOURCE}' AND {table.name}.state = 'Completed'"
            " AND COALESCE(excluded.state, '') <> 'Completed')"
        )
    username_at = names.index("username") if resource.username_from_users else None  # see _name_from_users
    sql = dialect.upsert_sql(table.name, names, key, refreshed, kept=kept, revived=True, where=where)
    groups = tuple((_picker(names), convert) for convert, names in by_converter.items())
    return _Upsert(sql, groups, username_at)


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
    rows = await _stored(connection, table_of(resource), resource.key_column, "content_hash, deleted_at IS NOT NULL", ids)
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
        # (index among values, user_id) of the rows whose username users holds
        self.unnamed: list[tuple[int, int]] = []

    def add(self, row: Mapping[str, Any], raw_json: bytes, digest: str) -> None:
        """`row` as normalized from a payload whose JSON is `raw_json` and digest `digest`."""
        values = self._plan.values(row)
        if not self._holds_nul and b"\\u0000" in raw_json:
            raw_json = orjson.dumps(without_nul(row["raw"]))
            values = [without_nul(value) for value in values]
        values += (raw_json.decode(), digest, self._stamp, self._stamp)
        if self._plan.username_at is not None and row["username"] is None and row["user_id"] is not None:
            self.unnamed.append((len(self.values), row["user_id"]))
        self.values.append(tuple(values))
        for column, wanted in self.unique.items():
            if row[column] is not None:
                wanted[row[column]] = row[self.resource.key_column]


async def upsert_rows(connection: AsyncConnection, batch: RowBatch) -> list[Any]:
    """Insert or rewrite the batch's rows (the writer chose them: new, changed, or seen again
    after being marked deleted), in one executemany. Returns the keys of the stored rows
    that gave up a unique value to one of them (see _free_unique_values)."""
    if not batch.values:
        return []
    if batch.unnamed:
        await _name_from_users(connection, batch)
    displaced: list[Any] = []
    for column, wanted in batch.unique.items():
        if wanted:
            displaced += await _free_unique_values(connection, batch.resource, column, wanted)
    await dialect_of(connection).run(connection, "executemany", batch._plan.sql, batch.values)
    return displaced


async def _name_from_users(connection: AsyncConnection, batch: RowBatch) -> None:
    """The username `users` holds for each row that names its student by user_id only: one
    lookup a batch. (A lookup in the INSERT, a subquery a row, cost PostgreSQL 1.5 s of a
    W2 full walk.) A user not stored yet names its attempts when it is
    (name_attempts_after_users)."""
    at = batch._plan.username_at
    assert at is not None
    names = dict(await _stored(connection, users, "user_id", "username", sorted({user_id for _, user_id in batch.unnamed})))
    values = batch.values
    for index, user_id in batch.unnamed:
        name = names.get(user_id)
        if name is not None:
            row = values[index]
            values[index] = (*row[:at], name, *row[at + 1 :])


async def _free_unique_values(
    connection: AsyncConnection, resource: Resource, column: str, wanted: dict[Any, int]
) -> list[Any]:
    """Slugs and usernames are unique, but Testpress may give one to another item (one was
    deleted, two swapped names). A stored row holding a value that an incoming item now
    has is given a placeholder `value#key` first; its own next sighting restores its real
    value. A row holding it without a key (a user a student login named by username only)
    is the same item: it takes the key, and the upsert then updates it. Returns the keys
    of the rows given a placeholder."""
    table, key = table_of(resource), resource.key_column
    displaced = []
    for value, holder in await _stored(connection, table, column, key, list(wanted)):
        if holder is None:
            await connection.execute(update(table).where(table.c[column] == value).values({key: wanted[value]}))
        elif holder != wanted[value]:
            await connection.execute(update(table).where(table.c[key] == holder).values({column: f"{value}#{holder}"}))
            displaced.append(holder)
    return displaced


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
    await _follow_renames(connection, merged, stored, write=write)
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


async def _follow_renames(
    connection: AsyncConnection, merged: Mapping[str, tuple[Any, ...]], stored: dict[str, tuple[Any, ...]], *, write: bool
) -> None:
    """Users seen under a name no row has, with a Testpress id a row has: renamed since
    (usernames change, ids do not). That row takes the new name, so the upsert by username
    updates it; its fields join `stored` under the new name. The user's attempts stored
    before take it too (an admin run's among them)."""
    renamed = {fields[0]: username for username, fields in merged.items() if username not in stored and fields[0] is not None}
    if not renamed:
        return
    moved = []
    for user_id, _old_name, *values in await _stored(
        connection, users, "user_id", "username, " + ", ".join(_USER_FIELDS), list(renamed)
    ):
        new_name = renamed[user_id]
        if write:  # the new name is no row's (it is not in `stored`): nothing to move aside
            await connection.execute(update(users).where(users.c.user_id == user_id).values(username=new_name))
            moved.append(user_id)
        stored[new_name] = tuple(values)
    if moved:
        await name_attempts_after_users(connection, moved)


# --- deletion marks and fetch outcomes ----------------------------------------------------


async def name_attempts_after_users(connection: AsyncConnection, user_ids: Sequence[int]) -> None:
    """The attempts of these users (just written: new, changed, renamed) take the username
    `users` now holds: attempts written before their user had none, and a renamed user's
    attempts had the old name. Rows already named so are left alone."""
    name = select(users.c.username).where(users.c.user_id == attempts.c.user_id).scalar_subquery()
    for chunk in _chunks(user_ids):
        named = update(attempts).where(attempts.c.user_id.in_(chunk), attempts.c.username.is_distinct_from(name))
        await connection.execute(named.values(username=name))


async def mark_missing_deleted(
    connection: AsyncConnection,
    resource: Resource,
    present: Set[int],
    now: datetime,
    scope: Mapping[str, Any],
    *,
    write: bool = True,
    written_before: datetime | None = None,
) -> int:
    """Rows of a top-level resource that a complete listing no longer shows, within the
    listing's `scope` (the filters it was walked with, by column). With `written_before`
    (the walk's start), a row a webhook wrote since is newer than the listing: kept."""
    table = table_of(resource)
    live = select(table.c[resource.key_column]).where(
        table.c.deleted_at.is_(None), table.c[resource.key_column].is_not(None)
    )
    for column, value in scope.items():
        live = live.where(table.c[column] == value)
    kept = _not_written_by_webhook_since(table, written_before)
    if kept is not None:
        live = live.where(kept)
    key = table.c[resource.key_column]
    missing = [ident async for ident in _keys_in_order(connection, live, key) if ident not in present]
    for chunk in _chunks(missing if write else []):
        # The guard again: a delivery committed since the SELECT above is kept too.
        marked = update(table).where(key.in_(chunk)) if kept is None else update(table).where(key.in_(chunk), kept)
        await connection.execute(marked.values(deleted_at=now))
    return len(missing)


_KEYS_AT_ONCE = 20_000


# The users columns that hold personal data: those named like a personal key of the payload.
_USER_PERSONAL_COLUMNS = tuple(column.name for column in users.c if column.name in PERSONAL_KEYS)


async def drop_personal_data_of_deleted_rows(connection: AsyncConnection) -> int:
    """Rows marked deleted are in no listing, so a full walk under a new personal-data
    policy cannot write them again: their personal data is dropped instead (null, in the
    columns and inside `raw`). Not hashed: what they hold may already be a hash, by
    another salt. Returns how many rows held some."""
    dropped, changed = PiiPolicy("drop"), 0
    for table, keys, names in ((users, PERSONAL_KEYS, _USER_PERSONAL_COLUMNS), (attempts, ATTEMPT_PERSONAL_KEYS, ())):
        columns = [table.c[name] for name in names]
        scrub = (
            update(table)  # still deleted: a webhook delivery may have brought one back since
            .where(table.c.id == bindparam("ident"), table.c.deleted_at.is_not(None))
            .values(raw=bindparam("scrubbed", type_=table.c.raw.type), **dict.fromkeys(names))
        )
        deleted = select(table.c.id, table.c.raw, *columns).where(table.c.deleted_at.is_not(None))
        async for rows in _pages_in_order(connection, deleted, table.c.id):
            personal = [
                {"ident": ident, "scrubbed": dropped.payload(raw, keys) if isinstance(raw, dict) else raw}
                for ident, raw, *values in rows
                if any(value is not None for value in values)
                or (isinstance(raw, dict) and any(raw.get(key) not in (None, "") for key in keys))
            ]
            if personal:
                await connection.execute(scrub, personal)
                changed += len(personal)
    return changed


async def _keys_in_order(connection: AsyncConnection, query: Select[Any], key: Any) -> AsyncIterator[Any]:
    """The keys `query` selects, in key order, read `_KEYS_AT_ONCE` at a time: a table of
    millions of rows is never held whole beside the walk's own set of ids."""
    async for rows in _pages_in_order(connection, query, key):
        for row in rows:
            yield row[0]


async def _pages_in_order(connection: AsyncConnection, query: Select[Any], key: Any) -> AsyncIterator[Sequence[Any]]:
    """The rows `query` selects (`key` first), in key order, `_KEYS_AT_ONCE` a page."""
    last = None
    while True:
        page = query if last is None else query.where(key > last)
        rows = (await connection.execute(page.order_by(key).limit(_KEYS_AT_ONCE))).all()
        if rows:
            yield rows
        if len(rows) < _KEYS_AT_ONCE:
            return
        last = rows[-1][0]


def _webhook_writes(table: Table) -> bool:
    return "source" in table.c  # exams and attempts: the tables a delivery writes to


def _not_written_by_webhook_since(table: Table, moment: datetime | None) -> ColumnElement[bool] | None:
    """Rows that a webhook delivery has not written at or after `moment`; None (no
    condition) without a moment or for a table that the webhook does not write."""
    if moment is None or not _webhook_writes(table):
        return None
    return or_(table.c.source.is_distinct_from(WEBHOOK_SOURCE), table.c.last_seen_at < moment)


async def mark_children_of_deleted_deleted(
    connection: AsyncConnection, child: Resource, parent: Resource, now: datetime, *, write: bool = True
) -> int:
    """Rows of `child` (memberships) whose parent row (the user) is marked deleted: a
    deleted user is in no batch. Returns how many (counted, not written, with write=False)."""
    assert child.parent_column is not None, f"{child.name} has no parent"
    table, parents = table_of(child), table_of(parent)
    gone = select(parents.c[parent.key_column]).where(parents.c.deleted_at.is_not(None)).scalar_subquery()
    live = (table.c.deleted_at.is_(None), table.c[child.parent_column].in_(gone))
    if not write:
        return int((await connection.execute(select(func.count()).select_from(table).where(*live))).scalar_one())
    done = await connection.execute(update(table).where(*live).values(deleted_at=now))
    return int(done.rowcount)


async def mark_missing_children_deleted(
    connection: AsyncConnection,
    resource: Resource,
    present_by_parent: Mapping[int, Set[int]],
    now: datetime,
    *,
    write: bool = True,
    written_before: datetime | None = None,
) -> int:
    """Rows that a complete walk of their parent's listing no longer shows, for every
    parent in `present_by_parent` (parent id → the keys the walk showed). With
    `written_before` (the walk's start), a row a webhook wrote since is newer than the
    listing: kept."""
    assert resource.parent_column is not None, f"{resource.name} has no parent"
    table, parent, key = table_of(resource), resource.parent_column, resource.key_column
    dialect = dialect_of(connection)
    # The guard of _not_written_by_webhook_since, in SQL: its moment bound at `mark`.
    since = (dialect.stamp(written_before),) if written_before is not None and _webhook_writes(table) else ()

    def kept(mark: str) -> str:
        return f" AND (source IS NULL OR source <> '{WEBHOOK_SOURCE}' OR last_seen_at < {mark})" if since else ""

    missing: list[tuple[int, int]] = []
    for chunk in _chunks(list(present_by_parent)):
        *marks, last = dialect.placeholders(len(chunk) + 1)
        sql = f"SELECT {key}, {parent} FROM {table.name} WHERE {parent} IN ({', '.join(marks)}) AND deleted_at IS NULL{kept(last)}"
        live = await dialect.run(connection, "execute_fetchall", sql, (*chunk, *since))
        missing.extend((ident, parent_id) for ident, parent_id in live if ident not in present_by_parent[parent_id])
    if missing and write:
        # The guard again: a delivery committed since the SELECT above is kept too.
        stamp, (first, second, third, fourth) = dialect.stamp(now), dialect.placeholders(4)
        sql = f"UPDATE {table.name} SET deleted_at = {first} WHERE {key} = {second} AND {parent} = {third}{kept(fourth)}"
        await dialect.run(connection, "executemany", sql, [(stamp, ident, parent_id, *since) for ident, parent_id in missing])
    return len(missing)


async def upsert_links(
    connection: AsyncConnection, resource: Resource, rows: Sequence[Mapping[str, Any]], now: datetime, *, write: bool = True
) -> RowCounts:
    """Membership rows (user_batches): new ones inserted, changed or returning ones
    rewritten, the rest left alone, so an unchanged night writes nothing."""
    assert resource.parent_column is not None, f"{resource.name} has no parent"
    table, parent, key = table_of(resource), resource.parent_column, resource.key_column
    extra = [name for name in resource.content_columns if name not in (parent, key)]
    wanted = {(row[parent], row[key]): row for row in rows}
    stored = {
        (parent_id, ident): (tuple(values), gone)
        for parent_id, ident, *values, gone in await _stored(
            connection, table, parent, ", ".join([key, *extra, "deleted_at IS NOT NULL"]), sorted({p for p, _ in wanted})
        )
    }
    counts, to_write = RowCounts(), []
    dialect = dialect_of(connection)
    convert = [dialect.converter(table.c[name].type) or (lambda value: value) for name in extra]
    stamp = dialect.stamp(now)
    for pair, row in wanted.items():
        values = tuple(row[name] for name in extra)
        before = stored.get(pair)
        if before is not None and not before[1] and before[0] == tuple(c(v) for c, v in zip(convert, values, strict=True)):
            counts.unchanged += 1
            continue
        if before is None:
            counts.inserted += 1
        else:
            counts.updated += 1
        to_write.append((*pair, *(c(v) for c, v in zip(convert, values, strict=True)), stamp, stamp))
    if to_write and write:
        names = [parent, key, *extra, "first_seen_at", "last_seen_at"]
        sql = dialect.upsert_sql(table.name, names, f"{parent}, {key}", [*extra, "last_seen_at"], revived=True)
        await dialect.run(connection, "executemany", sql, to_write)
    return counts


# --- attempt details: each attempt's breakdowns, replaced whole ---------------------------


async def attempts_needing_details(connection: AsyncConnection) -> list[int]:
    """The live attempts of the admin API whose details were never fetched, or were
    fetched for a row that has changed since (details_hash is the row's content_hash of
    then): the ones a run with attempt details reads, in id order."""
    stale = or_(attempts.c.details_hash.is_(None), attempts.c.details_hash != attempts.c.content_hash)
    result = await connection.execute(
        select(attempts.c.id)
        .where(attempts.c.deleted_at.is_(None), attempts.c.source == "admin", stale)
        .order_by(attempts.c.id)
    )
    return list(result.scalars())


@dataclass(frozen=True)
class _DetailInsert:
    """The INSERT of one detail table in one dialect, and its values from a row: picked
    at once (a C-level itemgetter), then the few that need it converted (ten rows a
    detail, and a first run has one detail per attempt)."""

    sql: str
    pick: Callable[[Any], tuple[Any, ...]]
    converted: tuple[tuple[int, Converter], ...]  # (position, converter)

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        picked = self.pick(row)
        if not self.converted:
            return picked
        values = list(picked)
        for position, convert in self.converted:
            values[position] = convert(values[position])
        return tuple(values)


@cache
def _detail_insert(table: Table, dialect: Dialect) -> _DetailInsert:
    # Without attempt_subjects' surrogate id, which the database numbers.
    columns = [column for column in table.columns if column.name != "id"]
    converted: list[tuple[int, Converter]] = []
    for position, column in enumerate(columns):
        convert = dialect.converter(column.type)
        if convert is None and isinstance(column.type, Text) and not dialect.holds_nul():
            convert = without_nul  # a subject's name from the API, on a database that refuses NUL
        if convert is not None:
            converted.append((position, convert))
    names = [column.name for column in columns]
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join(dialect.placeholders(len(names)))})"
    return _DetailInsert(sql, _picker(names), tuple(converted))


def _as_is(value: Any) -> Any:
    return value


async def replace_attempt_details(
    connection: AsyncConnection, details: Sequence[Mapping[str, Any]], now: datetime, *, write: bool = True
) -> RowCounts:
    """Each attempt's details (sync.model.admin_rows.attempt_details_row) in place of the
    ones stored: its rows in the detail tables deleted and the new ones inserted, and its
    row marked as having them (details_hash = its content_hash, details_fetched_at = now)
    with the detail's percentile, which the admin listing does not serve. In the caller's
    transaction: an attempt's details are replaced whole, or not at all.

    Counted by attempt: inserted for a first set of details, updated for a replaced one."""
    if not details:
        return RowCounts()
    ids = [detail["id"] for detail in details]
    had = sum(1 for _, fetched in await _stored(connection, attempts, "id", "details_hash IS NOT NULL", ids) if fetched)
    counts = RowCounts(inserted=len(ids) - had, updated=had)
    if not write:
        return counts
    dialect = dialect_of(connection)
    for name in DETAIL_TABLES:
        table = metadata.tables[name]
        # Deleted even for an attempt never fetched: one statement a table (by the key's
        # first column), and it keeps an operator's reset of details_hash from failing on
        # duplicates.
        for chunk in _chunks(ids):
            await connection.execute(delete(table).where(table.c.attempt_id.in_(chunk)))
        insert = _detail_insert(table, dialect)
        rows = [insert.values(row) for detail in details for row in detail[name]]
        if rows:
            await dialect.run(connection, "executemany", insert.sql, rows)
    # The row's own content_hash, read in this statement: the details belong to the row as
    # it is now. (A webhook delivery that rewrote it since the selection makes the hash a
    # newer one; the next admin run rewrites that row from its listing, and reads again.)
    stamp, percentile = dialect.stamp(now), dialect.converter(attempts.c.percentile.type) or _as_is
    first, second, third = dialect.placeholders(3)
    sql = f"UPDATE attempts SET details_hash = content_hash, details_fetched_at = {first}, percentile = {second} WHERE id = {third}"
    await dialect.run(connection, "executemany", sql, [(stamp, percentile(detail["percentile"]), detail["id"]) for detail in details])
    return counts


async def set_listing_status(connection: AsyncConnection, resource: Resource, statuses: Mapping[int, str]) -> None:
    """How fetching each parent's listing of `resource` ended, on the parent's row (for
    attempts: exams.attempts_status); rows already holding the status are untouched."""
    by_status: dict[str, list[int]] = {}
    for parent_id, status in statuses.items():
        by_status.setdefault(status, []).append(parent_id)
    for status, parent_ids in by_status.items():
        for chunk in _chunks(parent_ids):
            await _set_parent_status(connection, resource, status, chunk)


async def set_status_of_every_parent(connection: AsyncConnection, resource: Resource, status: str) -> None:
    """How fetching a listing that holds every parent's items ended (the admin attempt
    listing: every exam's attempts_status)."""
    await _set_parent_status(connection, resource, status, None)


async def _set_parent_status(
    connection: AsyncConnection, resource: Resource, status: str, parent_ids: Sequence[int] | None
) -> None:
    """`status` on the parents among `parent_ids` (None: every parent) that do not hold it."""
    assert resource.parent_table is not None and resource.parent_status_column is not None
    table, column = resource.parent_table, resource.parent_status_column
    dialect = dialect_of(connection)
    first, *ids, last = dialect.placeholders(len(parent_ids or ()) + 2)
    among = f"id IN ({', '.join(ids)}) AND " if parent_ids is not None else ""
    sql = f"UPDATE {table} SET {column} = {first} WHERE {among}({column} IS NULL OR {column} <> {last})"
    await dialect.run(connection, "execute", sql, (status, *(parent_ids or ()), status))


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


@dataclass(frozen=True)
class ErrorRow:
    """What could not be stored, as sync_errors keeps it (already redacted)."""

    entity: str
    key: str | None
    message: str
    http_status: int | None = None
    payload: Any = None


async def record_errors(connection: AsyncConnection, run_id: int, errors: Iterable[ErrorRow], now: datetime) -> None:
    """A batch's errors, in one statement (a page of malformed items is hundreds)."""
    rows = [
        {"run_id": run_id, "entity": error.entity, "key": error.key, "http_status": error.http_status,
         "message": error.message, "payload": error.payload, "created_at": now}
        for error in errors
    ]  # fmt: skip
    if rows:
        await connection.execute(sync_errors.insert(), rows)


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


async def columns_of(connection: AsyncConnection, table: Table) -> frozenset[str]:
    """The columns `table` has in this database, none if it has no such table: what an
    older schema holds, for a command that reads a database it does not migrate (`status`)."""

    def inspected(sync_connection: Any) -> frozenset[str]:
        inspector = inspect(sync_connection)
        if not inspector.has_table(table.name):
            return frozenset()
        return frozenset(column["name"] for column in inspector.get_columns(table.name))

    return cast(frozenset[str], await connection.run_sync(inspected))


async def recent_runs(connection: AsyncConnection, limit: int, columns: Set[str] | None = None) -> list[RunRecord]:
    """The last `limit` runs, newest first. `columns`: those the table has (columns_of),
    when the schema may be older than the code; the rest of a record is None."""
    names = [name for name in RunRecord.__dataclass_fields__ if columns is None or name in columns]
    result = await connection.execute(
        select(*(sync_runs.c[name] for name in names)).order_by(sync_runs.c.id.desc()).limit(limit)
    )
    missing: dict[str, Any] = dict.fromkeys(RunRecord.__dataclass_fields__.keys() - set(names))
    return [RunRecord(**missing, **row._mapping) for row in result]


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


# --- what incremental runs resume from ---------------------------------------------------


async def read_sync_state(connection: AsyncConnection, resource: str, columns: Set[str] | None = None) -> SyncState:
    """What the last completed runs left for `resource`. `columns`: as for recent_runs
    (a table without `rules`, from before revision 0005, or no table at all)."""
    names = [name for name in ("watermark", "last_full_at", "rules") if columns is None or name in columns]
    if "watermark" not in names:
        return SyncState()
    row = (await connection.execute(select(*(sync_state.c[name] for name in names)).where(sync_state.c.resource == resource))).first()
    return SyncState() if row is None else SyncState(**row._mapping)


async def save_sync_state(connection: AsyncConnection, resource: str, state: SyncState, now: datetime) -> None:
    """Written only once a run has completed: what it read is stored, so the next may
    start from it."""
    values = {"watermark": state.watermark, "last_full_at": state.last_full_at, "rules": state.rules, "updated_at": now}
    done = await connection.execute(update(sync_state).where(sync_state.c.resource == resource).values(**values))
    if not done.rowcount:
        await connection.execute(sync_state.insert().values(resource=resource, **values))


async def longest_exam_duration(connection: AsyncConnection) -> timedelta | None:
    seconds = (await connection.execute(select(func.max(exams.c.duration_seconds)))).scalar()
    return None if seconds is None else timedelta(seconds=int(seconds))


def open_attempts_query(moment: datetime) -> Select[Any]:
    """The live attempts stored as Running or Not Started that started before `moment` (or
    at no known time): id, exam id. Read through the partial index ix_attempts_open."""
    started_before = (attempts.c.date < moment) | attempts.c.date.is_(None)
    return select(attempts.c.id, attempts.c.exam_id).where(text(OPEN_STATES), attempts.c.deleted_at.is_(None), started_before)


async def open_attempts_before(connection: AsyncConnection, moment: datetime) -> dict[int, int]:
    """Attempt id → exam id of the open attempts before `moment`: a nightly run must read
    them again."""
    result = await connection.execute(open_attempts_query(moment))
    return {ident: exam_id for ident, exam_id in result}


async def stored_keys_and_digests(connection: AsyncConnection, resource: Resource) -> dict[int, str | None]:
    """key → content_hash of every live row of `resource` (thousands of users, not
    attempts): what an admin run compares listings with, to read only what changed."""
    table = table_of(resource)
    result = await connection.execute(
        select(table.c[resource.key_column], table.c.content_hash).where(
            table.c.deleted_at.is_(None), table.c[resource.key_column].is_not(None)
        )
    )
    return {key: digest for key, digest in result}
