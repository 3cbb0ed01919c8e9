"""The database dialects testpress-sync writes to, by name."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from sync.sink.dialects.base import DatabaseFault, Dialect
from sync.sink.dialects.postgresql import PostgreSQL
from sync.sink.dialects.sqlite import SQLite

DIALECTS: dict[str, Dialect] = {dialect.name: dialect for dialect in (SQLite(), PostgreSQL())}


def dialect_of(connection: AsyncConnection) -> Dialect:
    return DIALECTS[connection.dialect.name]


def dialect_named(name: str) -> Dialect:
    return DIALECTS[name]


def dialect_for_scheme(drivername: str) -> Dialect | None:
    """The dialect a URL's drivername (`sqlite`, `postgres`, `postgresql+psycopg2` …) means."""
    return next((d for d in DIALECTS.values() if drivername in d.url_schemes), None)


__all__ = ["DIALECTS", "DatabaseFault", "Dialect", "dialect_for_scheme", "dialect_named", "dialect_of"]
