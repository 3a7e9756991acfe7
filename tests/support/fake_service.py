"""The one in-memory InstanceServiceAPI for API and web page tests (the real service is tested in tests/engine
and tests/api/test_real_service.py).

Authorization is not imitated: every method asks :mod:`sandkeep.engine.access` — the rule code the real
service runs — so a page or route that forgot to pass the actor, or an access rule that changed, shows up
here too. Beyond that it keeps the contract the HTTP layers depend on: busy gating (``instance_busy``),
destroy refused while recovering unless an admin forces it, admin actions audited (refusals at the door
included), opaque cursors that reject anything it did not hand out. Every call that passed authorization is
recorded in ``calls`` (method, actor user id, instance id), so tests can prove a refused request reached
nothing.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sandkeep.clock import Clock, FakeClock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials, memory_credentials
from sandkeep.engine import access, intents, labels
from sandkeep.engine.instances import debug_view
from sandkeep.engine.service import (
    Actor,
    CleanupRefused,
    InvalidTransition,
    RecoveringRefused,
    ServiceError,
)
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status

SECRET = "test-web-secret-0123456789abcdef"


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


def _page(kind: str, items: list[Any], cursor: str | None, limit: int) -> Page[Any]:
    start = _offset(kind, cursor)
    nxt = _cursor(kind, start + limit) if start + limit < len(items) else None
    return Page(items=items[start:start + limit], next_cursor=nxt)


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
        self.orphans: list[dict[str, Any]] = []  # what list_orphans answers (service.list_orphans's shape)
        self.snapshots: list[dict[str, Any]] = []  # what list_volume_snapshots answers
        self.restores: list[dict[str, str | None]] = []  # restore_volume's arguments, in order
        self.calls: list[tuple[str, str, str | None]] = []
        self.gateway_base = gateway_base
        self.gateway: tuple[str, dict[str, str]] | None = None  # what gateway_target answers, when set
        self.cleanup_refused = False
        self.cleanup_error: Exception | None = None
        self.fail_next: Exception | None = None  # raised (once) by the next start/stop/restart/destroy
        self._ids = itertools.count(1)

    # --- fixtures -------------------------------------------------------------------------------------

    def add(self, user_id: str, status: Status = Status.RUNNING, **fields: Any) -> InstanceRecord:
        """A new instance of ``user_id`` with the next id (``ins_0001``...)."""
        n = next(self._ids)
        now = self.clock.now()
        record = InstanceRecord(id=f"ins_{n:04d}", user_id=user_id, sandbox_id=f"sbx_{n:04d}", status=status,
                                created_at=now, updated_at=now, app_name=f"sk-{user_id}",
                                machine_id=f"m{n}", volume_id=f"vol_{n}", region="lcl-a",
                                last_started_at=now, **fields)
        self.instances[record.id] = record
        self._event("instance.provisioned", record)
        return record

    def put(self, instance_id: str, user_id: str, status: Status = Status.RUNNING, **fields: Any) -> InstanceRecord:
        """An instance with a chosen id (page tests name theirs), started half an hour ago."""
        now = self.clock.now()
        values: dict[str, Any] = {"machine_id": f"m_{instance_id}", "volume_id": f"vol_{instance_id}",
                                  "region": "lcl-a", "last_started_at": now - timedelta(minutes=30)}
        values.update(fields)
        rec = InstanceRecord(id=instance_id, user_id=user_id, sandbox_id=f"sbx_{instance_id}", status=status,
                             created_at=now - timedelta(hours=1), updated_at=now, app_name=f"sk-{user_id}",
                             **values)
        self.instances[instance_id] = rec
        return rec

    def event(self, name: str, instance_id: str | None, at: datetime | None = None, **kw: Any) -> None:
        self.events.append(EventRecord(event=name, instance_id=instance_id, at=at or self.clock.now(),
                                       id=len(self.events) + 1, **kw))

    def _event(self, name: str, r: InstanceRecord, **kw: Any) -> None:
        self.events.append(EventRecord(event=name, instance_id=r.id, at=self.clock.now(), user_id=r.user_id,
                                       sandbox_id=r.sandbox_id, status=str(r.status), machine_id=r.machine_id,
                                       volume_id=r.volume_id, region=r.region, id=len(self.events) + 1, **kw))

    def _audit(self, actor: Actor, action: str, instance_id: str | None, outcome: str = "ok",
               **details: Any) -> None:
        self.audit.append(AuditRecord(actor=actor.user_id, role=actor.role, action=action, at=self.clock.now(),
                                      instance_id=instance_id, outcome=outcome, details=details,
                                      id=len(self.audit) + 1))

    def audit_denied(self, actor: Actor, action: str, instance_id: str | None, reason: str) -> None:
        """Not a mutation of any instance: recorded in the audit log only (not in ``calls``)."""
        self._audit(actor, action, instance_id, "refused", error=reason)

    # --- the real rules --------------------------------------------------------------------------------

    def _get(self, instance_id: str) -> InstanceRecord:
        access.check_instance_id(instance_id)
        record = self.instances.get(instance_id)
        if record is None:
            raise access.not_found(instance_id)
        return record

    def _visible(self, actor: Actor, instance_id: str) -> InstanceRecord:
        record = self._get(instance_id)
        access.check_visible(actor, record)
        return record

    def _admin_gate(self, actor: Actor, action: str, instance_id: str) -> InstanceRecord:
        try:
            access.require_admin(actor)
            return self._get(instance_id)
        except ServiceError as exc:
            self.audit_denied(actor, action, instance_id, f"{exc.http_status} {exc.code}: {exc.message}")
            raise

    def _set(self, r: InstanceRecord, status: Status | None = None, **changes: Any) -> InstanceRecord:
        new = r.copy(status=status or r.status, updated_at=self.clock.now(), version=r.version + 1, **changes)
        self.instances[r.id] = new
        return new

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def _user_action(self, actor: Actor, name: str, instance_id: str) -> InstanceRecord:
        r = self._visible(actor, instance_id)
        self.calls.append((name, actor.user_id, instance_id))
        self._maybe_fail()
        intents.gate(r, name)  # the real busy / destroyed rule
        return r

    # --- InstanceServiceAPI ---------------------------------------------------------------------------

    async def create_instance(self, actor: Actor, *, user_id: str | None = None, size: str | None = None,
                              env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                              image: str | None = None, idempotency_key: str | None = None,
                              name: str | None = None, labels: dict[str, str] | None = None,
                              guest: dict[str, Any] | None = None) -> InstanceRecord:
        owner = access.check_create_for(actor, actor.user_id if user_id is None else user_id)
        self.calls.append(("create", actor.user_id, None))
        return self.add(owner, Status.STARTING, machine_size=size or "shared-cpu-1x", env=dict(env or {}),
                        secrets_encrypted={k: "enc:" + v[::-1] for k, v in (secrets or {}).items()},
                        image=image or "sandkeep/gateway", **self._identity(name, labels, guest))

    @staticmethod
    def _identity(name: str | None, labels_: dict[str, str] | None, guest: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if name is not None:
            out["name"] = labels.validate_name(name) if name else None
        if labels_ is not None:
            out["labels"] = labels.validate_labels(labels_, 16)
        if guest is not None:
            g = labels.validate_guest(guest.get("cpu_kind", "shared"), guest.get("cpus"), guest.get("memory_mb"))
            out.update(guest_cpu_kind=g.cpu_kind, guest_cpus=g.cpus, guest_memory_mb=g.memory_mb)
        return out

    async def update_config(self, actor: Actor, instance_id: str, *, size: str | None = None,
                            env: dict[str, str] | None = None,
                            secrets: dict[str, str | None] | None = None,
                            name: str | None = None, labels: dict[str, str] | None = None,
                            guest: dict[str, Any] | None = None) -> InstanceRecord:
        r = self._visible(actor, instance_id)
        self.calls.append(("update_config", actor.user_id, instance_id))
        changes: dict[str, Any] = {"config_generation": r.config_generation + 1,
                                   **self._identity(name, labels, guest)}
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
        return self._set(r, **changes)

    def get_instance(self, actor: Actor, instance_id: str) -> InstanceRecord:
        return self._visible(actor, instance_id)

    def list_instances(self, actor: Actor, *, user_id: str | None = None, status: list[str] | None = None,
                       region: str | None = None, cursor: str | None = None,
                       limit: int = 50) -> Page[InstanceRecord]:
        user_id = access.list_scope(actor, user_id)
        items = [r for r in sorted(self.instances.values(), key=lambda r: r.id)
                 if (r.status != Status.DESTROYED or (status and Status.DESTROYED.value in status))
                 and (user_id is None or r.user_id == user_id)
                 and (not status or str(r.status) in status)
                 and (region is None or r.region == region)]
        return _page("instances", items, cursor, limit)

    def count_by_status(self, actor: Actor) -> dict[str, int]:
        access.require_admin(actor)
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
        r = self._admin_gate(actor, "force_destroy", instance_id) if force else self._visible(actor, instance_id)
        self.calls.append(("destroy", actor.user_id, instance_id))
        self._maybe_fail()
        if r.status == Status.RECOVERING and not force:
            raise RecoveringRefused(f"instance {instance_id} is recovering; an admin may force the destroy")
        if r.status in (Status.DESTROYING, Status.DESTROYED):
            return r
        if force:
            self._audit(actor, "force_destroy", instance_id)
        return self._set(r, Status.DESTROYING)

    def list_events(self, actor: Actor, instance_id: str, *, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        self._visible(actor, instance_id)
        return self._events(instance_id, name, cursor, limit)

    def fleet_events(self, actor: Actor, *, instance_id: str | None = None, name: str | None = None,
                     cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        access.require_admin(actor)
        return self._events(instance_id, name, cursor, limit)

    def _events(self, instance_id: str | None, name: str | None, cursor: str | None,
                limit: int) -> Page[EventRecord]:
        items = [e for e in reversed(self.events) if (instance_id is None or e.instance_id == instance_id)
                 and (name is None or e.event == name)]
        return _page("events", items, cursor, limit)

    def debug(self, actor: Actor, instance_id: str) -> dict[str, Any]:
        access.require_admin(actor)
        return debug_view(self._get(instance_id))

    async def retry_recovery(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._admin_gate(actor, "retry_recovery", instance_id)
        self.calls.append(("retry_recovery", actor.user_id, instance_id))
        self._audit(actor, "retry_recovery", instance_id)
        return self._set(r, alarm_at=self.clock.now())

    async def cleanup_retained_volume(self, actor: Actor, instance_id: str) -> str | None:
        r = self._admin_gate(actor, "retained_volume_cleanup", instance_id)
        self.calls.append(("cleanup_retained_volume", actor.user_id, instance_id))
        if r.status == Status.RECOVERING:
            self._audit(actor, "retained_volume_cleanup", instance_id, "refused")
            raise RecoveringRefused(f"instance {instance_id} is recovering; retained volume cleanup is refused")
        if self.cleanup_refused:
            self._audit(actor, "retained_volume_cleanup", instance_id, "refused")
            raise CleanupRefused("Refusing to destroy attached machine m9: it belongs to sandbox sbx_other")
        if self.cleanup_error is not None:
            raise self.cleanup_error
        deleted = r.retained_volume_id
        self._set(r, retained_volume_id=None, retained_volume_cleanup_after=None)
        self._audit(actor, "retained_volume_cleanup", instance_id, deleted_volume_id=deleted)
        return deleted

    async def approve_restore(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._admin_gate(actor, "approve_restore", instance_id)
        self.calls.append(("approve_restore", actor.user_id, instance_id))
        self._audit(actor, "approve_restore", instance_id)
        return self._set(r, restore_approval="approved")

    async def list_volume_snapshots(self, actor: Actor, instance_id: str) -> list[dict[str, Any]]:
        self._admin_gate(actor, "list_snapshots", instance_id)
        self.calls.append(("list_volume_snapshots", actor.user_id, instance_id))
        return list(self.snapshots)

    async def restore_volume(self, actor: Actor, instance_id: str, *, snapshot_id: str | None = None,
                             volume_id: str | None = None) -> InstanceRecord:
        r = self._admin_gate(actor, "volume_restore", instance_id)
        self.calls.append(("restore_volume", actor.user_id, instance_id))
        self.restores.append({"snapshot_id": snapshot_id, "volume_id": volume_id})
        self._audit(actor, "volume_restore", instance_id)
        return self._set(r)

    async def delete_flagged_volume(self, actor: Actor, instance_id: str, volume_id: str) -> str:
        r = self._admin_gate(actor, "flagged_volume_delete", instance_id)
        self.calls.append(("delete_flagged_volume", actor.user_id, instance_id))
        self._audit(actor, "flagged_volume_delete", instance_id)
        self._set(r, flagged_volume_ids=[v for v in r.flagged_volume_ids if v != volume_id])
        return volume_id

    async def destroy_machine(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._admin_gate(actor, "destroy_machine", instance_id)
        self.calls.append(("destroy_machine", actor.user_id, instance_id))
        self._audit(actor, "destroy_machine", instance_id, machine_id=r.machine_id)
        return self._set(r, machine_id=None)

    async def rotate_gateway_token(self, actor: Actor, instance_id: str) -> InstanceRecord:
        r = self._admin_gate(actor, "rotate_gateway_token", instance_id)
        self.calls.append(("rotate_gateway_token", actor.user_id, instance_id))
        self._audit(actor, "rotate_gateway_token", instance_id)
        return self._set(r, Status.RESTARTING if r.status == Status.RUNNING else r.status)

    def list_audit(self, actor: Actor, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        access.require_admin(actor)
        items = [a for a in reversed(self.audit) if instance_id is None or a.instance_id == instance_id]
        return _page("audit", items, cursor, limit)

    def list_orphans(self, actor: Actor) -> list[dict[str, Any]]:
        access.require_admin(actor)
        return list(self.orphans)

    def gateway_target(self, actor: Actor, instance_id: str) -> tuple[str, dict[str, str]] | None:
        r = self._get(instance_id)
        access.check_gateway(actor, r)
        if r.status != Status.RUNNING or r.machine_id is None:
            return None
        if self.gateway is not None:
            return self.gateway
        return self.gateway_base, {"fly-force-instance-id": r.machine_id}


def retained(clock: Clock) -> dict[str, Any]:
    return {"retained_volume_id": "vol_old", "retained_volume_cleanup_after": clock.now() + timedelta(days=7)}


@dataclass
class FakeRuntime:
    """What the web pages need from a runtime, around a :class:`FakeService`."""

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
