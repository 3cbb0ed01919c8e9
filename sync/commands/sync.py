"""`run` and `backfill`: one sync of the configured institute into the configured database."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.commands import Outcome
from sync.config import Settings
from sync.errors import error_text
from sync.model.run import SUCCESSFUL, Progress, RunOptions, RunSummary, utc_now
from sync.ops.logs import Redactor
from sync.ops.report import MetricFamily, metric_families, prometheus_text, push_metrics
from sync.run import run_sync
from sync.sink import store
from sync.sink.database import create_engine, database_url_from, describe, ensure_schema, run_lock
from sync.source.client import TestpressClient, open_session

log = structlog.get_logger("testpress_sync.commands")


@dataclass(frozen=True)
class Outputs:
    """Where a run reports besides its log."""

    summary_json: Path | None = None
    metrics_file: Path | None = None
    metrics_push: str | None = None  # a Prometheus Pushgateway's URL
    on_progress: Callable[[Progress], None] | None = None


def metric_labels(settings: Settings) -> dict[str, str]:
    """What tells one institute's metrics from another's: the API host, and the schema."""
    return {"institute": urlsplit(settings.api.base_url).hostname or "", "schema": settings.database_schema or ""}


def open_database(settings: Settings) -> AsyncEngine:
    """The engine of every command: the URL and the schema (`[database] schema`) together."""
    return create_engine(database_url_from(settings.database_url), schema=settings.database_schema)


async def sync(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, options: RunOptions, outputs: Outputs
) -> Outcome:
    settings.require_api()
    summary = await sync_into(settings, redactor, stop, options, outputs)
    return Outcome.OK if summary.status == "succeeded" else Outcome.INCOMPLETE


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
                    on_finish=lambda summary: _report(engine, summary, outputs, metric_labels(settings)),
                )  # fmt: skip
    finally:
        await engine.dispose()


async def _prepare_schema(engine: AsyncEngine, *, dry_run: bool) -> None:
    state = await ensure_schema(engine, auto_migrate=not dry_run)
    if not state.up_to_date:
        log.info("schema_migrated", database=describe(engine.url), before=state.current, after=state.head)


async def _report(engine: AsyncEngine, summary: RunSummary, outputs: Outputs, labels: dict[str, str]) -> None:
    """The summary file, the metrics file (written whole or not at all) and the push."""
    now = utc_now()
    data = {**summary.as_dict(), "finished_at": now.isoformat()}
    if outputs.summary_json:
        _write_atomically(outputs.summary_json, json.dumps(data, indent=2, default=str) + "\n")
    if not (outputs.metrics_file or outputs.metrics_push):
        return
    last_success = now if summary.status in SUCCESSFUL else None
    if last_success is None:
        try:
            async with engine.connect() as connection:
                last_success = await store.last_success_finished_at(connection)
        except Exception as exc:  # the database may be why this run failed
            log.warning("last_success_unknown", error=error_text(exc))
    families = metric_families(data, now, last_success, labels)
    if outputs.metrics_file:
        _write_atomically(outputs.metrics_file, prometheus_text(families))
    if outputs.metrics_push:
        await _push(outputs.metrics_push, families, labels)


async def _push(url: str, families: list[MetricFamily], labels: dict[str, str]) -> None:
    # A Pushgateway that is down must not fail a run that stored its data: say so, go on.
    try:
        await asyncio.to_thread(push_metrics, url, families, labels)
    except Exception as exc:
        log.warning("metrics_not_pushed", url=url, error=f"{type(exc).__name__}: {exc}")
    else:
        log.info("metrics_pushed", url=url)


def _write_atomically(path: Path, text: str) -> None:
    # node_exporter may read the file at any moment: it must never see half of it.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.error("report_not_written", path=str(path), error=str(exc))
        temporary.unlink(missing_ok=True)
