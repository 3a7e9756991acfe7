"""orphans seen by the inventory (SPEC §15): first sightings survive an engine restart (the grace keeps running)

Revision ID: v0008_orphans
Revises: v0007_engines
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0008_orphans"
down_revision: str | None = "v0007_engines"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "orphans",
        sa.Column("app_name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("resource_id", sa.String(length=255), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app_name", "kind", "resource_id", name=op.f("pk_orphans")),
    )


def downgrade() -> None:
    op.drop_table("orphans")
