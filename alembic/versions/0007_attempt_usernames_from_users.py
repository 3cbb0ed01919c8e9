"""Admin attempts get their username from users, as the contract asks.

Admin attempt rows name their student by `user_id` only; until now their `username`
stayed null. From this revision the sync fills it from `users` as it writes; this fills
the rows stored before. Nothing to undo on the way down: the names are right under every
revision (the sync of an older version leaves new rows null again, no more).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE attempts SET username = (SELECT users.username FROM users WHERE users.user_id = attempts.user_id) "
        "WHERE username IS NULL AND user_id IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM users WHERE users.user_id = attempts.user_id)"
    )


def downgrade() -> None:
    pass
