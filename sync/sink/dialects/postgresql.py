"""PostgreSQL: asyncpg, `$n` placeholders, a session advisory lock for the run, NUL
characters dropped, and SQLSTATE classes for errors.

Users paste the URLs their provider hands out (`postgresql://u:p@host/db?sslmode=require`),
written for libpq. asyncpg takes none of libpq's query parameters as keywords, so they are
translated here into asyncpg's own arguments and taken out of the URL SQLAlchemy sees.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sync.errors import ConfigError, DatabaseError, LockHeldError
from sync.sink.dialects.base import (
    SCHEMA_OPTION,
    DatabaseFault,
    Dialect,
    configured_schema,
    connect_error_text,
)

# SQLSTATE prefixes. Away: 08 connection exceptions, 57P operator intervention
# (shutdown, restart, cannot connect now), 53 insufficient resources, 55000 the database
# not accepting connections; busy for now, 40001 serialization failure and 40P01 deadlock
# (the nightly run and the webhook receiver writing the same rows): the transaction is
# retried whole. Unusable: 42 a statement naming what does not exist, or that the user
# may not run; 25006 a read-only transaction (a standby, a read-only user).
_OUTAGE = ("08", "57P", "53", "55000", "40001", "40P01")
_UNUSABLE = ("42", "25006")

# --- libpq's URL parameters ----------------------------------------------------------------

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# The libpq parameters we translate, in the order the error message lists them.
URL_PARAMETERS = (
    "sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "options", "connect_timeout",
)  # fmt: skip
# asyncpg's name for sslmode, as SQLAlchemy's documentation writes it (`?ssl=require`):
# URLs that worked before the translation keep working.
_ASYNCPG_SSL = "ssl"
# The address in the query (`?host=/var/run/postgresql` for a Unix socket, several hosts):
# SQLAlchemy reads these itself.
_ADDRESS_PARAMETERS = ("host", "port")
# What pg_stat_activity shows for our sessions unless the URL names them otherwise.
DEFAULT_APPLICATION_NAME = "testpress-sync"
# PostgreSQL truncates longer identifiers, which would make the schema we create and the
# one we look for differ.
_MAX_IDENTIFIER_BYTES = 63


def connect_arguments(url: URL, schema: str | None = None) -> tuple[URL, dict[str, Any]]:
    """The URL without libpq's parameters, and asyncpg's connect arguments that say the
    same: `ssl`, `server_settings` (application_name, options' `-c name=value`, the
    schema's search_path) and `timeout`. Raises ConfigError for anything we cannot honour."""
    given = _libpq_parameters(url.query)
    arguments: dict[str, Any] = {}
    ssl_argument = _ssl_argument(given)
    if ssl_argument is not None:
        arguments["ssl"] = ssl_argument
    arguments["server_settings"] = _server_settings(given, schema)
    if "connect_timeout" in given:
        arguments["timeout"] = _connect_timeout(given["connect_timeout"])
    return url.difference_update_query((*URL_PARAMETERS, _ASYNCPG_SSL)), arguments


def _libpq_parameters(query: Mapping[str, str | Sequence[str]]) -> dict[str, str]:
    unknown = [name for name in query if name not in (*URL_PARAMETERS, *_ADDRESS_PARAMETERS, _ASYNCPG_SSL)]
    if unknown:
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL: unknown parameter {', '.join(map(repr, unknown))}; "
            f"supported: {', '.join(URL_PARAMETERS)} (and host, port)"
        )
    if _ASYNCPG_SSL in query and "sslmode" in query:
        raise ConfigError("TESTPRESS_DATABASE_URL: ssl and sslmode are the same parameter; keep sslmode")
    given: dict[str, str] = {}
    for name in (*URL_PARAMETERS, _ASYNCPG_SSL):
        value = query.get(name)
        if value is None:
            continue
        if not isinstance(value, str):  # SQLAlchemy gives a repeated parameter as a tuple
            raise ConfigError(f"TESTPRESS_DATABASE_URL: parameter {name!r} is given more than once")
        given["sslmode" if name == _ASYNCPG_SSL else name] = value
    return given


# --- TLS -------------------------------------------------------------------------------------


def _ssl_argument(given: Mapping[str, str]) -> str | ssl.SSLContext | None:
    """asyncpg's `ssl`: the mode itself, which asyncpg applies as libpq does (PGSSL*
    variables, ~/.postgresql), or, when the URL names certificate files, a context made
    from them. None: asyncpg's default, `prefer` (or PGSSLMODE), as libpq's."""
    mode = given.get("sslmode")
    if mode is not None and mode not in SSL_MODES:
        raise ConfigError(f"TESTPRESS_DATABASE_URL: sslmode {mode!r} is not one of {', '.join(SSL_MODES)}")
    if "sslkey" in given and "sslcert" not in given:
        raise ConfigError("TESTPRESS_DATABASE_URL: sslkey is given without sslcert (the client certificate)")
    root = given.get("sslrootcert")
    if root == "system":
        # libpq ≥ 16: the system's CAs; any mode weaker than verify-full would be a
        # check in name only, so libpq refuses one.
        if mode not in (None, "verify-full"):
            raise ConfigError(
                f"TESTPRESS_DATABASE_URL: sslmode={mode} cannot be used with sslrootcert=system; use verify-full"
            )
        mode = "verify-full"
    if "sslcert" not in given and (root is None or mode in (None, "disable", "allow", "prefer")):
        # Without a client certificate, and in the modes that do not check the server (where
        # libpq ignores a root certificate), the mode says it all: asyncpg keeps the
        # fallback between TLS and plain text of allow and prefer.
        return mode
    if mode == "disable":
        return mode
    # A context is TLS or nothing for asyncpg: with a client certificate, allow and prefer
    # connect over TLS only (a server that asks for the certificate speaks TLS anyway).
    return _ssl_context(mode or "prefer", given)


def _ssl_context(mode: str, given: Mapping[str, str]) -> ssl.SSLContext:
    """A client context for `mode` as libpq applies it: verify-ca checks the chain,
    verify-full the host name too; require checks the chain only if a root certificate is
    given (libpq's rule, kept for compatibility)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # libpq's and asyncpg's floor
    if ssl.HAS_ALPN:
        context.set_alpn_protocols(["postgresql"])  # as asyncpg's own contexts; PostgreSQL 17 checks it
    context.check_hostname = mode == "verify-full"
    root = given.get("sslrootcert")
    if mode in ("verify-ca", "verify-full") or (mode == "require" and root):
        _load_roots(context, root or _default_root(mode))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if "sslcert" in given:
        certificate, key = given["sslcert"], given.get("sslkey")
        try:
            context.load_cert_chain(certificate, keyfile=key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"TESTPRESS_DATABASE_URL: sslcert {certificate} / sslkey {key}: {_reason(exc)}"
            ) from None
    return context


def _default_root(mode: str) -> str:
    """Where libpq looks for the root certificate when the URL names none."""
    default = os.environ.get("PGSSLROOTCERT") or str(Path.home() / ".postgresql" / "root.crt")
    if not Path(default).is_file():
        raise ConfigError(
            f"TESTPRESS_DATABASE_URL: sslmode={mode} checks the server's certificate: give the CA "
            "that signed it as sslrootcert=/path/ca.pem (or sslrootcert=system for the system's CAs)"
        )
    return default


def _load_roots(context: ssl.SSLContext, root: str) -> None:
    if root == "system":
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return
    try:
        context.load_verify_locations(cafile=root)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TESTPRESS_DATABASE_URL: sslrootcert {root}: {_reason(exc)}") from None


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)


# --- settings of the session -----------------------------------------------------------------


def _server_settings(given: Mapping[str, str], schema: str | None) -> dict[str, str]:
    settings = {"application_name": DEFAULT_APPLICATION_NAME}
    if "options" in given:
        settings |= _options_settings(given["options"])
    if "application_name" in given:
        settings["application_name"] = given["application_name"]
    if schema is not None:
        if "search_path" in settings:
            raise ConfigError(
                "TESTPRESS_DATABASE_URL sets search_path in options, and [database] schema "
                "(TESTPRESS_DATABASE_SCHEMA) is set too: keep one of them"
            )
        # Only the tool's schema: every table, view and the version table land in it, and
        # an unqualified name never finds a table of the same name elsewhere.
        settings["search_path"] = quote_identifier(schema)
    return settings


def _options_settings(options: str) -> dict[str, str]:
    """libpq's `options` (`-c name=value`, `-cname=value`, `--name=value`, separated by
    spaces; a backslash escapes a space) as server settings."""
    settings: dict[str, str] = {}
    words = iter(shlex.split(options))
    for word in words:
        if word == "-c":
            assignment = next(words, "")
        elif word.startswith("--"):
            name, _, value = word[2:].partition("=")
            assignment = f"{name.replace('-', '_')}={value}"
        elif word.startswith("-c"):
            assignment = word[2:]
        else:
            raise ConfigError(
                f"TESTPRESS_DATABASE_URL: options {options!r}: only -c name=value settings are supported"
            )
        name, equals, value = assignment.partition("=")
        if not name or not equals:
            raise ConfigError(f"TESTPRESS_DATABASE_URL: options {options!r}: {assignment!r} is not name=value")
        settings[name.strip()] = value
    return settings


def _connect_timeout(value: str) -> float | None:
    try:
        seconds = int(value)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise ConfigError(f"TESTPRESS_DATABASE_URL: connect_timeout {value!r} is not a whole number of seconds")
    return seconds or None  # 0: wait as long as it takes, as in libpq


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def checked_schema(schema: str) -> str:
    if len(schema.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"database.schema {schema!r} is longer than PostgreSQL's {_MAX_IDENTIFIER_BYTES} bytes "
            "(TESTPRESS_DATABASE_SCHEMA)"
        )
    return schema


# --- the run lock ----------------------------------------------------------------------------


def lock_key(schema: str) -> int:
    """The advisory lock's key for the tool's tables in `schema`: one run at a time per
    schema, so two institutes in two schemas of one database sync at once. A digest, not
    hash(), which differs from one process to the next; signed, as pg_try_advisory_lock's
    bigint is."""
    digest = hashlib.sha256(f"testpress-sync:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgreSQL(Dialect):
    name = "postgresql"
    async_driver = "postgresql+asyncpg"
    url_schemes = frozenset(
        {"postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+asyncpg"}
    )

    def placeholders(self, count: int) -> list[str]:
        return [f"${n}" for n in range(1, count + 1)]

    # asyncpg takes aware datetimes, Decimals and ints as they are: no converters.

    async def run(self, connection: AsyncConnection, method: str, sql: str, parameters: Any) -> Any:
        # exec_driver_sql: the asyncpg adapter is what opens the transaction, and its
        # overhead per statement is a fifth of SQLite's adapter's.
        result = await connection.exec_driver_sql(sql, parameters)
        return result.all() if method == "execute_fetchall" else None

    async def lookup(
        self, connection: AsyncConnection, table: Table, key: str, columns: str, keys: Sequence[Any]
    ) -> list[Any]:
        # A join, not `key = ANY($1)`: PostgreSQL soon runs a prepared statement with a
        # generic plan made while the table was small, a sequential scan that compares
        # every row with every key (10 ms a batch for 2,000 users, where the join takes a
        # fraction of one, whatever the plan).
        kind = table.c[key].type.compile(dialect=connection.dialect)
        sql = (
            f"SELECT t.{key}, {columns} FROM {table.name} AS t "
            f"JOIN unnest($1::{kind}[]) AS wanted (key) ON t.{key} = wanted.key"
        )
        return list((await connection.exec_driver_sql(sql, (list(keys),))).all())

    def holds_nul(self) -> bool:
        return False  # text and jsonb cannot hold a NUL character

    def check_url(self, url: URL) -> None:
        connect_arguments(url)

    def create_engine(
        self,
        url: URL,
        json_serializer: Callable[[Any], str],
        json_deserializer: Callable[[Any], Any],
        schema: str | None = None,
    ) -> AsyncEngine:
        if schema is not None:
            schema = checked_schema(schema)
        url, arguments = connect_arguments(url, schema)
        return create_async_engine(
            url,
            json_serializer=json_serializer,
            json_deserializer=json_deserializer,
            pool_size=4,
            pool_pre_ping=True,
            connect_args=arguments,
            execution_options={SCHEMA_OPTION: schema},
        )

    def create_schema(self, connection: Connection) -> None:
        """The configured schema, if it is missing. Looked up first: CREATE SCHEMA checks
        the right to create one even when it exists, and a sync user may not have it."""
        schema = configured_schema(connection)
        if schema is None:
            return
        exists = connection.exec_driver_sql(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1", (schema,)
        ).scalar()
        if not exists:
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")

    @asynccontextmanager
    async def run_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        """A session advisory lock on a connection held for the run: it dies with the
        connection, so a killed run never leaves a lock behind. Its key is the schema's
        (lock_key), so runs into different schemas of one database do not wait for each other."""
        where = engine.url.render_as_string(hide_password=True)
        try:
            connection = await engine.connect()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise DatabaseError(f"database {where}: {connect_error_text(exc)}") from exc
        try:
            schema = await _schema_of(connection, configured_schema(engine))
            key = lock_key(schema)
            got = (await connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})).scalar()
            await connection.commit()
            if not got:
                raise LockHeldError(f"another testpress-sync run is writing to {where} (schema {schema})")
            try:
                yield
            finally:
                await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                await connection.commit()
        finally:
            await connection.close()

    def fault_of(self, driver_error: BaseException | None) -> DatabaseFault | None:
        sqlstate = getattr(driver_error, "sqlstate", None)
        if not isinstance(sqlstate, str):
            return None
        if sqlstate.startswith(_OUTAGE):
            return DatabaseFault.OUTAGE
        if sqlstate.startswith(_UNUSABLE):
            return DatabaseFault.UNUSABLE
        return None  # the class of the error decides (sync.sink.faults)


async def _schema_of(connection: AsyncConnection, configured: str | None) -> str:
    """The schema the run writes to: where the connection's unqualified names go, the
    same whether the schema was named in the settings, in the URL's options, or is the
    default (public). A configured schema that does not exist yet is named by the setting."""
    current = (await connection.execute(text("SELECT current_schema()"))).scalar()
    return str(current or configured or "")
