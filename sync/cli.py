"""The command line: parse, load settings, delegate, map errors to exit codes.

Exit codes (also in the README):
    0    success (forbidden exams included)
    1    finished, with errors recorded in sync_errors
    2    configuration or usage error
    3    authentication failed
    4    database unreachable, or migration failed
    5    another run holds the lock on this database
    130  interrupted by SIGINT;  143  interrupted by SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import metadata
from sync import __version__
from sync.client import TestpressClient, open_session
from sync.config import Settings, load_settings
from sync.database import (
    create_engine,
    database_url_from,
    describe,
    ensure_schema,
    migrate,
    run_lock,
)
from sync.errors import AuthError, ConfigError, DatabaseError, LockHeldError, SyncError
from sync.logs import Redactor, configure_logging
from sync.pipeline import RunOptions, RunSummary, run_sync

log = structlog.get_logger("testpress_sync.cli")

EXIT_OK, EXIT_PARTIAL, EXIT_CONFIG, EXIT_AUTH, EXIT_DATABASE, EXIT_LOCKED = 0, 1, 2, 3, 4, 5
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEMO_DATABASE = "testpress-demo.db"


# --- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings (flags beat environment beat config file)")
    group.add_argument("--config", metavar="PATH", help="TOML config file (see config.example.toml); env TESTPRESS_CONFIG")
    group.add_argument("--database-url", metavar="URL", help="sqlite:///file.db or postgresql://user@host/db; env TESTPRESS_DATABASE_URL (default sqlite:///testpress.db)")
    group.add_argument("--base-url", metavar="URL", help="institute root, e.g. https://demo.testpress.in; env TESTPRESS_BASE_URL")
    group.add_argument("--username", help="Testpress login; env TESTPRESS_USERNAME")
    group.add_argument("--password-file", metavar="PATH", help="file holding the password; env TESTPRESS_PASSWORD_FILE (or TESTPRESS_PASSWORD)")
    group.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at most (default 16)")
    group.add_argument("--batch-size", type=int, metavar="N", help="rows per transaction (default 500)")
    group.add_argument("--course", metavar="NAME", help="only exams of this course (the API's course filter)")
    group.add_argument("--log-format", choices=("auto", "console", "json"), help="auto: readable on a terminal, JSON lines otherwise")
    group.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    parser = argparse.ArgumentParser(
        prog="testpress-sync",
        description="Sync Testpress exams and attempts into PostgreSQL or SQLite.",
        epilog="Exit codes: 0 ok, 1 finished with errors in sync_errors, 2 configuration, "
        "3 login refused, 4 database, 5 another run is going, 130/143 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"testpress-sync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "run", parents=[common], help="the nightly job: every exam and every attempt",
        description="Walk the exam listing and every exam's attempts; upsert what changed; "
        "mark what disappeared as deleted. Creates or migrates the schema when needed.",
    )
    backfill = commands.add_parser(
        "backfill", parents=[common], help="one-shot full import (resumable)",
        description="The full walk, recording which exams are complete so that an "
        "interrupted backfill can continue with --resume.",
    )
    backfill.add_argument("--resume", action="store_true", help="continue the last unfinished backfill, skipping exams it already stored completely")
    commands.add_parser(
        "migrate", parents=[common], help="bring the database schema to the latest version",
        description="Apply the Alembic migrations to the configured database.",
    )
    demo = commands.add_parser(
        "demo", parents=[common], help="try it now: sync the bundled simulator into SQLite",
        description=f"Start the bundled Testpress simulator on a free loopback port, sync it "
        f"into a local SQLite file (default ./{DEMO_DATABASE}) and show what was stored.",
    )
    demo.add_argument("--exams", type=int, default=40, help="exams to generate (default 40)")
    demo.add_argument("--attempts-per-exam", type=int, default=45, help="attempts per exam (default 45)")
    simulate = commands.add_parser(
        "simulate", help="serve the bundled Testpress simulator until stopped",
        description="Serve the v2.1 API over generated data, for trying the tool or "
        "load-testing it. Faults and data changes can be switched while it runs: "
        "POST /_simulator/faults, POST /_simulator/change, GET /_simulator/stats.",
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8000)
    simulate.add_argument("--exams", type=int, default=100)
    simulate.add_argument("--attempts-per-exam", type=int, default=30)
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--users", type=int, default=200, help="distinct students")
    simulate.add_argument("--per-page", type=int, default=20, help="items per page (Testpress: 20)")
    simulate.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    simulate.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds a login token lasts")
    simulate.add_argument("--username", default="admin")
    simulate.add_argument("--password", default="secret")
    return parser


def settings_from(args: argparse.Namespace, warn: Callable[..., Any]) -> Settings:
    overrides = {
        "database_url": args.database_url,
        "api.base_url": args.base_url,
        "api.username": args.username,
        "api.password_file": args.password_file,
        "http.concurrency": args.concurrency,
        "sync.batch_size": args.batch_size,
        "sync.course": args.course,
        "log.format": args.log_format,
        "log.level": args.log_level,
    }
    return load_settings(config_path=args.config, overrides=overrides, warn=warn)


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    redactor = Redactor()
    warnings: list[tuple[str, dict[str, Any]]] = []
    try:
        settings = settings_from(args, lambda event, **kw: warnings.append((event, kw)))
        database_url_from(settings.database_url)  # a bad URL is a usage error, said first
    except ConfigError as exc:
        print(f"testpress-sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor.add(settings.api.password)
    configure_logging(redactor, format=settings.log.format, level=settings.log.level)
    for event, fields in warnings:
        log.warning(event, **fields)
    stop = asyncio.Event()
    command: Callable[[], Awaitable[int]] = {
        "run": lambda: _sync(settings, redactor, stop, mode="run"),
        "backfill": lambda: _sync(settings, redactor, stop, mode="backfill", resume=args.resume),
        "migrate": lambda: _migrate(settings),
        "demo": lambda: _demo(settings, redactor, stop, args),
    }[args.command]
    return _run_until_signal(command, stop, redactor)


def _run_until_signal(
    command: Callable[[], Awaitable[int]], stop: asyncio.Event, redactor: Redactor
) -> int:
    """Run `command` on a fresh loop. The first SIGINT/SIGTERM sets `stop`: fetching
    ends, the batch in progress is committed, the run is recorded as interrupted, and we
    exit with 130/143. A second one exits at once (like kill -9, it loses no committed
    batch) after logging what the run was still waiting on."""
    received: list[signal.Signals] = []

    async def supervised() -> int:
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum)
            if len(received) == 1:
                log.warning("interrupted", signal=signum.name, hint="committing what was fetched; a second signal exits at once")
                stop.set()
                return
            log.warning("stopping_now", waiting_on=_pending_work())
            os._exit(EXIT_SIGNAL[received[0]])

        for signum in EXIT_SIGNAL:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await command()
        finally:
            for signum in EXIT_SIGNAL:
                loop.remove_signal_handler(signum)

    try:
        code = asyncio.run(supervised())
    except ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        return EXIT_CONFIG
    except AuthError as exc:
        log.error("login_refused", error=str(exc), hint="check TESTPRESS_USERNAME and the password")
        return EXIT_AUTH
    except LockHeldError as exc:
        log.error("another_run_is_going", error=str(exc), hint="wait for it, or check `status`")
        return EXIT_LOCKED
    except DatabaseError as exc:
        log.error("database_error", error=redactor.redact(str(exc)))
        return EXIT_DATABASE
    except (SQLAlchemyError, OSError) as exc:
        log.error("database_error", error=redactor.redact(_one_line(exc)))
        return EXIT_DATABASE
    except SyncError as exc:
        log.error("sync_failed", error=redactor.redact(str(exc)))
        return EXIT_PARTIAL
    return EXIT_SIGNAL[received[0]] if received else code


def _pending_work() -> list[str]:
    """Where each unfinished task is waiting: what a second Ctrl-C shows."""
    places = []
    for pending in asyncio.all_tasks():
        frames = pending.get_stack()
        if frames:
            frame = frames[-1]
            places.append(f"{pending.get_name()}: {frame.f_code.co_qualname} line {frame.f_lineno}")
    return sorted(places)


def _one_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0] if text else ''}"


# --- commands ------------------------------------------------------------------------------


async def _open_database(settings: Settings) -> AsyncEngine:
    return create_engine(database_url_from(settings.database_url))


async def _sync(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, *, mode: str, resume: bool = False
) -> int:
    settings.require_api()
    summary = await _sync_into(settings, redactor, stop, mode=mode, resume=resume)
    return EXIT_OK if summary.status == "succeeded" else EXIT_PARTIAL


async def _sync_into(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, *, mode: str, resume: bool = False
) -> RunSummary:
    engine = await _open_database(settings)
    try:
        async with run_lock(engine):
            state = await ensure_schema(engine)
            if not state.up_to_date:
                log.info("schema_migrated", database=describe(engine.url), before=state.current, after=state.head)
            async with open_session(settings.api, settings.http) as session:
                client = TestpressClient(session, settings.api, settings.http, redactor)
                return await run_sync(
                    engine, client, settings, redactor, RunOptions(mode=mode, resume=resume), stop=stop
                )
    finally:
        await engine.dispose()


async def _migrate(settings: Settings) -> int:
    engine = await _open_database(settings)
    try:
        before, after = await migrate(engine)
    finally:
        await engine.dispose()
    if before == after:
        log.info("schema_up_to_date", database=describe(engine.url), revision=after)
    else:
        log.info("schema_migrated", database=describe(engine.url), before=before, after=after)
    return EXIT_OK


async def _demo(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, args: argparse.Namespace
) -> int:
    from dataclasses import replace

    from sync.simulator import Dataset, SimulatorServer

    database_url = args.database_url or f"sqlite:///{DEMO_DATABASE}"
    dataset = Dataset(exams=args.exams, attempts_per_exam=args.attempts_per_exam, forbidden_every=9)
    async with SimulatorServer(dataset, username="demo", password="demo-password") as simulator:
        settings = replace(
            settings,
            database_url=database_url,
            api=replace(settings.api, base_url=simulator.base_url, username="demo", password="demo-password"),
        )
        print(f"Simulator serving {args.exams} exams at {simulator.base_url}", file=sys.stderr)
        summary = await _sync_into(settings, redactor, stop, mode="run")
    engine = await _open_database(settings)
    try:
        counts = await _row_counts(engine)
    finally:
        await engine.dispose()
    _print_demo_report(database_url, summary, counts)
    return EXIT_OK if summary.status == "succeeded" else EXIT_PARTIAL


async def _row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        return {
            name: (await connection.execute(select(func.count()).select_from(table))).scalar_one()
            for name, table in metadata.tables.items()
        }


def _print_demo_report(database_url: str, summary: RunSummary, counts: dict[str, int]) -> None:
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
        ]
    print("\n".join(lines))


def _simulate(args: argparse.Namespace) -> int:
    from sync.simulator import Dataset, Faults, SimulatorServer

    async def serve() -> None:
        dataset = Dataset(
            exams=args.exams, attempts_per_exam=args.attempts_per_exam, users=args.users, seed=args.seed
        )
        server = SimulatorServer(
            dataset,
            faults=Faults(latency=args.latency, token_lifetime=args.token_lifetime),
            username=args.username,
            password=args.password,
            per_page=args.per_page,
            host=args.host,
            port=args.port,
        )
        async with server:
            print(
                f"Testpress simulator at {server.base_url} (login {args.username} / "
                f"{args.password}); {args.exams} exams; Ctrl-C stops it",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return EXIT_OK
