"""One declarative spec per endpoint: everything the crawler, the writer and the store
need to know about a resource, in one place.

Adding an endpoint is a new `Resource` here, its normalizer in sync.model.normalize, its
table in schema/ (with a migration), a simulator route and tests; the crawler walks any
spec, and the writer and the store write any spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schema import ATTEMPT_CONTENT_COLUMNS, EXAM_CONTENT_COLUMNS
from sync.model.batches import Payload
from sync.model.normalize import UserRow, attempt_row, exam_row

Row = Mapping[str, Any]
# payload, the id of its parent item (None for a top-level resource) → the row to store,
# and the users it names. Raises RecordError for a payload that cannot be stored.
Normalizer = Callable[[Payload, "int | None"], tuple[Row, Sequence[UserRow]]]


@dataclass(frozen=True)
class Resource:
    name: str  # the resource, as batches and markers name it
    entity: str  # one item, as sync_errors and logs name it
    api_version: str  # each resource is read from its own API version
    path: str  # the listing, under /api/<api_version>/
    table: str  # where its rows go
    content_columns: tuple[str, ...]  # the columns a payload fills (raw included)
    normalize: Normalizer
    id_field: str = "id"
    # The resource each item belongs to, and the field of the parent's payload that holds
    # the URL of this listing (attempts: each exam's `attempts_url`).
    parent: str | None = None
    listing_url_field: str | None = None
    # The column of a row naming its parent, the parent's table, and the column of the
    # parent's row that records how fetching this listing ended.
    parent_column: str | None = None
    parent_table: str | None = None
    parent_status_column: str | None = None
    # Where one item is read by its key (`--exam SLUG`), and the field naming an item in
    # sync_errors.
    detail_path: str | None = None
    key_field: str = "id"
    # Unique columns besides the id that Testpress may move from one item to another: the
    # store frees a value an incoming item now holds before writing it.
    movable_unique_columns: tuple[str, ...] = ()
    # Listing filters that narrow a walk, by the column each filters on: a complete
    # walk with a filter marks as deleted only rows within it.
    scope_columns: tuple[str, ...] = ()

    def key_of(self, payload: Payload, ident: int) -> str:
        key = payload.get(self.key_field) if isinstance(payload, dict) else None
        return str(key if key is not None else ident)

    def listing_path(self) -> str:
        return f"/api/{self.api_version}/{self.path}"


def _exam(payload: Payload, _parent: int | None) -> tuple[Row, Sequence[UserRow]]:
    return exam_row(payload), ()


def _attempt(payload: Payload, exam_id: int | None) -> tuple[Row, Sequence[UserRow]]:
    assert exam_id is not None, "attempts are walked per exam"
    row, user = attempt_row(payload, exam_id)
    return row, (user,)


EXAMS = Resource(
    name="exams",
    entity="exam",
    api_version="v2.1",
    path="exams/",
    table="exams",
    content_columns=EXAM_CONTENT_COLUMNS,
    normalize=_exam,
    detail_path="exams/{key}/",
    key_field="slug",
    movable_unique_columns=("slug",),
    scope_columns=("course",),
)

ATTEMPTS = Resource(
    name="attempts",
    entity="attempt",
    api_version="v2.1",
    path="exams/{parent}/attempts/",
    table="attempts",
    content_columns=ATTEMPT_CONTENT_COLUMNS,
    normalize=_attempt,
    parent="exams",
    listing_url_field="attempts_url",
    parent_column="exam_id",
    parent_table="exams",
    parent_status_column="attempts_status",
)

RESOURCES: Mapping[str, Resource] = {spec.name: spec for spec in (EXAMS, ATTEMPTS)}
