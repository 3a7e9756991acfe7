"""The store contract (SPEC §5): instance rows with leases and fenced writes, events, audit log.

Fencing: a worker claims an instance (lease_owner = me, lease_expires_at = now + ttl, version + 1) and
every later write is conditional on ``lease_owner == me AND version == <what I read>``; a write that
matches no row raises :class:`FencedError` and must not be retried blindly (re-read and re-decide).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sandkeep.store.heartbeats import SilentInstance
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, OrphanRecord, Page


class StoreError(Exception):
    pass


class FencedError(StoreError):
    """The write's lease or version no longer holds: someone else owns the instance now."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class QuotaReached(StoreError):
    """``insert_instance(..., max_for_user=n)``: the user already has ``count`` >= n instances (not destroyed)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the user already has {count} instances")
        self.count = count


class Store(Protocol):
    # instances
    def insert_instance(self, record: InstanceRecord, *, max_for_user: int | None = None) -> InstanceRecord:
        """Insert; with ``max_for_user``, atomically refuse (QuotaReached) when the user already has that many."""
        ...
    def get_instance(self, instance_id: str) -> InstanceRecord | None: ...
    def list_instances(self, *, user_id: str | None = None, status: Sequence[str] | None = None,
                       region: str | None = None, include_destroyed: bool = False,
                       cursor: str | None = None, limit: int = 50) -> Page[InstanceRecord]: ...
    def count_by_status(self) -> dict[str, int]: ...

    def find_by_idempotency_key(self, user_id: str, key: str) -> InstanceRecord | None:
        """The instance created for ``user_id`` with this (caller-scoped) idempotency key, if any."""

    def ops_gauges(self, now: datetime, *, overdue_grace: float = 3600.0) -> dict[str, float]:
        """Store-derived gauges for ``/metrics`` (due alarms, oldest recovery, retained volumes)."""

    def ping(self) -> None:
        """One round trip to the database (raises when it does not answer)."""

    # leases and fenced writes
    def claim(self, instance_id: str, owner: str, ttl_seconds: float, now: datetime) -> InstanceRecord | None:
        """Take the lease if free or expired; the returned record carries the new version."""
        ...

    def claim_due(self, owner: str, ttl_seconds: float, now: datetime, limit: int) -> list[InstanceRecord]:
        """Claim up to ``limit`` instances whose ``alarm_at <= now`` and whose lease is free or expired."""
        ...

    def renew(self, record: InstanceRecord, owner: str, ttl_seconds: float, now: datetime) -> InstanceRecord:
        """Extend the lease (fenced); raises FencedError if lost."""
        ...

    def update(self, record: InstanceRecord, owner: str, changes: dict[str, Any]) -> InstanceRecord:
        """Fenced write of ``changes``; bumps version; returns the new record. Raises FencedError."""
        ...

    def release(self, record: InstanceRecord, owner: str) -> None:
        """Drop the lease if still ours (no error if it was already lost)."""
        ...

    def finish(self, record: InstanceRecord, owner: str, changes: dict[str, Any]) -> InstanceRecord:
        """``update`` and ``release`` in one fenced write (the end of a reconcile pass)."""
        ...

    def finish_many(self, items: Sequence[tuple[InstanceRecord, str, dict[str, Any]]]
                    ) -> list[InstanceRecord | StoreError]:
        """Several ``finish`` writes in one transaction; per item the new record or its FencedError/NotFound."""
        ...

    def release_many(self, items: Sequence[tuple[InstanceRecord, str]]) -> None:
        """``release`` for several leases in one transaction."""
        ...

    def next_alarm_at(self) -> datetime | None: ...

    def next_due_at(self, now: datetime) -> datetime | None:
        """The earliest ``alarm_at`` among instances whose lease is free."""
        ...

    # engine processes (several engines share one database)
    def engine_heartbeat(self, engine_id: str, role: str, now: datetime, ttl_seconds: float) -> bool:
        """Register/refresh an engine; False when its row was gone (first beat, or declared dead)."""
        ...

    def engine_leave(self, engine_id: str, now: datetime) -> int:
        """Planned stop: void the engine's leases (``<engine_id>#…`` owners) and deregister it."""
        ...

    def void_dead_engines(self, now: datetime) -> dict[str, int]:
        """Void the leases of engines whose heartbeat expired and deregister them (id -> leases voided)."""
        ...

    def list_engines(self) -> list[dict[str, Any]]: ...

    def live_engine_ids(self, now: datetime) -> list[str]:
        """Ids of the reconciling engines (not ``api``) whose heartbeat has not expired at ``now``, sorted."""
        ...

    # gateway heartbeats (issue 11)
    def record_heartbeats(self, beats: dict[str, datetime]) -> int:
        """Upsert ``instance id -> last beat`` (one batch)."""
        ...

    def heartbeat_tokens(self, instance_ids: Sequence[str]) -> dict[str, str | None]:
        """instance id -> encrypted gateway token, for the instances that exist and are not destroyed."""
        ...

    def silent_instances(self, cutoff: datetime, limit: int = 1000) -> list[SilentInstance]:
        """Running instances that beat before but not since ``cutoff`` (oldest first)."""
        ...

    def heartbeat_times(self, instance_ids: Sequence[str]) -> dict[str, datetime]:
        """instance id -> last beat, for those of ``instance_ids`` that ever beat."""
        ...

    def recovery_progress(self, now: datetime, since: datetime) -> dict[str, int]:
        """Recoveries queued / in flight now, succeeded / failed since ``since`` (admin fleet page)."""
        ...

    # events and audit
    # orphans (SPEC §15): the inventory's sightings, durable across engine restarts
    def record_orphans(self, app_name: str, seen: Sequence[OrphanRecord], now: datetime) -> list[OrphanRecord]:
        """Replace what is known of ``app_name``'s orphans by ``seen``: a new one is first seen ``now``, one seen
        before keeps its ``first_seen_at``, one no longer seen is forgotten. Returns the stored rows."""
        ...

    def forget_orphan(self, app_name: str, kind: str, resource_id: str) -> None: ...
    def list_orphans(self) -> list[OrphanRecord]:
        """Every known orphan, oldest sighting first."""
        ...

    def add_event(self, event: EventRecord) -> EventRecord: ...
    def list_events(self, *, instance_id: str | None = None, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        """Newest first."""
        ...

    def add_audit(self, entry: AuditRecord) -> AuditRecord: ...
    def list_audit(self, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]: ...

    def close(self) -> None: ...
