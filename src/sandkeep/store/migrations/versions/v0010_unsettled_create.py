"""a machine create with an unknown outcome (SPEC 12.2): when it failed or was abandoned

Revision ID: v0010_unsettled_create
Revises: v0009_heartbeat
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0010_unsettled_create"
down_revision: str | None = "v0009_heartbeat"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("unsettled_create_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("unsettled_create_at")
