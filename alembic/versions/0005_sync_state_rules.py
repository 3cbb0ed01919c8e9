"""sync_state.rules: what the last full walk wrote rows by.

A nightly run reads a window of attempts, so a new personal-data policy (`[sync] pii`,
`pii_salt`) reached only the rows it read: older attempts kept their e-mails in `raw`
until a full walk. The column holds a one-way digest of the rules of the last complete
full walk; a run whose rules differ walks everything. Null (a database from before this
revision) means not recorded yet: the next full walk records it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _recreate() -> str:
    # SQLite: the table is rebuilt, so its DDL reads exactly as a new database's (a test
    # compares them word for word; no table references sync_state). PostgreSQL alters in place.
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"


def upgrade() -> None:
    with op.batch_alter_table("sync_state", recreate=_recreate()) as table:
        table.add_column(sa.Column("rules", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("sync_state", recreate=_recreate()) as table:
        table.drop_column("rules")
