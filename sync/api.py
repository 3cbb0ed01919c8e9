"""The Python API: one sync run from code, for an orchestrator that runs one institute
per task (Airflow, Dagster, Prefect, a plain script).

    from sync.api import RunOptions, load_settings, sync_institute

    settings = load_settings(overrides={
        "api.base_url": "https://yourinstitute.testpress.in",
        "api.username": "reports-bot",
        "api.password_file": "/run/secrets/testpress-password",
        "database_url": "postgresql://sync@db.internal/warehouse",
        "database_schema": "yourinstitute",
    })
    summary = sync_institute(settings)              # blocks; or await sync_institute_async(...)
    if summary.status != "succeeded":
        ...                                         # "partial": see sync_errors for run summary.run_id

`load_settings` reads the same layers as the command line (a TOML file, `.env`, the
environment), with `overrides` on top; a `Settings` can also be built directly from its
dataclasses. A run that cannot start or cannot finish raises an error of `sync.errors`:
ConfigError, AuthError, DatabaseError, LockHeldError (another run holds this database
or schema), ThrottledError, or another SyncError. A run that finished returns its
RunSummary, whose `status` is "succeeded", "partial" or "interrupted".
"""

from __future__ import annotations

import asyncio

from sync.commands.sync import Outputs, sync_into
from sync.config import Settings, load_settings
from sync.errors import AuthError, ConfigError, DatabaseError, LockHeldError, SyncError, ThrottledError
from sync.model.run import RunOptions, RunSummary
from sync.ops.logs import Redactor, configure_logging

__all__ = [
    "AuthError",
    "ConfigError",
    "DatabaseError",
    "LockHeldError",
    "RunOptions",
    "RunSummary",
    "Settings",
    "SyncError",
    "ThrottledError",
    "load_settings",
    "sync_institute",
    "sync_institute_async",
]

NIGHTLY_RUN = RunOptions()  # `run`: the nightly job


async def sync_institute_async(
    settings: Settings,
    options: RunOptions = NIGHTLY_RUN,
    *,
    stop: asyncio.Event | None = None,
    configure_logs: bool = True,
) -> RunSummary:
    """One run (`options.mode` "run" or "backfill") of `settings`' institute into its
    database; creates or migrates the schema as the command line does.

    Setting `stop` ends the run early and cleanly (the run is recorded as interrupted).
    With `configure_logs`, testpress-sync's log lines (JSON, secrets redacted) go to
    stderr at settings.log.level, as from the command line; pass False when the host
    application configures structlog itself (then nothing is redacted for you)."""
    settings.require_api()
    redactor = Redactor()
    redactor.add(settings.api.password)
    if configure_logs:
        log_format = "json" if settings.log.format == "auto" else settings.log.format
        configure_logging(redactor, format=log_format, level=settings.log.level)
    return await sync_into(settings, redactor, stop or asyncio.Event(), options, Outputs())


def sync_institute(settings: Settings, options: RunOptions = NIGHTLY_RUN, *, configure_logs: bool = True) -> RunSummary:
    """sync_institute_async on an event loop of its own, for code that is not async
    (an Airflow PythonOperator, a Dagster op). Not for use inside a running event loop."""
    return asyncio.run(sync_institute_async(settings, options, configure_logs=configure_logs))
