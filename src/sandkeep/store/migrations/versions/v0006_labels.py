"""instance names and labels; guest CPU/memory chosen within the policy (instances.name, labels, guest_*)

Revision ID: v0006_labels
Revises: v0005_deadhost
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0006_labels"
down_revision: str | None = "v0005_deadhost"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("name", sa.String(length=63), nullable=True))
        batch.add_column(sa.Column("labels", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("guest_cpu_kind", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("guest_cpus", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("guest_memory_mb", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("guest_memory_mb")
        batch.drop_column("guest_cpus")
        batch.drop_column("guest_cpu_kind")
        batch.drop_column("labels")
        batch.drop_column("name")
