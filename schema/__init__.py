"""The reporting schema: SQLAlchemy table definitions shared by the sync and Alembic.

The tables and views are a public contract with dashboards (../shared/reporting-schema.md):
change them only through a new Alembic migration and a line in CHANGELOG.md.
"""

from schema.tables import (
    ATTEMPT_CONTENT_COLUMNS,
    EXAM_CONTENT_COLUMNS,
    attempts,
    exams,
    metadata,
    sync_errors,
    sync_progress,
    sync_runs,
    users,
)

__all__ = [
    "ATTEMPT_CONTENT_COLUMNS",
    "EXAM_CONTENT_COLUMNS",
    "attempts",
    "exams",
    "metadata",
    "sync_errors",
    "sync_progress",
    "sync_runs",
    "users",
]
