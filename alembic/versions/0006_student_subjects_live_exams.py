"""student_subjects leaves out the attempts of deleted exams, as every other view does.

0002 made it join live attempts only; an exam marked deleted kept its attempts' subjects
in a student's strengths. Only that view is recreated (a view of the user's own may
depend on the others).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op
from schema.view_history import STUDENT_SUBJECTS_0002
from schema.views import create_view_statements, view_name

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

VIEW = "student_subjects"


def upgrade() -> None:
    op.execute(f"DROP VIEW IF EXISTS {VIEW}")
    [statement] = [s for s in create_view_statements(op.get_bind().dialect.name) if view_name(s) == VIEW]
    op.execute(statement)


def downgrade() -> None:
    op.execute(f"DROP VIEW IF EXISTS {VIEW}")
    op.execute(STUDENT_SUBJECTS_0002)
