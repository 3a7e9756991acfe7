"""engine processes register and heartbeat (issue 11: a dead engine's leases are voided within seconds)

Revision ID: v0007_engines
Revises: v0006_labels
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0007_engines"
down_revision: str | None = "v0006_labels"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "engines",
        sa.Column("id", sa.String(length=255), primary_key=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_engines_expires_at", "engines", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_engines_expires_at", table_name="engines")
    op.drop_table("engines")
