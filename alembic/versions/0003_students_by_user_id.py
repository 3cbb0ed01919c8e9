"""The views count students by Testpress user id where the row has one.

Admin attempt rows name their student by user_id only (their username column is null):
exam_summary.distinct_users and attempts_per_day.distinct_users counted them as no one.
Both now count COALESCE(user_id, username).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op
from schema.view_history import views_0002
from schema.views import VIEW_NAMES, create_view_statements

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _recreate_views(statements: list[str]) -> None:
    for view in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _recreate_views(create_view_statements(op.get_bind().dialect.name))


def downgrade() -> None:
    _recreate_views(views_0002(op.get_bind().dialect.name))
