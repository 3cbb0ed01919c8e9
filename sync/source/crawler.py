"""The walk: a resource's listing and, for each of its items, the listings that belong to
it (each exam's attempts), concurrently, as batches of payloads.

    root listing walker ──ChildListing──▶ queue ──▶ N child workers
            │                                            │
            └──────── batches and markers ──▶ out queue (bounded) ──▶ the writer

Any resource spec (sync.model.resources) can be walked: the crawler reads only its path,
its API version, its parent and the field that names each child listing. Items go to the
writer as fetched, with their ids; the writer normalizes them.

Requests in flight are bounded by the client's semaphore; pages waiting for the writer by
the out queue, so memory does not grow with the data.

A listing can shift while it is walked (new items push later ones down a page), which
can show an item twice or hide one. A walk is *consistent* when every page reported the
same `count` and the walk saw exactly that many distinct ids; otherwise it is walked
again, up to `max_passes`. Only a consistent walk counts as complete, and only a complete
walk may mark rows deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin

import structlog

from sync.errors import ApiError, RecordError, SkippableError, first_error
from sync.model.admin_rows import shown_id, shows_no_id
from sync.model.batches import Batch, Failure, Message, Payload, ResourceDone
from sync.model.ids import IdSet
from sync.model.normalize import INT64, parse_int
from sync.model.resources import Resource
from sync.source.client import TestpressClient
from sync.source.pagination import Page, later_page_urls, page_count, read_page

log = structlog.get_logger("testpress_sync.crawler")

PageHandler = Callable[[list[Any], "_Walk"], Any]
# How far a root listing may run ahead of its child listings, in items (~2.5 MB at most).
CHILD_LISTINGS_AHEAD = 10_000


@dataclass(frozen=True)
class ChildListing:
    """One listing that belongs to an item of the root resource: its attempts, say."""

    resource: Resource
    parent_id: int
    url: str


@dataclass
class _Walk:
    """What one pass over a paginated listing saw."""

    counts: set[int] = field(default_factory=set)
    ids: IdSet = field(default_factory=IdSet)
    failed: bool = False
    past_end: bool = False
    uncounted: bool = False  # the server gave no `count`: completeness cannot be checked
    # Items shown without a usable id: the walk cannot be checked against its count, and
    # walking it again would not change that (nor record them once more).
    unidentified: int = 0

    @property
    def consistent(self) -> bool:
        return (
            not self.failed
            and not self.past_end
            and not self.unidentified
            and len(self.counts) == 1
            and len(self.ids) == next(iter(self.counts))
        )


@dataclass(frozen=True)
class _VariantWalk:
    """How the walks of one variant of the root listing went: `shown` holds the ids of
    the walk that added up (consistent); `earlier` those of the walks before it."""

    complete: bool
    failed: bool
    shown: Set[int] = frozenset()
    earlier: Set[int] = frozenset()


ChildFilter = Callable[[Resource, int, Payload], bool]


class Crawler:
    """Walks `root`'s listing (or only the items named by `keys`) and every child listing
    of each item it shows, handing batches and markers to `out`.

    `variants` are filters the listing is walked with in turn, sharing what was seen: the
    student API's exams under each `state` (its default without one is undocumented), or
    an admin run's slices of the attempt listing (since a date; still running). With
    `partial` the walks are slices, never the whole listing: nothing may be marked deleted
    from them. `child_filter` says which items' child listings are walked (an admin
    nightly run reads the batches of new and changed users only)."""

    def __init__(
        self,
        client: TestpressClient,
        out: asyncio.Queue[Message],
        root: Resource,
        *,
        children: Sequence[Resource] = (),
        workers: int,
        filters: Mapping[str, str] | None = None,
        keys: tuple[str, ...] = (),
        limit: int | None = None,
        skip_children_of: frozenset[int] = frozenset(),
        max_passes: int = 3,
        variants: Sequence[Mapping[str, str]] = ({},),
        partial: bool = False,
        child_filter: ChildFilter | None = None,
        references: ReferencedItems | None = None,
        read_already: tuple[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._out = out
        self._root = root
        self._children = children
        self._workers = workers
        self._filters = dict(filters or {})
        self._keys = keys
        self._limit = limit
        self._skip = skip_children_of
        self._max_passes = max_passes
        self._variants = variants
        self._partial = partial
        self._child_filter = child_filter
        self._references = references
        # (url, document): a page read before this walk (the source check's), used the
        # first time the walk asks for that URL instead of asking the server again.
        self._read_already = read_already
        self.shown_unkeyed = False  # the listing showed items without any id (read_when_referenced)
        # Child listings waiting for a worker. The root listing runs this far ahead of them
        # (a few hundred bytes each): the users listing is read whole early, not held back
        # by a request per user's batches, and admin attempts find their users stored.
        self._listings: asyncio.Queue[ChildListing | None] = asyncio.Queue(maxsize=CHILD_LISTINGS_AHEAD)
        self.skipped = 0  # root items whose children were not walked (backfill --resume)
        self.present = IdSet()  # every root id the listings showed
        self.total: int | None = None  # root items, known once the listing's first page arrived

    def listing_url(self, variant: Mapping[str, str] | None = None) -> str:
        url = self._client.url(self._root.listing_path())
        query = {**self._filters, **(variant or {})}
        if query:
            url += "?" + urlencode(query)
        return url

    async def crawl(self) -> None:
        """Walk everything; returns when every batch and marker is in the out queue."""
        with first_error():  # several workers may hit one fatal error (a refused login, a long throttle)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fetch_named_items() if self._keys else self._walk_root())
                for _ in range(self._workers):
                    group.create_task(self._child_worker())

    # --- the root listing --------------------------------------------------------------

    async def _walk_root(self) -> None:
        complete, failed = True, False
        walks = [await self._walk_variant(variant) for variant in self._variants]
        for walked in walks:
            complete, failed = complete and walked.complete, failed or walked.failed
        await self._close_child_queue()
        status = "error" if failed else "ok"
        whole = complete and not failed and not self._partial
        if whole and len(walks) == 1:
            # Beside other variants (the student API's exam states), an item a later walk
            # no longer shows may have moved to a variant walked before (an exam that
            # started): it stays.
            self._forget_vanished(walks[0])
        # `present` itself, not a copy: only ReferencedItems adds to it after this (an exam
        # read by id exists: the writer, which reads it once everything is stored, must not
        # mark it deleted).
        # A listing that showed items without an id is never complete, and nothing is
        # wrong with that: said once, when the first such item came.
        sliced = self._partial or self._limit is not None or self.shown_unkeyed
        await self._out.put(ResourceDone(self._root.name, status, whole, self.present, scope=self._filters,
                                         sliced=sliced, parents=self._parents_walked()))  # fmt: skip

    def _parents_walked(self) -> frozenset[int] | None:
        """The parents the walks were narrowed to by the root's parent filter, if every
        walk was (admin attempts by exam); None otherwise."""
        key = self._root.parent_filter
        queries = [{**self._filters, **variant} for variant in self._variants]
        if key is None or not all(key in query for query in queries):
            return None
        return frozenset(int(query[key]) for query in queries)

    async def _walk_variant(self, variant: Mapping[str, str]) -> _VariantWalk:
        """One listing, walked again while it shifts."""
        present = self.present  # every id the listings showed: the items handed over
        earlier = IdSet()  # the ids the walks that did not add up showed
        for number in range(1, self._max_passes + 1):
            # The usual walk, one pass of one listing, counts its ids in `present` itself
            # (the page handler adds every item it hands over to `present`).
            ids = present if not present else IdSet()
            try:
                walk = await self._walk(self.listing_url(variant), self._root_page_handler(), self._limit, self._root.name, ids=ids)
            except SkippableError as exc:  # the listing itself refused (after a new login): the other listings go on
                await self._page_failed(exc)
                return _VariantWalk(complete=False, failed=True)
            if walk.failed or walk.uncounted or walk.unidentified or self._limit is not None:
                # A limited walk is a sample: never complete, never a reason to delete.
                return _VariantWalk(complete=False, failed=walk.failed)
            if walk.consistent:
                return _VariantWalk(complete=True, failed=False, shown=walk.ids, earlier=earlier)
            earlier.update(walk.ids)
            log.info("listing_shifted_walking_again", entity=self._root.entity, walk=number, **variant)
        return _VariantWalk(complete=False, failed=False)

    def _forget_vanished(self, walked: _VariantWalk) -> None:
        """Once the listing was walked consistently, the items that only a walk that did
        not add up showed are gone upstream (deleted while the pages were read): out of
        `present`, so that they are marked deleted like any other. (A consistent walk is
        one whose count held and whose distinct ids match it; the same check a walk that
        never shifted passes.)"""
        vanished = [ident for ident in walked.earlier if ident not in walked.shown]
        for ident in vanished:
            self.present.discard(ident)
        if vanished:
            log.info("listing_items_vanished", entity=self._root.entity, count=len(vanished), ids=vanished[:20],
                     hint="shown by an earlier walk of the listing, not by the one that added up: marked deleted")  # fmt: skip

    async def _fetch_named_items(self) -> None:
        """--exam SLUG: those items from their detail pages, not the listing."""
        self.total = len(self._keys)
        handle = self._root_page_handler()
        for key in self._keys:
            url = self._client.url(self._root.detail_route(key))
            try:
                detail = await self._client.get_json(url, self._root.name)
            except SkippableError as exc:
                message = f"cannot read {self._root.entity} {key!r}: {exc}"
                await self._out.put(Failure(self._root.entity, key, message, exc.status))
                continue
            except ApiError as exc:
                await self._page_failed(exc)
                continue
            if isinstance(detail, dict):
                for child in self._children:  # an embedded child list (exam detail: usernames only)
                    detail.pop(child.name, None)
            await handle([detail], _Walk())
        await self._close_child_queue()
        await self._out.put(ResourceDone(self._root.name, "ok", False, self.present, scope=self._filters, sliced=True))

    async def fetch_each(self) -> None:
        """Each item that `keys` names, from the root's detail route, `workers` at a time
        (the client bounds requests in flight, for these and any other walk alike): a
        Batch for each, a Failure for each that could not be read or is not the item asked
        for. Nothing else: a set of details is no listing, so no ResourceDone (nothing may be
        marked deleted from it), and no children."""
        assert self._root.detail_path is not None, f"{self._root.name} cannot be read one by one"
        self.total = len(self._keys)
        keys = iter(self._keys)  # shared: each worker takes the next key when it is free

        async def worker() -> None:
            for key in keys:
                await self._fetch_one(key)

        with first_error():
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._workers, len(self._keys))):
                    group.create_task(worker())

    async def _fetch_one(self, key: str) -> None:
        root = self._root
        url = self._client.url(root.detail_route(key))
        try:
            detail = await self._client.get_json(url)
        except ApiError as exc:  # after the client's retries: this item, not the run
            await self._out.put(Failure(root.entity, key, f"cannot read {root.entity} {key}: {exc}", exc.status))
            return
        try:
            ident = root.identify(detail, root.entity)
        except RecordError as exc:
            await self._out.put(Failure(root.entity, key, str(exc), payload=detail))
            return
        if root.key_of(detail, ident) != key:
            message = f"asked for {root.entity} {key}, the server answered with {root.key_of(detail, ident)}"
            await self._out.put(Failure(root.entity, key, message, payload=detail))
            return
        await self._out.put(Batch(root.name, [(ident, detail)]))

    async def _close_child_queue(self) -> None:
        # Not in a `finally`: on an error the task group cancels the workers anyway, and a
        # put on a full queue would block the cancellation.
        for _ in range(self._workers):
            await self._listings.put(None)

    def _root_page_handler(self) -> PageHandler:
        present = self.present  # the items handed to the writer (an item shown twice goes once)

        async def handle(items: list[Any], walk: _Walk) -> None:
            if self.total is None and walk.counts:  # the listing's first page
                listed = next(iter(walk.counts))
                self.total = listed if self._limit is None else min(listed, self._limit)
            if self._limit is not None:
                items = items[: max(0, self._limit - len(present))]
            identified, failures = identify_items(items, self._root)
            if failures:
                walk.unidentified += len(failures)
                if self._root.read_when_referenced:
                    failures = self._unkeyed_items(failures)
            fresh = [(ident, payload) for ident, payload in identified if ident not in present]
            present.update(ident for ident, _ in fresh)
            if walk.ids is not present:
                walk.ids.update(ident for ident, _ in identified)
            if self._references is not None and fresh:
                fresh, unreferenced = await self._references.resolve(fresh, self._root)
                failures += unreferenced
            await self._hand_over(Batch(self._root.name, fresh) if fresh else None, failures)
            for ident, payload in fresh:
                if ident in self._skip:
                    self.skipped += 1
                    continue
                for child in self._children:
                    if self._child_filter is None or self._child_filter(child, ident, payload):
                        await self._queue_child_listing(child, ident, payload)

        return handle

    def _unkeyed_items(self, failures: list[Failure]) -> list[Failure]:
        """Of the items that could not be identified, those shown with no id at all are
        not recorded: they are read by id when an item of another resource names them.
        The rest (an id that is not a number) are failures still."""
        kept = [failure for failure in failures if not shows_no_id(failure.payload)]
        if len(kept) < len(failures) and not self.shown_unkeyed:
            self.shown_unkeyed = True
            log.warning("listing_without_ids", resource=self._root.name, entity=self._root.entity,
                        hint=f"each {self._root.entity} is read by id when another item names it; none is marked deleted")
        return kept

    async def _queue_child_listing(self, child: Resource, parent_id: int, parent: Payload) -> None:
        url = parent.get(child.listing_url_field) if child.listing_url_field else None
        if child.listing_url_field and not (isinstance(url, str) and url):
            key = self._root.key_of(parent, parent_id)
            message = f"{self._root.entity} has no {child.listing_url_field}"
            await self._out.put(Failure(self._root.entity, key, message))
            return
        if url is None:
            url = self._client.url(f"/api/{child.api_version}/{child.path.format(parent=parent_id)}")
        elif not url.startswith(("https://", "http://")):
            # Absolute in every known server; resolved anyway, in case one is not.
            url = urljoin(self._client.url(f"/api/{child.api_version}/"), url)
        await self._listings.put(ChildListing(child, parent_id, url))

    # --- the child listings ----------------------------------------------------------

    async def _child_worker(self) -> None:
        while (listing := await self._listings.get()) is not None:
            await self._crawl_child_listing(listing)

    async def _crawl_child_listing(self, listing: ChildListing) -> None:
        resource, parent_id = listing.resource, listing.parent_id
        seen: set[int] = set()  # items handed to the writer
        shown: Set[int] = set()  # every id the pages showed; once consistent, the last walk's
        status, complete = "ok", False
        handle = self._child_page_handler(resource, parent_id, seen)
        for number in range(1, self._max_passes + 1):
            try:
                walk = await self._walk(listing.url, handle, route=resource.name)
            except SkippableError as exc:
                # Gone (404), or not this login's to read (403, or a 401 a new login did not cure).
                status = "not_found" if exc.status == 404 else "forbidden"
                break
            if walk.consistent:
                # This walk shows the listing whole: an item only an earlier walk showed is
                # gone, and must not be kept from being marked deleted.
                shown, complete = walk.ids, True
                break
            shown = {*shown, *walk.ids}
            if walk.failed:
                status = "error"
                break
            if walk.uncounted or walk.unidentified:
                break
            log.info("listing_shifted_walking_again", entity=resource.entity, parent_id=parent_id, walk=number)
        await self._out.put(ResourceDone(resource.name, status, complete, shown, parent_id=parent_id))

    def _child_page_handler(self, resource: Resource, parent_id: int, seen: set[int]) -> PageHandler:
        async def handle(items: list[Any], walk: _Walk) -> None:
            identified, failures = identify_items(items, resource)
            walk.unidentified += len(failures)
            walk.ids.update(ident for ident, _ in identified)
            fresh = [(ident, payload) for ident, payload in identified if ident not in seen]
            seen.update(ident for ident, _ in fresh)
            await self._hand_over(Batch(resource.name, fresh, parent_id) if fresh else None, failures)

        return handle

    async def _hand_over(self, batch: Batch | None, failures: list[Failure]) -> None:
        if batch is not None:
            await self._out.put(batch)
        for failure in failures:
            await self._out.put(failure)

    # --- shared: one pass over a paginated listing -----------------------------------

    async def _walk(
        self,
        first_url: str,
        handle: PageHandler,
        max_items: int | None = None,
        route: str | None = None,
        *,
        ids: IdSet | None = None,
    ) -> _Walk:
        """Fetch every page of a listing (or enough for `max_items`), page 1 first, the
        rest concurrently.

        Raises SkippableError when page 1 is forbidden or gone; a later page that fails
        is recorded as a Failure and marks the walk failed."""
        walk = _Walk() if ids is None else _Walk(ids=ids)
        try:
            first = read_page(await self._first_document(first_url, route), first_url)
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
            await self._follow_next(first, handle, walk, route)
            return walk
        urls = later_page_urls(first)
        if max_items is not None and first.results:
            urls = urls[: max(0, -(-max_items // len(first.results)) - 1)]
        async for _url, outcome in fetch_concurrently(self._client, urls, window=self._workers, route=route):
            if isinstance(outcome, Page):
                walk.counts.add(-1 if outcome.count is None else outcome.count)
                await handle(outcome.results, walk)
            elif isinstance(outcome, SkippableError) and outcome.status == 404:
                walk.past_end = True  # the listing shrank while we walked it
            else:
                await self._page_failed(outcome)
                walk.failed = True
        return walk

    async def _first_document(self, url: str, route: str | None) -> Any:
        if self._read_already is not None and self._read_already[0] == url:
            document, self._read_already = self._read_already[1], None  # once: a walk again asks again
            return document
        return await self._client.get_json(url, route)

    async def _follow_next(self, page: Page, handle: PageHandler, walk: _Walk, route: str | None) -> None:
        """A listing without `count`: one page after another, as `next` says."""
        walk.uncounted = True
        log.warning("listing_without_count", url=page.url,
                    hint="pages are fetched one by one; nothing is marked deleted from this listing")
        visited = {page.url}
        while page.next_url is not None and page.next_url not in visited:
            visited.add(page.next_url)
            try:
                page = read_page(await self._client.get_json(page.next_url, route), page.next_url)
            except ApiError as exc:
                await self._page_failed(exc)
                walk.failed = True
                return
            await handle(page.results, walk)

    async def _page_failed(self, error: ApiError) -> None:
        log.warning("page_failed", url=error.url, status=error.status, error=str(error))
        await self._out.put(Failure("page", error.url, str(error), http_status=error.status))


class ReferencedItems:
    """The items of `resource` that other items name by id in their `field` (admin
    attempts name their exam by `exam_id`), made sure of before those are handed over:
    an id that `known` (the ids its listing showed) lacks is read from `resource`'s detail
    route, once, and handed over ahead of the items that name it (the queue lets exams
    ahead of attempts, never behind), so no row names a parent that is not stored. That
    covers an exam created after its listing was walked, and a listing that shows no ids
    at all (the documented admin exam row).

    An item that cannot be read costs the items that name it, each a Failure with its
    payload instead of a row the database would refuse; unless the database holds it
    already (`stored`): then they are stored as before, and it counts as shown (a full
    walk does not mark deleted what live rows name).

    Items in `settled` (on a nightly run: those the database holds as read from the API)
    are not read again for the items that name them: with a listing that shows no ids,
    that would be a request for every exam a night's attempts name (a thousand on W2,
    where the whole nightly run makes 280). Full walks settle none and read them all."""

    def __init__(
        self, client: TestpressClient, out: asyncio.Queue[Message], resource: Resource, field: str, known: IdSet,
        stored: Set[int] = frozenset(), *, settled: Set[int] = frozenset(),
    ) -> None:  # fmt: skip
        assert resource.detail_path is not None, f"{resource.name} cannot be read one by one"
        self._client = client
        self._out = out
        self._resource = resource
        self._field = field
        self._known = known  # the listing's `present`: an item read here joins it (not deleted)
        self._stored = stored
        self._settled = settled
        self._outcomes: dict[int, str | None] = {}  # id → why it could not be read (None: it was)
        self.read = 0  # items read one by one

    async def resolve(self, items: list[tuple[int, Payload]], naming: Resource) -> tuple[list[tuple[int, Payload]], list[Failure]]:
        """`items` (of `naming`) whose referenced item is stored or on its way, and a Failure
        for each of the others."""
        named = [_named_id(payload.get(self._field)) for _, payload in items]
        wanted = {
            ident for ident in named
            if ident is not None and ident not in self._known and ident not in self._outcomes and ident not in self._settled
        }  # fmt: skip
        if wanted:
            with first_error():  # a fatal error (a refused login) stops the other reads
                async with asyncio.TaskGroup() as group:
                    reads = {ident: group.create_task(self._read(ident)) for ident in wanted}
            self._outcomes.update((ident, read.result()) for ident, read in reads.items())
        kept, failures = [], []
        for (ident, payload), named_id in zip(items, named, strict=True):
            problem = None
            if named_id is not None:
                problem = self._outcomes.get(named_id)
                if problem is not None and named_id in self._stored:
                    # Stored rows name it and its read failed, which says nothing of it being
                    # gone: the attempts are stored as before, and it is not marked deleted.
                    self._known.add(named_id)
                    problem = None
            if problem is None:
                kept.append((ident, payload))
            else:
                message = f"not stored: its {self._resource.entity} {named_id} could not be read ({problem})"
                failures.append(Failure(naming.entity, naming.key_of(payload, ident), message, payload=payload))
        return kept, failures

    async def _read(self, ident: int) -> str | None:
        """Read one item by id and hand it over; why it could not be, or None."""
        resource = self._resource
        url = self._client.url(resource.detail_route(ident))
        try:
            detail = await self._client.get_json(url, resource.name)
        except ApiError as exc:  # after the client's retries: this item, and those naming it
            await self._out.put(Failure(resource.entity, str(ident), f"cannot read {resource.entity} {ident}: {exc}", exc.status))
            return str(exc)
        problem: str | None
        try:
            shown = _shown_id(detail, resource)
        except RecordError as exc:
            problem = str(exc)
        else:
            problem = None if shown in (None, ident) else f"asked for {resource.entity} {ident}, the server answered with {shown}"
        if problem is not None:
            await self._out.put(Failure(resource.entity, str(ident), problem, payload=detail))
            return problem
        self._known.add(ident)
        self.read += 1
        await self._out.put(Batch(resource.name, [(ident, detail)]))
        return None


def _named_id(value: Any) -> int | None:
    """An id as another item names it (5, "5"), or None when it names none usable (that
    item's own normalizer says what is wrong with it)."""
    try:
        return parse_int(value, "id", limit=INT64)
    except RecordError:
        return None


def _shown_id(payload: Any, resource: Resource) -> int | None:
    """The id an item read by id shows of itself: None when it shows none (the documented
    admin exam row); RecordError when it is no object, or shows one that is no id."""
    if not isinstance(payload, dict):
        raise RecordError(f"{resource.entity}: expected an object, got {type(payload).__name__}")
    return shown_id(payload, resource.entity)


def identify_items(items: list[Any], resource: Resource) -> tuple[list[tuple[int, Any]], list[Failure]]:
    """Each item of a page with its id, or a Failure for an item without a usable one.
    (Every identified item, malformed or not, counts as shown: it exists, and must not be
    marked deleted.)"""
    identified: list[tuple[int, Any]] = []
    failures: list[Failure] = []
    identify, entity = resource.identify, resource.entity
    for payload in items:
        try:
            ident = identify(payload, entity)
        except RecordError as exc:
            failures.append(Failure(entity, None, str(exc), payload=payload))
            continue
        identified.append((ident, payload))
    return identified, failures


async def fetch_concurrently(
    client: TestpressClient, urls: Iterable[str], *, window: int, route: str | None = None
) -> AsyncIterator[tuple[str, Page | ApiError]]:
    """Pages in the order they arrive, at most `window` requested at once.

    The window keeps a huge listing from becoming thousands of tasks holding pages that
    the writer has not taken yet."""

    async def fetch(url: str) -> tuple[str, Page | ApiError]:
        try:
            return url, read_page(await client.get_json(url, route), url)
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
