"""Crash safety: SIGTERM, kill -9, resume, overlapping runs, the database going away.

Runs go through the real command in a child process, against the simulator on loopback
in this process; every test ends by comparing the stored rows with what the server serves.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import attempts, sync_progress, sync_runs
from sync.errors import DatabaseError
from sync.ops.logs import Redactor
from sync.run import run_sync
from sync.simulator import SimulatorServer
from sync.sink.database import migrate
from sync.source.client import TestpressClient, open_session
from tests.conftest import PASSWORD, USERNAME, SimulatorThread, _asyncpg_dsn, fast_settings, small_dataset
from tests.helpers import assert_matches_server, on_engine, select_rows, select_value, stored_rows, sync_with


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The runs under test (children, which inherit this environment) talk to the
    simulator directly, whatever HTTP(S)_PROXY the developer has set."""
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    yield


@pytest.fixture
def slow_simulator() -> Iterator[SimulatorServer]:
    """Enough work, slowly enough served, that a run can be interrupted in the middle."""
    dataset = small_dataset(exams=30, attempts_per_exam=50, users=60)
    with SimulatorThread(dataset) as server:
        server.state.faults.latency = 0.05
        yield server


def start_cli(args: list[str], simulator: SimulatorServer, database_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TESTPRESS_BASE_URL": simulator.base_url,
        "TESTPRESS_USERNAME": USERNAME,
        "TESTPRESS_PASSWORD": PASSWORD,
        "TESTPRESS_DATABASE_URL": database_url,
        "TESTPRESS_CONCURRENCY": "2",
        "TESTPRESS_BATCH_SIZE": "60",
        "TESTPRESS_LOG_FORMAT": "json",
        "TESTPRESS_SOURCE": "student",  # the v2.1 path, as the tests compare it
    }
    env.pop("TESTPRESS_CONFIG", None)
    with log.open("ab") as output:
        # Not in the checkout: a developer's .env there would be read.
        return subprocess.Popen([sys.executable, "-m", "sync", *args], env=env, cwd=log.parent, stdout=output, stderr=output)


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def check(database_url: str, simulator: SimulatorServer) -> None:
    async def compare(engine: AsyncEngine) -> None:
        await assert_matches_server(engine, simulator)
        await assert_stored_rows_are_whole(engine, simulator)

    on_engine(database_url, compare)


async def assert_stored_rows_are_whole(engine: AsyncEngine, simulator: SimulatorServer) -> None:
    """Every attempt stored so far carries the complete payload the server gave for it."""
    _, attempt_rows = await stored_rows(engine)
    dataset = simulator.dataset
    for exam in dataset.exams:
        for attempt in exam.attempts:
            row = attempt_rows.get(attempt.id)
            if row is not None:
                assert row.raw == dataset.attempt_payload(exam, attempt, simulator.base_url)


def stored_attempts(database_url: str) -> int:
    return select_value(database_url, select(func.count()).select_from(attempts)) or 0


@pytest.fixture
def migrated(database_url: str) -> str:
    on_engine(database_url, migrate)
    return database_url


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_cleanly_and_the_next_run_completes(
    slow_simulator: SimulatorServer, migrated: str, tmp_path: Path, signum: signal.Signals
) -> None:
    log = tmp_path / "run.log"
    process = start_cli(["run"], slow_simulator, migrated, log)
    wait_until(lambda: stored_attempts(migrated) > 100)
    sent = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=15)
    assert time.monotonic() - sent < 5, "the run took too long to stop"
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], log.read_text()
    assert select_value(migrated, select(sync_runs.c.status)) == "interrupted"
    assert 0 < stored_attempts(migrated) < 29 * 50
    again = start_cli(["run"], slow_simulator, migrated, log)
    assert again.wait(timeout=60) == 0, log.read_text()
    check(migrated, slow_simulator)


def test_kill_9_then_resume_skips_finished_exams_and_ends_exact(
    slow_simulator: SimulatorServer, migrated: str, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    rng = random.Random(5)
    progress = select(func.count()).select_from(sync_progress)
    for _ in range(2):  # killed twice, at different moments
        before = select_value(migrated, progress)
        process = start_cli(["backfill", "--resume"], slow_simulator, migrated, log)
        wait_until(lambda before=before: select_value(migrated, progress) >= before + 4)
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()
        process.wait(timeout=10)
    completed = select_value(migrated, select(func.count(func.distinct(sync_progress.c.exam_id))))

    before = slow_simulator.state.requests
    resumed = start_cli(["backfill", "--resume"], slow_simulator, migrated, log)
    assert resumed.wait(timeout=60) == 0, log.read_text()
    resume_requests = slow_simulator.state.requests - before
    check(migrated, slow_simulator)
    statuses = [row for row in select_rows(migrated, select(sync_runs.c.status, sync_runs.c.exams_skipped, sync_runs.c.resumed_from).order_by(sync_runs.c.id))]
    assert [s for s, _, _ in statuses] == ["interrupted", "interrupted", "succeeded"]
    assert statuses[2][1] == completed and statuses[2][2] == 2

    before = slow_simulator.state.requests
    full = start_cli(["backfill"], slow_simulator, migrated, log)
    assert full.wait(timeout=60) == 0, log.read_text()
    full_requests = slow_simulator.state.requests - before
    # Each skipped exam saves its three attempt pages.
    assert resume_requests <= full_requests - 3 * completed


def test_two_runs_at_once_one_waits_out_with_exit_5(
    slow_simulator: SimulatorServer, migrated: str, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    slow_simulator.state.faults.latency = 0.1  # the first run outlasts the second's start-up
    first = start_cli(["run"], slow_simulator, migrated, log)
    wait_until(lambda: select_value(migrated, select(sync_runs.c.status)) == "running")
    second = start_cli(["run"], slow_simulator, migrated, log)
    assert second.wait(timeout=20) == 5
    assert first.wait(timeout=60) == 0, log.read_text()
    assert "another testpress-sync run" in log.read_text()
    check(migrated, slow_simulator)


# --- PostgreSQL going away (SQLite is a local file: nothing to restart) ---------------------------------------------------------------


async def first_rows_stored(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until the run under test has committed its first attempts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with engine.connect() as connection:
            if (await connection.execute(select(func.count()).select_from(attempts))).scalar():
                return
        await asyncio.sleep(0.02)
    raise AssertionError("no attempt was stored in time")


async def terminate_connections(database_url: str, *, block: bool | None = None) -> int:
    """Cut every connection to the test database, as a server restart would."""
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_asyncpg_dsn(database_url.rsplit("/", 1)[0] + "/test"))
    try:
        if block is not None:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not block).lower()}')
        return len(await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        ))
    finally:
        await admin.close()


async def test_dropped_database_connections_are_retried(
    simulator: SimulatorServer, postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    engine, database_url = postgres_engine, postgres_url
    simulator.state.faults.latency = 0.02
    settings = fast_settings(simulator.base_url, database_url, concurrency=2)
    task = asyncio.create_task(sync_with(settings))
    cut = 0
    for _ in range(3):
        await asyncio.sleep(0.25)
        cut += await terminate_connections(database_url)
    summary = await task
    assert cut > 0 and summary.status == "succeeded"
    await engine.dispose()  # its pooled connections were cut too
    await assert_matches_server(engine, simulator)


async def test_a_database_away_as_a_run_starts_is_waited_for_as_a_batch_would_be(
    simulator: SimulatorServer, postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    """The run's own bookkeeping (closing abandoned runs, recording itself, reading the
    plan) rides out a database that is briefly away, like its batches do."""
    engine, database_url = postgres_engine, postgres_url
    await migrate(engine)
    await engine.dispose()
    settings = fast_settings(simulator.base_url, database_url)
    await terminate_connections(database_url, block=True)

    async def come_back() -> None:
        await asyncio.sleep(0.6)
        await terminate_connections(database_url, block=False)

    back = asyncio.create_task(come_back())
    try:
        async with open_session(settings.api, settings.http) as session:
            client = TestpressClient(session, settings.api, settings.http, Redactor())
            summary = await run_sync(engine, client, settings, Redactor())
    finally:
        await back
    assert summary.status == "succeeded"
    await engine.dispose()
    await assert_matches_server(engine, simulator)


async def test_a_database_that_stays_away_fails_the_run_and_keeps_committed_batches(
    simulator: SimulatorServer, postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    engine, database_url = postgres_engine, postgres_url
    simulator.state.faults.latency = 0.02
    base = fast_settings(simulator.base_url, database_url, concurrency=2)
    settings = replace(base, sync=replace(base.sync, batch_size=40, database_retry_seconds=1.0))
    task = asyncio.create_task(sync_with(settings))
    try:
        await first_rows_stored(engine)
        await terminate_connections(database_url, block=True)
        with pytest.raises(DatabaseError, match="unreachable"):
            await task
    finally:
        await terminate_connections(database_url, block=False)
    await engine.dispose()
    await assert_stored_rows_are_whole(engine, simulator)
    summary = await sync_with(base)
    assert summary.status == "succeeded"
    await assert_matches_server(engine, simulator)


async def test_a_postgresql_restart_mid_run_is_ridden_out(
    simulator: SimulatorServer, postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0 or not Path("/etc/postgresql").is_dir():
        pytest.skip("restarting the server needs pg_ctlcluster, run as root")
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    simulator.state.faults.latency = 0.1
    settings = fast_settings(simulator.base_url, postgres_url, concurrency=2)
    task = asyncio.create_task(sync_with(settings))
    await first_rows_stored(postgres_engine)
    assert not task.done(), "the run ended before the restart could interrupt it"
    restart = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]
    try:
        await asyncio.to_thread(subprocess.run, restart, check=True, capture_output=True, timeout=120)
    finally:  # whatever happened, leave the server running for the rest of the suite
        await asyncio.to_thread(
            subprocess.run, ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True, timeout=120,
        )  # fmt: skip
    summary = await task
    assert summary.status == "succeeded"
    await postgres_engine.dispose()  # its pooled connections died with the server
    await assert_matches_server(postgres_engine, simulator)
