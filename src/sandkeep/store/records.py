"""Persisted records (SPEC §2), as plain dataclasses shared by the store, the engine and the API.

The store maps these to tables; the engine reads and writes them; the API renders them. Fields may
be added (with a migration), never renamed or removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Status(StrEnum):
    PROVISIONED = "provisioned"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    RESTARTING = "restarting"
    RECOVERING = "recovering"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


BUSY_STATUSES: frozenset[Status] = frozenset(
    {Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING}
)


@dataclass
class InstanceRecord:
    id: str  # ins_…
    user_id: str
    sandbox_id: str  # sbx_…, written into machine metadata
    status: Status
    created_at: datetime
    updated_at: datetime
    app_name: str
    machine_id: str | None = None
    volume_id: str | None = None
    region: str | None = None
    machine_size: str = "shared-cpu-1x"
    image: str = "sandkeep/gateway"
    env: dict[str, str] = field(default_factory=dict)
    secrets_encrypted: dict[str, str] = field(default_factory=dict)  # name -> Fernet token
    config_generation: int = 0  # bumped by every PATCH; the machine carries the generation it got
    # the instance's gateway token (SPEC §13), a Fernet token like the secrets; None until the next start
    gateway_token_encrypted: str | None = None
    last_started_at: datetime | None = None
    last_stopped_at: datetime | None = None
    status_changed_at: datetime | None = None
    health_fail_count: int = 0  # consecutive 'stopped' observations while running
    alarm_at: datetime | None = None
    # what the user asked for that the engine has not finished (e.g. "stop", "start", "restart")
    pending_action: str | None = None
    # unexpected-stop recovery (SPEC §7)
    recovery_started_at: datetime | None = None
    recovery_step: str | None = None  # the relocation step in flight, for resumption after a crash
    pending_recovery_volume_id: str | None = None
    retained_volume_id: str | None = None
    retained_volume_cleanup_after: datetime | None = None
    last_recovery_error: str | None = None
    last_recovery_error_at: datetime | None = None
    # two-phase destroy (SPEC §8)
    pending_destroy_machine_id: str | None = None
    pending_destroy_volume_id: str | None = None
    destroy_volume_attempts: int = 0
    destroyed_at: datetime | None = None
    # transient provider error backoff
    provider_error_count: int = 0
    last_provider_error: str | None = None
    last_provider_error_at: datetime | None = None
    # dead hosts (SPEC §15)
    suspect_since: datetime | None = None  # when the running instance was first seen on an unreachable host
    suspect_reason: str | None = None  # "host_unreachable" | "health_failed"
    restore_approval: str | None = None  # None | "awaiting" | "approved" (SANDKEEP_SNAPSHOT_RESTORE_POLICY=approve)
    fenced_machine_id: str | None = None  # the old machine on a dead host: destroyed as soon as it answers
    # old volumes left behind by a snapshot restore: may hold newer data; never deleted without an admin
    flagged_volume_ids: list[str] = field(default_factory=list)
    recovery_point: str | None = None  # created_at of the snapshot the current recovery restores
    incident_note: str | None = None  # plain words for the owner: what happened to the instance, what was lost
    last_snapshot_at: datetime | None = None  # sandkeep's own newest snapshot of the current volume
    # a machine create failed or was abandoned with its outcome unknown: the provider may still carry it out, so
    # until ``create_landing_window`` has passed every pass looks for such a machine and stops it (SPEC 12.2)
    unsettled_create_at: datetime | None = None
    # "<caller user id>/<Idempotency-Key>" of the create request that made this instance (unique per owner)
    idempotency_key: str | None = None
    # what the owner calls it and how they group it (shown, never sent to the provider)
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # guest CPU/memory chosen within the policy; None = the machine size's preset
    guest_cpu_kind: str | None = None
    guest_cpus: int | None = None
    guest_memory_mb: int | None = None
    # concurrency (SPEC §5)
    version: int = 0
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None

    @property
    def busy(self) -> bool:
        return self.status in BUSY_STATUSES

    def copy(self, **changes: Any) -> InstanceRecord:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class EventRecord:
    """SPEC §9 event: one row per lifecycle change."""

    event: str
    instance_id: str | None
    at: datetime
    user_id: str | None = None
    sandbox_id: str | None = None
    status: str | None = None
    machine_id: str | None = None
    volume_id: str | None = None
    region: str | None = None
    label: str | None = None
    error: str | None = None
    duration_ms: int | None = None
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass
class AuditRecord:
    """One admin action: who did what to which instance, and how it ended."""

    actor: str  # user id from the token
    role: str
    action: str  # e.g. "retained_volume_cleanup"
    at: datetime
    instance_id: str | None = None
    outcome: str = "ok"  # "ok" | "refused" | "error"
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None = None


@dataclass
class OrphanRecord:
    """A machine or volume of sandkeep's that no record references (SPEC §15), as the inventory last saw it."""

    app_name: str
    kind: str  # "machine" | "volume"
    resource_id: str
    instance_id: str
    region: str | None
    reason: str
    first_seen_at: datetime
    last_seen_at: datetime
