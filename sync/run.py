"""One run, start to finish: run record, crawl, write, summary.

    crawler ──(bounded queue of batches and markers)──▶ writer ──▶ database

The crawler (sync.source.crawler) fetches; the writer (sync.sink.writer) normalizes and
is the only task that touches the database. This module starts both, stops them cleanly
on request, and records the run's outcome in sync_runs.

An admin run with `[sync] attempt_details` has a second such round once the first has
ended, and so committed every attempt row: the store says which attempts are new or
changed since their details were read, the crawler reads those details, a writer of
their own replaces them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sync.config import Settings, parse_duration
from sync.errors import ConfigError, error_text, first_error
from sync.model.admin_rows import PiiPolicy
from sync.model.batches import Message, MessageQueue, Payload
from sync.model.normalize import payload_digest
from sync.model.plan import MIXED_RULES, AdminPlan, SyncState, lookback_for, plan_admin_run
from sync.model.resources import ATTEMPT_DETAILS, ATTEMPTS, EXAMS, RESOURCES, Resource, admin_resources
from sync.model.run import Clock, Progress, RunOptions, RunSummary, utc_now
from sync.model.webhook import WEBHOOK_HASH_PREFIX
from sync.ops.logs import Redactor
from sync.sink import store
from sync.sink.faults import in_own_transaction
from sync.sink.writer import Writer
from sync.source.access import SourceChoice, choose_source
from sync.source.client import TestpressClient
from sync.source.crawler import Crawler, ReferencedItems

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
        # Each in a transaction tried again while the database is away, as the batches are.
        retry_seconds = settings.sync.database_retry_seconds
        # We hold the run lock, so a run still marked running was killed mid-way.
        abandoned = await in_own_transaction(engine, retry_seconds, lambda c: store.close_abandoned_runs(c, clock()))
        if abandoned:
            log.warning("abandoned_runs_closed", runs=abandoned, status="interrupted")
        if options.resume:
            resumed_from, skip = await in_own_transaction(engine, retry_seconds, store.resume_point)
            if resumed_from is None:
                log.info("nothing_to_resume", hint="the last backfill finished; walking everything")
        run_id = await in_own_transaction(
            engine, retry_seconds, lambda c: store.start_run(c, options.mode, clock(), resumed_from=resumed_from)
        )
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


class _Walks:
    """The crawl of one run, once the source is known: which listings, in which order."""

    def __init__(
        self,
        client: TestpressClient,
        queue: asyncio.Queue[Message | None],
        settings: Settings,
        options: RunOptions,
    ) -> None:
        self.client = client
        self.queue = queue
        self.settings = settings
        self.options = options
        self.main: Crawler | None = None  # the one the progress line follows
        self.attempts: Crawler | None = None  # an admin run's attempt listing

    def crawler(self, root: Resource, **options: Any) -> Crawler:
        # The crawler never puts the queue's closing None.
        return Crawler(self.client, self.queue, root, workers=self.settings.http.concurrency, **options)  # type: ignore[arg-type]

    async def student(self, skip: frozenset[int]) -> None:
        """Exams under each `state` (the default without one is undocumented), merged by id,
        and each exam's attempts: the login's own."""
        course = self.settings.sync.course
        self.main = self.crawler(
            EXAMS, children=(ATTEMPTS,), filters={"course": course} if course else None,
            keys=self.options.exam_slugs, limit=self.options.limit, skip_children_of=skip,
            variants=tuple({"state": state} for state in STUDENT_EXAM_STATES),
        )  # fmt: skip
        await self.main.crawl()

    async def admin(
        self, resources: Mapping[str, Resource], plan: AdminPlan, known: _Known, chosen: SourceChoice
    ) -> None:
        """Users with their batches, the batches and the exams at once; the attempts once
        every exam is handed over (they reference exams; the writer keeps each resource's
        order, and attempt pages only ever let others ahead of them). The users' batches, a
        request per user, are the longest walk: they start first. The batches listing
        starts from the page the source check read."""
        if self.options.exam_slugs:
            raise ConfigError("--exam names exams by slug, which the admin API does not serve: use --limit, or --source student")
        if self.settings.sync.course:
            # Ignoring it would sync (and, on a full walk, mark deleted) beyond the course.
            raise ConfigError(
                f"[sync] course ({self.settings.sync.course!r}) filters the student API's exam listing; the admin API "
                "has no course filter and reads the whole institute: remove the setting, or set --source student"
            )
        partial, limit = not plan.full, self.options.limit
        users = self.crawler(
            resources["users"], children=(resources["memberships"],), partial=partial, limit=limit,
            child_filter=None if plan.full else known.changed_user(resources["users"]),
        )  # fmt: skip
        batches = self.crawler(resources["batches"], partial=partial, limit=limit, read_already=chosen.probe)
        self.main = exams = self.crawler(resources["exams"], partial=partial, limit=limit)
        # An exam the listing did not show (created since, or shown without an id) is read
        # by the id an attempt names it by.
        assert resources["attempts"].references is not None, "admin attempts name their exam"
        field, target = resources["attempts"].references
        named = ReferencedItems(self.client, self.queue, resources[target], field, exams.present,  # type: ignore[arg-type]
                                stored=known.exam_ids, settled=known.exams_read)  # fmt: skip
        with first_error():  # a fatal error (a refused login, a setting) says it once
            async with asyncio.TaskGroup() as group:
                for crawler in (users, batches):
                    group.create_task(crawler.crawl())
                await exams.crawl()
                # Under --limit, the attempts of the sampled exams only: a sample, from which
                # nothing may be marked deleted.
                self.attempts = attempts = self.crawler(
                    resources["attempts"], partial=partial or limit is not None,
                    variants=self._attempt_slices(plan, exams), references=named,
                )  # fmt: skip
                group.create_task(attempts.crawl())
        if not plan.full and limit is None:
            await self._open_attempts_again(resources["attempts"], known, attempts.present, named)
        if named.read:
            log.info("exams_read_by_id", exams=named.read, hint="attempts named exams that the exam listing did not show")

    async def details(self, details: Resource, attempt_ids: Sequence[int], out: asyncio.Queue[Message | None]) -> None:
        """The detail of each of these attempts into `out`, one request each, as many at
        once as the run's concurrency (the same client: the same bound and retries as every
        walk)."""
        keys = tuple(str(ident) for ident in attempt_ids)
        # The crawler never puts the queue's closing None.
        await Crawler(self.client, out, details, keys=keys, workers=self.settings.http.concurrency).fetch_each()  # type: ignore[arg-type]

    def _attempt_slices(self, plan: AdminPlan, exams: Crawler) -> tuple[dict[str, str], ...]:
        if self.options.limit is not None:  # a first try: the attempts of the exams stored
            if exams.shown_unkeyed:
                raise ConfigError("--limit samples exams by id, and this server's exam listing shows none: "
                                  "run without --limit (exams are then read by the ids their attempts name)")  # fmt: skip
            return tuple({"exams": str(exam_id)} for exam_id in sorted(exams.present))
        if plan.full:
            return ({},)
        return (plan.attempt_window(), *plan.open_before_window())

    async def _open_attempts_again(self, attempts: Resource, known: _Known, seen: Set[int], named: ReferencedItems) -> None:
        """Attempts stored as Running or Not Started before the window, that the `state`
        listings no longer show: they finished (or vanished); read their exams again."""
        exam_ids = sorted({exam_id for ident, exam_id in known.open_attempts.items() if ident not in seen})
        if exam_ids:
            log.info("reading_exams_of_finished_attempts", exams=len(exam_ids))
            variants = tuple({"exams": str(e)} for e in exam_ids)
            await self.crawler(attempts, partial=True, variants=variants, references=named).crawl()


STUDENT_EXAM_STATES = ("available", "upcoming", "history")
# Details buffered for the writer per page that `[sync] queue_pages` allows.
DETAILS_PER_PAGE = 16


@dataclass(frozen=True)
class _Known:
    """What the database holds that an admin nightly run compares listings with."""

    user_digests: Mapping[int, str | None]
    open_attempts: Mapping[int, int]  # attempt id → exam id, Running or Not Started before the window
    exam_ids: Set[int] = frozenset()  # exams stored: an attempt naming one it cannot read is stored still
    # Of those, the ones read from the API (not a webhook's few fields): a nightly run need
    # not read them again by id for the attempts that name them (a full walk's plan leaves
    # it empty: every exam named is read again).
    exams_read: Set[int] = frozenset()

    def changed_user(self, users: Resource) -> Callable[[Resource, int, Payload], bool]:
        def changed(_child: Resource, user_id: int, payload: Payload) -> bool:
            digest = payload_digest(orjson.dumps(payload), users.fingerprint)
            return self.user_digests.get(user_id) != digest

        return changed


async def _admin_plan(engine: AsyncEngine, settings: Settings, options: RunOptions, now: datetime) -> tuple[AdminPlan, _Known, SyncState]:
    """The admin run's plan, from what the last completed runs left in sync_state (read
    in one transaction, tried again while the database is away)."""
    return await in_own_transaction(
        engine, settings.sync.database_retry_seconds, lambda connection: _read_admin_plan(connection, settings, options, now)
    )


async def _read_admin_plan(
    connection: AsyncConnection, settings: Settings, options: RunOptions, now: datetime
) -> tuple[AdminPlan, _Known, SyncState]:
    state = await store.read_sync_state(connection, "attempts")
    longest = await store.longest_exam_duration(connection)
    setting = None if settings.sync.lookback == "auto" else parse_duration(settings.sync.lookback)
    policy = pii_policy(settings)
    plan = plan_admin_run(
        mode=options.mode, force_full=options.full, state=state, now=now,
        full_every=parse_duration(settings.sync.full_every), lookback=lookback_for(setting, longest),
        rules=policy.rules,
    )  # fmt: skip
    resources = admin_resources(policy)
    exam_digests = await store.stored_keys_and_digests(connection, resources["exams"])
    exam_ids = frozenset(exam_digests)
    if plan.full:
        return plan, _Known({}, {}, exam_ids), state
    known = _Known(
        user_digests=await store.stored_keys_and_digests(connection, resources["users"]),
        open_attempts=await store.open_attempts_before(connection, plan.since or now),
        exam_ids=exam_ids,
        exams_read=frozenset(ident for ident, digest in exam_digests.items() if not (digest or "").startswith(WEBHOOK_HASH_PREFIX)),
    )
    return plan, known, state


def pii_policy(settings: Settings) -> PiiPolicy:
    """`[sync] pii` and `pii_salt`: what every writer of personal data applies."""
    return PiiPolicy(settings.sync.pii, settings.sync.pii_salt or "")


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
    run_started = clock()
    # An admin run's plan is read from the database while the login and the source check
    # are in flight: neither needs the other, and it saves a nightly run ~20 ms of its ~1 s.
    planning = None
    if settings.api.source != "student":
        planning = asyncio.create_task(_admin_plan(engine, settings, options, run_started))
    try:
        await client.login()
        chosen = await choose_source(client, settings.api.source)
    except BaseException:
        await _cancel(planning)  # the run ends here
        raise
    source = summary.source = chosen.source
    log.info("source_chosen", source=source, reason=chosen.reason)
    # Attempt pages yield to every other resource's messages (MessageQueue says why).
    queue = MessageQueue(settings.sync.queue_pages, settings.sync.queue_items, yielding=frozenset({ATTEMPTS.name}))
    walks = _Walks(client, queue, settings, options)
    if source == "student":
        log.warning("student_login_sees_own_attempts_only",
                    hint="the student API lists the logged-in user's own attempts; an institute staff login syncs every student")
        resources: Mapping[str, Resource] = RESOURCES
        walk: Callable[[], Coroutine[Any, Any, None]] = lambda: walks.student(skip)  # noqa: E731
        plan = None
        if planning is not None:  # its read ends (a few ms) rather than be cut off mid-transaction; unused
            await asyncio.gather(planning, return_exceptions=True)
    else:
        policy = pii_policy(settings)
        resources = admin_resources(policy)
        plan, known, state = await (planning or _admin_plan(engine, settings, options, run_started))
        summary.full_walk = plan.full
        log.info("admin_plan", full=plan.full, reason=plan.reason, since=plan.since.isoformat() if plan.since else None)
        if not options.dry_run and state.rules != MIXED_RULES and state.rules_changed(policy.rules):
            # This run writes rows by rules the stored ones were not written by: until a
            # full walk under one set of rules completes, every run is a full walk.
            await in_own_transaction(
                engine, settings.sync.database_retry_seconds,
                lambda connection: store.save_sync_state(connection, "attempts", replace(state, rules=MIXED_RULES), clock()),
            )  # fmt: skip
        walk = lambda: walks.admin(resources, plan, known, chosen)  # noqa: E731

    def writer_of(written: Mapping[str, Resource]) -> Writer:
        return Writer(
            engine,
            summary,
            redactor,
            batch_size=settings.sync.batch_size,
            commit_interval=settings.sync.commit_interval,
            record_progress=options.mode == "backfill" and source == "student",
            dry_run=options.dry_run,
            database_retry_seconds=settings.sync.database_retry_seconds,
            clock=clock,
            resources=written,
        )

    writer = writer_of(resources)
    started = time.monotonic()

    def snapshot(done: bool = False) -> Progress:
        main = walks.main
        return Progress(
            elapsed=time.monotonic() - started,
            exams_total=main.total if main else None,
            exams_done=summary.exams_done + (main.skipped if main else 0),
            attempts_seen=summary.attempts_seen,
            requests=client.stats.requests,
            retries=client.stats.retries,
            done=done,
            by_attempts=source == "admin",
            attempts_total=walks.attempts.total if walks.attempts else None,
        )

    async def report_progress(callback: Callable[[Progress], None]) -> None:
        while True:
            callback(snapshot())
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report_progress(on_progress)) if on_progress else None
    try:
        await _produce_and_write(walk, queue, writer, stop)
        summary.exams_skipped = walks.main.skipped if walks.main else 0
        lost = summary.errors - summary.field_problems  # items not stored (a null field costs no row)
        # A listing that kept shifting (or showed one id twice) may have hidden an attempt.
        missed = not summary.listing_complete
        if plan is not None and not stop.is_set() and not lost and not missed and not options.dry_run and options.limit is None:
            # Only a run that completed moves the watermark: one that stopped early, or left
            # items unstored, leaves it where the next run must start from. A `--limit` run
            # is a sample, neither a full walk nor a window read whole. Fields stored null
            # (a birth date of 31/02) do not hold it back: with one such user in the
            # institute, no run would ever count as its full walk. Attempt details do not
            # either: which ones are read never depends on it.
            # A full walk wrote every live row by this run's rules; a nightly run, only some.
            saved = (SyncState(run_started, run_started, policy.rules) if plan.full
                     else replace(state, watermark=run_started))  # fmt: skip
            # Rows marked deleted were not written by this walk: under new rules that
            # protect personal data, they lose theirs (with the rules recorded, or neither).
            protect = plan.full and policy.mode != "keep" and (state.rules is None or state.rules_changed(policy.rules))
            dropped = await in_own_transaction(
                engine, settings.sync.database_retry_seconds,
                lambda connection: _record_watermark(connection, saved, protect, clock()),
            )  # fmt: skip
            if dropped:  # said once it is committed (the transaction may be tried again)
                log.info("personal_data_dropped_from_deleted_rows", rows=dropped,
                         reason="rows marked deleted are in no listing: the walk under the new rules could not reach them")  # fmt: skip
        if settings.sync.attempt_details and not stop.is_set():
            await _attempt_details(engine, walks, resources, writer_of, stop, options, source)
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        if on_progress is not None:
            on_progress(snapshot(done=True))


async def _record_watermark(connection: AsyncConnection, saved: SyncState, protect: bool, now: datetime) -> int:
    """The state the next run starts from; with `protect`, first the personal data of the
    rows marked deleted is dropped (how many rows held some is returned)."""
    dropped = await store.drop_personal_data_of_deleted_rows(connection) if protect else 0
    await store.save_sync_state(connection, "attempts", saved, now)
    return dropped


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait for it to end, its outcome unread."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _produce_and_write(
    produce: Callable[[], Coroutine[Any, Any, None]],
    queue: asyncio.Queue[Message | None],
    writer: Writer,
    stop: asyncio.Event,
) -> None:
    """One producer→writer round: `produce` (a crawl) fills the queue while the writer
    commits it. Returns only once the writer has committed everything handed over, and
    marked what complete listings no longer show: whatever follows may read the database.

    Setting `stop` cuts the producer short. A producer's failure is held back until the
    writer has committed what was fetched (cancelling the writer inside a database call is
    what we must never do), then raised."""
    failure: list[BaseException] = []

    async def produce_until_stopped() -> None:
        producing = asyncio.create_task(produce())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({producing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not producing.done():
                producing.cancel()
            await asyncio.gather(producing, stopping, return_exceptions=True)
        if not producing.cancelled() and producing.exception() is not None:
            failure.append(producing.exception())  # type: ignore[arg-type]
        await queue.put(None)

    with first_error():  # the writer failed (the database); the producer was cancelled because of it
        async with asyncio.TaskGroup() as group:
            group.create_task(produce_until_stopped())
            group.create_task(writer.consume(queue))
    if failure:
        raise failure[0]


async def _attempt_details(
    engine: AsyncEngine,
    walks: _Walks,
    resources: Mapping[str, Resource],
    writer_of: Callable[[Mapping[str, Resource]], Writer],
    stop: asyncio.Event,
    options: RunOptions,
    source: str,
) -> None:
    """The second round of an admin run with `attempt_details`: the detail of every
    attempt stored new or changed, read once the first round's writer has committed every
    attempt row (so the query sees this run's attempts), and written by a writer of its own.

    Which attempts: those whose row's content_hash differs from the one their details were
    fetched for (or that have none), so a run over unchanged data reads no detail, and one
    whose detail failed (recorded in sync_errors, left unmarked) reads it again next run."""
    if source != "admin":
        log.warning("attempt_details_need_the_admin_api", hint="a student login reads no attempt details")
        return
    if options.dry_run:
        log.info("attempt_details_skipped", reason="a dry run stores no details, so it reads none")
        return
    details = resources[ATTEMPT_DETAILS]
    wanted = await in_own_transaction(engine, walks.settings.sync.database_retry_seconds, store.attempts_needing_details)
    log.info("attempt_details_started", attempts=len(wanted))
    if not wanted:
        return
    started, requests = time.monotonic(), walks.client.stats.requests
    # A message here is one attempt's detail, not a page of up to 200 items: a queue of
    # more of them holds no more memory, and keeps the fetchers going while the writer
    # commits (a commit of 500 details takes longer than 64 details take to arrive).
    queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=walks.settings.sync.queue_pages * DETAILS_PER_PAGE)
    await _produce_and_write(lambda: walks.details(details, wanted, queue), queue, writer_of({details.name: details}), stop)
    log.info("attempt_details_finished", attempts=len(wanted), requests=walks.client.stats.requests - requests,
             seconds=round(time.monotonic() - started, 3), stopped=stop.is_set())  # fmt: skip


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
