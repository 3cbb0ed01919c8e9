"""The views count students by Testpress user id where the row has one.

Admin attempt rows name their student by user_id only (their username column is null):
exam_summary.distinct_users and attempts_per_day.distinct_users counted them as no one.
Both now count the user id where a row has one, else the username. Only those two views
are recreated (a view of the user's own may depend on the others).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op
from schema.view_history import views_0002
from schema.views import COUNTING_STUDENTS, create_view_statements, view_name

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _recreate_views(statements: list[str]) -> None:
    for view in COUNTING_STUDENTS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for statement in statements:
        if view_name(statement) in COUNTING_STUDENTS:
            op.execute(statement)


def upgrade() -> None:
    _recreate_views(create_view_statements(op.get_bind().dialect.name))


def downgrade() -> None:
    _recreate_views(views_0002(op.get_bind().dialect.name))
