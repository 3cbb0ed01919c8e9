"""What each command does, given parsed settings. The CLI parses and maps exit codes;
this module opens the database, the HTTP session and the simulator, and delegates."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import metadata
from sync import store
from sync.client import TestpressClient, open_session
from sync.config import Settings
from sync.database import (
    create_engine,
    database_url_from,
    describe,
    ensure_schema,
    migrate,
    missing_sqlite_file,
    run_lock,
    schema_state,
)
from sync.doctor import print_checks, run_checks
from sync.errors import error_text
from sync.logs import Redactor
from sync.pipeline import Progress, RunOptions, RunSummary, run_sync, utc_now
from sync.report import SUCCESSFUL, health, prometheus_text, status_table

log = structlog.get_logger("testpress_sync.commands")

EXIT_OK, EXIT_PARTIAL = 0, 1
DEMO_DATABASE = "testpress-demo.db"


@dataclass(frozen=True)
class Outputs:
    """Where a run reports besides its log."""

    summary_json: Path | None = None
    metrics_file: Path | None = None
    on_progress: Callable[[Progress], None] | None = None


def open_database(settings: Settings) -> AsyncEngine:
    return create_engine(database_url_from(settings.database_url))


# --- run, backfill -----------------------------------------------------------------------


async def sync(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, options: RunOptions, outputs: Outputs
) -> int:
    settings.require_api()
    summary = await sync_into(settings, redactor, stop, options, outputs)
    return EXIT_OK if summary.status == "succeeded" else EXIT_PARTIAL


async def sync_into(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, options: RunOptions, outputs: Outputs
) -> RunSummary:
    engine = open_database(settings)
    try:
        async with run_lock(engine):
            await _prepare_schema(engine, dry_run=options.dry_run)
            async with open_session(settings.api, settings.http) as session:
                client = TestpressClient(session, settings.api, settings.http, redactor)
                return await run_sync(
                    engine, client, settings, redactor, options,
                    stop=stop,
                    on_progress=outputs.on_progress,
                    on_finish=lambda summary: _report(engine, summary, outputs),
                )  # fmt: skip
    finally:
        await engine.dispose()


async def _prepare_schema(engine: AsyncEngine, *, dry_run: bool) -> None:
    state = await ensure_schema(engine, auto_migrate=not dry_run)
    if not state.up_to_date:
        log.info("schema_migrated", database=describe(engine.url), before=state.current, after=state.head)


async def _report(engine: AsyncEngine, summary: RunSummary, outputs: Outputs) -> None:
    """The summary file and the metrics file, written whole or not at all."""
    now = utc_now()
    data = {**summary.as_dict(), "finished_at": now.isoformat()}
    if outputs.summary_json:
        _write_atomically(outputs.summary_json, json.dumps(data, indent=2, default=str) + "\n")
    if outputs.metrics_file:
        last_success = now if summary.status in SUCCESSFUL else None
        if last_success is None:
            try:
                async with engine.connect() as connection:
                    last_success = await store.last_success_finished_at(connection)
            except Exception as exc:  # the database may be why this run failed
                log.warning("last_success_unknown", error=error_text(exc))
        _write_atomically(outputs.metrics_file, prometheus_text(data, now, last_success))


def _write_atomically(path: Path, text: str) -> None:
    # node_exporter may read the file at any moment: it must never see half of it.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.error("report_not_written", path=str(path), error=str(exc))
        temporary.unlink(missing_ok=True)


# --- migrate, status, doctor -------------------------------------------------------------


async def migrate_database(settings: Settings) -> int:
    engine = open_database(settings)
    try:
        before, after = await migrate(engine)
    finally:
        await engine.dispose()
    if before == after:
        log.info("schema_up_to_date", database=describe(engine.url), revision=after)
    else:
        log.info("schema_migrated", database=describe(engine.url), before=before, after=after)
    return EXIT_OK


async def show_status(
    settings: Settings, *, limit: int, as_json: bool, max_age: timedelta | None
) -> int:
    """The last runs, and exit 1 when the last one failed or no success is recent."""
    missing = missing_sqlite_file(database_url_from(settings.database_url))
    runs = []
    engine = open_database(settings)
    try:
        state = None if missing else await schema_state(engine)  # reads; never writes
        if state is not None and state.current is not None and state.known:
            async with engine.connect() as connection:
                runs = await store.recent_runs(connection, limit)
    finally:
        await engine.dispose()
    verdict = health(runs, datetime.now(UTC), max_age)
    if as_json:
        document = {"healthy": verdict.healthy, "reason": verdict.reason, "runs": [run.as_dict() for run in runs]}
        print(json.dumps(document, indent=2))
    else:
        if missing:
            print(f"No database at {missing} yet: the first `testpress-sync run` creates it.")
        else:
            print(status_table(runs))
        print(f"\n{'OK' if verdict.healthy else 'UNHEALTHY'}: {verdict.reason}")
    return EXIT_OK if verdict.healthy else EXIT_PARTIAL


async def doctor(settings: Settings, redactor: Redactor) -> int:
    return print_checks(await run_checks(settings, redactor), print)


# --- demo, simulate ----------------------------------------------------------------------


async def demo(
    settings: Settings,
    redactor: Redactor,
    stop: asyncio.Event,
    outputs: Outputs,
    *,
    database_url: str | None,
    exams: int,
    attempts_per_exam: int,
) -> int:
    from sync.simulator import Dataset, SimulatorServer

    database_url = database_url or f"sqlite:///{DEMO_DATABASE}"
    dataset = Dataset(exams=exams, attempts_per_exam=attempts_per_exam, forbidden_every=9)
    async with SimulatorServer(dataset, username="demo", password="demo-password") as simulator:
        settings = replace(
            settings,
            database_url=database_url,
            api=replace(settings.api, base_url=simulator.base_url, username="demo", password="demo-password"),
        )
        print(f"Simulator serving {exams} exams at {simulator.base_url}", file=sys.stderr)
        summary = await sync_into(settings, redactor, stop, RunOptions(), outputs)
    engine = open_database(settings)
    try:
        counts = await _row_counts(engine)
    finally:
        await engine.dispose()
    print(_demo_report(database_url, summary, counts))
    return EXIT_OK if summary.status == "succeeded" else EXIT_PARTIAL


async def _row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        return {
            name: (await connection.execute(select(func.count()).select_from(table))).scalar_one()
            for name, table in metadata.tables.items()
        }


def _demo_report(database_url: str, summary: RunSummary, counts: dict[str, int]) -> str:
    path = database_url.removeprefix("sqlite:///")
    lines = [
        "",
        f"Run {summary.run_id} {summary.status} in {summary.duration_seconds:.1f}s "
        f"({summary.requests} requests, {summary.retries} retries).",
        "Rows per table:",
        *(f"  {name:<14} {count:>7}" for name, count in counts.items()),
        "",
    ]
    if database_url.startswith("sqlite:///"):
        lines += [
            f"Database: {Path(path).resolve()}",
            "Try:",
            f"  sqlite3 {path} \"SELECT slug, attempt_count, distinct_users, average_score, "
            "completion_rate FROM exam_summary ORDER BY attempt_count DESC LIMIT 5;\"",
            f"  {_this_command()} status --database-url {database_url}",
        ]
    return "\n".join(lines)


def _this_command() -> str:
    """How the user called us (`.venv/bin/testpress-sync` after `make demo`), to quote back."""
    called = sys.argv[0] if sys.argv and sys.argv[0].endswith("testpress-sync") else "testpress-sync"
    return shlex.quote(called)


async def simulate(options: dict[str, Any], ready: Callable[[str], None]) -> None:
    """Serve the simulator until cancelled."""
    from sync.simulator import Dataset, Faults, SimulatorServer

    dataset = Dataset(
        exams=options["exams"], attempts_per_exam=options["attempts_per_exam"],
        users=options["users"], seed=options["seed"],
    )  # fmt: skip
    server = SimulatorServer(
        dataset,
        faults=Faults(latency=options["latency"], token_lifetime=options["token_lifetime"]),
        username=options["username"],
        password=options["password"],
        per_page=options["per_page"],
        host=options["host"],
        port=options["port"],
    )
    async with server:
        ready(server.base_url)
        await asyncio.Event().wait()

