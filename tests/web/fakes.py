"""An in-memory InstanceServiceAPI and runtime for page tests (the real service is tested elsewhere).

The fake follows the service contract where the pages depend on it: busy gating raises InstanceBusy,
destroy while recovering raises RecoveringRefused, admin actions write audit rows, unknown ids raise
InstanceNotFound and a cursor it never handed out raises a ValueError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sandkeep.clock import FakeClock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials, memory_credentials
from sandkeep.engine.service import (
    Actor,
    InstanceBusy,
    InstanceNotFound,
    InvalidTransition,
    RecoveringRefused,
)
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status

SECRET = "test-web-secret-0123456789abcdef"


class InvalidCursor(ValueError):
    pass


def _page(items: list[Any], cursor: str | None, limit: int) -> Page[Any]:
    try:
        start = int(cursor) if cursor else 0
    except ValueError as exc:
        raise InvalidCursor(f"unknown cursor {cursor!r}") from exc
    if start < 0 or start > len(items):
        raise InvalidCursor(f"unknown cursor {cursor!r}")
    chunk = items[start:start + limit]
    nxt = str(start + limit) if start + limit < len(items) else None
    return Page(items=chunk, next_cursor=nxt)


@dataclass
class FakeService:
    clock: FakeClock
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (method, actor user id, instance id)
    gateway: tuple[str, dict[str, str]] | None = None  # what gateway_target answers for running instances
    cleanup_error: Exception | None = None
    fail_next: Exception | None = None  # raised (once) by the next start/stop/restart/destroy

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    # --- fixtures -------------------------------------------------------------------------------

    def add(self, instance_id: str, user_id: str, status: Status = Status.RUNNING, **changes: Any) -> InstanceRecord:
        now = self.clock.now()
        values: dict[str, Any] = {"machine_id": f"m_{instance_id}", "volume_id": f"vol_{instance_id}",
                                  "region": "lcl-a", "last_started_at": now - timedelta(minutes=30)}
        values.update(changes)
        rec = InstanceRecord(id=instance_id, user_id=user_id, sandbox_id=f"sbx_{instance_id}", status=status,
                             created_at=now - timedelta(hours=1), updated_at=now, app_name=f"sk-{user_id}",
                             **values)
        self.instances[instance_id] = rec
        return rec

    def event(self, name: str, instance_id: str | None, at: datetime | None = None, **kw: Any) -> None:
        self.events.append(EventRecord(event=name, instance_id=instance_id, at=at or self.clock.now(),
                                       id=len(self.events) + 1, **kw))

    def _get(self, instance_id: str) -> InstanceRecord:
        rec = self.instances.get(instance_id)
        if rec is None:
            raise InstanceNotFound(f"instance {instance_id} not found")
        return rec

    def _set(self, rec: InstanceRecord, **changes: Any) -> InstanceRecord:
        new = rec.copy(updated_at=self.clock.now(), **changes)
        self.instances[rec.id] = new
        return new

    def _busy(self, rec: InstanceRecord) -> None:
        if rec.busy:
            raise InstanceBusy(f"instance {rec.id} is busy ({rec.status.value})", status=rec.status.value)

    def _audit(self, actor: Actor, action: str, instance_id: str, outcome: str = "ok", **details: Any) -> None:
        self.audit.append(AuditRecord(actor=actor.user_id, role=actor.role, action=action, at=self.clock.now(),
                                      instance_id=instance_id, outcome=outcome, details=details,
                                      id=len(self.audit) + 1))

    # --- InstanceServiceAPI -------------------------------------------------------------------------

    async def create_instance(self, actor: Actor, *, user_id: str, size: str | None = None,
                              env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                              image: str | None = None, idempotency_key: str | None = None) -> InstanceRecord:
        return self.add(f"ins_{len(self.instances) + 1}", user_id, Status.STARTING)

    async def update_config(self, actor: Actor, instance_id: str, *, size: str | None = None,
                            env: dict[str, str] | None = None,
                            secrets: dict[str, str | None] | None = None) -> InstanceRecord:
        return self._get(instance_id)

    def get_instance(self, instance_id: str) -> InstanceRecord:
        return self._get(instance_id)

    def list_instances(self, *, user_id: str | None = None, status: list[str] | None = None,
                       region: str | None = None, cursor: str | None = None,
                       limit: int = 50) -> Page[InstanceRecord]:
        items = [r for r in sorted(self.instances.values(), key=lambda r: r.id)
                 if (user_id is None or r.user_id == user_id)
                 and (status is None or r.status.value in status)
                 and (region is None or r.region == region)]
        return _page(items, cursor, limit)

    def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.instances.values():
            if r.status != Status.DESTROYED:
                counts[r.status.value] = counts.get(r.status.value, 0) + 1
        return counts

    async def start(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("start", actor.user_id, instance_id))
        self._maybe_fail()
        self._busy(rec)
        if rec.status == Status.RUNNING:
            raise InvalidTransition(f"instance {instance_id} is already running")
        return self._set(rec, status=Status.STARTING)

    async def stop(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("stop", actor.user_id, instance_id))
        self._maybe_fail()
        self._busy(rec)
        if rec.status != Status.RUNNING:
            raise InvalidTransition(f"instance {instance_id} is not running")
        return self._set(rec, status=Status.STOPPED, last_stopped_at=self.clock.now())

    async def restart(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("restart", actor.user_id, instance_id))
        self._maybe_fail()
        self._busy(rec)
        return self._set(rec, status=Status.RESTARTING)

    async def destroy(self, actor: Actor, instance_id: str, *, force: bool = False) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("destroy", actor.user_id, instance_id))
        self._maybe_fail()
        if rec.status == Status.RECOVERING and not (force and actor.is_admin):
            raise RecoveringRefused(f"instance {instance_id} is recovering; destroy is refused")
        return self._set(rec, status=Status.DESTROYING)

    def list_events(self, *, instance_id: str | None = None, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        items = [e for e in self.events if (instance_id is None or e.instance_id == instance_id)
                 and (name is None or e.event == name)]
        return _page(items, cursor, limit)

    def debug(self, instance_id: str) -> dict[str, Any]:
        data = asdict(self._get(instance_id))
        data.pop("secrets_encrypted", None)
        return data

    async def retry_recovery(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("retry_recovery", actor.user_id, instance_id))
        self._audit(actor, "recovery_retry", instance_id)
        return self._set(rec, alarm_at=self.clock.now())

    async def cleanup_retained_volume(self, actor: Actor, instance_id: str) -> str | None:
        rec = self._get(instance_id)
        self.calls.append(("cleanup_retained_volume", actor.user_id, instance_id))
        if rec.status == Status.RECOVERING:
            self._audit(actor, "retained_volume_cleanup", instance_id, outcome="refused")
            raise RecoveringRefused(f"instance {instance_id} is recovering; cleanup is refused")
        if self.cleanup_error is not None:
            raise self.cleanup_error
        deleted = rec.retained_volume_id
        self._set(rec, retained_volume_id=None, retained_volume_cleanup_after=None)
        self._audit(actor, "retained_volume_cleanup", instance_id, deleted_volume_id=deleted)
        return deleted

    async def approve_restore(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("approve_restore", actor.user_id, instance_id))
        self._audit(actor, "approve_restore", instance_id)
        return self._set(rec, restore_approval="approved")

    async def list_volume_snapshots(self, actor: Actor, instance_id: str) -> list[dict[str, Any]]:
        return []

    async def restore_volume(self, actor: Actor, instance_id: str, *, snapshot_id: str | None = None,
                             volume_id: str | None = None) -> InstanceRecord:
        return self._get(instance_id)

    async def delete_flagged_volume(self, actor: Actor, instance_id: str, volume_id: str) -> str:
        rec = self._get(instance_id)
        self.calls.append(("delete_flagged_volume", actor.user_id, instance_id))
        self._audit(actor, "flagged_volume_delete", instance_id)
        self._set(rec, flagged_volume_ids=[v for v in rec.flagged_volume_ids if v != volume_id])
        return volume_id

    async def destroy_machine(self, actor: Actor, instance_id: str) -> InstanceRecord:
        rec = self._get(instance_id)
        self.calls.append(("destroy_machine", actor.user_id, instance_id))
        self._audit(actor, "machine_destroy", instance_id, machine_id=rec.machine_id)
        return self._set(rec, machine_id=None)

    def list_audit(self, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        items = [a for a in self.audit if instance_id is None or a.instance_id == instance_id]
        return _page(items, cursor, limit)

    def gateway_target(self, instance_id: str) -> tuple[str, dict[str, str]] | None:
        rec = self._get(instance_id)
        if rec.status != Status.RUNNING or self.gateway is None:
            return None
        return self.gateway


@dataclass
class FakeRuntime:
    settings: Settings
    clock: FakeClock
    service: FakeService
    credentials: Credentials
    jwt_secret: str = SECRET


def make_runtime(**settings: Any) -> FakeRuntime:
    clock = FakeClock()
    return FakeRuntime(settings=Settings(**settings), clock=clock, service=FakeService(clock=clock),
                       credentials=memory_credentials(SECRET, clock))


def token(rt: FakeRuntime, user_id: str, role: str = "user") -> str:
    """A token recorded in ``rt``'s registry (as `sandkeep token` makes them)."""
    return rt.credentials.issue_token(user_id, role).token
