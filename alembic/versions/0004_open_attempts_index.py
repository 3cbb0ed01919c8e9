"""A partial index on the attempts still open (Running, Not Started).

An admin nightly run reads them again, and that read scanned the whole attempts table
every night (50 ms at 150,000 attempts with a warm cache; the table is read from disk
when it is not). The index holds the open attempts only, a few percent of the rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# As this revision made it: schema.OPEN_STATES (the query's text) must stay equal to it,
# or SQLite stops using the index (a test says so); a new predicate is a new revision.
OPEN_STATES_0004 = "state IN ('Running', 'Not Started')"


def upgrade() -> None:
    where = sa.text(OPEN_STATES_0004)
    op.create_index("ix_attempts_open", "attempts", ["state"], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    op.drop_index("ix_attempts_open", table_name="attempts")
