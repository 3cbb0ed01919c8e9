"""The producer–writer contract: what a producer (the crawler today, a webhook receiver
tomorrow) puts on the writer's queue. Plain values; no producer and no database here.

    Batch          payloads of one resource as received, each with its id
    Failure        something that could not be stored: a malformed item, a failed page
    ResourceDone   one listing has been handed over completely (or could not be): what
                   it showed, so the writer may mark what it no longer shows as deleted
"""

from __future__ import annotations

import asyncio
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


Message = Batch | Failure | ResourceDone


class MessageQueue(asyncio.Queue["Message | None"]):
    """The producer–writer queue, full at `max_messages` messages or `max_items` items.

    Memory follows items, not pages: an admin page holds 200 attempts, a student page 20,
    so a bound in pages alone let an admin run buffer ten times as much. A message larger
    than the whole bound still goes in when the queue is empty."""

    def __init__(self, max_messages: int, max_items: int) -> None:
        super().__init__(maxsize=max_messages)
        self._max_items = max_items
        self._items_held = 0

    def full(self) -> bool:  # asyncio.Queue's put() waits while this is true
        return super().full() or self._items_held >= self._max_items

    def _put(self, message: Message | None) -> None:
        self._items_held += _weight(message)
        super()._put(message)

    def _get(self) -> Message | None:
        message: Message | None = super()._get()
        self._items_held -= _weight(message)
        return message


def _weight(message: Message | None) -> int:
    return len(message.items) if isinstance(message, Batch) else 1
