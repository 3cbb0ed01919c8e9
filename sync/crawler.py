"""The walk: the exam listing and every exam's attempts, concurrently, as row batches.

    listing walker ──ExamRef──▶ exam queue ──▶ N attempt workers
          │                                         │
          └──────── batches and markers ──▶ out queue (bounded) ──▶ the writer

Requests in flight are bounded by the client's semaphore; pages waiting for the writer
by the out queue, so memory does not grow with the data. Exams are normalized here (the
walk needs their attempts_url); attempts go to the writer as fetched, with their ids,
and are normalized there only if they are new or changed since the last run.

A listing can shift while it is walked (new items push later ones down a page), which
can show an item twice or hide one. A walk is *consistent* when every page reported the
same `count` and the walk saw exactly that many distinct ids; otherwise it is walked
again, up to `max_passes`. Only a consistent walk counts as complete, and only a complete
walk may mark rows deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin

import structlog

from sync.client import TestpressClient
from sync.errors import ApiError, RecordError, SkippableError
from sync.normalize import ExamRow, Payload, exam_row, require_id
from sync.pagination import Page, later_page_urls, page_count, read_page

log = structlog.get_logger("testpress_sync.crawler")


# --- what the crawler hands to the writer --------------------------------------------------


@dataclass(frozen=True)
class ExamBatch:
    rows: list[ExamRow]


@dataclass(frozen=True)
class AttemptBatch:
    exam_id: int
    items: list[tuple[int, Payload]]  # (id, payload as fetched)


@dataclass(frozen=True)
class Failure:
    """Something that could not be stored: a malformed item or a page that kept failing."""

    entity: str  # exam, attempt, page
    key: str | None
    message: str
    http_status: int | None = None
    payload: Any = None


@dataclass(frozen=True)
class AttemptsDone:
    """Every attempt page of one exam has been handed over (or could not be)."""

    exam_id: int
    status: str  # ok, forbidden, not_found, error
    complete: bool
    seen_ids: frozenset[int]


@dataclass(frozen=True)
class ListingDone:
    complete: bool
    seen_ids: frozenset[int]
    course: str | None


CrawlItem = ExamBatch | AttemptBatch | Failure | AttemptsDone | ListingDone


@dataclass(frozen=True)
class ExamRef:
    id: int
    attempts_url: str


@dataclass
class _Walk:
    """What one pass over a paginated listing saw."""

    counts: set[int] = field(default_factory=set)
    ids: set[int] = field(default_factory=set)
    failed: bool = False
    past_end: bool = False
    uncounted: bool = False  # the server gave no `count`: completeness cannot be checked

    @property
    def consistent(self) -> bool:
        return (
            not self.failed
            and not self.past_end
            and len(self.counts) == 1
            and len(self.ids) == next(iter(self.counts))
        )


# --- the crawler ---------------------------------------------------------------------------


class Crawler:
    def __init__(
        self,
        client: TestpressClient,
        out: asyncio.Queue[CrawlItem],
        *,
        workers: int,
        course: str | None = None,
        exam_slugs: tuple[str, ...] = (),
        limit: int | None = None,
        skip_attempts_of: frozenset[int] = frozenset(),
        max_passes: int = 3,
    ) -> None:
        self._client = client
        self._out = out
        self._workers = workers
        self._course = course
        self._slugs = exam_slugs
        self._limit = limit
        self._skip = skip_attempts_of
        self._max_passes = max_passes
        self._exams: asyncio.Queue[ExamRef | None] = asyncio.Queue(maxsize=workers * 4)
        self.exams_skipped = 0
        self.exams_total: int | None = None  # known once the listing's first page arrived

    def listing_url(self) -> str:
        url = f"{self._client.api_root}/exams/"
        if self._course:
            url += "?" + urlencode({"course": self._course})
        return url

    async def crawl(self) -> None:
        """Walk everything; returns when every batch and marker is in the out queue."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fetch_named_exams() if self._slugs else self._walk_listing())
                for _ in range(self._workers):
                    group.create_task(self._attempt_worker())
        except BaseExceptionGroup as failure:
            # Several workers may hit the same fatal error (a refused login, a long
            # throttle); the first says it.
            raise failure.exceptions[0] from None

    # --- the exam listing ------------------------------------------------------------

    async def _walk_listing(self) -> None:
        seen: set[int] = set()  # exams handed to the writer
        present: set[int] = set()  # every exam id the listing showed, malformed ones included
        complete = False
        for number in range(1, self._max_passes + 1):
            walk = await self._walk(self.listing_url(), self._exam_page_handler(seen), self._limit)
            present |= walk.ids
            if walk.failed or walk.uncounted or self._limit is not None:
                break  # a limited walk is a sample: never complete, never a reason to delete
            if walk.consistent:
                complete = True
                break
            log.info("listing_shifted_walking_again", entity="exam", walk=number)
        await self._close_exam_queue()
        await self._out.put(ListingDone(complete, frozenset(present), self._course))

    async def _fetch_named_exams(self) -> None:
        """--exam SLUG: those exams from their detail pages, not the listing."""
        self.exams_total = len(self._slugs)
        seen: set[int] = set()
        handle = self._exam_page_handler(seen)
        for slug in self._slugs:
            url = f"{self._client.api_root}/exams/{slug}/"
            try:
                detail = await self._client.get_json(url)
            except SkippableError as exc:
                await self._out.put(Failure("exam", slug, f"cannot read exam {slug!r}: {exc}", exc.status))
                continue
            except ApiError as exc:
                await self._page_failed(exc)
                continue
            if isinstance(detail, dict):
                detail.pop("attempts", None)  # the embedded list names users by username only
            await handle([detail], _Walk())
        await self._close_exam_queue()
        await self._out.put(ListingDone(False, frozenset(seen), self._course))

    async def _close_exam_queue(self) -> None:
        # Not in a `finally`: on an error the task group cancels the workers anyway, and a
        # put on a full queue would block the cancellation.
        for _ in range(self._workers):
            await self._exams.put(None)

    def _exam_page_handler(self, seen: set[int]) -> Callable[[list[Any], _Walk], Any]:
        async def handle(items: list[Any], walk: _Walk) -> None:
            if self.exams_total is None and walk.counts:  # the listing's first page
                listed = next(iter(walk.counts))
                self.exams_total = listed if self._limit is None else min(listed, self._limit)
            if self._limit is not None:
                items = items[: max(0, self._limit - len(seen))]
            normalized, failures = normalize_items(items, "exam", exam_row, walk.ids)
            rows = [row for row in normalized if row["id"] not in seen]
            seen.update(row["id"] for row in rows)
            await self._hand_over(ExamBatch(rows) if rows else None, failures)
            for row in rows:
                if row["id"] in self._skip:
                    self.exams_skipped += 1
                elif row["attempts_url"]:
                    # Absolute in every known server; resolved anyway, in case one is not.
                    url = row["attempts_url"]
                    if not url.startswith(("https://", "http://")):
                        url = urljoin(f"{self._client.api_root}/", url)
                    await self._exams.put(ExamRef(row["id"], url))
                else:
                    await self._out.put(Failure("exam", row["slug"], "exam has no attempts_url"))

        return handle

    # --- attempts of each exam -------------------------------------------------------

    async def _attempt_worker(self) -> None:
        while (ref := await self._exams.get()) is not None:
            await self._crawl_attempts(ref)

    async def _crawl_attempts(self, exam: ExamRef) -> None:
        seen: set[int] = set()  # attempts handed to the writer
        present: set[int] = set()  # every attempt id the pages showed
        status, complete = "ok", False
        handle = self._attempt_page_handler(exam.id, seen)
        for number in range(1, self._max_passes + 1):
            try:
                walk = await self._walk(exam.attempts_url, handle)
            except SkippableError as exc:
                status = "forbidden" if exc.status == 403 else "not_found"
                break
            present |= walk.ids
            if walk.failed:
                status = "error"
                break
            if walk.uncounted:
                break
            if walk.consistent:
                complete = True
                break
            log.info("listing_shifted_walking_again", entity="attempt", exam_id=exam.id, walk=number)
        await self._out.put(AttemptsDone(exam.id, status, complete, frozenset(present)))

    def _attempt_page_handler(
        self, exam_id: int, seen: set[int]
    ) -> Callable[[list[Any], _Walk], Any]:
        async def handle(items: list[Any], walk: _Walk) -> None:
            identified, failures = identify_items(items, "attempt", walk.ids)
            fresh = [(ident, payload) for ident, payload in identified if ident not in seen]
            seen.update(ident for ident, _ in fresh)
            await self._hand_over(AttemptBatch(exam_id, fresh) if fresh else None, failures)

        return handle

    async def _hand_over(self, batch: CrawlItem | None, failures: list[Failure]) -> None:
        if batch is not None:
            await self._out.put(batch)
        for failure in failures:
            await self._out.put(failure)

    # --- shared: one pass over a paginated listing -----------------------------------

    async def _walk(
        self,
        first_url: str,
        handle: Callable[[list[Any], _Walk], Any],
        max_items: int | None = None,
    ) -> _Walk:
        """Fetch every page of a listing (or enough for `max_items`), page 1 first, the
        rest concurrently.

        Raises SkippableError when page 1 is forbidden or gone; a later page that fails
        is recorded as a Failure and marks the walk failed."""
        walk = _Walk()
        try:
            first = read_page(await self._client.get_json(first_url), first_url)
        except SkippableError:
            raise
        except ApiError as exc:
            await self._page_failed(exc)
            walk.failed = True
            return walk
        if first.count is not None:
            walk.counts.add(first.count)
        await handle(first.results, walk)
        if page_count(first) is None:
            await self._follow_next(first, handle, walk)
            return walk
        urls = later_page_urls(first)
        if max_items is not None and first.results:
            urls = urls[: max(0, -(-max_items // len(first.results)) - 1)]
        async for _url, outcome in fetch_concurrently(self._client, urls, window=self._workers):
            if isinstance(outcome, Page):
                walk.counts.add(-1 if outcome.count is None else outcome.count)
                await handle(outcome.results, walk)
            elif isinstance(outcome, SkippableError) and outcome.status == 404:
                walk.past_end = True  # the listing shrank while we walked it
            else:
                await self._page_failed(outcome)
                walk.failed = True
        return walk

    async def _follow_next(self, page: Page, handle: Callable[[list[Any], _Walk], Any], walk: _Walk) -> None:
        """A listing without `count`: one page after another, as `next` says."""
        walk.uncounted = True
        log.warning("listing_without_count", url=page.url,
                    hint="pages are fetched one by one; nothing is marked deleted from this listing")
        visited = {page.url}
        while page.next_url is not None and page.next_url not in visited:
            visited.add(page.next_url)
            try:
                page = read_page(await self._client.get_json(page.next_url), page.next_url)
            except ApiError as exc:
                await self._page_failed(exc)
                walk.failed = True
                return
            await handle(page.results, walk)

    async def _page_failed(self, error: ApiError) -> None:
        log.warning("page_failed", url=error.url, status=error.status, error=str(error))
        await self._out.put(Failure("page", error.url, str(error), http_status=error.status))


def identify_items(items: list[Any], entity: str, ids: set[int]) -> tuple[list[tuple[int, Any]], list[Failure]]:
    """Each item of a page with its id, or a Failure for an item without a usable one;
    every id seen goes to `ids`."""
    identified: list[tuple[int, Any]] = []
    failures: list[Failure] = []
    for payload in items:
        try:
            ident = require_id(payload, entity)
        except RecordError as exc:
            failures.append(Failure(entity, None, str(exc), payload=payload))
            continue
        ids.add(ident)
        identified.append((ident, payload))
    return identified, failures


def normalize_items(
    items: list[Any], entity: str, normalize: Callable[[Any], Any], ids: set[int]
) -> tuple[list[Any], list[Failure]]:
    """Each item of a page normalized, or a Failure for it; every id seen goes to `ids`
    (malformed items included: they exist, and must not count as deleted)."""
    identified, failures = identify_items(items, entity, ids)
    results: list[Any] = []
    for ident, payload in identified:
        try:
            results.append(normalize(payload))
        except RecordError as exc:
            failures.append(Failure(entity, str(ident), str(exc), payload=payload))
    return results, failures


async def fetch_concurrently(
    client: TestpressClient, urls: Iterable[str], *, window: int
) -> AsyncIterator[tuple[str, Page | ApiError]]:
    """Pages in the order they arrive, at most `window` requested at once.

    The window keeps a huge listing from becoming thousands of tasks holding pages that
    the writer has not taken yet."""

    async def fetch(url: str) -> tuple[str, Page | ApiError]:
        try:
            return url, read_page(await client.get_json(url), url)
        except ApiError as exc:
            return url, exc

    urls = list(urls)
    if len(urls) == 1:  # the usual two-page listing: no task to spawn and wait for
        yield await fetch(urls[0])
        return
    pending: set[asyncio.Task[tuple[str, Page | ApiError]]] = set()
    queue = iter(urls)
    try:
        for url in queue:
            pending.add(asyncio.create_task(fetch(url)))
            if len(pending) >= window:
                break
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for url in queue:
                pending.add(asyncio.create_task(fetch(url)))
                if len(pending) >= window:
                    break
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
