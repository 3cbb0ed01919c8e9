"""The writer: takes batches and markers from a producer's queue and commits them.

It is the only task that touches the database during a run. A batch (parents, then their
children and the users they name, then the markers that depend on them) is one
transaction, so a crash leaves whole batches only; a lost connection retries the whole
batch on a fresh one.

The write path goes one way, for every resource alike (`write_payloads`):
    1. the store says which items are new or changed (one lookup of stored digests);
    2. those, and only those, are normalized here, by their resource's normalizer;
    3. the store upserts the rows (one executemany).
An item that will not normalize is recorded in sync_errors with the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sync.errors import DatabaseError, RecordError, error_text
from sync.model.batches import Batch, Failure, Message, Payload, ResourceDone
from sync.model.normalize import UserRow, payload_digest
from sync.model.resources import ATTEMPT_DETAILS, RESOURCES, Resource
from sync.model.run import Clock, RowCounts, RunSummary, utc_now
from sync.ops.logs import Redactor
from sync.sink import store
from sync.sink.dialects.base import WRITES_OPTION
from sync.sink.faults import DatabaseFault, classify, connection_lost, database_unusable, in_own_transaction

log = structlog.get_logger("testpress_sync.writer")

# Items normalized between two turns of the event loop: with larger batches, one
# uninterrupted pass kept responses waiting past their latency and idled the fetchers.
_YIELD_EVERY = 250

# id (or, for a link resource, (parent id, id)) → (parent id, payload as received)
Items = Mapping[Any, tuple["int | None", Payload]]


@dataclass
class PayloadOutcome:
    """What writing one resource's items did."""

    counts: RowCounts = field(default_factory=RowCounts)
    users: list[UserRow] = field(default_factory=list)  # the users the written rows name
    malformed: list[Failure] = field(default_factory=list)  # items that would not normalize
    problems: list[Failure] = field(default_factory=list)  # fields stored null: the rows were stored
    written: list[Any] = field(default_factory=list)  # keys of the rows inserted or changed


async def write_payloads(
    connection: AsyncConnection, resource: Resource, items: Items, now: datetime, *, write: bool = True
) -> PayloadOutcome:
    """Insert new items, rewrite changed ones (or deleted ones seen again), count the rest.

    An item whose digest matches its stored row is not even normalized: on the nightly run
    over mostly unchanged data, normalizing is most of the work saved. With write=False
    only count (a dry run)."""
    outcome = PayloadOutcome()
    if not items:
        return outcome
    if resource.write == "link":
        return await _write_links(connection, resource, items, now, write=write)
    if resource.write == "details":
        return await _write_details(connection, resource, items, now, write=write)
    stored = await store.stored_digests(connection, resource, list(items))
    counts, normalize, rules, key = outcome.counts, resource.normalize, resource.fingerprint, resource.key_column
    rows = store.RowBatch(connection, resource, now)
    for number, (ident, (parent_id, payload)) in enumerate(items.items(), 1):
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        raw_json = orjson.dumps(payload)
        digest = payload_digest(raw_json, rules)
        before = stored.get(ident)
        if before is not None and before[0] == digest and not before[1]:
            counts.unchanged += 1
            continue
        try:
            row, users, problems = normalize(payload, parent_id)
        except RecordError as error:
            outcome.malformed.append(Failure(resource.entity, str(ident), str(error), payload=payload))
            continue
        if row[key] is None:  # shown without an id (an admin exam's detail): the id it was read by
            row = {**row, key: ident}
        if before is None:
            counts.inserted += 1
        else:
            counts.updated += 1
        outcome.written.append(row[key])
        if users:
            outcome.users.extend(users)
        if problems:
            outcome.problems += [Failure(resource.entity, str(ident), problem, payload=payload) for problem in problems]
        # The row's raw is the payload, unless the personal-data policy replaced some of it.
        rows.add(row, raw_json if row["raw"] is payload else orjson.dumps(row["raw"]), digest)
    if write:
        # A row that gave its username (or slug) to one of these changed too.
        outcome.written += await store.upsert_rows(connection, rows)
    return outcome


async def _write_links(
    connection: AsyncConnection, resource: Resource, items: Items, now: datetime, *, write: bool
) -> PayloadOutcome:
    """Membership rows: normalized, then inserted if new (they carry no payload to compare)."""
    outcome, rows = PayloadOutcome(), []
    for ident, (parent_id, payload) in items.items():
        try:
            rows.append(resource.normalize(payload, parent_id)[0])
        except RecordError as error:
            outcome.malformed.append(Failure(resource.entity, str(ident), str(error), payload=payload))
    outcome.counts = await store.upsert_links(connection, resource, rows, now, write=write)
    return outcome


async def _write_details(
    connection: AsyncConnection, resource: Resource, items: Items, now: datetime, *, write: bool
) -> PayloadOutcome:
    """Attempt details: each normalized, then stored in place of the attempt's old ones.
    They are fetched only when new or changed, so there is no digest to compare first; one
    that will not normalize is recorded and left unfetched, to be read again next run."""
    outcome, rows = PayloadOutcome(), []
    for number, (ident, (parent_id, payload)) in enumerate(items.items(), 1):
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        try:
            rows.append(resource.normalize(payload, parent_id)[0])
        except RecordError as error:
            outcome.malformed.append(Failure(resource.entity, str(ident), str(error), payload=payload))
    outcome.counts = await store.replace_attempt_details(connection, rows, now, write=write)
    return outcome


@dataclass
class _Pending:
    """Items and markers waiting for the next commit."""

    items: dict[str, dict[Any, tuple[int | None, Payload]]] = field(default_factory=dict)  # by resource
    failures: list[Failure] = field(default_factory=list)
    done: list[ResourceDone] = field(default_factory=list)  # child listings that ended

    def size(self) -> int:
        return sum(map(len, self.items.values())) + len(self.failures) + len(self.done)


@dataclass
class _Tally:
    """What one transaction did; added to the run's summary only once it commits."""

    by_table: dict[str, RowCounts] = field(default_factory=dict)
    refused: list[Failure] = field(default_factory=list)  # rows the database would not take
    malformed: list[tuple[str, Failure]] = field(default_factory=list)  # (resource, item) not normalized
    problems: list[Failure] = field(default_factory=list)  # fields stored null in rows that were stored
    unstorable: set[tuple[str, int]] = field(default_factory=set)  # (resource, id) of those

    def count(self, table: str, counts: RowCounts) -> None:
        self.by_table.setdefault(table, RowCounts()).add(counts)

    def add(self, other: _Tally) -> None:
        for table, counts in other.by_table.items():
            self.count(table, counts)
        self.refused += other.refused
        self.malformed += other.malformed
        self.problems += other.problems
        self.unstorable |= other.unstorable


class Writer:
    """Consumes a producer's queue and commits it to the database in batches.

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
        resources: Mapping[str, Resource] = RESOURCES,
    ) -> None:
        # Its transactions read stored digests, then write: on SQLite they take the write
        # lock as they begin, so a webhook commit in between cannot fail them (WRITES_OPTION).
        self._engine = engine.execution_options(**{WRITES_OPTION: True})
        self._summary = summary
        self._redactor = redactor
        self._batch_size = batch_size
        self._commit_interval = commit_interval
        self._record_progress = record_progress
        self._write = not dry_run
        self._database_retry_seconds = database_retry_seconds
        self._clock = clock
        self._resources = resources  # in the order they are written: parents first
        self._by_entity = {resource.entity: resource for resource in resources.values()}
        # Whether attempts take their username from users: then a user written (new, or
        # renamed) names the attempts stored before it.
        self._users_name_attempts = any(resource.username_from_users for resource in resources.values())
        self._pending = _Pending()
        self._listings: list[ResourceDone] = []  # top-level listings: marked at the end
        self._unstorable: set[tuple[str, int]] = set()  # parents that would not normalize
        # Child listings that answered 403 or 404 (a forbidden exam, a vanished one): normal,
        # not failures, but said once at the end, by resource and status, with their parents.
        self._unreadable: dict[tuple[str, str], list[int]] = {}
        # When the walk began (the crawl starts after its writer exists): rows a webhook
        # wrote since then are newer than any listing of this run, and never marked deleted.
        self._walk_started = clock()

    async def consume(self, queue: asyncio.Queue[Message | None]) -> None:
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
        await self._finish_listings()
        for (resource, status), parents in self._unreadable.items():
            parent = self._resources[resource].parent
            log.info("listings_not_readable", resource=resource, status=status, count=len(parents),
                     parents=sorted(parents)[:20], hint=f"the {parent} listing showed them, but this login may not read their {resource}"
                     if status == "forbidden" else f"the {parent} vanished while the run read it")  # fmt: skip

    def _take(self, item: Message) -> None:
        pending = self._pending
        if isinstance(item, Batch):
            # The last sighting of an id wins: one statement may not touch a row twice.
            waiting = pending.items.setdefault(item.resource, {})
            parent = item.parent_id
            if self._resources[item.resource].write == "link":  # an id is unique per parent only
                waiting.update(((parent, ident), (parent, payload)) for ident, payload in item.items)
            else:
                waiting.update((ident, (parent, payload)) for ident, payload in item.items)
            self._summary.count_seen(item.resource, len(item.items))
        elif isinstance(item, Failure):
            pending.failures.append(item)
        elif item.parent_id is None:
            self._listings.append(item)
        else:
            pending.done.append(item)

    async def _commit(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not pending.size():
            return
        now = self._clock()

        async def write(connection: AsyncConnection, tally: _Tally, one_by_one: bool) -> None:
            # Order matters: children reference parents; deletion marks need the rows stored.
            for resource in self._resources.values():
                items = pending.items.get(resource.name)
                if not items:
                    continue
                if one_by_one:
                    await self._write_one_by_one(connection, resource, items, tally, now)
                else:
                    await self._write_items(connection, resource, items, tally, now)
            if self._write:
                await store.record_errors(connection, self._summary.run_id, map(self._error_row, _failures(pending, tally)), now)
            await self._finish_child_listings(connection, pending.done, tally, now)

        try:
            tally = await self._in_transaction(lambda c, t: write(c, t, one_by_one=False))
        except DBAPIError as exc:
            # Not an outage (those are retried inside): the database refused something in
            # this batch. Write it again row by row, and record the rows it refuses.
            log.warning("batch_refused_writing_row_by_row", error=self._redactor.redact(error_text(exc)))
            tally = await self._in_transaction(lambda c, t: write(c, t, one_by_one=True))
        self._add(tally)
        self._unstorable |= tally.unstorable
        self._summary.batches += 1
        resources = self._resources  # an exam is done when its attempts are (not a user's batches)
        self._summary.exams_done += sum(1 for done in pending.done if resources[done.resource].parent == "exams")
        for resource, _ in tally.malformed:
            self._summary.count_seen(resource, -1)  # seen, but not as an item
        self._summary.field_problems += len(tally.problems)
        for failure in _failures(pending, tally):
            self._summary.errors += 1
            log.warning("record_failed", entity=failure.entity, key=failure.key, error=failure.message)
        for done in pending.done:
            if done.status in ("forbidden", "not_found") and done.parent_id is not None:
                self._unreadable.setdefault((done.resource, done.status), []).append(done.parent_id)
            if done.status == "ok" and not done.complete:
                log.warning("listing_incomplete", resource=done.resource, parent_id=done.parent_id,
                            hint="the listing kept shifting; deletions not checked this run")

    async def _write_items(
        self, connection: AsyncConnection, resource: Resource, items: Items, tally: _Tally, now: datetime
    ) -> None:
        """One resource's items (new or changed ones normalized), then the users they name."""
        items = self._without_orphans(resource, items, tally)
        outcome = await write_payloads(connection, resource, items, now, write=self._write)
        tally.count(resource.table, outcome.counts)
        if resource.table == "users" and self._users_name_attempts and outcome.written and self._write:
            await store.name_attempts_after_users(connection, outcome.written)
        if outcome.users:
            tally.count("users", await store.upsert_users(connection, outcome.users, now, write=self._write))
        tally.malformed += [(resource.name, failure) for failure in outcome.malformed]
        tally.problems += outcome.problems
        tally.unstorable |= {(resource.name, int(failure.key or 0)) for failure in outcome.malformed}

    def _without_orphans(self, resource: Resource, items: Items, tally: _Tally) -> Items:
        """Items whose parent would not normalize cannot be stored (their rows would name
        a parent that is not there): they are recorded, with their payloads, instead."""
        if resource.parent is None:
            return items
        gone = self._unstorable | tally.unstorable
        if not gone:
            return items
        kept = {}
        for ident, (parent_id, payload) in items.items():
            if (resource.parent, parent_id) in gone:
                message = f"not stored: its {resource.parent} item {parent_id} could not be stored"
                tally.malformed.append((resource.name, Failure(resource.entity, str(ident), message, payload=payload)))
            else:
                kept[ident] = (parent_id, payload)
        return kept

    async def _write_one_by_one(
        self, connection: AsyncConnection, resource: Resource, items: Items, tally: _Tally, now: datetime
    ) -> None:
        """Each item (with the users it names) in a savepoint of its own: the ones the
        database refuses become failures, the rest is stored. An item's counts join the
        batch's only once its savepoint is released."""
        for ident, (parent_id, payload) in items.items():
            step = _Tally(unstorable=set(tally.unstorable))
            try:
                async with connection.begin_nested():
                    await self._write_items(connection, resource, {ident: (parent_id, payload)}, step, now)
            except DBAPIError as exc:
                if classify(exc) is not DatabaseFault.ROW:
                    raise  # not this row's fault: the transaction is retried, or the run stops
                message = f"the database refused it: {error_text(exc)}"
                tally.refused.append(Failure(resource.entity, resource.key_of(payload, ident), message, payload=payload))
            else:
                tally.add(step)

    async def _in_transaction(self, work: Callable[[AsyncConnection, _Tally], Awaitable[None]]) -> _Tally:
        async def tallied(connection: AsyncConnection) -> _Tally:
            tally = _Tally()  # a new one for each try: a failed try counts nothing
            await work(connection, tally)
            return tally

        try:
            return await in_own_transaction(self._engine, self._database_retry_seconds, tallied)
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

    async def _finish_child_listings(
        self, connection: AsyncConnection, done: list[ResourceDone], tally: _Tally, now: datetime
    ) -> None:
        """Record how each child listing's fetch ended; mark what a complete one missed."""
        by_resource: dict[str, list[ResourceDone]] = {}
        for item in done:
            by_resource.setdefault(item.resource, []).append(item)
        for name, listings in by_resource.items():
            resource = self._resources[name]
            if self._write and resource.parent_status_column:
                await store.set_listing_status(connection, resource, {item.parent_id: item.status for item in listings if item.parent_id is not None})
            complete = {
                item.parent_id: item.seen_ids
                for item in listings
                if item.status == "ok" and item.complete and item.parent_id is not None
            }
            deleted = await store.mark_missing_children_deleted(
                connection, resource, complete, now, write=self._write, written_before=self._walk_started
            )
            tally.count(resource.table, RowCounts(deleted=deleted))
            if self._record_progress and self._write:
                await store.record_progress(connection, self._summary.run_id, list(complete), now)

    async def _finish_listings(self) -> None:
        """Top-level listings, once everything else is stored: mark what a complete one
        no longer shows as deleted."""
        # Whether every listing read whole was read consistently: a full walk that was not
        # may have missed an item, so it moves no watermark (sync.run).
        self._summary.listing_complete = all(listing.complete for listing in self._listings if not listing.sliced)
        await self._record_root_listing_status()
        for listing in self._listings:
            if listing.sliced:
                log.info("deletions_not_checked", resource=listing.resource,
                         reason="this run did not read the whole listing by id (incremental, --exam, --limit, or a listing without ids)")
                continue
            if not listing.complete:
                log.warning("listing_incomplete", resource=listing.resource, hint="nothing is marked deleted from it this run")
                continue
            resource = self._resources[listing.resource]

            async def mark(connection: AsyncConnection, tally: _Tally, resource: Resource = resource,
                           listing: ResourceDone = listing) -> None:
                deleted = await store.mark_missing_deleted(
                    connection, resource, listing.seen_ids, self._clock(), listing.scope, write=self._write,
                    written_before=self._walk_started,
                )
                tally.count(resource.table, RowCounts(deleted=deleted))
                for child in self._resources.values():
                    if child.parent == resource.name and child.write == "link":  # a deleted user's memberships
                        gone = await store.mark_children_of_deleted_deleted(connection, child, resource, self._clock(), write=self._write)
                        tally.count(child.table, RowCounts(deleted=gone))

            self._add(await self._in_transaction(mark))

    async def _record_root_listing_status(self) -> None:
        """The listings of every parent's items (admin attempts), all read without a failed
        page: each parent whose items they read is `ok` (every parent, unless each walk was
        narrowed to some). After a failed page they all stay as they were: which parents'
        items the failed pages held is not known."""
        by_resource: dict[str, list[ResourceDone]] = {}
        for listing in self._listings:
            if self._resources[listing.resource].parent_status_column is not None:
                by_resource.setdefault(listing.resource, []).append(listing)
        for name, listings in by_resource.items():
            if not self._write or any(listing.status != "ok" for listing in listings):
                continue
            resource = self._resources[name]
            narrowed = [listing.parents for listing in listings if listing.parents is not None]
            read = frozenset[int]().union(*narrowed) if len(narrowed) == len(listings) else None  # None: every parent

            async def record(connection: AsyncConnection, _tally: _Tally, resource: Resource = resource,
                             read: frozenset[int] | None = read) -> None:  # fmt: skip
                if read is None:
                    await store.set_status_of_every_parent(connection, resource, "ok")
                else:
                    await store.set_listing_status(connection, resource, dict.fromkeys(read, "ok"))

            await self._in_transaction(record)

    def _error_row(self, failure: Failure) -> store.ErrorRow:
        payload = failure.payload
        resource = self._by_entity.get(failure.entity)
        if resource is not None and resource.personal is not None and isinstance(payload, dict):
            payload = resource.personal(payload)  # as the policy would have stored it
        return store.ErrorRow(
            entity=failure.entity,
            key=failure.key,
            message=self._redactor.redact(failure.message),
            http_status=failure.http_status,
            payload=self._redactor.redact_value(payload),
        )

    def _add(self, tally: _Tally) -> None:
        for table, counts in tally.by_table.items():
            # The run's totals are of the data rows (exams, attempts); a user re-seen on
            # every page would swamp them, so users are counted in by_table only.
            if table not in ("users", ATTEMPT_DETAILS):  # details: counted by attempt, in by_table only
                self._summary.rows.add(counts)
            self._summary.by_table.setdefault(table, RowCounts()).add(counts)


def _failures(pending: _Pending, tally: _Tally) -> list[Failure]:
    """Everything a batch could not store: what the producer reported, the items that
    would not normalize, the rows the database refused, the fields stored null."""
    return [*pending.failures, *(failure for _, failure in tally.malformed), *tally.refused, *tally.problems]
