"""The reporting schema, first version: exams, attempts, users, runs, errors, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op
from schema.types import ExactDecimal, RawJSON, UTCDateTime
from schema.view_history import views_0001

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _seen_columns() -> list[sa.Column]:
    return [
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
        sa.Column("last_seen_at", UTCDateTime, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "exams",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("slug", sa.Text, nullable=False),
        sa.Column("title", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("course", sa.Text),
        sa.Column("start_date", UTCDateTime),
        sa.Column("end_date", UTCDateTime),
        sa.Column("rank_publishing_date", UTCDateTime),
        sa.Column("created", UTCDateTime),
        sa.Column("duration_seconds", sa.Integer),
        sa.Column("number_of_questions", sa.Integer),
        sa.Column("template_type", sa.Integer),
        sa.Column("comments_count", sa.Integer),
        sa.Column("negative_marks", ExactDecimal),
        sa.Column("mark_per_question", ExactDecimal),
        sa.Column("allow_retake", sa.Boolean),
        sa.Column("enable_ranks", sa.Boolean),
        sa.Column("allow_pdf", sa.Boolean),
        sa.Column("variable_mark_per_question", sa.Boolean),
        sa.Column("show_answers", sa.Boolean),
        sa.Column("max_retakes", sa.Integer),
        sa.Column("url", sa.Text),
        sa.Column("attempts_url", sa.Text),
        sa.Column("raw", RawJSON, nullable=False),
        # What the row was written from; a row whose hash is unchanged is not rewritten.
        sa.Column("content_hash", sa.Text, nullable=False),
        *_seen_columns(),
        sa.Column("deleted_at", UTCDateTime),
        sa.Column("attempts_status", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_exams"),
        sa.UniqueConstraint("slug", name="uq_exams_slug"),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("exam_id", sa.BigInteger, nullable=False),
        sa.Column("username", sa.Text),
        sa.Column("user_id", sa.BigInteger),
        sa.Column("date", UTCDateTime),
        sa.Column("last_started_time", UTCDateTime),
        sa.Column("total_questions", sa.Integer),
        sa.Column("correct_count", sa.Integer),
        sa.Column("incorrect_count", sa.Integer),
        sa.Column("unanswered_count", sa.Integer),
        sa.Column("score", ExactDecimal),
        sa.Column("percentage", ExactDecimal),
        sa.Column("percentile", ExactDecimal),
        sa.Column("time_taken_seconds", ExactDecimal),
        sa.Column("remaining_time_seconds", ExactDecimal),
        sa.Column("state", sa.Text),
        sa.Column("rank", sa.Integer),
        sa.Column("max_rank", sa.Integer),
        sa.Column("url", sa.Text),
        sa.Column("review_url", sa.Text),
        sa.Column("questions_url", sa.Text),
        sa.Column("raw", RawJSON, nullable=False),
        # What the row was written from; a row whose hash is unchanged is not rewritten.
        sa.Column("content_hash", sa.Text, nullable=False),
        *_seen_columns(),
        sa.Column("deleted_at", UTCDateTime),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
        sa.ForeignKeyConstraint(["exam_id"], ["exams.id"], name="fk_attempts_exam_id_exams"),
    )
    op.create_index("ix_attempts_exam_id", "attempts", ["exam_id"])
    op.create_index("ix_attempts_username", "attempts", ["username"])
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("user_id", sa.BigInteger),
        sa.Column("display_name", sa.Text),
        sa.Column("first_name", sa.Text),
        sa.Column("last_name", sa.Text),
        *_seen_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    counters = [
        "requests", "retries", "exams_seen", "attempts_seen", "rows_inserted", "rows_updated",
        "rows_unchanged", "rows_deleted", "errors", "exams_skipped",
    ]  # fmt: skip
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("mode", sa.Text, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("status", sa.Text, nullable=False),
        *[sa.Column(name, sa.Integer, nullable=False) for name in counters],
        sa.Column("resumed_from", sa.Integer),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_sync_runs"),
        sa.ForeignKeyConstraint(
            ["resumed_from"], ["sync_runs.id"], name="fk_sync_runs_resumed_from_sync_runs"
        ),
    )
    op.create_table(
        "sync_errors",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("key", sa.Text),
        sa.Column("http_status", sa.Integer),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("payload", RawJSON),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sync_errors"),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_sync_errors_run_id_sync_runs"),
    )
    op.create_index("ix_sync_errors_run_id", "sync_errors", ["run_id"])
    op.create_table(
        "sync_progress",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("exam_id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("completed_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "exam_id", name="pk_sync_progress"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name="fk_sync_progress_run_id_sync_runs"
        ),
    )
    for statement in views_0001(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for view in ("attempts_per_day", "user_results", "exam_summary"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for table in ("sync_progress", "sync_errors", "sync_runs", "users", "attempts", "exams"):
        op.drop_table(table)
