"""The producer–writer contract: what a producer (the crawler today, a webhook receiver
tomorrow) puts on the writer's queue. Plain values; no producer and no database here.

    Batch          payloads of one resource as received, each with its id
    Failure        something that could not be stored: a malformed item, a failed page
    ResourceDone   one listing has been handed over completely (or could not be): what
                   it showed, so the writer may mark what it no longer shows as deleted
"""

from __future__ import annotations

from collections.abc import Mapping
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
    seen_ids: frozenset[int]
    parent_id: int | None = None
    scope: Mapping[str, Any] = field(default_factory=dict)


Message = Batch | Failure | ResourceDone
