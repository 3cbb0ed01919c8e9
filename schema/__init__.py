"""The reporting schema: SQLAlchemy table definitions shared by the sync and Alembic.

The tables and views are a public contract with dashboards (../shared/reporting-schema.md):
change them only through a new Alembic migration and a line in CHANGELOG.md.
"""

# The newest Alembic revision. A database at this revision needs no migration; a test keeps
# this equal to the head of alembic/versions.
SCHEMA_HEAD = "0007"

from schema.tables import (  # noqa: E402
    ATTEMPT_CONTENT_COLUMNS,
    BATCH_CONTENT_COLUMNS,
    EXAM_CONTENT_COLUMNS,
    OPEN_STATES,
    USER_CONTENT_COLUMNS,
    attempt_difficulty,
    attempt_sections,
    attempt_subjects,
    attempts,
    batches,
    exams,
    metadata,
    sync_errors,
    sync_progress,
    sync_runs,
    sync_state,
    user_batches,
    users,
    webhook_events,
)

__all__ = [
    "SCHEMA_HEAD",
    "ATTEMPT_CONTENT_COLUMNS",
    "BATCH_CONTENT_COLUMNS",
    "EXAM_CONTENT_COLUMNS",
    "OPEN_STATES",
    "USER_CONTENT_COLUMNS",
    "attempt_difficulty",
    "attempt_sections",
    "attempt_subjects",
    "attempts",
    "batches",
    "exams",
    "metadata",
    "sync_errors",
    "sync_progress",
    "sync_runs",
    "sync_state",
    "user_batches",
    "users",
    "webhook_events",
]
