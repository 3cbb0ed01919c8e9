"""Fitting a user's warehouse: libpq's URL parameters (TLS against a PostgreSQL of the
test's own), a schema of the tool's own, its own Alembic version table beside another
application's, and one run at a time per schema."""

from __future__ import annotations

import asyncio
import gc
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
from alembic.config import Config
from sqlalchemy import Connection, Table, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from schema import SCHEMA_HEAD, metadata
from schema.views import VIEW_NAMES
from sync.cli import main
from sync.commands.doctor import _check_database
from sync.commands.sync import Outputs, sync_into
from sync.config import Settings
from sync.errors import ConfigError, DatabaseError, LockHeldError
from sync.model.run import RunOptions, RunSummary
from sync.ops.logs import Redactor
from sync.simulator import Faults, SimulatorServer
from sync.sink.database import (
    LEGACY_VERSION_TABLE,
    VERSION_TABLE,
    _version_table,
    create_engine,
    database_url_from,
    ensure_schema,
    migrate,
    migrations_dir,
    run_lock,
    schema_state,
)
from sync.sink.dialects.postgresql import connect_arguments, lock_key
from tests.conftest import (
    PASSWORD,
    USERNAME,
    fast_settings,
    fresh_postgres_database,
    run_in_own_loop,
    small_dataset,
)
from tests.helpers import assert_matches_server, upgrade_to
from tests.test_migrations import _schema_fingerprint

TOOL_RELATIONS = set(metadata.tables) | set(VIEW_NAMES) | {VERSION_TABLE}


def engine_for(url: str, schema: str | None = None) -> AsyncEngine:
    return create_engine(database_url_from(url), schema=schema)


async def relations(url: str) -> set[tuple[str, str]]:
    """(schema, name) of every table and view outside PostgreSQL's own schemas."""
    engine = engine_for(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            ))  # fmt: skip
            return {(row[0], row[1]) for row in rows}
    finally:
        await engine.dispose()


async def run_into(simulator: SimulatorServer, url: str, schema: str | None) -> RunSummary:
    """One run the way `testpress-sync run` makes it: lock, schema, sync."""
    settings = replace(fast_settings(simulator.base_url, url), database_schema=schema)
    return await sync_into(settings, Redactor(), asyncio.Event(), RunOptions(), Outputs())


# --- a schema of the tool's own ------------------------------------------------------------


async def test_a_run_into_a_schema_puts_every_table_and_view_there(simulator: SimulatorServer) -> None:
    with fresh_postgres_database() as url:
        summary = await run_into(simulator, url, "institute_a")
        assert summary.status == "succeeded"
        found = await relations(url)
        assert found == {("institute_a", name) for name in TOOL_RELATIONS}  # nothing in public
        engine = engine_for(url, "institute_a")
        try:
            await assert_matches_server(engine, simulator)
            assert (await schema_state(engine)).up_to_date
        finally:
            await engine.dispose()


async def test_a_schema_is_a_postgresql_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL setting"):
        create_engine(database_url_from(f"sqlite:///{tmp_path / 'sync.db'}"), schema="institute_a")


def test_a_schema_on_sqlite_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTPRESS_DATABASE_SCHEMA", "institute_a")
    assert main(["migrate", "--database-url", f"sqlite:///{tmp_path / 'sync.db'}", "--log-format", "json"]) == 2
    assert "PostgreSQL setting" in capsys.readouterr().err
    assert not (tmp_path / "sync.db").exists()


def test_alembic_by_hand_honours_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """`alembic upgrade head` with TESTPRESS_DATABASE_URL and TESTPRESS_DATABASE_SCHEMA
    builds, in that schema, exactly what a run builds in it."""
    with fresh_postgres_database() as by_hand, fresh_postgres_database() as by_run:
        monkeypatch.setenv("TESTPRESS_DATABASE_URL", by_hand)
        monkeypatch.setenv("TESTPRESS_DATABASE_SCHEMA", "institute_a")
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        command.upgrade(config, "head")

        async def build_and_fingerprint() -> tuple[dict[str, Any], dict[str, Any], set[tuple[str, str]]]:
            engines = [engine_for(by_hand, "institute_a"), engine_for(by_run, "institute_a")]
            try:
                await migrate(engines[1])
                prints = []
                for engine in engines:
                    async with engine.connect() as connection:
                        prints.append(await connection.run_sync(_schema_fingerprint))
                return prints[0], prints[1], await relations(by_hand)
            finally:
                for engine in engines:
                    await engine.dispose()

        hand, run, found = run_in_own_loop(build_and_fingerprint())
    assert hand == run
    assert found == {("institute_a", name) for name in TOOL_RELATIONS}


# --- other applications' tables and Alembic ------------------------------------------------


async def _execute(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as connection:
        for statement in statements:
            await connection.execute(text(statement))


async def _rows(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(text(sql))]


async def _table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))


async def test_another_applications_tables_and_alembic_are_left_alone(database_url: str) -> None:
    """Sharing the default schema (public on PostgreSQL) with them."""
    await _beside_another_application(database_url, None)


async def test_another_applications_public_tables_and_alembic_are_left_alone_from_a_schema() -> None:
    with fresh_postgres_database() as url:
        await _beside_another_application(url, "institute_a")
        found = await relations(url)
    assert {name for where, name in found if where == "public"} == {"orders", "alembic_version"}
    assert {name for where, name in found if where == "institute_a"} == TOOL_RELATIONS


async def _beside_another_application(database_url: str, schema: str | None) -> None:
    """public.orders and another application's alembic_version (at 'abc123'): the tool
    accepts the database, leaves both as they are, and keeps its revision apart."""
    theirs = engine_for(database_url)
    ours = engine_for(database_url, schema)
    try:
        await _execute(
            theirs,
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT)",
            "INSERT INTO orders VALUES (1, 'asha')",
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
            "INSERT INTO alembic_version VALUES ('abc123')",
        )
        state = await ensure_schema(ours)
        assert state.empty and not state.legacy
        assert (await schema_state(ours)).up_to_date
        assert await _rows(theirs, "SELECT id, customer FROM orders") == [(1, "asha")]
        assert await _rows(theirs, "SELECT version_num FROM alembic_version") == [("abc123",)]
        assert await _rows(ours, f"SELECT version_num FROM {VERSION_TABLE}") == [(SCHEMA_HEAD,)]
        await ensure_schema(ours)  # and again: nothing to do, nothing refused
    finally:
        await theirs.dispose()
        await ours.dispose()


def _make_legacy(connection: Connection, revision: str, others: list[str]) -> None:
    """The version record as testpress-sync kept it before VERSION_TABLE: in alembic_version."""
    _version_table().drop(connection)
    legacy: Table = _version_table(LEGACY_VERSION_TABLE)
    legacy.create(connection)
    for version in [revision, *others]:
        connection.execute(legacy.insert().values(version_num=version))


async def _keep_the_record_as_before(engine: AsyncEngine, revision: str, others: list[str] | None = None) -> None:
    """The database's version record moved back to alembic_version (_make_legacy)."""
    async with engine.connect() as connection:
        await connection.run_sync(_make_legacy, revision, others or [])
        await connection.commit()


@pytest.mark.parametrize("others", [[], ["abc123"]], ids=["alone", "beside-another-app"])
async def test_our_revision_in_alembic_version_moves_to_our_version_table(
    database_url: str, others: list[str]
) -> None:
    """A database of an older testpress-sync, at the first revision with its record in
    alembic_version: the next migrate moves the record (and upgrades); alembic_version is
    dropped if that leaves it empty, kept with another application's row otherwise."""
    engine = engine_for(database_url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(upgrade_to("0001"))
            await connection.commit()
        await _keep_the_record_as_before(engine, "0001", others)
        before = await schema_state(engine)
        assert (before.current, before.legacy, before.known, before.clash) == ("0001", True, True, False)
        assert await migrate(engine) == ("0001", SCHEMA_HEAD)
        after = await schema_state(engine)
        assert (after.current, after.legacy, after.up_to_date) == (SCHEMA_HEAD, False, True)
        assert await _rows(engine, f"SELECT version_num FROM {VERSION_TABLE}") == [(SCHEMA_HEAD,)]
        if others:
            assert await _rows(engine, "SELECT version_num FROM alembic_version") == [("abc123",)]
        else:
            assert LEGACY_VERSION_TABLE not in await _table_names(engine)
    finally:
        await engine.dispose()


async def test_a_run_moves_the_record_of_a_current_database(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        await migrate(engine)
        await _keep_the_record_as_before(engine, SCHEMA_HEAD)
        dry = await ensure_schema(engine, auto_migrate=False)  # a dry run writes nothing
        assert dry.legacy and LEGACY_VERSION_TABLE in await _table_names(engine)
        state = await ensure_schema(engine)
        assert state.legacy and state.up_to_date
        assert not (await schema_state(engine)).legacy
        assert LEGACY_VERSION_TABLE not in await _table_names(engine)
    finally:
        await engine.dispose()


async def test_another_apps_revision_named_like_ours_is_theirs(database_url: str) -> None:
    """alembic_version at "0001" without the tool's tables is another application's."""
    engine = engine_for(database_url)
    try:
        await _execute(
            engine,
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
            "INSERT INTO alembic_version VALUES ('0001')",
        )
        assert (await schema_state(engine)).empty
        await migrate(engine)
        assert await _rows(engine, "SELECT version_num FROM alembic_version") == [("0001",)]
        assert await _rows(engine, f"SELECT version_num FROM {VERSION_TABLE}") == [(SCHEMA_HEAD,)]
    finally:
        await engine.dispose()


async def test_a_table_with_one_of_our_names_is_a_clash_refused_with_the_reason(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        await _execute(engine, "CREATE TABLE exams (id INTEGER PRIMARY KEY, name TEXT)")
        with pytest.raises(DatabaseError) as refused:
            await ensure_schema(engine)
    finally:
        await engine.dispose()
    message = str(refused.value)
    assert "exams" in message and "did not create" in message and VERSION_TABLE in message
    remedy = "TESTPRESS_DATABASE_SCHEMA" if database_url.startswith("postgres") else "another database file"
    assert remedy in message
    check = await _check_database(Settings(database_url=database_url))
    assert not check.ok and "exams" in check.detail and check.failure is DatabaseError
    assert remedy in check.remedy


async def test_a_clash_in_another_schema_does_not_block() -> None:
    with fresh_postgres_database() as url:
        theirs = engine_for(url)
        ours = engine_for(url, "institute_a")
        try:
            await _execute(theirs, "CREATE TABLE exams (id INTEGER PRIMARY KEY, name TEXT)")
            await ensure_schema(ours)
            assert (await schema_state(ours)).up_to_date
            check = await _check_database(Settings(database_url=url, database_schema="institute_a"))
            assert check.ok and "schema institute_a" in check.detail
        finally:
            await theirs.dispose()
            await ours.dispose()


async def test_the_doctor_tells_of_a_record_to_move(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        await migrate(engine)
        await _keep_the_record_as_before(engine, SCHEMA_HEAD)
    finally:
        await engine.dispose()
    check = await _check_database(Settings(database_url=database_url))
    assert check.ok and "alembic_version" in check.detail and VERSION_TABLE in check.detail


# --- one run at a time per schema ------------------------------------------------------------


def test_lock_keys_are_stable_and_differ_by_schema() -> None:
    # A digest, the same in every process and every version of the tool.
    assert lock_key("institute_a") == lock_key("institute_a") == 3834109234126545380
    assert lock_key("institute_a") != lock_key("institute_b")
    assert all(-(2**63) <= lock_key(name) < 2**63 for name in ("", "public", "x" * 63))


async def test_runs_into_two_schemas_hold_their_locks_at_once() -> None:
    with fresh_postgres_database() as url:
        engines = {name: engine_for(url, schema) for name, schema in
                   [("a", "institute_a"), ("b", "institute_b"), ("a again", "institute_a"),
                    ("default", None), ("public", "public")]}  # fmt: skip
        try:
            async with run_lock(engines["a"]), run_lock(engines["b"]):
                with pytest.raises(LockHeldError, match="institute_a"):
                    async with run_lock(engines["a again"]):
                        pass
                # The schema made while the lock is held: its key is still the same.
                await migrate(engines["a again"])
                with pytest.raises(LockHeldError):
                    async with run_lock(engines["a again"]):
                        pass
            async with run_lock(engines["default"]):
                with pytest.raises(LockHeldError, match="public"):  # public, named or not
                    async with run_lock(engines["public"]):
                        pass
        finally:
            for engine in engines.values():
                await engine.dispose()


async def test_two_institutes_sync_into_two_schemas_at_once() -> None:
    """Two real runs, concurrently, into two schemas of one database: neither waits for
    the other's lock, and each stores what its server serves."""
    slow = Faults(latency=0.01)  # every request takes a while: the runs overlap for sure
    async with (
        SimulatorServer(small_dataset(seed=1), faults=slow, username=USERNAME, password=PASSWORD) as first,
        SimulatorServer(small_dataset(seed=2), faults=slow, username=USERNAME, password=PASSWORD) as second,
    ):
        with fresh_postgres_database() as url:
            summaries = await asyncio.gather(
                run_into(first, url, "institute_a"), run_into(second, url, "institute_b")
            )
            assert [summary.status for summary in summaries] == ["succeeded", "succeeded"]
            periods = []
            for schema, simulator in (("institute_a", first), ("institute_b", second)):
                engine = engine_for(url, schema)
                try:
                    await assert_matches_server(engine, simulator)
                    periods.append((await _rows(engine, "SELECT started_at, finished_at FROM sync_runs"))[0])
                finally:
                    await engine.dispose()
    (a_start, a_end), (b_start, b_end) = periods
    assert a_start < b_end and b_start < a_end  # at the same time, not one after the other


# --- libpq's URL parameters, translated for asyncpg --------------------------------------------


def _arguments(query: str, schema: str | None = None) -> tuple[str, dict[str, Any]]:
    url, arguments = connect_arguments(make_url(f"postgresql+asyncpg://u@h/db?{query}"), schema)
    return url.render_as_string(), arguments


def test_libpq_parameters_become_asyncpg_arguments() -> None:
    url, arguments = _arguments(
        "sslmode=require&application_name=bi&connect_timeout=7"
        "&options=-c%20statement_timeout%3D5000%20-cwork_mem%3D8MB%20--lock-timeout%3D2s",
        schema="institute_a",
    )
    assert url == "postgresql+asyncpg://u@h/db"
    assert arguments == {
        "ssl": "require",
        "timeout": 7,
        "server_settings": {
            "statement_timeout": "5000", "work_mem": "8MB", "lock_timeout": "2s",
            "application_name": "bi", "search_path": '"institute_a"',
        },
    }  # fmt: skip
    assert _arguments("host=/var/run/postgresql")[0] == "postgresql+asyncpg://u@h/db?host=%2Fvar%2Frun%2Fpostgresql"
    assert _arguments("")[1] == {"server_settings": {"application_name": "testpress-sync"}}
    assert _arguments("connect_timeout=0")[1]["timeout"] is None  # libpq: wait indefinitely
    assert _arguments("ssl=require") == ("postgresql+asyncpg://u@h/db", _arguments("sslmode=require")[1])


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("sslmode=require&sslfactory=x", "unknown parameter 'sslfactory'; supported: sslmode, sslrootcert"),
        ("sslmode=always", "sslmode 'always' is not one of disable, allow"),
        ("sslmode=require&sslmode=disable", "'sslmode' is given more than once"),
        ("ssl=require&sslmode=require", "ssl and sslmode are the same parameter"),
        ("sslkey=/k.pem", "sslkey is given without sslcert"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "sslrootcert /nonexistent/ca.pem: No such file"),
        ("sslmode=require&sslrootcert=system", "cannot be used with sslrootcert=system"),
        ("options=-c", "'' is not name=value"),
        ("options=-c%20nameonly", "'nameonly' is not name=value"),
        ("options=-f%20x", "only -c name=value settings are supported"),
        ("connect_timeout=soon", "connect_timeout 'soon' is not a whole number"),
    ],
)
def test_what_cannot_be_honoured_is_a_config_error(query: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match="TESTPRESS_DATABASE_URL") as refused:
        database_url_from(f"postgresql://u@h/db?{query}")
    assert complaint in str(refused.value)


def test_a_search_path_in_options_and_a_schema_are_one_too_many() -> None:
    with pytest.raises(ConfigError, match="keep one of them"):
        _arguments("options=-c%20search_path%3Dx", schema="institute_a")


def test_an_unknown_parameter_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--database-url", "postgresql://u@127.0.0.1:1/db?sslmode=require&ssl_mode=on"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "'ssl_mode'" in err and "sslmode, sslrootcert, sslcert, sslkey" in err
    assert "Traceback" not in err


@pytest.fixture(autouse=True)
def _collect_the_sockets_of_refused_connections() -> Iterator[None]:
    """This module makes connections fail on purpose (a silent listener, a wrong CA, a
    rule that refuses plain TCP). asyncpg leaves such an attempt's socket to the garbage
    collector, whose ResourceWarning would then surface in whichever test runs next:
    collect them here, at the end of the test that provoked them."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_connect_timeout_is_honoured() -> None:
    """A server that takes the connection and never answers: given up after
    connect_timeout, with a line that says so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        engine = engine_for(f"postgresql://u@127.0.0.1:{port}/db?sslmode=disable&connect_timeout=1")
        started = time.monotonic()
        try:
            with pytest.raises(DatabaseError, match="no answer in time") as failed:
                await schema_state(engine)
        finally:
            await engine.dispose()
        waited = time.monotonic() - started
    assert 0.9 <= waited < 5, waited
    assert "connect_timeout" in str(failed.value)


# --- against a PostgreSQL with TLS on, made for these tests ---------------------------------------


@dataclass(frozen=True)
class TlsCluster:
    port: int
    directory: Path
    ca: Path  # signed the server's certificate and the client's
    wrong_ca: Path  # signed nothing of this cluster
    client_cert: Path  # CN=certuser
    client_key: Path
    timings: dict[str, float]

    def url(self, user: str = "postgres", database: str = "postgres", **params: str | Path) -> str:
        query = urlencode({name: str(value) for name, value in params.items()})
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (in CI the TLS tests must run)")
    pytest.skip(reason)


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL's programs: Debian's layout, else initdb on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_certificates(directory: Path) -> None:
    """A CA; a server certificate it signs for 127.0.0.1 and localhost; a client
    certificate it signs for the role certuser; and another CA that signed nothing."""
    for ca in ("ca", "wrong-ca"):
        _openssl(directory, "req", "-x509", *_EC_KEY, "-days", "2", "-subj", f"/CN=testpress-sync test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt")  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, subject, extensions in (("server", "/CN=127.0.0.1", ["-extfile", "server.ext"]), ("client", "/CN=certuser", [])):
        _openssl(directory, "req", *_EC_KEY, "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr")
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", *extensions, "-out", f"{name}.crt")  # fmt: skip


# Who may connect how. sslonly: only over TLS (a plain connection is rejected, not
# passed on to the `host` line); certuser: only with a client certificate; anyone else:
# either way, so that the tests can tell which one a connection used.
_HBA = """\
local all all trust
hostnossl all sslonly 127.0.0.1/32 reject
hostssl all certuser 127.0.0.1/32 cert
hostnossl all certuser 127.0.0.1/32 reject
host all all 127.0.0.1/32 trust
"""


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[TlsCluster]:
    """A throwaway PostgreSQL with TLS on and a certificate of its own, on a free port of
    127.0.0.1; stopped and removed afterwards. Skipped (failed with CI=true) where there
    is no PostgreSQL to make one with."""
    binaries = _postgres_bin()
    if binaries is None:
        _unavailable("no initdb (looked in /usr/lib/postgresql/*/bin and on PATH): cannot make a TLS PostgreSQL")
    if shutil.which("openssl") is None:
        _unavailable("no openssl: cannot make the TLS PostgreSQL's certificates")
    assert binaries is not None
    as_postgres: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:  # initdb refuses root: the programs run as the postgres user
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no postgres user to run initdb as")
        as_postgres, owner = ["runuser", "-u", "postgres", "--"], (entry.pw_uid, entry.pw_gid)
    timings: dict[str, float] = {}
    directory = Path(tempfile.mkdtemp(prefix="testpress-sync-tls-"))
    data = directory / "data"
    started = False
    try:
        clock = time.monotonic()
        _make_certificates(directory)
        timings["certificates"] = time.monotonic() - clock
        if owner is not None:
            for path in [directory, *directory.iterdir()]:
                os.chown(path, *owner)
        (directory / "server.key").chmod(0o600)  # PostgreSQL refuses a key others can read

        def postgres_program(name: str, *args: str) -> None:
            subprocess.run([*as_postgres, str(binaries / name), *args], check=True, capture_output=True, timeout=60)

        clock = time.monotonic()
        postgres_program("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                         "--no-locale", "--no-sync", "--no-instructions")  # fmt: skip
        timings["initdb"] = time.monotonic() - clock
        (data / "pg_hba.conf").write_text(_HBA)
        port = _free_port()
        settings = {
            "port": port, "listen_addresses": "127.0.0.1", "unix_socket_directories": directory,
            "ssl": "on", "ssl_cert_file": directory / "server.crt", "ssl_key_file": directory / "server.key",
            "ssl_ca_file": directory / "ca.crt",
            # Fast to start, and no durability to pay for: the cluster lives for a module.
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "shared_buffers": "16MB", "max_connections": 40,
        }  # fmt: skip
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        clock = time.monotonic()
        try:
            postgres_program("pg_ctl", "-D", str(data), "-l", str(directory / "server.log"), "-w", "-o", options, "start")
        except subprocess.CalledProcessError:
            log = (directory / "server.log").read_text() if (directory / "server.log").exists() else ""
            pytest.fail(f"the TLS PostgreSQL did not start:\n{log[-2000:]}")
        started = True
        timings["start"] = time.monotonic() - clock

        async def roles() -> None:
            admin = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres", ssl=False)
            try:
                await admin.execute("CREATE ROLE sslonly LOGIN; CREATE ROLE certuser LOGIN")
            finally:
                await admin.close()

        run_in_own_loop(roles())
        cluster = TlsCluster(
            port=port, directory=directory, ca=directory / "ca.crt", wrong_ca=directory / "wrong-ca.crt",
            client_cert=directory / "client.crt", client_key=directory / "client.key", timings=timings,
        )  # fmt: skip
        yield cluster
    finally:
        if started:
            clock = time.monotonic()
            postgres_program("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
            timings["stop"] = time.monotonic() - clock
        shutil.rmtree(directory, ignore_errors=True)
        if timings:
            print(f"\nTLS PostgreSQL fixture, seconds: {', '.join(f'{k} {v:.3f}' for k, v in timings.items())}")


async def session_facts(url: str, schema: str | None = None) -> dict[str, Any]:
    """What the server says about the session a tool's engine opens with `url`."""
    engine = engine_for(url, schema)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(text(
                "SELECT s.ssl, a.application_name, current_setting('statement_timeout'), "
                "current_setting('search_path'), current_user "
                "FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.pid = pg_backend_pid()"
            ))).one()  # fmt: skip
    finally:
        await engine.dispose()
    return dict(zip(("ssl", "application_name", "statement_timeout", "search_path", "user"), row, strict=True))


async def refused(url: str) -> str:
    """The DatabaseError's message when the tool's engine for `url` cannot connect."""
    engine = engine_for(url)
    try:
        with pytest.raises(DatabaseError) as failed:
            await schema_state(engine)
    finally:
        await engine.dispose()
    return str(failed.value)


@pytest.mark.parametrize(
    ("user", "mode", "over_tls"),
    [
        ("postgres", "disable", False),
        ("postgres", "allow", False),  # plain text first, TLS only if refused
        ("sslonly", "allow", True),  # ...as here
        ("postgres", "prefer", True),
        ("postgres", "require", True),
        ("postgres", "verify-ca", True),
        ("postgres", "verify-full", True),
    ],
)
async def test_every_sslmode(tls_cluster: TlsCluster, user: str, mode: str, over_tls: bool) -> None:
    params: dict[str, str | Path] = {"sslmode": mode}
    if mode.startswith("verify"):
        params["sslrootcert"] = tls_cluster.ca
    facts = await session_facts(tls_cluster.url(user, **params))
    assert (facts["ssl"], facts["user"]) == (over_tls, user)


async def test_require_connects_over_tls_and_disable_meets_the_hostssl_rule(tls_cluster: TlsCluster) -> None:
    assert (await session_facts(tls_cluster.url("sslonly", sslmode="require")))["ssl"] is True
    assert "rejects connection" in await refused(tls_cluster.url("sslonly", sslmode="disable"))


async def test_verify_full_trusts_only_the_ca_it_is_given(tls_cluster: TlsCluster) -> None:
    for host in ("127.0.0.1", "localhost"):  # both names of the certificate
        url = tls_cluster.url(sslmode="verify-full", sslrootcert=tls_cluster.ca).replace("127.0.0.1", host)
        assert (await session_facts(url))["ssl"] is True
    message = await refused(tls_cluster.url(sslmode="verify-full", sslrootcert=tls_cluster.wrong_ca))
    assert "certificate verify failed" in message and "sslrootcert" in message
    # require with a root certificate checks the chain, as libpq's does
    assert "certificate verify failed" in await refused(tls_cluster.url(sslmode="require", sslrootcert=tls_cluster.wrong_ca))


def test_the_cli_migrates_over_verify_full_and_exits_4_on_a_wrong_ca(
    tls_cluster: TlsCluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESTPRESS_DATABASE_SCHEMA", raising=False)
    database = f"warehouse_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(tls_cluster.url(), ssl=False)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()

    run_in_own_loop(create())
    good = tls_cluster.url(database=database, sslmode="verify-full", sslrootcert=tls_cluster.ca)
    wrong = tls_cluster.url(database=database, sslmode="verify-full", sslrootcert=tls_cluster.wrong_ca)
    assert main(["migrate", "--database-url", good, "--log-format", "json"]) == 0
    capsys.readouterr()
    assert main(["migrate", "--database-url", wrong, "--log-format", "json"]) == 4
    err = capsys.readouterr().err
    assert "certificate verify failed" in err and "Traceback" not in err
    monkeypatch.setenv("TESTPRESS_DATABASE_SCHEMA", "institute_a")
    assert main(["migrate", "--database-url", good, "--log-format", "json"]) == 0
    facts = run_in_own_loop(session_facts(good, "institute_a"))
    assert facts["ssl"] is True and facts["search_path"] == '"institute_a"'


async def test_a_client_certificate_logs_in(tls_cluster: TlsCluster) -> None:
    certificate = {"sslcert": tls_cluster.client_cert, "sslkey": tls_cluster.client_key}
    verified = await session_facts(tls_cluster.url("certuser", sslmode="verify-full", sslrootcert=tls_cluster.ca, **certificate))
    assert (verified["ssl"], verified["user"]) == (True, "certuser")
    assert (await session_facts(tls_cluster.url("certuser", sslmode="require", **certificate)))["ssl"] is True
    assert "certificate" in await refused(tls_cluster.url("certuser", sslmode="require"))


async def test_application_name_options_and_schema_reach_the_session(tls_cluster: TlsCluster) -> None:
    named = await session_facts(
        tls_cluster.url(sslmode="require", application_name="nightly-warehouse", options="-c statement_timeout=5000"),
        schema="institute_a",
    )
    assert named == {
        "ssl": True, "application_name": "nightly-warehouse", "statement_timeout": "5s",
        "search_path": '"institute_a"', "user": "postgres",
    }  # fmt: skip
    default = await session_facts(tls_cluster.url(sslmode="require"))
    assert default["application_name"] == "testpress-sync" and default["statement_timeout"] == "0"


def test_certificate_files_that_are_not_there_are_a_config_error(tls_cluster: TlsCluster) -> None:
    with pytest.raises(ConfigError, match="sslcert"):
        database_url_from(tls_cluster.url(sslmode="require", sslcert=tls_cluster.directory / "none.crt"))
    context = connect_arguments(
        make_url(tls_cluster.url(sslmode="verify-ca", sslrootcert=tls_cluster.ca)).set(drivername="postgresql+asyncpg")
    )[1]["ssl"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_REQUIRED
    assert not context.check_hostname
