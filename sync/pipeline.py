"""One run, start to finish: run record, crawl, write, summary.

    crawler ──(bounded queue of row batches and markers)──▶ writer ──▶ database

The writer is the only task that touches the database. It buffers rows and commits a
batch (exams, then users, then attempts, then the markers that depend on them) in one
transaction, so a crash leaves whole batches only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from schema import sync_progress, sync_runs
from sync import store
from sync.client import TestpressClient
from sync.config import Settings
from sync.crawler import (
    AttemptBatch,
    AttemptsDone,
    Crawler,
    CrawlItem,
    ExamBatch,
    Failure,
    ListingDone,
)
from sync.errors import DatabaseError, error_text
from sync.logs import Redactor
from sync.normalize import AttemptRow, ExamRow, UserRow
from sync.store import RowCounts

log = structlog.get_logger("testpress_sync.pipeline")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunSummary:
    run_id: int
    mode: str
    dry_run: bool = False
    status: str = "running"  # succeeded, partial, failed, interrupted
    duration_seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process during the run (all threads)
    batches: int = 0  # transactions committed
    requests: int = 0
    retries: int = 0
    exams_seen: int = 0
    exams_done: int = 0  # exams whose attempt fetch has ended, one way or another
    attempts_seen: int = 0
    exams_skipped: int = 0
    errors: int = 0
    rows: RowCounts = field(default_factory=RowCounts)
    by_table: dict[str, RowCounts] = field(default_factory=dict)
    listing_complete: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The counters as sync_runs stores them."""
        return {
            "requests": self.requests,
            "retries": self.retries,
            "exams_seen": self.exams_seen,
            "attempts_seen": self.attempts_seen,
            "exams_skipped": self.exams_skipped,
            "rows_inserted": self.rows.inserted,
            "rows_updated": self.rows.updated,
            "rows_unchanged": self.rows.unchanged,
            "rows_deleted": self.rows.deleted,
            "errors": self.errors,
            "error": self.error,
        }


@dataclass
class _Pending:
    """Rows and markers waiting for the next commit."""

    exams: list[ExamRow] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)
    users: list[UserRow] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    done: list[AttemptsDone] = field(default_factory=list)

    def size(self) -> int:
        return len(self.exams) + len(self.attempts) + len(self.failures) + len(self.done)


@dataclass
class _Tally:
    """What one transaction did; added to the run's summary only once it commits."""

    by_table: dict[str, RowCounts] = field(default_factory=dict)

    def count(self, table: str, counts: RowCounts) -> None:
        self.by_table.setdefault(table, RowCounts()).add(counts)


# PostgreSQL SQLSTATEs that mean "the server is away", not "the statement is wrong":
# 08 connection exceptions, 57P operator intervention (shutdown, restart, cannot connect
# now), 53 insufficient resources, 55000 the database not accepting connections.
_SERVER_AWAY = ("08", "57P", "53", "55000")


def connection_lost(error: BaseException) -> bool:
    """A database error worth retrying: the server went away, not the statement was wrong."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated or isinstance(error, (OperationalError, InterfaceError)):
        return True
    code = getattr(error.orig, "sqlstate", None)
    return isinstance(code, str) and code.startswith(_SERVER_AWAY)


class Writer:
    """Consumes the crawler's queue and commits it to the database in batches.

    Each batch is one transaction. If the database goes away, the whole transaction is
    retried on a fresh connection for up to `database_retry_seconds`; then the run fails
    with DatabaseError, and every batch committed before stays as it was."""

    def __init__(
        self,
        engine: AsyncEngine,
        summary: RunSummary,
        redactor: Redactor,
        *,
        batch_size: int,
        record_progress: bool,
        dry_run: bool = False,
        database_retry_seconds: float = 60.0,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._summary = summary
        self._redactor = redactor
        self._batch_size = batch_size
        self._record_progress = record_progress
        self._write = not dry_run
        self._database_retry_seconds = database_retry_seconds
        self._clock = clock
        self._pending = _Pending()
        self._listing: ListingDone | None = None

    async def consume(self, queue: asyncio.Queue[CrawlItem | None]) -> None:
        """Take items until the None that ends the crawl, committing batch by batch.

        A batch is committed when it is full, or when the queue runs dry: then the API is
        the bottleneck, and rows should not wait for a batch to fill. (No timeout here:
        Python 3.11's wait_for can swallow a cancellation, and shutdown relies on it.)"""
        while (item := await queue.get()) is not None:
            self._take(item)
            if self._pending.size() >= self._batch_size or queue.empty():
                await self._commit()
        await self._commit()
        if self._listing is not None:
            await self._finish_listing(self._listing)

    def _take(self, item: CrawlItem) -> None:
        pending = self._pending
        if isinstance(item, ExamBatch):
            pending.exams.extend(item.rows)
            self._summary.exams_seen += len(item.rows)
        elif isinstance(item, AttemptBatch):
            pending.attempts.extend(item.rows)
            pending.users.extend(item.users)
            self._summary.attempts_seen += len(item.rows)
        elif isinstance(item, Failure):
            pending.failures.append(item)
        elif isinstance(item, AttemptsDone):
            pending.done.append(item)
        else:
            self._listing = item

    async def _commit(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not pending.size():
            return
        now = self._clock()

        async def write(connection: AsyncConnection, tally: _Tally) -> None:
            # Order matters: attempts reference exams; deletion marks need the rows stored.
            write = self._write
            tally.count("exams", await store.upsert_exams(connection, pending.exams, now, write=write))
            tally.count("users", await store.upsert_users(connection, pending.users, now, write=write))
            tally.count(
                "attempts", await store.upsert_attempts(connection, pending.attempts, now, write=write)
            )
            if write:
                for failure in pending.failures:
                    await self._record_failure(connection, failure, now)
            await self._finish_exams(connection, pending.done, tally, now)

        self._add(await self._in_transaction(write))
        self._summary.batches += 1
        self._summary.exams_done += len(pending.done)
        for failure in pending.failures:
            self._summary.errors += 1
            log.warning("record_failed", entity=failure.entity, key=failure.key, error=failure.message)
        for done in pending.done:
            if done.status == "ok" and not done.complete:
                log.warning("attempts_incomplete", exam_id=done.exam_id,
                            hint="the attempt listing kept shifting; deletions not checked this run")

    async def _in_transaction(self, work: Callable[[AsyncConnection, _Tally], Awaitable[None]]) -> _Tally:
        retrying = AsyncRetrying(
            retry=retry_if_exception(connection_lost),
            stop=stop_after_delay(self._database_retry_seconds),
            wait=wait_exponential(multiplier=0.2, max=5),
            before_sleep=_log_database_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    tally = _Tally()
                    async with self._engine.begin() as connection:
                        await work(connection, tally)
                    return tally
        except DBAPIError as exc:
            if not connection_lost(exc):
                raise
            raise DatabaseError(
                f"the database stayed unreachable for {self._database_retry_seconds:g}s: "
                f"{self._redactor.redact(error_text(exc))}"
            ) from exc
        except OSError as exc:
            raise DatabaseError(f"the database stayed unreachable: {exc}") from exc
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _finish_exams(
        self, connection: AsyncConnection, done: list[AttemptsDone], tally: _Tally, now: datetime
    ) -> None:
        """Record how each exam's attempt fetch ended; mark what a complete fetch missed."""
        if not done:
            return
        if self._write:
            await store.set_attempts_status(connection, {item.exam_id: item.status for item in done})
        complete = {item.exam_id: item.seen_ids for item in done if item.status == "ok" and item.complete}
        deleted = await store.mark_attempts_deleted(connection, complete, now, write=self._write)
        tally.count("attempts", RowCounts(deleted=deleted))
        if self._record_progress and self._write:
            await store.record_progress(connection, self._summary.run_id, list(complete), now)

    async def _finish_listing(self, listing: ListingDone) -> None:
        self._summary.listing_complete = listing.complete
        if not listing.complete:
            log.warning("listing_incomplete", hint="no exam is marked deleted this run")
            return

        async def mark(connection: AsyncConnection, tally: _Tally) -> None:
            deleted = await store.mark_exams_deleted(
                connection, listing.seen_ids, self._clock(), listing.course, write=self._write
            )
            tally.count("exams", RowCounts(deleted=deleted))

        self._add(await self._in_transaction(mark))

    async def _record_failure(self, connection: AsyncConnection, failure: Failure, now: datetime) -> None:
        await store.record_error(
            connection,
            self._summary.run_id,
            entity=failure.entity,
            key=failure.key,
            message=self._redactor.redact(failure.message),
            http_status=failure.http_status,
            payload=self._redactor.redact_value(failure.payload),
            now=now,
        )

    def _add(self, tally: _Tally) -> None:
        for table, counts in tally.by_table.items():
            # The run's totals are of the data rows (exams, attempts); a user re-seen on
            # every page would swamp them, so users are counted in by_table only.
            if table != "users":
                self._summary.rows.add(counts)
            self._summary.by_table.setdefault(table, RowCounts()).add(counts)


def _log_database_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("database_unreachable_retrying", error=error_text(error) if error else None,
                attempt=state.attempt_number, wait=round(state.upcoming_sleep, 2))


@dataclass(frozen=True)
class RunOptions:
    """What this invocation asks for, beyond the settings."""

    mode: str = "run"  # run, backfill
    resume: bool = False  # backfill --resume
    exam_slugs: tuple[str, ...] = ()  # --exam: only these exams
    limit: int | None = None  # --limit: only the first N exams of the listing
    dry_run: bool = False  # fetch and compare, write nothing


DEFAULT_OPTIONS = RunOptions()


@dataclass(frozen=True)
class Progress:
    """A snapshot for a live progress line."""

    elapsed: float
    exams_total: int | None
    exams_done: int
    attempts_seen: int
    requests: int
    retries: int
    done: bool = False  # the last snapshot: the crawl and the writes have ended


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
            resumed_from, skip = await _resume_point(engine)
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
    queue: asyncio.Queue[CrawlItem | None] = asyncio.Queue(maxsize=settings.sync.queue_pages)
    crawler = Crawler(
        client,
        queue,  # type: ignore[arg-type]  # the crawler never puts the closing None
        workers=settings.http.concurrency,
        course=settings.sync.course,
        exam_slugs=options.exam_slugs,
        limit=options.limit,
        skip_attempts_of=skip,
    )
    writer = Writer(
        engine,
        summary,
        redactor,
        batch_size=settings.sync.batch_size,
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
            exams_total=crawler.exams_total,
            exams_done=summary.exams_done + crawler.exams_skipped,
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
    summary.exams_skipped = crawler.exams_skipped


async def _resume_point(engine: AsyncEngine) -> tuple[int | None, frozenset[int]]:
    """The last unfinished backfill, and the exams whose attempts it (and the backfills
    that resumed it) stored completely."""
    async with engine.connect() as connection:
        last = (
            await connection.execute(
                select(sync_runs.c.id, sync_runs.c.status, sync_runs.c.resumed_from)
                .where(sync_runs.c.mode == "backfill")
                .order_by(sync_runs.c.id.desc())
                .limit(1)
            )
        ).first()
        if last is None or last.status in ("succeeded", "partial"):
            return None, frozenset()
        chain = [last.id]
        parent = last.resumed_from
        while parent is not None:
            chain.append(parent)
            parent = (
                await connection.execute(
                    select(sync_runs.c.resumed_from).where(sync_runs.c.id == parent)
                )
            ).scalar()
        done = await connection.execute(
            select(sync_progress.c.exam_id).where(sync_progress.c.run_id.in_(chain))
        )
        return last.id, frozenset(done.scalars())


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
