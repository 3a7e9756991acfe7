"""SQLAlchemy Core tables of the store (SPEC §2, §9) and the column types both backends share.

The Alembic migrations in :mod:`sandkeep.store.migrations` create exactly these tables; a test compares
the migrated schema with this metadata so the two cannot drift apart. Column names equal the field names
of the records in :mod:`sandkeep.store.records`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (UTC), on SQLite too.

    PostgreSQL keeps ``timestamp with time zone``; SQLite keeps text without an offset, so values are
    converted to UTC before they are written (making text order equal time order) and tagged UTC when
    read. Naive datetimes are refused: every time in sandkeep comes from the clock, which is aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: pass a timezone-aware time")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JSONText(TypeDecorator[Any]):
    """A JSON document kept as text (portable; compared as a whole, never queried inside)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return json.loads(value)


# BIGINT on PostgreSQL; INTEGER on SQLite so the column is the rowid alias and autoincrements.
EventId = BigInteger().with_variant(Integer(), "sqlite")

instances = Table(
    "instances",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("sandbox_id", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("app_name", String(255), nullable=False),
    Column("machine_id", String(255), nullable=True),
    Column("volume_id", String(255), nullable=True),
    Column("region", String(64), nullable=True),
    Column("machine_size", String(64), nullable=False),
    Column("image", String(1024), nullable=False),
    Column("env", JSONText(), nullable=False),
    Column("secrets_encrypted", JSONText(), nullable=False),
    Column("gateway_token_encrypted", Text(), nullable=True),
    Column("config_generation", Integer(), nullable=False),
    Column("last_started_at", UTCDateTime(), nullable=True),
    Column("last_stopped_at", UTCDateTime(), nullable=True),
    Column("status_changed_at", UTCDateTime(), nullable=True),
    Column("health_fail_count", Integer(), nullable=False),
    Column("alarm_at", UTCDateTime(), nullable=True),
    Column("pending_action", String(64), nullable=True),
    Column("recovery_started_at", UTCDateTime(), nullable=True),
    Column("recovery_step", String(64), nullable=True),
    Column("pending_recovery_volume_id", String(255), nullable=True),
    Column("retained_volume_id", String(255), nullable=True),
    Column("retained_volume_cleanup_after", UTCDateTime(), nullable=True),
    Column("last_recovery_error", Text(), nullable=True),
    Column("last_recovery_error_at", UTCDateTime(), nullable=True),
    Column("pending_destroy_machine_id", String(255), nullable=True),
    Column("pending_destroy_volume_id", String(255), nullable=True),
    Column("destroy_volume_attempts", Integer(), nullable=False),
    Column("destroyed_at", UTCDateTime(), nullable=True),
    Column("provider_error_count", Integer(), nullable=False),
    Column("last_provider_error", Text(), nullable=True),
    Column("last_provider_error_at", UTCDateTime(), nullable=True),
    Column("idempotency_key", String(300), nullable=True),
    Column("suspect_since", UTCDateTime(), nullable=True),
    Column("suspect_reason", String(64), nullable=True),
    Column("restore_approval", String(32), nullable=True),
    Column("fenced_machine_id", String(255), nullable=True),
    Column("flagged_volume_ids", JSONText(), nullable=False, server_default="[]"),
    Column("recovery_point", String(64), nullable=True),
    Column("incident_note", Text(), nullable=True),
    Column("last_snapshot_at", UTCDateTime(), nullable=True),
    Column("unsettled_create_at", UTCDateTime(), nullable=True),
    Column("name", String(63), nullable=True),
    Column("labels", JSONText(), nullable=False, server_default="{}"),
    Column("guest_cpu_kind", String(32), nullable=True),
    Column("guest_cpus", Integer(), nullable=True),
    Column("guest_memory_mb", Integer(), nullable=True),
    Column("version", BigInteger(), nullable=False),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    Index("ix_instances_sandbox_id", "sandbox_id", unique=True),
    Index("ix_instances_user_id", "user_id"),
    Index("ix_instances_user_id_idempotency_key", "user_id", "idempotency_key", unique=True),
    Index("ix_instances_status", "status"),
    Index("ix_instances_alarm_at", "alarm_at"),
    Index("ix_instances_created_at_id", "created_at", "id"),
)

events = Table(
    "events",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("event", String(128), nullable=False),
    Column("instance_id", String(64), nullable=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("user_id", String(255), nullable=True),
    Column("sandbox_id", String(64), nullable=True),
    Column("status", String(32), nullable=True),
    Column("machine_id", String(255), nullable=True),
    Column("volume_id", String(255), nullable=True),
    Column("region", String(64), nullable=True),
    Column("label", String(255), nullable=True),
    Column("error", Text(), nullable=True),
    Column("duration_ms", BigInteger(), nullable=True),
    Column("value", Float(), nullable=True),
    Column("details", JSONText(), nullable=False),
    Index("ix_events_instance_id_id", "instance_id", "id"),
    Index("ix_events_event_id", "event", "id"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("actor", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("action", String(128), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("instance_id", String(64), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("details", JSONText(), nullable=False),
    Index("ix_audit_instance_id_id", "instance_id", "id"),
)

# --- credentials (migration v0003): server-side web sessions, one-time sign-in codes, API token registry.
# Secrets never reach the database in the clear: sessions and codes are stored as the SHA-256 of the value.

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("token_jti", String(64), nullable=True),
    Index("ix_web_sessions_expires_at", "expires_at"),
)

login_codes = Table(
    "login_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_login_codes_expires_at", "expires_at"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("issued_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("issued_by", String(255), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_by", String(255), nullable=True),
    Index("ix_api_tokens_user_id", "user_id"),
)

# --- engine processes (migration v0007_engines): each engine registers and heartbeats; a row whose
# ``expires_at`` passed belongs to a dead engine, whose instance leases any other engine voids.

engines = Table(
    "engines",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("role", String(32), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_engines_expires_at", "expires_at"),
)

# --- orphans (migration v0008_orphans): what the inventory (engine/orphans.py) found that no record references,
# with the time it was first seen, so an engine restart does not restart SANDKEEP_ORPHAN_GRACE.

orphans = Table(
    "orphans",
    metadata,
    Column("app_name", String(255), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("resource_id", String(255), primary_key=True),
    Column("instance_id", String(64), nullable=False),
    Column("region", String(64), nullable=True),
    Column("reason", String(255), nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
)

# --- gateway heartbeats (migration v0009_heartbeat): the last time each instance's gateway beat, written in
# batches by whichever process received the beats; engines look here for running instances whose beats stopped.

instance_heartbeats = Table(
    "instance_heartbeats",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("beat_at", UTCDateTime(), nullable=False),
    Index("ix_instance_heartbeats_beat_at", "beat_at"),
)
