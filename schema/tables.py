"""Table definitions: the one MetaData that the sync writes through and Alembic mirrors."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from schema.types import ExactDecimal, RawJSON, UTCDateTime

# Named constraints, so that migrations can refer to them on both dialects.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

exams = Table(
    "exams",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("slug", Text, unique=True),  # unique where present: admin rows carry none
    Column("title", Text),
    Column("description", Text),
    Column("course", Text),
    Column("start_date", UTCDateTime),
    Column("end_date", UTCDateTime),
    Column("rank_publishing_date", UTCDateTime),
    Column("created", UTCDateTime),
    Column("duration_seconds", Integer),
    Column("number_of_questions", Integer),
    Column("template_type", Integer),
    Column("comments_count", Integer),
    Column("negative_marks", ExactDecimal),
    Column("mark_per_question", ExactDecimal),
    Column("allow_retake", Boolean),
    Column("enable_ranks", Boolean),
    Column("allow_pdf", Boolean),
    Column("variable_mark_per_question", Boolean),
    Column("show_answers", Boolean),
    Column("max_retakes", Integer),
    Column("url", Text),
    Column("attempts_url", Text),
    Column("raw", RawJSON, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
    Column("attempts_status", Text),
    # Added in 0002, for the admin API (v2.5).
    Column("published", Boolean),
    Column("pass_percentage", ExactDecimal),
    Column("total_marks", ExactDecimal),
    Column("show_score", Boolean),
    Column("modified", UTCDateTime),
    Column("source", Text),  # student / admin: the API the row last came from
)

# The attempts a later run must read again: written out as SQL, the same text in the index
# below and in the query that reads them, which SQLite needs to use a partial index.
OPEN_STATES = "state IN ('Running', 'Not Started')"

attempts = Table(
    "attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("exam_id", BigInteger, ForeignKey("exams.id"), nullable=False),
    Column("username", Text),
    Column("user_id", BigInteger),
    Column("date", UTCDateTime),
    Column("last_started_time", UTCDateTime),
    Column("total_questions", Integer),
    Column("correct_count", Integer),
    Column("incorrect_count", Integer),
    Column("unanswered_count", Integer),
    Column("score", ExactDecimal),
    Column("percentage", ExactDecimal),
    Column("percentile", ExactDecimal),
    Column("time_taken_seconds", ExactDecimal),
    Column("remaining_time_seconds", ExactDecimal),
    Column("state", Text),
    Column("rank", Integer),
    Column("max_rank", Integer),
    Column("url", Text),
    Column("review_url", Text),
    Column("questions_url", Text),
    Column("raw", RawJSON, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
    # Added in 0002: the admin API's flat rows, the webhook, and the details' bookkeeping.
    Column("result", Text),  # Pass, Fail, Not taken, as served
    Column("speed", Integer),
    Column("accuracy", Integer),
    Column("last_answer_updated_time", UTCDateTime),
    Column("source", Text),  # student / admin / webhook: what wrote the row last
    Column("details_hash", Text),  # content_hash of the row when its details were fetched
    Column("details_fetched_at", UTCDateTime),
    Index(None, "exam_id"),
    Index(None, "username"),
    Index(None, "user_id"),
    # Added in 0004: the attempts still open, which an admin nightly run reads again
    # (store.open_attempts_before). Partial: a few percent of the rows, so it costs
    # little to keep; without it that read scanned the whole table every night.
    Index("ix_attempts_open", "state", sqlite_where=text(OPEN_STATES), postgresql_where=text(OPEN_STATES)),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", Text, nullable=False, unique=True),
    Column("user_id", BigInteger, unique=True),  # Testpress's id, when known: the key
    Column("display_name", Text),
    Column("first_name", Text),
    Column("last_name", Text),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    # Added in 0002, from the admin API; the personal ones obey [sync] pii.
    Column("email", Text),
    Column("phone", Text),
    Column("city", Text),
    Column("state", Text),
    Column("birth_date", Date),
    Column("custom_fields", RawJSON),
    Column("created", UTCDateTime),
    Column("modified", UTCDateTime),
    Column("raw", RawJSON),
    Column("content_hash", Text),
    Column("deleted_at", UTCDateTime),
)

batches = Table(
    "batches",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", Text),
    Column("created", UTCDateTime),
    Column("modified", UTCDateTime),
    Column("raw", RawJSON, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
)

user_batches = Table(
    "user_batches",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("batch_id", BigInteger, primary_key=True, autoincrement=False),
    Column("expires", UTCDateTime),  # null: no expiry
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
    Index(None, "batch_id"),
)

# What incremental runs resume from, per resource; an operator may read and reset it.
sync_state = Table(
    "sync_state",
    metadata,
    Column("resource", Text, primary_key=True),
    Column("watermark", UTCDateTime),  # attempts started before this (less a lookback) are stored
    Column("last_full_at", UTCDateTime),  # the last complete full walk
    Column("updated_at", UTCDateTime, nullable=False),
    # Added in 0005: a one-way digest of the rules the last full walk wrote rows by (the
    # normalizer's version, the personal-data policy and salt); null: not recorded yet.
    Column("rules", Text),
)

# The admin attempt detail's breakdowns, replaced whole when an attempt's details change.
attempt_sections = Table(
    "attempt_sections",
    metadata,
    Column("attempt_id", BigInteger, primary_key=True, autoincrement=False),
    Column("section_id", BigInteger, primary_key=True, autoincrement=False),
    Column("section_order", Integer),
    Column("time_taken_seconds", ExactDecimal),
    Column("correct_count", Integer),
    Column("incorrect_count", Integer),
    Column("unanswered_count", Integer),
    Column("score", ExactDecimal),
)

attempt_subjects = Table(
    "attempt_subjects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("attempt_id", BigInteger, nullable=False),
    Column("subject_name", Text, nullable=False),
    Column("subject_id", BigInteger),  # the API serves null ids
    Column("parent_subject_id", BigInteger),
    Column("is_leaf", Boolean),
    Column("total_count", Integer),
    Column("correct_count", Integer),
    Column("incorrect_count", Integer),
    Column("unanswered_count", Integer),
    Column("partial_correct_count", Integer),
    Column("score", ExactDecimal),
    UniqueConstraint("attempt_id", "subject_name", "subject_id"),
)

attempt_difficulty = Table(
    "attempt_difficulty",
    metadata,
    Column("attempt_id", BigInteger, primary_key=True, autoincrement=False),
    Column("level", Text, primary_key=True),
    Column("total_count", Integer),
    Column("correct_count", Integer),
    Column("incorrect_count", Integer),
    Column("unanswered_count", Integer),
    Column("partial_correct_count", Integer),
)

# Every webhook delivery, accepted or refused, secrets removed.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("received_at", UTCDateTime, nullable=False),
    Column("attempt_id", BigInteger),
    Column("attempt_state", Text),
    Column("verified", Boolean, nullable=False),
    Column("payload", RawJSON),
    Column("processed_at", UTCDateTime),
    Column("error", Text),
    Index(None, "attempt_id"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mode", Text, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("status", Text, nullable=False),
    Column("requests", Integer, nullable=False, default=0),
    Column("retries", Integer, nullable=False, default=0),
    Column("exams_seen", Integer, nullable=False, default=0),
    Column("attempts_seen", Integer, nullable=False, default=0),
    Column("rows_inserted", Integer, nullable=False, default=0),
    Column("rows_updated", Integer, nullable=False, default=0),
    Column("rows_unchanged", Integer, nullable=False, default=0),
    Column("rows_deleted", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("exams_skipped", Integer, nullable=False, default=0),
    Column("resumed_from", Integer, ForeignKey("sync_runs.id")),
    Column("error", Text),
    Column("source", Text),  # student / admin: the API the run read, added in 0002
)

sync_errors = Table(
    "sync_errors",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column("entity", Text, nullable=False),
    Column("key", Text),
    Column("http_status", Integer),
    Column("message", Text, nullable=False),
    Column("payload", RawJSON),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "run_id"),
)

# Which exams a run has stored completely (listing row and every attempt page), so that
# `backfill --resume` can skip them. Bookkeeping, not part of the reporting contract.
sync_progress = Table(
    "sync_progress",
    metadata,
    Column("run_id", Integer, ForeignKey("sync_runs.id"), primary_key=True),
    Column("exam_id", BigInteger, primary_key=True, autoincrement=False),
    Column("completed_at", UTCDateTime, nullable=False),
)

# Columns that come from the payload (and the row's normalizer), in table order.
_BOOKKEEPING = {
    "content_hash", "first_seen_at", "last_seen_at", "deleted_at", "attempts_status",
    "details_hash", "details_fetched_at",
}  # fmt: skip
EXAM_CONTENT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in exams.columns if c.name not in _BOOKKEEPING
)
ATTEMPT_CONTENT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in attempts.columns if c.name not in _BOOKKEEPING
)
# Users from the admin listing (the surrogate `id` is this database's own).
USER_CONTENT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in users.columns if c.name not in _BOOKKEEPING | {"id"}
)
BATCH_CONTENT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in batches.columns if c.name not in _BOOKKEEPING
)
