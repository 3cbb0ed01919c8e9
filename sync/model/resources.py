"""One declarative spec per endpoint: everything the crawler, the writer and the store
need to know about a resource, in one place.

Adding an endpoint is a new `Resource` here, its normalizer in sync.model.normalize (or
admin_rows for the admin API), its table in schema/ (with a migration), a simulator route
and tests; the crawler walks any spec, and the writer and the store write any spec.

Two sets: the student API's (v2.1: exams, and each exam's attempts of the logged-in
user) and the admin API's (v2.5: exams, attempts, users with their batches, batches, and
the attempts' details), built for a run's personal-data policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schema import ATTEMPT_CONTENT_COLUMNS, BATCH_CONTENT_COLUMNS, EXAM_CONTENT_COLUMNS, USER_CONTENT_COLUMNS
from sync.model.admin_rows import (
    ATTEMPT_PERSONAL_KEYS,
    PiiPolicy,
    admin_attempt_row,
    admin_exam_row,
    admin_user_row,
    attempt_details_row,
    batch_row,
    id_from_row_or_url,
    membership_row,
)
from sync.model.batches import Payload
from sync.model.normalize import UserRow, attempt_row, exam_row, require_id

Row = Mapping[str, Any]
# payload, the id of its parent item (None for a top-level resource) → the row to store,
# the users it names, and the fields that would not parse (stored null; each goes to
# sync_errors while the row is stored). Raises RecordError for a payload that cannot be
# stored at all.
Normalized = tuple[Row, Sequence[UserRow], Sequence[str]]
Normalizer = Callable[[Payload, "int | None"], Normalized]
NO_USERS: tuple[UserRow, ...] = ()
NO_PROBLEMS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resource:
    name: str  # the resource, as batches and markers name it
    entity: str  # one item, as sync_errors and logs name it
    api_version: str  # each resource is read from its own API version
    path: str  # the listing, under /api/<api_version>/
    table: str  # where its rows go
    content_columns: tuple[str, ...]  # the columns a payload fills (raw included)
    normalize: Normalizer
    id_field: str = "id"  # in the payload
    key_column: str = "id"  # the table's column that the payload's id goes to
    # How an item's id is found: its `id_field`, or (admin exams) its URL's last number.
    identify: Callable[[Any, str], int] = require_id
    # "payload": rows compared by digest and upserted whole; "link": a membership row with
    # no payload of its own (user_batches), inserted once and marked deleted when gone;
    # "details": an attempt's breakdowns, replaced whole in the tables its row names
    # (`table` then only names them in the run's counts).
    write: str = "payload"
    # Part of each row's digest besides the payload: the personal-data policy, say.
    fingerprint: bytes = b""
    # The resource each item belongs to, and the field of the parent's payload that holds
    # the URL of this listing (attempts: each exam's `attempts_url`).
    parent: str | None = None
    listing_url_field: str | None = None
    # The column of a row naming its parent, the parent's table, and the column of the
    # parent's row that records how fetching this listing ended. A root listing with a
    # status column holds every parent's items (admin attempts: every exam's), unless
    # walked with `parent_filter`, the listing filter that narrows it to one parent.
    parent_column: str | None = None
    parent_table: str | None = None
    parent_status_column: str | None = None
    parent_filter: str | None = None
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
    # A completion that a webhook delivery stored is newer than any page of a run still on
    # its way: a row of this resource never goes back from Completed to an earlier state
    # by a listing's page (the next run's page shows the completion too).
    keeps_webhook_completions: bool = False
    # Items of another resource that this one's items name by id: (the payload's field,
    # that resource). Admin attempts name their exam by `exam_id`; an exam its listing did
    # not show is read from its detail route before the attempts that name it are handed
    # over (sync.source.crawler.ReferencedItems), so no row names an exam that is not stored.
    references: tuple[str, str] | None = None
    # Items this listing shows without an id are not failures: they are read by id from
    # `detail_path` when another resource's item names them. The documented admin exam
    # row shows no id (testpress-api.md); attempts name exams by `exam_id` all the same.
    read_when_referenced: bool = False
    # Rows that name their student by `user_id` only (admin attempts): the username is the
    # one `users` holds for that id (reporting-schema.md), looked up as each row is
    # written, and brought up to date when a user is written later or renamed.
    username_from_users: bool = False
    # Columns this API never serves, which the other API fills: a rewrite keeps what is
    # stored (an exam's slug from a student login's earlier runs, an attempt's username
    # from a webhook delivery) instead of writing null over it. A value it does serve wins.
    kept_when_unserved: tuple[str, ...] = ()
    # What the personal-data policy leaves of a payload: applied to the payload a failure
    # keeps in sync_errors too (a malformed user keeps no e-mail in clear under `hash`).
    personal: Callable[[Payload], Payload] | None = None

    def key_of(self, payload: Payload, ident: int) -> str:
        key = payload.get(self.key_field) if isinstance(payload, dict) else None
        return str(key if key is not None else ident)

    def listing_path(self) -> str:
        return f"/api/{self.api_version}/{self.path}"

    def detail_route(self, key: object) -> str:
        """Where one item is read by its key, from the server's root."""
        assert self.detail_path is not None, f"{self.name} cannot be read one by one"
        return f"/api/{self.api_version}/{self.detail_path.format(key=key)}"


def _exam(payload: Payload, _parent: int | None) -> Normalized:
    return exam_row(payload), NO_USERS, NO_PROBLEMS


def _attempt(payload: Payload, exam_id: int | None) -> Normalized:
    assert exam_id is not None, "attempts are walked per exam"
    row, user = attempt_row(payload, exam_id)
    return row, (user,), NO_PROBLEMS


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
    keeps_webhook_completions=True,
)

# What the student API tells of an exam or an attempt and the admin API does not (its
# documented rows): an institute that moves from a student login to an admin one keeps
# them. Only properties that do not change with time: an attempt's rank would go stale.
ADMIN_EXAM_UNSERVED = (
    "slug", "course", "url", "attempts_url", "rank_publishing_date", "template_type", "comments_count",
    "allow_retake", "allow_pdf", "variable_mark_per_question", "show_answers", "max_retakes",
)  # fmt: skip
ADMIN_ATTEMPT_UNSERVED = ("username", "total_questions", "review_url", "questions_url")

# The attempt details' resource, and the name the run's counts give its rows.
ATTEMPT_DETAILS = "attempt_details"

# The student API's resources, in the order they are written (parents first).
RESOURCES: Mapping[str, Resource] = {spec.name: spec for spec in (EXAMS, ATTEMPTS)}


def admin_resources(policy: PiiPolicy) -> dict[str, Resource]:
    """The admin API's resources for a run whose personal data follows `policy`, in the
    order they are written (exams before the attempts that reference them)."""

    def exam(payload: Payload, _parent: int | None) -> Normalized:
        row, problems = admin_exam_row(payload)
        return row, NO_USERS, problems

    def attempt(payload: Payload, _parent: int | None) -> Normalized:
        row, problems = admin_attempt_row(payload, policy)
        return row, NO_USERS, problems

    def user(payload: Payload, _parent: int | None) -> Normalized:
        row, problems = admin_user_row(payload, policy)
        return row, NO_USERS, problems

    def batch(payload: Payload, _parent: int | None) -> Normalized:
        return batch_row(payload), NO_USERS, NO_PROBLEMS

    def membership(payload: Payload, user_id: int | None) -> Normalized:
        assert user_id is not None, "memberships are walked per user"
        return membership_row(payload, user_id), NO_USERS, NO_PROBLEMS

    def details(payload: Payload, _parent: int | None) -> Normalized:
        return attempt_details_row(payload), NO_USERS, NO_PROBLEMS

    specs = (
        Resource("exams", "exam", "v2.5", "admin/exams/", "exams", EXAM_CONTENT_COLUMNS, exam,
                 identify=id_from_row_or_url, detail_path="admin/exams/{key}/", read_when_referenced=True,
                 kept_when_unserved=ADMIN_EXAM_UNSERVED, movable_unique_columns=("slug",)),
        Resource("users", "user", "v2.5", "admin/users/", "users", USER_CONTENT_COLUMNS, user,
                 key_column="user_id", movable_unique_columns=("username",), fingerprint=policy.fingerprint,
                 key_field="username", personal=policy.payload),
        Resource("batches", "batch", "v2.5", "admin/batches/", "batches", BATCH_CONTENT_COLUMNS, batch),
        Resource("attempts", "attempt", "v2.5", "admin/attempts/", "attempts", ATTEMPT_CONTENT_COLUMNS, attempt,
                 fingerprint=policy.fingerprint, keeps_webhook_completions=True, references=("exam_id", "exams"),
                 username_from_users=True, kept_when_unserved=ADMIN_ATTEMPT_UNSERVED,
                 parent_table="exams", parent_status_column="attempts_status", parent_filter="exams",
                 personal=lambda payload: policy.payload(payload, ATTEMPT_PERSONAL_KEYS)),
        Resource("memberships", "membership", "v2.5", "admin/users/{parent}/batches/", "user_batches",
                 ("user_id", "batch_id", "expires"), membership, key_column="batch_id", write="link",
                 parent="users", parent_column="user_id"),
        # Read one by one, for the attempts stored new or changed (sync.run): never walked.
        # A detail repeats the attempt's row, its e-mail and phone too: what goes to
        # sync_errors of one follows the policy as the attempt's own row does.
        Resource(ATTEMPT_DETAILS, "attempt_detail", "v2.5", "admin/attempts/", ATTEMPT_DETAILS, (), details,
                 write="details", detail_path="admin/attempts/{key}/",
                 personal=lambda payload: policy.payload(payload, ATTEMPT_PERSONAL_KEYS)),
    )  # fmt: skip
    return {spec.name: spec for spec in specs}
