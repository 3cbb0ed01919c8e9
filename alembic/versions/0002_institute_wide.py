"""Institute-wide data (admin API), attempt details and webhook events.

exams.slug becomes nullable and exams gain the admin API's columns; attempts gain the
admin rows' columns, a source and their details' bookkeeping; users gain personal and
admin columns and a unique user_id; new tables batches, user_batches, sync_state,
attempt_sections, attempt_subjects, attempt_difficulty, webhook_events; sync_runs.source;
the user_results view is keyed by user id, and batch_results, subject_performance and
student_subjects are new.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op
from schema.types import ExactDecimal, RawJSON, UTCDateTime
from schema.view_history import views_0001, views_0002

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OLD_VIEWS = ("attempts_per_day", "user_results", "exam_summary")
_NEW_VIEWS = ("student_subjects", "subject_performance", "batch_results", *_OLD_VIEWS)


def _seen_columns() -> list[sa.Column]:
    return [
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
        sa.Column("last_seen_at", UTCDateTime, nullable=False),
    ]


def _recreate() -> str:
    # SQLite: every altered table is rebuilt, so its DDL reads exactly as a new database's
    # (a test compares them word for word); PostgreSQL alters in place.
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"


# Tables that reference the ones rebuilt on SQLite.
_CHILDREN = ("attempts", "sync_errors", "sync_progress")


def _set_children_aside() -> dict[str, list[str]]:
    """SQLite rebuilds a table to change it, and cannot turn foreign keys off inside the
    migration's transaction: dropping a parent would count every row that references it
    as a violation. So the referencing rows wait in copies while the parents are rebuilt."""
    kept = {}
    for name in _CHILDREN:
        kept[name] = [column["name"] for column in sa.inspect(op.get_bind()).get_columns(name)]
        op.execute(f"CREATE TABLE _0002_{name} AS SELECT * FROM {name}")
        op.execute(f"DELETE FROM {name}")
    return kept


def _put_children_back(kept: dict[str, list[str]]) -> None:
    for name, columns in kept.items():
        listed = ", ".join(columns)
        op.execute(f"INSERT INTO {name} ({listed}) SELECT {listed} FROM _0002_{name}")
        op.execute(f"DROP TABLE _0002_{name}")


def upgrade() -> None:
    bind = op.get_bind()
    for view in _OLD_VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    kept = _set_children_aside() if bind.dialect.name == "sqlite" else {}

    with op.batch_alter_table("exams", recreate=_recreate()) as table:
        table.alter_column("slug", existing_type=sa.Text, nullable=True)
        table.add_column(sa.Column("published", sa.Boolean))
        table.add_column(sa.Column("pass_percentage", ExactDecimal))
        table.add_column(sa.Column("total_marks", ExactDecimal))
        table.add_column(sa.Column("show_score", sa.Boolean))
        table.add_column(sa.Column("modified", UTCDateTime))
        table.add_column(sa.Column("source", sa.Text))
    with op.batch_alter_table("attempts", recreate=_recreate()) as table:
        table.add_column(sa.Column("result", sa.Text))
        table.add_column(sa.Column("speed", sa.Integer))
        table.add_column(sa.Column("accuracy", sa.Integer))
        table.add_column(sa.Column("last_answer_updated_time", UTCDateTime))
        table.add_column(sa.Column("source", sa.Text))
        table.add_column(sa.Column("details_hash", sa.Text))
        table.add_column(sa.Column("details_fetched_at", UTCDateTime))
        table.create_index("ix_attempts_user_id", ["user_id"])
    with op.batch_alter_table("users", recreate=_recreate()) as table:
        table.add_column(sa.Column("email", sa.Text))
        table.add_column(sa.Column("phone", sa.Text))
        table.add_column(sa.Column("city", sa.Text))
        table.add_column(sa.Column("state", sa.Text))
        table.add_column(sa.Column("birth_date", sa.Date))
        table.add_column(sa.Column("custom_fields", RawJSON))
        table.add_column(sa.Column("created", UTCDateTime))
        table.add_column(sa.Column("modified", UTCDateTime))
        table.add_column(sa.Column("raw", RawJSON))
        table.add_column(sa.Column("content_hash", sa.Text))
        table.add_column(sa.Column("deleted_at", UTCDateTime))
        table.create_unique_constraint("uq_users_user_id", ["user_id"])
    with op.batch_alter_table("sync_runs", recreate=_recreate()) as table:
        table.add_column(sa.Column("source", sa.Text))
    _put_children_back(kept)

    op.create_table(
        "batches",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("name", sa.Text),
        sa.Column("created", UTCDateTime),
        sa.Column("modified", UTCDateTime),
        sa.Column("raw", RawJSON, nullable=False),
        sa.Column("content_hash", sa.Text, nullable=False),
        *_seen_columns(),
        sa.Column("deleted_at", UTCDateTime),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_table(
        "user_batches",
        sa.Column("user_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("batch_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("expires", UTCDateTime),
        *_seen_columns(),
        sa.Column("deleted_at", UTCDateTime),
        sa.PrimaryKeyConstraint("user_id", "batch_id", name="pk_user_batches"),
    )
    op.create_index("ix_user_batches_batch_id", "user_batches", ["batch_id"])
    op.create_table(
        "sync_state",
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("watermark", UTCDateTime),
        sa.Column("last_full_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("resource", name="pk_sync_state"),
    )
    op.create_table(
        "attempt_sections",
        sa.Column("attempt_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("section_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("section_order", sa.Integer),
        sa.Column("time_taken_seconds", ExactDecimal),
        sa.Column("correct_count", sa.Integer),
        sa.Column("incorrect_count", sa.Integer),
        sa.Column("unanswered_count", sa.Integer),
        sa.Column("score", ExactDecimal),
        sa.PrimaryKeyConstraint("attempt_id", "section_id", name="pk_attempt_sections"),
    )
    op.create_table(
        "attempt_subjects",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("attempt_id", sa.BigInteger, nullable=False),
        sa.Column("subject_name", sa.Text, nullable=False),
        sa.Column("subject_id", sa.BigInteger),
        sa.Column("parent_subject_id", sa.BigInteger),
        sa.Column("is_leaf", sa.Boolean),
        sa.Column("total_count", sa.Integer),
        sa.Column("correct_count", sa.Integer),
        sa.Column("incorrect_count", sa.Integer),
        sa.Column("unanswered_count", sa.Integer),
        sa.Column("partial_correct_count", sa.Integer),
        sa.Column("score", ExactDecimal),
        sa.PrimaryKeyConstraint("id", name="pk_attempt_subjects"),
        sa.UniqueConstraint(
            "attempt_id", "subject_name", "subject_id",
            name="uq_attempt_subjects_attempt_id_subject_name_subject_id",
        ),
    )  # fmt: skip
    op.create_table(
        "attempt_difficulty",
        sa.Column("attempt_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("total_count", sa.Integer),
        sa.Column("correct_count", sa.Integer),
        sa.Column("incorrect_count", sa.Integer),
        sa.Column("unanswered_count", sa.Integer),
        sa.Column("partial_correct_count", sa.Integer),
        sa.PrimaryKeyConstraint("attempt_id", "level", name="pk_attempt_difficulty"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("attempt_id", sa.BigInteger),
        sa.Column("attempt_state", sa.Text),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("payload", RawJSON),
        sa.Column("processed_at", UTCDateTime),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_events"),
    )
    op.create_index("ix_webhook_events_attempt_id", "webhook_events", ["attempt_id"])
    for statement in views_0002(bind.dialect.name):
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for view in _NEW_VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for name in ("webhook_events", "attempt_difficulty", "attempt_subjects", "attempt_sections",
                 "sync_state", "user_batches", "batches"):
        op.drop_table(name)
    with op.batch_alter_table("users", recreate=_recreate()) as table:
        table.drop_constraint("uq_users_user_id", type_="unique")
        for column in ("deleted_at", "content_hash", "raw", "modified", "created", "custom_fields",
                       "birth_date", "state", "city", "phone", "email"):
            table.drop_column(column)
    with op.batch_alter_table("attempts", recreate=_recreate()) as table:
        table.drop_index("ix_attempts_user_id")
        for column in ("details_fetched_at", "details_hash", "source", "last_answer_updated_time",
                       "accuracy", "speed", "result"):
            table.drop_column(column)
    # Exams without a slug (from the admin API) cannot go back to a NOT NULL column.
    op.execute("DELETE FROM attempts WHERE exam_id IN (SELECT id FROM exams WHERE slug IS NULL)")
    op.execute("DELETE FROM exams WHERE slug IS NULL")
    kept = _set_children_aside() if bind.dialect.name == "sqlite" else {}
    with op.batch_alter_table("exams", recreate=_recreate()) as table:
        for column in ("source", "modified", "show_score", "total_marks", "pass_percentage", "published"):
            table.drop_column(column)
        table.alter_column("slug", existing_type=sa.Text, nullable=False)
    with op.batch_alter_table("sync_runs", recreate=_recreate()) as table:
        table.drop_column("source")
    _put_children_back(kept)
    for statement in views_0001(bind.dialect.name):
        op.execute(statement)
