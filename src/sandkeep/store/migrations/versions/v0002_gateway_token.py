"""per-instance gateway token (SPEC §13)

Adds ``instances.gateway_token_encrypted`` (nullable). Existing instances have none: the engine gives each
one a token at its next start, restart or recovery (the machine is updated with it before it starts).

Revision ID: v0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "v0002"
down_revision: str | None = "0001"  # the revision id inside v0001_initial_schema.py
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("gateway_token_encrypted", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("gateway_token_encrypted")
