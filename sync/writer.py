"""The writer: takes row batches and markers from the crawler's queue and commits them.

It is the only task that touches the database during a run. A batch (exams, then attempts
and their users, then the markers that depend on them) is one transaction, so a crash
leaves whole batches only; a lost connection retries the whole batch on a fresh one.
Attempts arrive as fetched: the store normalizes those that are new or changed, and the
ones that cannot be normalized are recorded in sync_errors with the batch.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from sync import store
from sync.crawler import AttemptBatch, AttemptsDone, CrawlItem, ExamBatch, Failure, ListingDone
from sync.database_faults import DatabaseFault, classify, connection_lost, database_unusable
from sync.errors import DatabaseError, error_text
from sync.logs import Redactor
from sync.normalize import AttemptRow, ExamRow, Payload, UserRow, attempt_row
from sync.store import RowCounts
from sync.summary import RunSummary

log = structlog.get_logger("testpress_sync.writer")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Pending:
    """Rows and markers waiting for the next commit."""

    exams: list[ExamRow] = field(default_factory=list)
    attempts: dict[int, tuple[int, Payload]] = field(default_factory=dict)  # id → (exam id, payload)
    failures: list[Failure] = field(default_factory=list)
    done: list[AttemptsDone] = field(default_factory=list)

    def size(self) -> int:
        return len(self.exams) + len(self.attempts) + len(self.failures) + len(self.done)


@dataclass
class _Tally:
    """What one transaction did; added to the run's summary only once it commits."""

    by_table: dict[str, RowCounts] = field(default_factory=dict)
    refused: list[Failure] = field(default_factory=list)  # rows the database would not take
    malformed: list[Failure] = field(default_factory=list)  # attempts that would not normalize

    def count(self, table: str, counts: RowCounts) -> None:
        self.by_table.setdefault(table, RowCounts()).add(counts)

    def add(self, other: _Tally) -> None:
        for table, counts in other.by_table.items():
            self.count(table, counts)
        self.refused += other.refused
        self.malformed += other.malformed


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
        commit_interval: float = 1.0,
        dry_run: bool = False,
        database_retry_seconds: float = 60.0,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._summary = summary
        self._redactor = redactor
        self._batch_size = batch_size
        self._commit_interval = commit_interval
        self._record_progress = record_progress
        self._write = not dry_run
        self._database_retry_seconds = database_retry_seconds
        self._clock = clock
        self._pending = _Pending()
        self._listing: ListingDone | None = None

    async def consume(self, queue: asyncio.Queue[CrawlItem | None]) -> None:
        """Take items until the None that ends the crawl, committing batch by batch.

        A batch is committed when it is full, or when its first item has waited
        `commit_interval` seconds. When the API is the bottleneck, rows are stored that
        soon, and one transaction still holds many pages: a transaction costs a few
        milliseconds of CPU whatever its size, and committing page by page would spend
        more of it than the rows do. (asyncio.timeout_at, unlike Python 3.11's wait_for,
        never swallows the cancellation that shutdown relies on.)"""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # when the pending batch is committed, full or not
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:
                await self._commit()
                deadline = None
                continue
            if item is None:
                break
            self._take(item)
            if deadline is None:
                deadline = loop.time() + self._commit_interval
            if self._pending.size() >= self._batch_size:
                await self._commit()
                deadline = None
        await self._commit()
        if self._listing is not None:
            await self._finish_listing(self._listing)

    def _take(self, item: CrawlItem) -> None:
        pending = self._pending
        if isinstance(item, ExamBatch):
            pending.exams.extend(item.rows)
            self._summary.exams_seen += len(item.rows)
        elif isinstance(item, AttemptBatch):
            # The last sighting of an id wins: one statement may not touch a row twice.
            pending.attempts.update((ident, (item.exam_id, payload)) for ident, payload in item.items)
            self._summary.attempts_seen += len(item.items)
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

        async def write(connection: AsyncConnection, tally: _Tally, one_by_one: bool) -> None:
            # Order matters: attempts reference exams; deletion marks need the rows stored.
            if one_by_one:
                await self._upsert_one_by_one(connection, pending, tally, now)
            else:
                await self._upsert_batch(connection, pending, tally, now)
            if self._write:
                for failure in [*pending.failures, *tally.malformed, *tally.refused]:
                    await self._record_failure(connection, failure, now)
            await self._finish_exams(connection, pending.done, tally, now)

        try:
            tally = await self._in_transaction(lambda c, t: write(c, t, one_by_one=False))
        except DBAPIError as exc:
            # Not an outage (those are retried inside): the database refused something in
            # this batch. Write it again row by row, and record the rows it refuses.
            log.warning("batch_refused_writing_row_by_row", error=self._redactor.redact(error_text(exc)))
            tally = await self._in_transaction(lambda c, t: write(c, t, one_by_one=True))
        self._add(tally)
        self._summary.batches += 1
        self._summary.exams_done += len(pending.done)
        self._summary.attempts_seen -= len(tally.malformed)  # seen, but not as attempts
        for failure in [*pending.failures, *tally.malformed, *tally.refused]:
            self._summary.errors += 1
            log.warning("record_failed", entity=failure.entity, key=failure.key, error=failure.message)
        for done in pending.done:
            if done.status == "ok" and not done.complete:
                log.warning("attempts_incomplete", exam_id=done.exam_id,
                            hint="the attempt listing kept shifting; deletions not checked this run")

    async def _upsert_batch(
        self, connection: AsyncConnection, pending: _Pending, tally: _Tally, now: datetime
    ) -> None:
        write = self._write
        tally.count("exams", await store.upsert_exams(connection, pending.exams, now, write=write))
        await self._upsert_attempts(connection, pending.attempts, tally, now)

    async def _upsert_attempts(
        self,
        connection: AsyncConnection,
        attempts: dict[int, tuple[int, Payload]],  # id → (exam id, payload)
        tally: _Tally,
        now: datetime,
    ) -> None:
        """Attempts (new or changed ones normalized by the store), then their users."""

        def normalize(ident: int, payload: Payload) -> tuple[AttemptRow, UserRow]:
            return attempt_row(payload, attempts[ident][0])

        payloads = {ident: payload for ident, (_, payload) in attempts.items()}
        outcome = await store.upsert_attempt_payloads(connection, payloads, normalize, now, write=self._write)
        tally.count("attempts", outcome.counts)
        tally.count("users", await store.upsert_users(connection, outcome.extras, now, write=self._write))
        tally.malformed += [
            Failure("attempt", str(ident), str(error), payload=payload) for ident, payload, error in outcome.malformed
        ]

    async def _upsert_one_by_one(
        self, connection: AsyncConnection, pending: _Pending, tally: _Tally, now: datetime
    ) -> None:
        """Each row (an attempt with its user) in a savepoint of its own: the ones the
        database refuses become failures, the rest is stored. A row's counts join the
        batch's only once its savepoint is released."""

        async def exam(row: ExamRow, step: _Tally) -> None:
            step.count("exams", await store.upsert_exams(connection, [row], now, write=self._write))

        async def attempt(ident: int, exam_and_payload: tuple[int, Payload], step: _Tally) -> None:
            await self._upsert_attempts(connection, {ident: exam_and_payload}, step, now)

        steps: list[tuple[str, str, Payload, Callable[[_Tally], Awaitable[None]]]] = [
            *(("exam", row["slug"], row["raw"], functools.partial(exam, row)) for row in pending.exams),
            *(("attempt", str(ident), item[1], functools.partial(attempt, ident, item))
              for ident, item in pending.attempts.items()),
        ]  # fmt: skip
        for entity, key, payload, upsert in steps:
            step = _Tally()
            try:
                async with connection.begin_nested():
                    await upsert(step)
            except DBAPIError as exc:
                if classify(exc) is not DatabaseFault.ROW:
                    raise  # not this row's fault: the transaction is retried, or the run stops
                tally.refused.append(
                    Failure(entity, key, f"the database refused it: {error_text(exc)}", payload=payload)
                )
            else:
                tally.add(step)

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
            if database_unusable(exc):
                raise DatabaseError(
                    f"the database cannot run the statements testpress-sync writes with: "
                    f"{self._redactor.redact(error_text(exc))}. Its tables are not the ones "
                    "testpress-sync made (changed by hand?), or the database user may not write to them"
                ) from exc
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
