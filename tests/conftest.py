"""Fixtures: both databases, the simulator on loopback, fast-retry settings.

Every storage test runs against SQLite and PostgreSQL. Without a reachable PostgreSQL the
Postgres half skips with the reason, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.config import ApiSettings, HttpSettings, Settings, SyncSettings
from sync.simulator import Dataset, Faults, SimulatorServer
from sync.sink.database import create_engine, database_url_from, migrate

PG_URL = os.environ.get("TESTPRESS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
USERNAME, PASSWORD = "teacher", "pa55-w0rd-sekret"


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


_pg_problem: list[str | None] = []


def run_in_own_loop(coroutine: Any) -> Any:
    """Run a coroutine to the end on a fresh loop in a thread: callable from sync code
    and from inside a running loop (async fixtures) alike."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used, or None; asked once per session."""
    if not _pg_problem:

        async def probe() -> None:
            connection = await asyncpg.connect(_asyncpg_dsn(PG_URL), timeout=5)
            await connection.close()

        try:
            run_in_own_loop(probe())
            _pg_problem.append(None)
        except Exception as exc:  # any reason at all: report it
            _pg_problem.append(f"PostgreSQL at {PG_URL} unreachable: {exc}")
    return _pg_problem[0]


def require_postgres() -> None:
    problem = postgres_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (in CI the PostgreSQL tests must run)")
        pytest.skip(problem)


def _admin(statement: str) -> None:
    async def execute() -> None:
        connection = await asyncpg.connect(_asyncpg_dsn(PG_URL), timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    run_in_own_loop(execute())


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    require_postgres()
    name = f"tps_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind, as a user would write its URL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sync.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """For the tests that are about PostgreSQL alone (a server going away)."""
    with fresh_postgres_database() as url:
        yield url


async def _migrated_engine(url: str) -> AsyncEngine:
    engine = create_engine(database_url_from(url))
    await migrate(engine)
    return engine


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh database with the schema migrated to head."""
    engine = await _migrated_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await _migrated_engine(postgres_url)
    yield engine
    await engine.dispose()


def fast_settings(base_url: str, database_url: str, **http: Any) -> Settings:
    """Settings for tests: the simulator's login and retries that do not wait long."""
    http_settings = HttpSettings(
        concurrency=8, timeout=5.0, max_attempts=12, max_retry_wait=30.0,
        backoff_initial=0.001, backoff_max=0.01,
    )  # fmt: skip
    return Settings(
        # The v2.1 path: these tests compare with the simulator's student API.
        api=ApiSettings(base_url=base_url, username=USERNAME, password=PASSWORD, source="student"),
        http=replace(http_settings, **http),
        sync=SyncSettings(batch_size=100),
        database_url=database_url,
    )


def small_dataset(**overrides: Any) -> Dataset:
    options: dict[str, Any] = dict(
        exams=12, attempts_per_exam=45, users=40, forbidden_every=5, vanished_every=0
    )
    options.update(overrides)
    return Dataset(**options)


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(small_dataset(), username=USERNAME, password=PASSWORD) as server:
        yield server


class SimulatorThread:
    """The simulator on its own event loop in a thread, for tests that call the CLI."""

    def __init__(self, dataset: Dataset, faults: Faults | None = None) -> None:
        self.server = SimulatorServer(dataset, faults=faults, username=USERNAME, password=PASSWORD)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> SimulatorServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def simulator_thread() -> Iterator[SimulatorServer]:
    with SimulatorThread(small_dataset()) as server:
        yield server


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary folder: a developer's ./.env in the checkout
    (read by default, as a user's is) never reaches a test, nor does a test leave files
    in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the proxies a test sets: a developer's own HTTP(S)_PROXY would otherwise carry
    every test's requests to 127.0.0.1 through it, unless NO_PROXY names 127.0.0.1."""
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # urllib ignores HTTP_PROXY under CGI
    yield


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """The CLI configures structlog globally; every test starts from the defaults."""
    import structlog

    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def cli_environment(
    monkeypatch: pytest.MonkeyPatch, simulator_thread: SimulatorServer, database_url: str
) -> SimulatorServer:
    """The environment a user would set for the CLI: the simulator, its login, a database
    of each kind, JSON logs (parsed by the tests)."""
    for name in ("TESTPRESS_CONFIG", "TESTPRESS_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TESTPRESS_BASE_URL", simulator_thread.base_url)
    monkeypatch.setenv("TESTPRESS_USERNAME", USERNAME)
    monkeypatch.setenv("TESTPRESS_PASSWORD", PASSWORD)
    monkeypatch.setenv("TESTPRESS_DATABASE_URL", database_url)
    monkeypatch.setenv("TESTPRESS_LOG_FORMAT", "json")
    monkeypatch.setenv("TESTPRESS_SOURCE", "student")  # the v2.1 path, as the tests compare it
    return simulator_thread
