"""The producer–writer contract: what a producer (the crawler today, a webhook receiver
tomorrow) puts on the writer's queue. Plain values; no producer and no database here.

    Batch          payloads of one resource as received, each with its id
    Failure        something that could not be stored: a malformed item, a failed page
    ResourceDone   one listing has been handed over completely (or could not be): what
                   it showed, so the writer may mark what it no longer shows as deleted
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any

Payload = dict[str, Any]


@dataclass(frozen=True)
class Batch:
    """Items of `resource` as fetched: (id, payload). `parent_id` is the item the listing
    belongs to (the exam of an attempt listing), None for a top-level listing."""

    resource: str
    items: list[tuple[int, Payload]]
    parent_id: int | None = None


@dataclass(frozen=True)
class Failure:
    """Something that could not be stored: a malformed item or a page that kept failing."""

    entity: str  # exam, attempt, page
    key: str | None
    message: str
    http_status: int | None = None
    payload: Any = None


@dataclass(frozen=True)
class ResourceDone:
    """Every page of one listing of `resource` has been handed over, or could not be.

    `complete` is true only for a consistent walk of the whole listing: only then may the
    rows it did not show be marked deleted. `scope` narrows the listing (the API filters
    it was walked with, by column: {"course": "SSC"})."""

    resource: str
    status: str  # ok, forbidden, not_found, error
    complete: bool
    seen_ids: Set[int]  # read-only: the producer adds nothing once it has put this
    parent_id: int | None = None
    scope: Mapping[str, Any] = field(default_factory=dict)
    # Walked in slices on purpose (an incremental run, --exam, --limit): never complete,
    # and nothing is wrong with that.
    sliced: bool = False
    # A listing of every parent's items (admin attempts) walked for some parents only (by
    # its parent filter: --limit's exams, a nightly's exams of finished attempts): those
    # parents. None: not narrowed to parents.
    parents: frozenset[int] | None = None


Message = Batch | Failure | ResourceDone


class MessageQueue(asyncio.Queue["Message | None"]):
    """The producer–writer queue, bounded for each resource apart: a resource's messages
    wait while it has `max_messages` messages or `max_items` items in the queue.

    Items, because memory follows items, not pages: an admin page holds 200 attempts, a
    student page 20. For each resource apart, because one bound for all let a producer of
    heavy pages hold back the others: with ten pages of attempts waiting for the writer,
    the users' batches (a request per user, two small messages each) could not be handed
    over, and 5,000 such requests were left for after the attempts, one at a time per
    connection. Memory stays bounded: by the listings walked at once, times the bounds.
    A message larger than a whole bound still goes in when its resource has none queued.

    Messages leave in the order they came, but for the resources named `yielding`: the
    messages of any other resource are taken ahead of theirs. An admin run's attempt pages
    are the writer's heavy work (200 rows to normalize and store each), and the users'
    batches are light and bound by latency (a request per user): in plain order, each of
    those waited behind the attempt pages queued before it, the walk of the users' batches
    went at the writer's pace, and a full walk ended with seconds of it alone (W2 at
    20 ms, with the client's fair bound on requests: 12.84 s before, 10.16 s after on
    SQLite). Safe because no message on this queue depends on one of a yielding resource
    (nothing a walk hands over references an attempt; attempt details are written in a
    round of their own, after the walk), and each resource keeps its own order (an
    attempts ResourceDone still comes after the attempt pages before it). The closing
    None leaves last, as it came."""

    _queue: deque[Message | None]  # asyncio.Queue's own store, which typeshed does not declare

    def __init__(self, max_messages: int, max_items: int, yielding: frozenset[str] = frozenset()) -> None:
        super().__init__()  # unbounded as a queue: the bounds are per resource, in put()
        self._max_messages = max_messages
        self._max_items = max_items
        self._yielding = yielding
        self._messages: Counter[str] = Counter()
        self._items: Counter[str] = Counter()
        self._taken = asyncio.Event()  # set by every get: a waiting put looks again

    def full_for(self, resource: str) -> bool:
        return self._messages[resource] >= self._max_messages or self._items[resource] >= self._max_items

    async def put(self, message: Message | None) -> None:
        resource = _resource_of(message)
        while self.full_for(resource):
            self._taken.clear()
            await self._taken.wait()
        self.put_nowait(message)

    def _put(self, message: Message | None) -> None:
        resource = _resource_of(message)
        self._messages[resource] += 1
        self._items[resource] += _weight(message)
        super()._put(message)

    def _get(self) -> Message | None:
        if self._yielding and _resource_of(self._queue[0]) in self._yielding:
            self._bring_forward_one_of_another_resource()
        message: Message | None = super()._get()
        resource = _resource_of(message)
        self._messages[resource] -= 1
        self._items[resource] -= _weight(message)
        self._taken.set()
        return message


    def _bring_forward_one_of_another_resource(self) -> None:
        """The oldest message of a resource that does not yield, to the head of the queue.
        (The closing None stays where it is: it is the last message.)"""
        queued = self._queue
        for index, message in enumerate(queued):
            if message is not None and _resource_of(message) not in self._yielding:
                del queued[index]
                queued.appendleft(message)
                return


def _resource_of(message: Message | None) -> str:
    if isinstance(message, Batch | ResourceDone):
        return message.resource
    return "" if message is None else "failures"


def _weight(message: Message | None) -> int:
    return len(message.items) if isinstance(message, Batch) else 1
