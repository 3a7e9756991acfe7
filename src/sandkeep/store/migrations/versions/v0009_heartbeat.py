"""gateway heartbeats (issue 11: detection on Fly without listing every app)

Revision ID: v0009_heartbeat
Revises: v0008_orphans
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0009_heartbeat"
down_revision: str | None = "v0008_orphans"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "instance_heartbeats",
        sa.Column("instance_id", sa.String(length=64), primary_key=True),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_instance_heartbeats_beat_at", "instance_heartbeats", ["beat_at"])


def downgrade() -> None:
    op.drop_index("ix_instance_heartbeats_beat_at", table_name="instance_heartbeats")
    op.drop_table("instance_heartbeats")
