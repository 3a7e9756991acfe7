"""dead hosts and orphans (SPEC §15): suspect/approval/fencing fields, flagged volumes, incident note

Revision ID: v0005_deadhost
Revises: v0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0005_deadhost"
down_revision: str | None = "v0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("suspect_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("suspect_reason", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("restore_approval", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("fenced_machine_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("flagged_volume_ids", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("recovery_point", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("incident_note", sa.Text(), nullable=True))
        batch.add_column(sa.Column("last_snapshot_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in ("last_snapshot_at", "incident_note", "recovery_point", "flagged_volume_ids", "fenced_machine_id",
                     "restore_approval", "suspect_reason", "suspect_since"):
            batch.drop_column(name)
