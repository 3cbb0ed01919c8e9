"""Webhook deliveries into the database, many in one transaction (the caller owns it):
each delivery's webhook_events row, the exam it names when none is stored yet, and its
attempt. Three executemany statements whatever the number of deliveries.

The rules live in the SQL, written once for both dialects (only placeholders and value
conversions differ, and those come from sync.sink.dialects):

- An exam is inserted only if no row has its id (ON CONFLICT DO NOTHING): an exam the
  nightly run stored is never overwritten by the few fields a delivery carries.
- An attempt's state only moves forward. A delivery that would take a Completed attempt
  back (a `started` arriving after its `completed`, or after the nightly run stored the
  attempt completed) changes nothing; neither does a duplicate (the same content_hash).
  A field the delivery does not carry (null) keeps its stored value; a username it does
  not carry is the one `users` holds for its user id.
- Rows are written in id order, so that two transactions writing the same rows (two
  batches, or a batch and a nightly run on PostgreSQL) lock them in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from schema import attempts, exams, webhook_events
from sync.model.webhook import WEBHOOK_SOURCE, DeliveryRecord
from sync.sink.dialects import Dialect, dialect_of
from sync.sink.dialects.base import Converter
from sync.sink.store import without_nul

_EVENT_COLUMNS = ("received_at", "attempt_id", "attempt_state", "verified", "payload", "error")
_EXAM_COLUMNS = ("id", "title", "duration_seconds", "start_date", "end_date", "raw", "content_hash")
_ATTEMPT_COLUMNS = (
    "id", "exam_id", "username", "user_id", "date", "state", "correct_count", "incorrect_count",
    "unanswered_count", "score", "percentage", "speed", "accuracy", "raw", "content_hash",
)  # fmt: skip
_JSON_COLUMNS = frozenset({"payload", "raw"})
# Columns a delivery always sets; the other content columns keep their stored value
# where the delivery has none.
_ALWAYS_SET = ("exam_id", "state", "raw", "content_hash", "source", "last_seen_at")
# The update happens only for news: not a duplicate, and not a step back from Completed.
_NEWS = (
    "attempts.content_hash <> excluded.content_hash "
    "AND (attempts.state IS NULL OR attempts.state <> 'Completed' OR excluded.state = 'Completed')"
)


@dataclass(frozen=True)
class _Statement:
    """One statement and how a row becomes its values (the dialect's converters)."""

    sql: str
    columns: tuple[str, ...]
    converters: tuple[Converter | None, ...]

    def values(self, row: Mapping[str, Any], extra: tuple[Any, ...], holds_nul: bool) -> tuple[Any, ...]:
        values = []
        for name, convert in zip(self.columns, self.converters, strict=True):
            value = row[name]
            if name in _JSON_COLUMNS:
                value = None if value is None else _json_text(value, holds_nul)
            elif convert is not None:
                value = convert(value)
            values.append(value if holds_nul else without_nul(value))
        return (*values, *extra)


def _json_text(value: Any, holds_nul: bool) -> str:
    text = orjson.dumps(value)
    if not holds_nul and b"\\u0000" in text:
        text = orjson.dumps(without_nul(value))
    return text.decode()


def _converters(table: Table, columns: Sequence[str], dialect: Dialect) -> tuple[Converter | None, ...]:
    return tuple(dialect.converter(table.c[name].type) for name in columns)


def _insert(dialect: Dialect, table: str, names: Sequence[str]) -> str:
    marks = dict(zip(names, dialect.placeholders(len(names)), strict=True))
    if table == "attempts":  # a delivery naming its student by id only: the name users holds
        username, user_id = marks["username"], marks["user_id"]
        marks["username"] = f"COALESCE({username}, (SELECT users.username FROM users WHERE users.user_id = {user_id}))"
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(marks.values())})"


@cache
def _statements(dialect: Dialect) -> tuple[_Statement, _Statement, _Statement]:
    event_names = (*_EVENT_COLUMNS, "processed_at")
    events = _Statement(
        _insert(dialect, "webhook_events", event_names),
        _EVENT_COLUMNS,
        _converters(webhook_events, _EVENT_COLUMNS, dialect),
    )
    exam_names = (*_EXAM_COLUMNS, "source", "first_seen_at", "last_seen_at")
    exam_rows = _Statement(
        _insert(dialect, "exams", exam_names) + " ON CONFLICT (id) DO NOTHING",
        _EXAM_COLUMNS,
        _converters(exams, _EXAM_COLUMNS, dialect),
    )
    attempt_names = (*_ATTEMPT_COLUMNS, "source", "first_seen_at", "last_seen_at")
    sets = [
        f"{name} = excluded.{name}" if name in _ALWAYS_SET else f"{name} = COALESCE(excluded.{name}, attempts.{name})"
        for name in attempt_names
        if name not in ("id", "first_seen_at")
    ]
    attempt_rows = _Statement(
        _insert(dialect, "attempts", attempt_names)
        + f" ON CONFLICT (id) DO UPDATE SET {', '.join(sets)}, deleted_at = NULL WHERE {_NEWS}",
        _ATTEMPT_COLUMNS,
        _converters(attempts, _ATTEMPT_COLUMNS, dialect),
    )
    return events, exam_rows, attempt_rows


async def store_deliveries(connection: AsyncConnection, records: Sequence[DeliveryRecord], now: datetime) -> None:
    """Every record's webhook_events row; for the accepted ones, their exams (if new) and
    their attempts. The events go first: a transaction that starts with a write waits its
    turn for SQLite's write lock instead of failing on a stale read."""
    if not records:
        return
    dialect = dialect_of(connection)
    holds_nul = dialect.holds_nul()
    stamp = dialect.stamp(now)
    events, exam_rows, attempt_rows = _statements(dialect)
    await dialect.run(
        connection,
        "executemany",
        events.sql,
        [events.values(record.event, (stamp if record.accepted else None,), holds_nul) for record in records],
    )
    accepted = [(record.exam, record.attempt) for record in records if record.exam is not None and record.attempt is not None]
    if not accepted:
        return
    seen = (stamp, stamp)
    new_exams = {exam["id"]: exam for exam, _ in accepted}
    await dialect.run(
        connection,
        "executemany",
        exam_rows.sql,
        [exam_rows.values(new_exams[ident], (WEBHOOK_SOURCE, *seen), holds_nul) for ident in sorted(new_exams)],
    )
    # sorted() is stable: two deliveries of one attempt are applied in the order they came.
    in_order = sorted((attempt for _, attempt in accepted), key=lambda row: row["id"])
    await dialect.run(
        connection,
        "executemany",
        attempt_rows.sql,
        [attempt_rows.values(row, (WEBHOOK_SOURCE, *seen), holds_nul) for row in in_order],
    )
