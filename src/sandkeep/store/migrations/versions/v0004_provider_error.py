"""when the last provider error happened (instances.last_provider_error_at); create idempotency keys

Revision ID: v0004
Revises: v0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0004"
down_revision: str | None = "v0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("last_provider_error_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(length=300), nullable=True))
        batch.create_index("ix_instances_user_id_idempotency_key", ["user_id", "idempotency_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_user_id_idempotency_key")
        batch.drop_column("idempotency_key")
        batch.drop_column("last_provider_error_at")
