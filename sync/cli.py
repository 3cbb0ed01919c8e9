"""The command line: parse, load settings, delegate to sync.commands, map exit codes.

Exit codes (also in the README):
    0    success (forbidden exams included); `status`: healthy
    1    finished, with errors recorded in sync_errors; `status`: unhealthy
    2    configuration or usage error
    3    authentication failed
    4    database unreachable, or migration failed
    5    another run holds the lock on this database
    70   an unexpected error (a bug): one line on stderr, the traceback in the log
    130  interrupted by SIGINT;  143  interrupted by SIGTERM
         (`webhook` exits 0: a signal is how the receiver is stopped)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import select
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog
from sqlalchemy.exc import SQLAlchemyError

from sync import __version__
from sync.commands import Outcome, Result
from sync.commands import config as config_command
from sync.commands import demo as demo_command
from sync.commands import doctor as doctor_command
from sync.commands import status as status_command
from sync.commands import sync as sync_command
from sync.config import Settings, load_settings_with_sources
from sync.errors import AuthError, ConfigError, DatabaseError, LockHeldError, SyncError, error_text
from sync.model.run import RunOptions
from sync.ops.logs import Redactor, configure_logging
from sync.ops.progress import TerminalStatus
from sync.ops.report import parse_age
from sync.sink.database import database_url_from

log = structlog.get_logger("testpress_sync.cli")

EXIT_OK, EXIT_PARTIAL, EXIT_CONFIG, EXIT_AUTH, EXIT_DATABASE, EXIT_LOCKED = 0, 1, 2, 3, 4, 5
EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: never 1, which cron reads as "partial"
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE, as shells report a writer whose reader left (`| head`)
EXIT_OUTCOME = {Outcome.OK: EXIT_OK, Outcome.INCOMPLETE: EXIT_PARTIAL}
# The error tree's exit codes, most specific first; any other SyncError ends a run that
# could not finish: 1.
EXIT_ERROR: tuple[tuple[type[SyncError], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (AuthError, EXIT_AUTH),
    (LockHeldError, EXIT_LOCKED),
    (DatabaseError, EXIT_DATABASE),
    (SyncError, EXIT_PARTIAL),
)


def exit_code(result: Result) -> int:
    """The exit code of a command's outcome, or of the kind of error it ended with."""
    if isinstance(result, Outcome):
        return EXIT_OUTCOME[result]
    return next(code for kind, code in EXIT_ERROR if issubclass(result, kind))
SYNC_COMMANDS = ("run", "backfill", "demo")
SERVICE_COMMANDS = ("webhook",)  # they run until a signal stops them cleanly: exit 0


# --- argument parsing ----------------------------------------------------------------------


def _settings_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings (flags beat environment beat .env beat config file; `config` shows each one's source)")
    add = group.add_argument
    add("--config", metavar="PATH", help="TOML config file (see config.example.toml); env TESTPRESS_CONFIG")
    add("--database-url", metavar="URL", help="sqlite:///file.db or postgresql://user@host/db; env TESTPRESS_DATABASE_URL (default sqlite:///testpress.db)")
    add("--base-url", metavar="URL", help="institute root, e.g. https://demo.testpress.in; env TESTPRESS_BASE_URL")
    add("--username", help="Testpress login; env TESTPRESS_USERNAME")
    add("--source", choices=("auto", "admin", "student"), help="which API to read: auto (admin when the login may, else student), admin or student; env TESTPRESS_SOURCE")
    add("--password-file", metavar="PATH", help="file holding the password; env TESTPRESS_PASSWORD_FILE (or TESTPRESS_PASSWORD); beats a password from any lower layer")
    add("--concurrency", type=int, metavar="N", help="requests in flight at most (default 16)")
    add("--batch-size", type=int, metavar="N", help="rows per transaction (default 500)")
    add("--log-format", choices=("auto", "console", "json"), help="auto: readable on a terminal, JSON lines otherwise")
    add("--log-level", choices=("debug", "info", "warning", "error"))
    return common


def _run_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("what to sync and where to report")
    add = group.add_argument
    add("--course", metavar="NAME", help="only exams of this course (the API's own filter, a course name)")
    add("--exam", metavar="SLUG", action="append", default=[], help="only this exam (repeatable); no exam is marked deleted")
    add("--limit", type=_positive, metavar="N", help="only the first N exams of the listing, for a first try")
    add("--dry-run", action="store_true", help="fetch and compare, report what would change, write nothing")
    add("--full", action="store_true", help="admin: walk everything (the only kind of run that marks rows deleted), not only what can have changed")
    add("--details", "--attempt-details", dest="details", action="store_true", default=None,
        help="admin: also fetch each new or changed attempt's sections, subjects and difficulty levels "
             "(one request per such attempt); env TESTPRESS_SYNC_ATTEMPT_DETAILS")  # fmt: skip
    add("--summary-json", type=Path, metavar="PATH", help="write the end-of-run summary as JSON")
    add("--metrics-file", type=Path, metavar="PATH", help="write Prometheus text-format metrics (node_exporter textfile collector)")
    add("--metrics-push", metavar="URL", help="push the metrics to a Prometheus Pushgateway at URL (job testpress_sync, grouped by institute and schema)")
    return options


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _age(text: str) -> Any:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    common, run_options = _settings_options(), _run_options()
    parser = argparse.ArgumentParser(
        prog="testpress-sync",
        description="Sync Testpress exams and attempts into PostgreSQL or SQLite.",
        epilog="Exit codes: 0 ok, 1 finished with errors in sync_errors (status: unhealthy), "
        "2 configuration, 3 login refused, 4 database, 5 another run is going, "
        "70 unexpected error (a bug), 130/143 interrupted. Run `testpress-sync COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"testpress-sync {__version__}")
    commands_ = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands_.add_parser(
        "run", parents=[common, run_options], help="the nightly job: what can have changed since the last run",
        description="An admin login (the whole institute): read only what can have changed "
        "since the last completed run (attempts started since then, less a lookback, the "
        "attempts stored as open, the exam, user and batch listings, the batches of new and "
        "changed users); every [sync] full_every (7 days), and with --full, walk everything "
        "and mark what disappeared as deleted. A student login (its own attempts): walk "
        "every exam and its attempts, and mark what disappeared as deleted. Either way, "
        "upsert what changed. Creates or migrates the schema when needed.",
    )
    backfill = commands_.add_parser(
        "backfill", parents=[common, run_options], help="one-shot full import (resumable)",
        description="The full walk, recording which exams are complete so that an "
        "interrupted backfill can continue with --resume.",
    )
    backfill.add_argument("--resume", action="store_true", help="continue the last unfinished backfill, skipping exams it already stored completely")
    commands_.add_parser(
        "migrate", parents=[common], help="bring the database schema to the latest version",
        description="Apply the Alembic migrations to the configured database.",
    )
    status = commands_.add_parser(
        "status", parents=[common], help="the last runs; exits 1 when unhealthy (for monitoring)",
        description="Show the last runs. Exits 1 when the last finished run failed or was "
        "interrupted, or when no run succeeded within --max-age.",
    )
    status.add_argument("--limit", type=_positive, default=10, metavar="N", help="runs to show (default 10)")
    status.add_argument("--json", action="store_true", help="print JSON for machines")
    status.add_argument("--max-age", type=_age, metavar="AGE", help="unhealthy unless a run succeeded within AGE: 26h, 90m, 2d or seconds")
    commands_.add_parser(
        "doctor", parents=[common], help="check configuration, server, login and database",
        description="Check each thing a run needs, in order, and say how to fix what fails.",
    ).add_argument("--json", action="store_true", help="print the checks as JSON for machines (the exit code is the same)")
    config = commands_.add_parser(
        "config", parents=[common], help="show the effective settings and where each came from",
        description="Print every setting with its value, the layer that set it (default, config "
        "file, .env, environment variable or flag) and its environment variable. Secrets, and "
        "the password inside a database URL, are shown as [redacted].",
    )
    config.add_argument("--json", action="store_true", help="print JSON for machines")
    demo = commands_.add_parser(
        "demo", parents=[common, run_options], help="try it now: sync the bundled simulator into SQLite",
        description=f"Start the bundled Testpress simulator on a free loopback port, sync it "
        f"into a local SQLite file (default ./{demo_command.DEMO_DATABASE}) and show what was stored.",
    )
    demo.add_argument("--exams", type=_positive, default=40, help="exams to generate (default 40)")
    demo.add_argument("--attempts-per-exam", type=int, default=45, help="attempts per exam (default 45)")
    simulate = commands_.add_parser(
        "simulate", help="serve the bundled Testpress simulator until stopped",
        description="Serve the v2.1 API over generated data, for trying the tool or "
        "load-testing it. Faults and data changes can be switched while it runs: "
        "POST /_simulator/faults, POST /_simulator/change, GET /_simulator/stats.",
    )
    add = simulate.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--exams", type=int, default=100)
    add("--attempts-per-exam", type=int, default=30)
    add("--users", type=int, default=200, help="distinct students")
    add("--seed", type=int, default=7)
    add("--per-page", type=int, default=20, help="items per page (Testpress: 20)")
    add("--latency", type=float, default=0.0, help="seconds each API request takes to be answered")
    add("--token-lifetime", type=float, default=3600.0, help="seconds a login token lasts")
    add("--username", default="admin")
    add("--password", default="secret")
    add("--webhook-url", metavar="URL", help="also send the data set's signed exam webhook deliveries (with a few duplicates, "
        "reordered and tampered ones) to URL, e.g. http://127.0.0.1:8080/testpress/webhook; keys: see the README")
    webhook = commands_.add_parser(
        "webhook", parents=[common], help="receive Testpress's exam webhook: attempts as they start and finish",
        description="Serve POST /testpress/webhook (signed deliveries, stored before they are answered), "
        "GET /healthz and GET /metrics until SIGTERM or SIGINT, which stop it cleanly (exit 0). "
        "Keys: TESTPRESS_WEBHOOK_PUBLIC_KEY and TESTPRESS_WEBHOOK_PRIVATE_KEY (or _FILE).",
    )
    webhook.add_argument("--host", help="address to listen on; env TESTPRESS_WEBHOOK_HOST (default 127.0.0.1)")
    webhook.add_argument("--port", type=int, help="port to listen on; env TESTPRESS_WEBHOOK_PORT (default 8080)")
    return parser


def settings_from(args: argparse.Namespace, warn: Callable[..., Any]) -> tuple[Settings, dict[str, str]]:
    """The settings of every layer, and the layer that set each one."""
    overrides = {
        "database_url": args.database_url,
        "api.base_url": args.base_url,
        "api.username": args.username,
        "api.password_file": args.password_file,
        "api.source": args.source,
        "http.concurrency": args.concurrency,
        "sync.batch_size": args.batch_size,
        "sync.course": getattr(args, "course", None),
        "sync.attempt_details": getattr(args, "details", None),  # only --details sets it: never to false
        "log.format": args.log_format,
        "log.level": args.log_level,
        "webhook.host": getattr(args, "host", None),
        "webhook.port": getattr(args, "port", None),
    }
    return load_settings_with_sources(config_path=args.config, overrides=overrides, warn=warn)


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    redactor = Redactor()
    warnings: list[tuple[str, dict[str, Any]]] = []
    try:
        settings, sources = settings_from(args, lambda event, **kw: warnings.append((event, kw)))
        database_url_from(settings.database_url)  # a bad URL is a usage error, said first
    except ConfigError as exc:
        print(f"testpress-sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor.add(settings.api.password)
    terminal = _terminal_status(args, settings)
    configure_logging(redactor, format=settings.log.format, level=settings.log.level, stream=terminal)
    for event, fields in warnings:
        log.warning(event, **fields)
    stop = asyncio.Event()
    try:
        return _run_until_signal(
            _command(args, settings, sources, redactor, stop, terminal), stop, redactor,
            signal_is_stop=args.command in SERVICE_COMMANDS,
        )  # fmt: skip
    finally:
        if terminal is not None:
            terminal.clear()


def entry_point() -> NoReturn:
    """`testpress-sync` and `python -m sync`: main() as a process of its own, tuned for
    being one. main() itself, called from tests or other code, sets nothing global."""
    _collect_young_objects_less_often()
    code = main()
    try:
        sys.stdout.flush()  # here, not at Python's exit: a reader that left is no error of ours
    except BrokenPipeError:
        code = _quit_writing()
    # The process ends here, and nothing needs collecting any more; but Python's shutdown
    # would still run the cycle collector over every object alive, most of them made by
    # SQLAlchemy's imports: 0.07–0.11 s of every run. Frozen objects are skipped.
    gc.freeze()
    sys.exit(code)


# Young objects are collected once this many more are alive than when last collected
# (Python's default is 700).
YOUNG_COLLECTION_THRESHOLD = 10_000


def _collect_young_objects_less_often() -> None:
    """A sync allocates a few dicts per attempt and frees nearly all of them by reference
    count, in bursts of a page or a batch. At the default threshold those bursts set off
    the cycle collector ~190 times in a 30,000-attempt run (0.12–0.18 s of the main
    thread, which is the bottleneck) to find nothing; at 10,000 it runs once or twice.
    Cycles are still collected, in larger batches."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def _terminal_status(args: argparse.Namespace, settings: Settings) -> TerminalStatus | None:
    """A live progress line, for sync commands on a terminal with readable logs."""
    if args.command in SYNC_COMMANDS and sys.stderr.isatty() and settings.log.format != "json":
        return TerminalStatus(sys.stderr)
    return None


def _command(
    args: argparse.Namespace,
    settings: Settings,
    sources: dict[str, str],
    redactor: Redactor,
    stop: asyncio.Event,
    terminal: TerminalStatus | None,
) -> Callable[[], Awaitable[Result]]:
    outputs = sync_command.Outputs(
        summary_json=getattr(args, "summary_json", None),
        metrics_file=getattr(args, "metrics_file", None),
        metrics_push=getattr(args, "metrics_push", None),
        on_progress=terminal.show if terminal is not None else None,
    )
    if args.command in ("run", "backfill"):
        options = RunOptions(
            mode=args.command,
            resume=getattr(args, "resume", False),
            exam_slugs=tuple(args.exam),
            limit=args.limit,
            dry_run=args.dry_run,
            full=args.full,
        )
        return lambda: sync_command.sync(settings, redactor, stop, options, outputs)
    if args.command == "demo":
        return lambda: demo_command.demo(
            settings, redactor, stop, outputs,
            database_url=args.database_url, exams=args.exams, attempts_per_exam=args.attempts_per_exam,
        )  # fmt: skip
    if args.command == "status":
        return lambda: status_command.show_status(settings, limit=args.limit, as_json=args.json, max_age=args.max_age)
    if args.command == "doctor":
        return lambda: doctor_command.doctor(settings, redactor, as_json=args.json)
    if args.command == "config":
        return lambda: config_command.show_config(settings, sources, as_json=args.json)
    if args.command == "webhook":
        # Imported here: aiohttp's server and prometheus_client cost every other command
        # ~50 ms of start-up.
        from sync.commands import webhook as webhook_command

        return lambda: webhook_command.serve(settings, redactor, stop)
    return lambda: status_command.migrate_database(settings)


def _run_until_signal(
    command: Callable[[], Awaitable[Result]], stop: asyncio.Event, redactor: Redactor, *, signal_is_stop: bool = False
) -> int:
    """Run `command` on a fresh loop. The first SIGINT/SIGTERM sets `stop`: fetching
    ends, the batch in progress is committed, the run is recorded as interrupted, and we
    exit with 130/143. A second one exits at once (like kill -9, it loses no committed
    batch) after logging what the run was still waiting on. For a service
    (`signal_is_stop`), a signal is how it is meant to stop: its own outcome is the exit code."""
    received: list[signal.Signals] = []

    async def supervised() -> Result:
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
        result = asyncio.run(supervised())
    except ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        return exit_code(ConfigError)
    except AuthError as exc:
        log.error("login_refused", error=str(exc), hint=exc.hint)
        return exit_code(AuthError)
    except LockHeldError as exc:
        log.error("another_run_is_going", error=str(exc), hint="wait for it; `testpress-sync status` shows it")
        return exit_code(LockHeldError)
    except DatabaseError as exc:
        log.error("database_error", error=redactor.redact(str(exc)))
        return exit_code(DatabaseError)
    except BrokenPipeError as exc:
        if _output_closed():
            return _quit_writing()
        log.error("database_error", error=redactor.redact(error_text(exc)))
        return exit_code(DatabaseError)
    except (SQLAlchemyError, OSError) as exc:
        log.error("database_error", error=redactor.redact(error_text(exc)))
        return exit_code(DatabaseError)
    except SyncError as exc:
        log.error("sync_failed", error=redactor.redact(str(exc)))
        return exit_code(type(exc))
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        return _unexpected(exc)
    return EXIT_SIGNAL[received[0]] if received and not signal_is_stop else exit_code(result)


def _output_closed() -> bool:
    """Whether whoever read standard output has gone (`testpress-sync status | head -1`):
    a broken pipe there is theirs, while one on the database's socket is the database's."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), no file descriptor
        return False


def _quit_writing() -> int:
    """The reader took what it wanted: say nothing more to it (Python would otherwise
    complain of the unflushed output at exit), and exit as a shell's writer does."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OUTPUT_CLOSED


def _unexpected(error: Exception) -> int:
    """Log the traceback at error level (redacted like every line), and tell the person at
    the terminal in one line what happened and where the traceback is."""
    log.error("unexpected_error", error=f"{type(error).__name__}: {error}", exc_info=error)
    print(
        f"testpress-sync: unexpected error ({type(error).__name__}); this is a bug. The traceback "
        "is in the log line 'unexpected_error' above (stderr); please report it with that line.",
        file=sys.stderr,
    )
    return EXIT_SOFTWARE


def _pending_work() -> list[str]:
    """Where each unfinished task is waiting: what a second Ctrl-C shows."""
    places = []
    for pending in asyncio.all_tasks():
        frames = pending.get_stack()
        if frames:
            frame = frames[-1]
            places.append(f"{pending.get_name()}: {frame.f_code.co_qualname} line {frame.f_lineno}")
    return sorted(places)


def _simulate(args: argparse.Namespace) -> int:
    def ready(base_url: str) -> None:
        print(
            f"Testpress simulator at {base_url} (login {args.username} / {args.password}); "
            f"{args.exams} exams; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to stop
        asyncio.run(demo_command.simulate(vars(args), ready))
    return EXIT_OK
