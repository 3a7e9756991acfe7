"""A small in-memory InstanceServiceAPI for pure-API tests (the real engine is tested elsewhere).

It keeps the rules the API depends on: busy gating (409 ``instance_busy``), destroy refused while
recovering unless forced, admin actions audited, cursor pagination with opaque cursors that reject
anything it did not hand out. Every mutating call is recorded in ``calls`` so tests can prove that a
refused request changed nothing.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from datetime import timedelta
from typing import Any

from sandkeep.clock import Clock, FakeClock
from sandkeep.engine.service import (
    Actor,
    CleanupRefused,
    InstanceBusy,
    InstanceNotFound,
    InvalidTransition,
    RecoveringRefused,
)
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status


class InvalidCursor(ValueError):
    """Same name as the store's: the API maps it to 400 invalid_cursor."""


def _cursor(kind: str, index: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{index}".encode()).decode()


def _offset(kind: str, cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)).decode()
        got_kind, _, index = raw.partition(":")
        value = int(index)
    except (binascii.Error, ValueError, UnicodeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc
    if got_kind != kind or value < 0:
        raise InvalidCursor(f"invalid cursor {cursor!r} for {kind}")
    return value


class FakeService:
    def __init__(self, clock: Clock | None = None, gateway_base: str = "http://gateway.test") -> None:
        self.reset(clock, gateway_base)

    def reset(self, clock: Clock | None = None, gateway_base: str = "http://gateway.test") -> None:
        """Forget everything (tests share one app and reset its service between tests)."""
        for name in [k for k, v in vars(self).items() if callable(v)]:  # methods a test replaced
            del self.__dict__[name]
        self.clock = clock or FakeClock()
        self.instances: dict[str, InstanceRecord] = {}
        self.events: list[EventRecord] = []
        self.audit: list[AuditRecord] = []
        self.calls: list[tuple[str, str, str | None]] = []  # (method, actor user id, instance id)
        self.gateway_base = gateway_base
        self.cleanup_refused = False
        self._ids = itertools.count(1)

    # helpers for tests --------------------------------------------------------------------------
    def add(self, user_id: str, status: Status = Status.RUNNING, **fields: Any) -> InstanceRecord:
        n = next(self._ids)
        now = self.clock.now()
        record = InstanceRecord(id=f"ins_{n:04d}", user_id=user_id, sandbox_id=f"sbx_{n:04d}", status=status,
                                created_at=now, updated_at=now, app_name=f"sk-{user_id}",
                                machine_id=f"m{n}", volume_id=f"vol_{n}", region="lcl-a",
                                last_started_at=now, **fields)
        self.instances[record.id] = record
        self._event("instance.provisioned", record)
        return record

    def _event(self, name: str, r: InstanceRecord, **kw: Any) -> None:
        self.events.append(EventRecord(event=name, instance_id=r.id, at=self.clock.now(), user_id=r.user_id,
                                       sandbox_id=r.sandbox_id, status=str(r.status), machine_id=r.machine_id,
                                       volume_id=r.volume_id, region=r.region, id=len(self.events) + 1, **kw))

    def _audit(self, actor: Actor, action: str, instance_id: str, outcome: str = "ok") -> None:
        self.audit.append(AuditRecord(actor=actor.user_id, role=actor.role, action=action, at=self.clock.now(),
                                      instance_id=instance_id, outcome=outcome, id=len(self.audit) + 1))

    def audit_denied(self, actor: Actor, action: str, instance_id: str | None, reason: str) -> None:
        """Not a mutation of any instance: recorded in the audit log only (not in ``calls``)."""
        self.audit.append(AuditRecord(actor=actor.user_id, role=actor.role, action=action, at=self.clock.now(),
                                      instance_id=instance_id, outcome="refused", details={"error": reason},
                                      id=len(self.audit) + 1))

    def _get(self, instance_id: str) -> InstanceRecord:
        record = self.instances.get(instance_id)
        if record is None:
            raise InstanceNotFound(f"instance {instance_id} not found")
        return record

    def _set(self, r: InstanceRecord, status: Status, **changes: Any) -> InstanceRecord:
        new = r.copy(status=status, updated_at=self.clock.now(), version=r.version + 1, **changes)
        self.instances[r.id] = new
        return new

    def _user_action(self, actor: Actor, name: str, instance_id: str) -> InstanceRecord:
        self.calls.append((name, actor.user_id, instance_id))
        r = self._get(instance_id)
        if r.status == Status.DESTROYED:
            raise InvalidTransition(f"instance {instance_id} is destroyed")
        if r.busy:
            raise InstanceBusy(f"instance {instance_id} is {r.status}; try again when it settles",
                               instance_status=str(r.status))
        return r

    # InstanceServiceAPI ---------------------------------------------------------------------------
    async def create_instance(self, actor: Actor, *, user_id: str, size: str | None = None,
                              env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                              image: str | None = None, idempotency_key: str | None = None) -> InstanceRecord:
        self.calls.append(("create", actor.user_id, None))
        r = self.add(user_id, Status.STARTING, machine_size=size or "shared-cpu-1x", env=dict(env or {}),
                     secrets_encrypted={k: "enc:" + v[::-1] for k, v in (secrets or {}).items()},
                     image=image or "sandkeep/gateway")
        return r

    async def update_config(self, actor: Actor, instance_id: str, *, size: str | None = None,
                            env: dict[str, str] | None = None,
                            secrets: dict[str, str | None] | None = None) -> InstanceRecord:
        self.calls.append(("update_config", actor.user_id, instance_id))
        r = self._get(instance_id)
        changes: dict[str, Any] = {"config_generation": r.config_generation + 1}
        if size is not None:
            changes["machine_size"] = size
        if env is not None:
            changes["env"] = dict(env)
        if secrets is not None:
            merged = dict(r.secrets_encrypted)
            for k, v in secrets.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = "enc:" + v[::-1]
            changes["secrets_encrypted"] = merged
        return self._set(r, r.status, **changes)

    def get_instance(self, instance_id: str) -> InstanceRecord:
        return self._get(instance_id)

    def list_instances(self, *, user_id: str | None = None, status: list[str] | None = None,
                       region: str | None = None, cursor: str | None = None,
                       limit: int = 50) -> Page[InstanceRecord]:
        items = [r for r in self.instances.values() if r.status != Status.DESTROYED
                 and (user_id is None or r.user_id == user_id)
                 and (not status or str(r.status) in status)
                 and (region is None or r.region == region)]
        start = _offset("instances", cursor)
        page = items[start:start + limit]
        nxt = _cursor("instances", start + limit) if start + limit < len(items) else None
        return Page(items=page, next_cursor=nxt)

    def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.instances.values():
            if r.status != Status.DESTROYED:
                counts[str(r.status)] = counts.get(str(r.status), 0) + 1
        return counts

    async def start(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._user_action(actor, "start", instance_id)
        if r.status == Status.RUNNING:
            raise InvalidTransition(f"instance {instance_id} is already running")
        return self._set(r, Status.STARTING)

    async def stop(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._user_action(actor, "stop", instance_id)
        if r.status != Status.RUNNING:
            raise InvalidTransition(f"instance {instance_id} is {r.status}, not running")
        return self._set(r, Status.STOPPED, last_stopped_at=self.clock.now())

    async def restart(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._user_action(actor, "restart", instance_id)
        return self._set(r, Status.RESTARTING)

    async def destroy(self, actor: Actor, instance_id: str, *, force: bool = False) -> InstanceRecord:
        self.calls.append(("destroy", actor.user_id, instance_id))
        r = self._get(instance_id)
        if r.status == Status.RECOVERING and not force:
            raise RecoveringRefused(f"instance {instance_id} is recovering; an admin may force the destroy")
        if r.status in (Status.DESTROYING, Status.DESTROYED):
            return r
        if force:
            self._audit(actor, "force_destroy", instance_id)
        return self._set(r, Status.DESTROYING)

    def list_events(self, *, instance_id: str | None = None, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        items = [e for e in reversed(self.events) if (instance_id is None or e.instance_id == instance_id)
                 and (name is None or e.event == name)]
        start = _offset("events", cursor)
        nxt = _cursor("events", start + limit) if start + limit < len(items) else None
        return Page(items=items[start:start + limit], next_cursor=nxt)

    def debug(self, instance_id: str) -> dict[str, Any]:
        r = self._get(instance_id)
        return {name: getattr(r, name) for name in InstanceRecord.field_names()}

    async def retry_recovery(self, actor: Actor, instance_id: str) -> InstanceRecord:
        self.calls.append(("retry_recovery", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "retry_recovery", instance_id)
        return self._set(r, r.status, alarm_at=self.clock.now())

    async def cleanup_retained_volume(self, actor: Actor, instance_id: str) -> str | None:
        self.calls.append(("cleanup_retained_volume", actor.user_id, instance_id))
        r = self._get(instance_id)
        if r.status == Status.RECOVERING:
            self._audit(actor, "retained_volume_cleanup", instance_id, "refused")
            raise RecoveringRefused(f"instance {instance_id} is recovering")
        if self.cleanup_refused:
            self._audit(actor, "retained_volume_cleanup", instance_id, "refused")
            raise CleanupRefused("Refusing to destroy attached machine m9: it belongs to sandbox sbx_other")
        deleted = r.retained_volume_id
        self._set(r, r.status, retained_volume_id=None, retained_volume_cleanup_after=None)
        self._audit(actor, "retained_volume_cleanup", instance_id)
        return deleted

    async def approve_restore(self, actor: Actor, instance_id: str) -> InstanceRecord:
        self.calls.append(("approve_restore", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "approve_restore", instance_id)
        return self._set(r, r.status, restore_approval="approved")

    async def list_volume_snapshots(self, actor: Actor, instance_id: str) -> list[dict[str, Any]]:
        self.calls.append(("list_volume_snapshots", actor.user_id, instance_id))
        return []

    async def restore_volume(self, actor: Actor, instance_id: str, *, snapshot_id: str | None = None,
                             volume_id: str | None = None) -> InstanceRecord:
        self.calls.append(("restore_volume", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "volume_restore", instance_id)
        return self._set(r, r.status)

    async def delete_flagged_volume(self, actor: Actor, instance_id: str, volume_id: str) -> str:
        self.calls.append(("delete_flagged_volume", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "flagged_volume_delete", instance_id)
        self._set(r, r.status, flagged_volume_ids=[v for v in r.flagged_volume_ids if v != volume_id])
        return volume_id

    async def destroy_machine(self, actor: Actor, instance_id: str) -> InstanceRecord:
        self.calls.append(("destroy_machine", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "destroy_machine", instance_id)
        return self._set(r, r.status, machine_id=None)

    async def rotate_gateway_token(self, actor: Actor, instance_id: str) -> InstanceRecord:
        self.calls.append(("rotate_gateway_token", actor.user_id, instance_id))
        r = self._get(instance_id)
        self._audit(actor, "rotate_gateway_token", instance_id)
        return self._set(r, Status.RESTARTING if r.status == Status.RUNNING else r.status)

    def list_audit(self, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        items = [a for a in reversed(self.audit) if instance_id is None or a.instance_id == instance_id]
        start = _offset("audit", cursor)
        nxt = _cursor("audit", start + limit) if start + limit < len(items) else None
        return Page(items=items[start:start + limit], next_cursor=nxt)

    def gateway_target(self, instance_id: str) -> tuple[str, dict[str, str]] | None:
        r = self._get(instance_id)
        if r.status != Status.RUNNING or r.machine_id is None:
            return None
        return self.gateway_base, {"fly-force-instance-id": r.machine_id}


def retained(clock: Clock) -> dict[str, Any]:
    return {"retained_volume_id": "vol_old", "retained_volume_cleanup_after": clock.now() + timedelta(days=7)}
