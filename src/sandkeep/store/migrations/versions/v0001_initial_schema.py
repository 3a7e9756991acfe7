"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    op.create_index("ix_audit_instance_id_id", "audit", ["instance_id", "id"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event", sa.String(length=128), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("sandbox_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("machine_id", sa.String(length=255), nullable=True),
        sa.Column("volume_id", sa.String(length=255), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("label", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_event_id", "events", ["event", "id"], unique=False)
    op.create_index("ix_events_instance_id_id", "events", ["instance_id", "id"], unique=False)

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("sandbox_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("app_name", sa.String(length=255), nullable=False),
        sa.Column("machine_id", sa.String(length=255), nullable=True),
        sa.Column("volume_id", sa.String(length=255), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("machine_size", sa.String(length=64), nullable=False),
        sa.Column("image", sa.String(length=1024), nullable=False),
        sa.Column("env", sa.Text(), nullable=False),
        sa.Column("secrets_encrypted", sa.Text(), nullable=False),
        sa.Column("config_generation", sa.Integer(), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("health_fail_count", sa.Integer(), nullable=False),
        sa.Column("alarm_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pending_action", sa.String(length=64), nullable=True),
        sa.Column("recovery_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recovery_step", sa.String(length=64), nullable=True),
        sa.Column("pending_recovery_volume_id", sa.String(length=255), nullable=True),
        sa.Column("retained_volume_id", sa.String(length=255), nullable=True),
        sa.Column("retained_volume_cleanup_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_recovery_error", sa.Text(), nullable=True),
        sa.Column("last_recovery_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pending_destroy_machine_id", sa.String(length=255), nullable=True),
        sa.Column("pending_destroy_volume_id", sa.String(length=255), nullable=True),
        sa.Column("destroy_volume_attempts", sa.Integer(), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_error_count", sa.Integer(), nullable=False),
        sa.Column("last_provider_error", sa.Text(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_index("ix_instances_alarm_at", "instances", ["alarm_at"], unique=False)
    op.create_index("ix_instances_created_at_id", "instances", ["created_at", "id"], unique=False)
    op.create_index("ix_instances_sandbox_id", "instances", ["sandbox_id"], unique=True)
    op.create_index("ix_instances_status", "instances", ["status"], unique=False)
    op.create_index("ix_instances_user_id", "instances", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_instances_user_id", table_name="instances")
    op.drop_index("ix_instances_status", table_name="instances")
    op.drop_index("ix_instances_sandbox_id", table_name="instances")
    op.drop_index("ix_instances_created_at_id", table_name="instances")
    op.drop_index("ix_instances_alarm_at", table_name="instances")

    op.drop_table("instances")
    op.drop_index("ix_events_instance_id_id", table_name="events")
    op.drop_index("ix_events_event_id", table_name="events")

    op.drop_table("events")
    op.drop_index("ix_audit_instance_id_id", table_name="audit")

    op.drop_table("audit")
