"""One run, start to finish: run record, crawl, write, summary.

    crawler ──(bounded queue of batches and markers)──▶ writer ──▶ database

The crawler (sync.source.crawler) fetches; the writer (sync.sink.writer) normalizes and
is the only task that touches the database. This module starts both, stops them cleanly
on request, and records the run's outcome in sync_runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.config import Settings
from sync.errors import error_text
from sync.model.batches import Message
from sync.model.resources import ATTEMPTS, EXAMS
from sync.model.run import Clock, Progress, RunOptions, RunSummary, utc_now
from sync.ops.logs import Redactor
from sync.sink import store
from sync.sink.writer import Writer
from sync.source.client import TestpressClient
from sync.source.crawler import Crawler

__all__ = ["Progress", "RunOptions", "RunSummary", "run_sync", "utc_now"]

log = structlog.get_logger("testpress_sync.run")

DEFAULT_OPTIONS = RunOptions()


async def run_sync(
    engine: AsyncEngine,
    client: TestpressClient,
    settings: Settings,
    redactor: Redactor,
    options: RunOptions = DEFAULT_OPTIONS,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_finish: Callable[[RunSummary], Awaitable[None]] | None = None,
    clock: Clock = utc_now,
) -> RunSummary:
    """One sync run; returns its summary. The database schema must be current.

    Setting `stop` ends the run early and cleanly: fetching stops, the writer commits
    what was fetched, and the run is recorded as interrupted. `on_progress` is called
    twice a second with a Progress snapshot, `on_finish` once with the final summary,
    however the run ended. A dry run reads the database to compare but writes nothing,
    not even its own run record."""
    stop = stop or asyncio.Event()
    started, cpu_started = time.monotonic(), time.process_time()
    skip: frozenset[int] = frozenset()
    resumed_from = None
    if options.dry_run:
        run_id = 0
    else:
        async with engine.begin() as connection:
            # We hold the run lock, so a run still marked running was killed mid-way.
            abandoned = await store.close_abandoned_runs(connection, clock())
        if abandoned:
            log.warning("abandoned_runs_closed", runs=abandoned, status="interrupted")
        if options.resume:
            async with engine.connect() as connection:
                resumed_from, skip = await store.resume_point(connection)
            if resumed_from is None:
                log.info("nothing_to_resume", hint="the last backfill finished; walking everything")
        async with engine.begin() as connection:
            run_id = await store.start_run(connection, options.mode, clock(), resumed_from=resumed_from)
    summary = RunSummary(run_id=run_id, mode=options.mode, dry_run=options.dry_run)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    log.info("run_started", mode=options.mode, dry_run=options.dry_run, resumed_from=resumed_from, exams_to_skip=len(skip))
    try:
        await _crawl_and_write(
            engine, client, settings, redactor, summary, options, skip, clock, stop, on_progress
        )
        if stop.is_set():
            summary.status = "interrupted"
        else:
            summary.status = "partial" if summary.errors else "succeeded"
    except asyncio.CancelledError:
        summary.status = "interrupted"
        raise
    except BaseException as exc:
        summary.status = "failed"
        summary.error = redactor.redact(error_text(exc))
        raise
    finally:
        summary.duration_seconds = round(time.monotonic() - started, 3)
        summary.cpu_seconds = round(time.process_time() - cpu_started, 3)
        summary.requests = client.stats.requests
        summary.retries = client.stats.retries
        if not options.dry_run:
            # Shielded: an interrupt must not cancel the bookkeeping that says it happened.
            await asyncio.shield(_finish(engine, summary, clock))
        _log_summary(summary)
        if on_finish is not None:
            await asyncio.shield(on_finish(summary))
        structlog.contextvars.unbind_contextvars("run_id")
    return summary


async def _crawl_and_write(
    engine: AsyncEngine,
    client: TestpressClient,
    settings: Settings,
    redactor: Redactor,
    summary: RunSummary,
    options: RunOptions,
    skip: frozenset[int],
    clock: Clock,
    stop: asyncio.Event,
    on_progress: Callable[[Progress], None] | None,
) -> None:
    queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=settings.sync.queue_pages)
    crawler = Crawler(
        client,
        queue,  # type: ignore[arg-type]  # the crawler never puts the closing None
        EXAMS,
        children=(ATTEMPTS,),
        workers=settings.http.concurrency,
        filters={"course": settings.sync.course} if settings.sync.course else None,
        keys=options.exam_slugs,
        limit=options.limit,
        skip_children_of=skip,
    )
    writer = Writer(
        engine,
        summary,
        redactor,
        batch_size=settings.sync.batch_size,
        commit_interval=settings.sync.commit_interval,
        record_progress=options.mode == "backfill",
        dry_run=options.dry_run,
        database_retry_seconds=settings.sync.database_retry_seconds,
        clock=clock,
    )

    async def crawl() -> None:
        await client.login()
        await crawler.crawl()

    crawl_failure: list[BaseException] = []

    async def crawl_until_stopped() -> None:
        """The crawl, cut short when `stop` is set; then the writer's queue is closed.

        A crawl failure is held back until the writer has committed what was fetched:
        cancelling the writer inside a database call is what we must never do."""
        crawling = asyncio.create_task(crawl())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({crawling, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not crawling.done():
                crawling.cancel()
            await asyncio.gather(crawling, stopping, return_exceptions=True)
        if not crawling.cancelled() and crawling.exception() is not None:
            crawl_failure.append(crawling.exception())  # type: ignore[arg-type]
        await queue.put(None)

    started = time.monotonic()

    def snapshot(done: bool = False) -> Progress:
        return Progress(
            elapsed=time.monotonic() - started,
            exams_total=crawler.total,
            exams_done=summary.exams_done + crawler.skipped,
            attempts_seen=summary.attempts_seen,
            requests=client.stats.requests,
            retries=client.stats.retries,
            done=done,
        )

    async def report_progress(callback: Callable[[Progress], None]) -> None:
        while True:
            callback(snapshot())
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report_progress(on_progress)) if on_progress else None
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(crawl_until_stopped())
            group.create_task(writer.consume(queue))
    except BaseExceptionGroup as group_error:
        # The writer failed (the database); the crawl was cancelled because of it.
        raise group_error.exceptions[0] from None
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        if on_progress is not None:
            on_progress(snapshot(done=True))
    if crawl_failure:
        raise crawl_failure[0]
    summary.exams_skipped = crawler.skipped


async def _finish(engine: AsyncEngine, summary: RunSummary, clock: Clock) -> None:
    try:
        async with engine.begin() as connection:
            await store.finish_run(
                connection, summary.run_id, status=summary.status, now=clock(), **summary.record()
            )
    except Exception as exc:  # the database may be the reason the run failed
        log.error("run_record_not_updated", error=str(exc))


def _log_summary(summary: RunSummary) -> None:
    """The one line a run ends with; its keys are sync_runs' column names."""
    level = {"succeeded": log.info, "partial": log.warning}.get(summary.status, log.error)
    level(
        "run_finished",
        status=summary.status,
        duration_s=summary.duration_seconds,
        cpu_s=summary.cpu_seconds,
        batches=summary.batches,
        **summary.record(),
    )
