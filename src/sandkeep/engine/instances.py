"""InstanceService: what the API, the CLI (through the API) and the web UI ask of the engine.

Every action takes the instance's short claim (the same lease the workers use; retried briefly while a
worker holds it, then :class:`InstanceLocked`), validates against the current record (busy gating,
transitions), persists the *intent* (status / ``pending_action``, alarm now), releases the claim and wakes a
reconcile in the background. Nothing here waits for the provider, except the admin actions that are one
short provider call by nature (retained-volume cleanup, destroy machine).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from sandkeep.clock import utc_iso
from sandkeep.engine import access, deadhost, intents, labels, policy
from sandkeep.engine.actions import Action, Changes
from sandkeep.engine.executor import Pass, Refused
from sandkeep.engine.lease import EngineContext, Lease, claim
from sandkeep.engine.naming import (
    ConfigError,
    ForbiddenEnvNameError,
    app_name_for,
    new_instance_id,
    new_sandbox_id,
    validate_env,
    validate_image,
    validate_size,
)
from sandkeep.engine.service import (
    Actor,
    CleanupRefused,
    ForbiddenEnvName,
    InstanceLocked,
    InstanceNotFound,
    InvalidArgument,
    InvalidConfig,
    InvalidTransition,
    ProviderUnavailable,
    QuotaExceeded,
    RecoveringRefused,
    ServiceError,
)
from sandkeep.gateway import TOKEN_HEADER as GATEWAY_TOKEN_HEADER
from sandkeep.provider.errors import MissingVolumeError, NotFoundError, ProviderError
from sandkeep.secrets import SecretsError, app_name_secret
from sandkeep.store.base import AlreadyExists, FencedError, QuotaReached
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status


def public_view(record: InstanceRecord) -> dict[str, Any]:
    """The instance as users see it (issue 3 §4); secrets appear by name only, never by value."""
    return {
        "id": record.id, "name": record.name, "labels": dict(record.labels), "user_id": record.user_id,
        "sandbox_id": record.sandbox_id,
        "status": record.status.value, "busy": record.busy, "pending_action": record.pending_action,
        "region": record.region, "machine_id": record.machine_id, "volume_id": record.volume_id,
        "app_name": record.app_name, "created_at": utc_iso(record.created_at),
        "last_started_at": utc_iso(record.last_started_at), "last_stopped_at": utc_iso(record.last_stopped_at),
        "config": {"image": record.image, "size": record.machine_size, "env": dict(record.env),
                   "secret_names": sorted(record.secrets_encrypted), "generation": record.config_generation},
        "recovery": {
            "started_at": utc_iso(record.recovery_started_at),
            "pending_volume_id": record.pending_recovery_volume_id,
            "retained_volume_id": record.retained_volume_id,
            "retained_volume_cleanup_after": utc_iso(record.retained_volume_cleanup_after),
            "last_error": record.last_recovery_error,
            "last_error_at": utc_iso(record.last_recovery_error_at),
        },
        "dead_host": dead_host_view(record),
    }


def dead_host_view(record: InstanceRecord) -> dict[str, Any]:
    """SPEC §15 as the owner and the API see it: suspicion, approval, fencing, flagged volumes, the note."""
    return {"suspect_since": utc_iso(record.suspect_since), "suspect_reason": record.suspect_reason,
            "restore_approval": record.restore_approval,
            "needs_approval": record.restore_approval == "awaiting",
            "fenced_machine_id": record.fenced_machine_id,
            "flagged_volume_ids": list(record.flagged_volume_ids), "incident_note": record.incident_note,
            "last_snapshot_at": utc_iso(record.last_snapshot_at)}


def debug_view(record: InstanceRecord) -> dict[str, Any]:
    """Every persisted field (alarm and lease included); secret values are replaced by a marker."""
    out: dict[str, Any] = {}
    for f in fields(InstanceRecord):
        value = getattr(record, f.name)
        if f.name == "secrets_encrypted":
            value = {name: "<encrypted>" for name in sorted(value)}
        elif f.name == "gateway_token_encrypted":
            value = "<encrypted>" if value else None
        elif isinstance(value, datetime):
            value = utc_iso(value)
        elif isinstance(value, Status):
            value = value.value
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    out["busy"] = record.busy
    return out


class InstanceService:
    """Implements :class:`sandkeep.engine.service.InstanceServiceAPI`."""

    def __init__(self, ctx: EngineContext, *, owner_prefix: str, wake: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.owner_prefix = owner_prefix
        self.wake = wake
        self._seq = itertools.count(1)
        # refused admin calls audited per actor: key -> (window start, rows written, refusals not written)
        self._refusals: dict[str, tuple[float, int, int]] = {}
        self._refusals_lock = threading.Lock()
        self._name_secret: str | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def settings(self) -> Any:
        return self.ctx.settings

    def _now(self) -> datetime:
        return self.ctx.clock.now()

    def _app_name_secret(self) -> str:
        if self._name_secret is None:
            self._name_secret = app_name_secret(self.settings)
        return self._name_secret

    def _load(self, instance_id: str) -> InstanceRecord:
        access.check_instance_id(instance_id)
        record = self.ctx.store.get_instance(instance_id)
        if record is None:
            raise access.not_found(instance_id)
        return record

    def _visible(self, actor: Actor, instance_id: str) -> InstanceRecord:
        record = self._load(instance_id)
        access.check_visible(actor, record)
        return record

    def _admin_gate(self, actor: Actor, action: str, instance_id: str) -> InstanceRecord:
        """An admin action's door: the admin role and an existing instance; a refusal here is audited too."""
        try:
            access.require_admin(actor)
            return self._load(instance_id)
        except ServiceError as exc:
            shown = instance_id if access.INSTANCE_ID_RE.match(instance_id) else instance_id[:64]
            try:
                self.audit_denied(actor, action, shown, f"{exc.http_status} {exc.code}: {exc.message}")
            except Exception as audit_exc:  # the refusal itself must still be answered
                self.ctx.emitter.log.warning("audit.write_failed", action=action, error=str(audit_exc))
            raise

    @asynccontextmanager
    async def _claimed(self, instance_id: str) -> AsyncIterator[Lease]:
        owner = f"{self.owner_prefix}/api#{next(self._seq)}"
        lease = await claim(self.ctx, instance_id, owner)
        if lease is None:
            if self.ctx.store.get_instance(instance_id) is None:
                raise InstanceNotFound(f"instance {instance_id} not found")
            raise InstanceLocked(f"instance {instance_id} is being worked on by another worker; retry shortly",
                                 retry_after=1)
        self.ctx.traced("acquire", instance_id, owner)
        try:
            yield lease
        except FencedError as exc:
            raise InstanceLocked(f"instance {instance_id} changed hands during the request; retry") from exc
        finally:
            await asyncio.shield(lease.release())  # on the store thread; a cancelled request still releases

    async def _apply(self, lease: Lease, actions: list[Action]) -> InstanceRecord:
        """Run an intent's actions with the executor, under the claim (provider errors are raised)."""
        await Pass(self.ctx, lease, intent=True).execute(actions)
        return lease.record

    async def _emit(self, record: InstanceRecord, event: str, **kw: Any) -> None:
        await self.ctx.emitter.aemit(record, event, **kw)

    def _audit_row(self, actor: Actor, action: str, instance_id: str | None, outcome: str,
                   details: dict[str, Any]) -> AuditRecord:
        return AuditRecord(actor=actor.user_id, role=actor.role, action=action, at=self._now(),
                           instance_id=instance_id, outcome=outcome, details=details)

    async def _audit(self, actor: Actor, action: str, instance_id: str | None, outcome: str,
                     **details: Any) -> None:
        """An admin action's audit row, written on the engine's store thread."""
        await self.ctx.call(self.ctx.store.add_audit, self._audit_row(actor, action, instance_id, outcome, details))

    def audit_denied(self, actor: Actor, action: str, instance_id: str | None, reason: str) -> None:
        """An admin action refused at the door (wrong role, unknown instance) is audited too, at most
        ``audit_refused_max`` rows per actor per ``audit_refused_window`` (per process): further refusals in
        the window are counted, logged, and reported as ``suppressed`` in the actor's next audited refusal,
        so a caller cannot grow the audit log without bound."""
        limit, window = int(self.settings.audit_refused_max), float(self.settings.audit_refused_window)
        key = f"{actor.role}:{actor.user_id}"
        now = self.ctx.clock.monotonic()
        with self._refusals_lock:
            start, written, suppressed = self._refusals.pop(key, (now, 0, 0))
            if now - start >= window:
                start, written = now, 0
            record = limit <= 0 or written < limit
            if record:
                written += 1
            self._refusals[key] = (start, written, 0 if record else suppressed + 1)
            while len(self._refusals) > 10000:
                self._refusals.pop(next(iter(self._refusals)))
        if not record:
            if suppressed == 0:
                self.ctx.emitter.log.warning("audit.refusals_suppressed", actor=actor.user_id, role=actor.role,
                                     limit=limit, window_seconds=window)
            return
        details: dict[str, Any] = {"error": reason[:500]}
        if suppressed:
            details["suppressed"] = suppressed
        self.ctx.store.add_audit(self._audit_row(actor, action, instance_id, "refused", details))

    async def _finish(self, record: InstanceRecord) -> InstanceRecord:
        self.wake(record.id)
        current = await self.ctx.call(self.ctx.store.get_instance, record.id)
        if current is None:
            raise access.not_found(record.id)
        return current

    # ------------------------------------------------------------------ configuration

    def _config(self, *, size: str | None, env: dict[str, str] | None, image: str | None) -> Changes:
        try:
            out: Changes = {}
            if size is not None:
                out["machine_size"] = validate_size(size)
            if env is not None:
                out["env"] = validate_env(env, "env")
            if image is not None:
                out["image"] = validate_image(image)
            return out
        except ForbiddenEnvNameError as exc:
            raise ForbiddenEnvName(str(exc)) from exc
        except ConfigError as exc:
            raise InvalidConfig(str(exc)) from exc

    def _secrets(self, current: dict[str, str], changes: dict[str, str | None] | None) -> dict[str, str]:
        merged = dict(current)
        if not changes:
            return merged
        if not isinstance(changes, dict):
            raise InvalidConfig("secrets must be an object of strings")
        try:
            for name, value in changes.items():
                if value is None:
                    merged.pop(name, None)
                    continue
                validate_env({name: value}, "secret")
                merged[name] = self.ctx.secrets.encrypt(value)
        except ForbiddenEnvNameError as exc:
            raise ForbiddenEnvName(str(exc)) from exc
        except ConfigError as exc:
            raise InvalidConfig(str(exc)) from exc
        return merged

    def _identity(self, actor: Actor, *, name: str | None, labels_: dict[str, str] | None,
                  guest: dict[str, Any] | None) -> Changes:
        """Name, labels and guest, validated (syntax, then the guest policy for ``actor``)."""
        out: Changes = {}
        if name is not None:
            out["name"] = labels.validate_name(name) if name != "" else None
        if labels_ is not None:
            out["labels"] = labels.validate_labels(labels_, int(self.settings.max_labels))
        if guest is not None:
            if not isinstance(guest, dict):
                raise labels.InvalidGuest("guest must be an object with cpu_kind, cpus and memory_mb")
            chosen = labels.validate_guest(guest.get("cpu_kind", "shared"), guest.get("cpus"),
                                           guest.get("memory_mb"))
            policy.check_guest(actor, chosen, self.settings)
            out["guest_cpu_kind"], out["guest_cpus"] = chosen.cpu_kind, chosen.cpus
            out["guest_memory_mb"] = chosen.memory_mb
        return out

    @staticmethod
    def _check_overlap(env: dict[str, str], secret_names: list[str]) -> None:
        both = sorted(set(env) & set(secret_names))
        if both:
            raise InvalidConfig(f"names used both as env and as secret: {', '.join(both)}")

    async def create_instance(self, actor: Actor, *, user_id: str | None = None, size: str | None = None,
                              env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                              image: str | None = None, idempotency_key: str | None = None,
                              name: str | None = None, labels: dict[str, str] | None = None,
                              guest: dict[str, Any] | None = None) -> InstanceRecord:
        """Create and start an instance. With ``idempotency_key``, a repeat of the same caller's create for the same
        owner with the same key returns the first instance instead of making another."""
        user_id = access.check_create_for(actor, actor.user_id if user_id is None else user_id)
        scoped_key = f"{actor.user_id}/{idempotency_key}" if idempotency_key else None
        if scoped_key is not None:
            first = self.ctx.store.find_by_idempotency_key(user_id, scoped_key)
            if first is not None:
                return first
        config = self._config(size=size or self.settings.default_size, env=env or {},
                              image=image or self.settings.image)
        policy.check_image(config["image"], self.settings)
        policy.check_size(actor, config["machine_size"], self.settings)
        identity = self._identity(actor, name=name or None, labels_=labels or {}, guest=guest)
        quota = policy.instance_quota(actor, self.settings)
        secret_map = self._secrets({}, dict(secrets) if secrets else None)
        self._check_overlap(config["env"], list(secret_map))
        now = self._now()
        record = InstanceRecord(
            id=new_instance_id(), user_id=user_id, sandbox_id=new_sandbox_id(), status=Status.PROVISIONED,
            created_at=now, updated_at=now,
            app_name=app_name_for(user_id, self.settings.app_prefix, self._app_name_secret()),
            machine_size=config["machine_size"], image=config["image"], env=config["env"],
            secrets_encrypted=secret_map, status_changed_at=now, pending_action="start", idempotency_key=scoped_key,
            name=identity.get("name"), labels=identity.get("labels", {}),
            guest_cpu_kind=identity.get("guest_cpu_kind"), guest_cpus=identity.get("guest_cpus"),
            guest_memory_mb=identity.get("guest_memory_mb"),
            # not due before this request moves it to starting (no worker races the claim below); if the
            # process dies in between, the alarm still starts it (provisioned + pending start)
            alarm_at=now + timedelta(seconds=max(1.0, 2 * self.settings.claim_wait)),
        )
        try:
            record = await self.ctx.call(self.ctx.store.insert_instance, record, max_for_user=quota)
        except QuotaReached as exc:
            raise QuotaExceeded(f"user {user_id} already has {exc.count} instances; the limit is {quota} "
                                f"(SANDKEEP_MAX_INSTANCES_PER_USER). Destroy one first.", limit=quota) from exc
        except AlreadyExists as exc:
            if scoped_key is not None:  # a concurrent create with the same key won
                first = self.ctx.store.find_by_idempotency_key(user_id, scoped_key)
                if first is not None:
                    return first
            # a 64-bit id collision: practically impossible, never half-written
            raise ServiceError("could not allocate an instance id; retry") from exc
        await self._emit(record, "instance.provisioned", details={"size": record.machine_size, "image": record.image})
        try:
            async with self._claimed(record.id) as lease:
                await self._apply(lease, intents.provision_start(lease.record, self._now()))
        except InstanceLocked:  # a worker already took it: it starts it (provisioned + pending start)
            return self._load(record.id)
        return await self._finish(lease.record)

    async def update_config(self, actor: Actor, instance_id: str, *, size: str | None = None,
                            env: dict[str, str] | None = None,
                            secrets: dict[str, str | None] | None = None,
                            name: str | None = None, labels: dict[str, str] | None = None,
                            guest: dict[str, Any] | None = None) -> InstanceRecord:
        self._visible(actor, instance_id)
        config = self._config(size=size, env=env, image=None)
        identity = self._identity(actor, name=name, labels_=labels, guest=guest)
        if "machine_size" in config:
            policy.check_size(actor, config["machine_size"], self.settings)
        if secrets is not None and not isinstance(secrets, dict):
            raise InvalidConfig("secrets must be an object of strings (null removes one)")
        async with self._claimed(instance_id) as lease:
            current = lease.record
            if current.status in (Status.DESTROYING, Status.DESTROYED):
                raise InvalidTransition(f"instance {instance_id} is {current.status.value}")
            secret_map = self._secrets(current.secrets_encrypted, secrets)
            self._check_overlap(config.get("env", current.env), list(secret_map))
            changes: Changes = {**config}
            if "guest_cpus" in identity:
                changes["guest_cpu_kind"] = identity["guest_cpu_kind"]
                changes["guest_cpus"] = identity["guest_cpus"]
                changes["guest_memory_mb"] = identity["guest_memory_mb"]
            if secrets:
                changes["secrets_encrypted"] = secret_map
            if changes:  # what the machine gets: applied at the next start or restart
                changes["config_generation"] = current.config_generation + 1
            if "name" in identity:
                changes["name"] = identity["name"]
            if "labels" in identity:
                changes["labels"] = identity["labels"]
            if not changes:
                return current
            await lease.persist(changes)
            await self._emit(lease.record, "instance.config_updated",
                       details={"changed": sorted(k if k != "secrets_encrypted" else "secrets" for k in changes
                                                  if k != "config_generation"),
                                "generation": lease.record.config_generation,
                                "secret_names": sorted(lease.record.secrets_encrypted)})
            return lease.record

    # ------------------------------------------------------------------ reads

    def get_instance(self, actor: Actor, instance_id: str) -> InstanceRecord:
        return self._visible(actor, instance_id)

    def list_instances(self, actor: Actor, *, user_id: str | None = None, status: list[str] | None = None,
                       region: str | None = None, cursor: str | None = None,
                       limit: int = 50) -> Page[InstanceRecord]:
        user_id = access.list_scope(actor, user_id)
        try:
            return self.ctx.store.list_instances(user_id=user_id, status=status, region=region, cursor=cursor,
                                                 limit=limit)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc

    def count_by_status(self, actor: Actor) -> dict[str, int]:
        access.require_admin(actor)
        counts = self.ctx.store.count_by_status()
        counts.pop(Status.DESTROYED.value, None)
        return counts

    def list_events(self, actor: Actor, instance_id: str, *, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        self._visible(actor, instance_id)
        return self._events(instance_id=instance_id, name=name, cursor=cursor, limit=limit)

    def fleet_events(self, actor: Actor, *, instance_id: str | None = None, name: str | None = None,
                     cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        access.require_admin(actor)
        return self._events(instance_id=instance_id, name=name, cursor=cursor, limit=limit)

    def _events(self, *, instance_id: str | None, name: str | None, cursor: str | None,
                limit: int) -> Page[EventRecord]:
        try:
            return self.ctx.store.list_events(instance_id=instance_id, name=name, cursor=cursor, limit=limit)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc

    def list_orphans(self, actor: Actor) -> list[dict[str, Any]]:
        access.require_admin(actor)
        grace = timedelta(seconds=self.ctx.settings.orphan_grace)
        return [{"kind": o.kind, "id": o.resource_id, "app_name": o.app_name, "region": o.region,
                 "instance_id": o.instance_id, "reason": o.reason, "first_seen_at": o.first_seen_at,
                 "last_seen_at": o.last_seen_at, "deletes_at": o.first_seen_at + grace}
                for o in self.ctx.store.list_orphans()]

    def list_audit(self, actor: Actor, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        access.require_admin(actor)
        try:
            return self.ctx.store.list_audit(instance_id=instance_id, cursor=cursor, limit=limit)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc

    # ------------------------------------------------------------------ user actions

    async def _intent(self, actor: Actor, instance_id: str,
                      decide: Callable[[InstanceRecord, datetime], list[Action]], what: str) -> InstanceRecord:
        """A user intent: check access and the gate on the unclaimed record (cheap refusals), then decide
        again on the claimed one and run the actions."""
        record = self._visible(actor, instance_id)
        intents.gate(record, what)
        async with self._claimed(instance_id) as lease:
            current = await self._apply(lease, decide(lease.record, self._now()))
        return await self._finish(current)

    async def start(self, actor: Actor, instance_id: str) -> InstanceRecord:
        return await self._intent(actor, instance_id, intents.start, "start")

    async def stop(self, actor: Actor, instance_id: str) -> InstanceRecord:
        return await self._intent(actor, instance_id, intents.stop, "stop")

    async def restart(self, actor: Actor, instance_id: str) -> InstanceRecord:
        return await self._intent(actor, instance_id, intents.restart, "restart")

    async def destroy(self, actor: Actor, instance_id: str, *, force: bool = False) -> InstanceRecord:
        """Two-phase destroy (SPEC §8). An admin's ``force`` is an admin action: audited, whatever the outcome."""
        if not force:
            record, _ = await self._destroy(actor, instance_id, force=False)
            return record
        self._admin_gate(actor, "force_destroy", instance_id)
        try:
            record, before = await self._destroy(actor, instance_id, force=True)
        except ServiceError as exc:
            outcome = "error" if isinstance(exc, InstanceLocked) else "refused"
            await self._audit(actor, "force_destroy", instance_id, outcome, error=exc.message)
            raise
        await self._audit(actor, "force_destroy", instance_id, "ok", status_before=before)
        return record

    async def _destroy(self, actor: Actor, instance_id: str, *, force: bool) -> tuple[InstanceRecord, str]:
        record = self._visible(actor, instance_id)
        intents.check_destroy(record, force=force)
        if record.status == Status.DESTROYING:
            return record, record.status.value
        async with self._claimed(instance_id) as lease:
            before = lease.record.status.value
            actions = intents.destroy(lease.record, self._now(), force=force)
            current = await self._apply(lease, actions)
        if not actions:  # already destroying
            return current, before
        return await self._finish(current), before

    # ------------------------------------------------------------------ admin

    def debug(self, actor: Actor, instance_id: str) -> dict[str, Any]:
        access.require_admin(actor)
        return debug_view(self._load(instance_id))

    async def retry_recovery(self, actor: Actor, instance_id: str) -> InstanceRecord:
        record = self._admin_gate(actor, "retry_recovery", instance_id)
        try:
            async with self._claimed(instance_id) as lease:
                mode, actions = intents.retry_recovery(lease.record, self._now())
                current = await self._apply(lease, actions)
        except ServiceError as exc:
            await self._audit(actor, "retry_recovery", instance_id, "refused", error=exc.message)
            raise
        await self._audit(actor, "retry_recovery", record.id, "ok", mode=mode)
        return await self._finish(current)

    async def cleanup_retained_volume(self, actor: Actor, instance_id: str) -> str | None:
        record = self._admin_gate(actor, "retained_volume_cleanup", instance_id)
        if record.status == Status.RECOVERING:
            await self._audit(actor, "retained_volume_cleanup", instance_id, "refused", error="instance is recovering")
            raise RecoveringRefused(f"instance {instance_id} is recovering; retained volume cleanup is refused")
        try:
            async with self._claimed(instance_id) as lease:
                volume_id = lease.record.retained_volume_id
                actions = intents.cleanup_retained_volume(lease.record, actor.user_id)
                try:
                    await self._apply(lease, actions)
                except Refused as exc:
                    raise CleanupRefused(str(exc), volume_id=volume_id) from exc
                except ProviderError as exc:
                    raise ProviderUnavailable(f"cannot delete volume {volume_id}: {exc}") from exc
        except (RecoveringRefused, CleanupRefused) as exc:
            await self._audit(actor, "retained_volume_cleanup", instance_id, "refused", error=exc.message)
            raise
        except ServiceError as exc:
            await self._audit(actor, "retained_volume_cleanup", instance_id, "error", error=exc.message)
            raise
        deleted = volume_id if actions else None
        await self._audit(actor, "retained_volume_cleanup", instance_id, "ok", deleted_volume_id=deleted)
        return deleted

    async def approve_restore(self, actor: Actor, instance_id: str) -> InstanceRecord:
        """Admin: approve the data-losing snapshot restore of an instance whose host is dead (SPEC §15)."""
        self._admin_gate(actor, "approve_restore", instance_id)
        try:
            async with self._claimed(instance_id) as lease:
                rec = lease.record
                if rec.restore_approval != deadhost.AWAITING or rec.status != Status.RUNNING:
                    raise InvalidTransition(f"instance {instance_id} has no snapshot restore awaiting approval")
                current = await self._apply(lease, deadhost.approve(rec, self._now(), actor.user_id))
        except ServiceError as exc:
            await self._audit(actor, "approve_restore", instance_id, "refused", error=exc.message)
            raise
        await self._audit(actor, "approve_restore", instance_id, "ok")
        return await self._finish(current)

    def _restorable_volumes(self, rec: InstanceRecord) -> list[tuple[str, str]]:
        """(volume id, role) of the volumes whose snapshots an admin may restore: current, retained, flagged."""
        out: list[tuple[str, str]] = []
        for vid, role in ((rec.volume_id, "current"), (rec.retained_volume_id, "retained"),
                          *((v, "flagged") for v in rec.flagged_volume_ids)):
            if vid and vid not in {v for v, _ in out}:
                out.append((vid, role))
        return out

    async def list_volume_snapshots(self, actor: Actor, instance_id: str) -> list[dict[str, Any]]:
        """Admin: every snapshot of the instance's current, retained and flagged volumes, newest first."""
        rec = self._admin_gate(actor, "list_snapshots", instance_id)
        provider = self.ctx.provider
        items: list[dict[str, Any]] = []
        for vid, role in self._restorable_volumes(rec):
            try:
                snaps = await provider.list_snapshots(rec.app_name, vid)
            except NotFoundError:
                continue
            except ProviderError as exc:
                raise ProviderUnavailable(f"cannot list the snapshots of volume {vid}: {exc}") from exc
            for s in snaps:
                items.append({"volume_id": vid, "volume_role": role, "snapshot_id": s.id, "created_at": s.created_at,
                              "status": s.status, "size": s.size, "source_volume_size": s.volume_size})
        items.sort(key=lambda i: i["created_at"] or "", reverse=True)
        return items

    async def restore_volume(self, actor: Actor, instance_id: str, *, snapshot_id: str | None = None,
                             volume_id: str | None = None) -> InstanceRecord:
        """Admin: restore a snapshot of one of the instance's volumes (or fork a flagged/retained volume) into a
        new volume sized from its source and switch the instance over; the previous volume is retained."""
        rec = self._admin_gate(actor, "volume_restore", instance_id)
        if (snapshot_id is None) == (volume_id is None):
            raise InvalidArgument("give exactly one of snapshot_id (restore) or volume_id (fork a kept volume)")
        provider = self.ctx.provider
        source_vid: str | None = None
        if snapshot_id is not None:
            listed = await self.list_volume_snapshots(actor, instance_id)
            match = next((i for i in listed if i["snapshot_id"] == snapshot_id), None)
            if match is None:
                raise InvalidArgument(f"snapshot {snapshot_id[:64]!r} is not a snapshot of a volume of {instance_id}")
            source_vid = str(match["volume_id"])
        else:
            assert volume_id is not None
            kept = {v for v, role in self._restorable_volumes(rec) if role != "current"}
            if volume_id not in kept:
                raise InvalidArgument(f"volume {volume_id[:64]!r} is not a retained or flagged volume of {instance_id}")
            source_vid = volume_id
        try:
            source = await provider.get_volume(rec.app_name, source_vid)
            size_gb: int | None = source.size_gb
        except (NotFoundError, MissingVolumeError):
            if volume_id is not None:
                raise InvalidArgument(f"volume {volume_id} no longer exists") from None
            size_gb = None  # the host sizes the restore from the snapshot's source
        except ProviderError as exc:
            raise ProviderUnavailable(f"cannot read volume {source_vid}: {exc}") from exc
        try:
            async with self._claimed(instance_id) as lease:
                cur = lease.record
                if cur.status not in (Status.RUNNING, Status.STOPPED):
                    raise InvalidTransition(f"instance {instance_id} is {cur.status.value}; a restore needs it "
                                            f"running or stopped", status=cur.status.value)
                actions = deadhost.admin_restore(
                    cur, self._now(), actor_id=actor.user_id, retention=self.settings.retained_volume_retention,
                    region=cur.region or (self.settings.region_list or ["?"])[0], size_gb=size_gb,
                    snapshot_id=snapshot_id, source_volume_id=volume_id)
                try:
                    current = await self._apply(lease, actions)
                except Refused as exc:
                    raise CleanupRefused(str(exc)) from exc
                except ProviderError as exc:
                    raise ProviderUnavailable(f"restore of {instance_id} failed: {exc}") from exc
        except ServiceError as exc:
            await self._audit(actor, "volume_restore", instance_id, "refused", error=exc.message)
            raise
        await self._audit(actor, "volume_restore", instance_id, "ok", snapshot_id=snapshot_id,
                          source_volume_id=volume_id, new_volume_id=current.volume_id)
        return await self._finish(current)

    async def delete_flagged_volume(self, actor: Actor, instance_id: str, volume_id: str) -> str:
        """Admin: delete an old volume flagged after a snapshot restore (the admin's decision, invariant 9)."""
        self._admin_gate(actor, "flagged_volume_delete", instance_id)
        try:
            async with self._claimed(instance_id) as lease:
                rec = lease.record
                if volume_id not in rec.flagged_volume_ids:
                    raise InvalidArgument(f"volume {volume_id[:64]!r} is not a flagged volume of {instance_id}")
                if volume_id in (rec.volume_id, rec.pending_recovery_volume_id):
                    raise InvalidTransition(f"volume {volume_id} is in use by {instance_id}")
                try:
                    await self._apply(lease, deadhost.delete_flagged(rec, volume_id, actor.user_id))
                except Refused as exc:
                    raise CleanupRefused(str(exc), volume_id=volume_id) from exc
                except ProviderError as exc:
                    raise ProviderUnavailable(f"cannot delete volume {volume_id}: {exc}") from exc
        except ServiceError as exc:
            await self._audit(actor, "flagged_volume_delete", instance_id, "refused", error=exc.message,
                        volume_id=volume_id[:64])
            raise
        await self._audit(actor, "flagged_volume_delete", instance_id, "ok", deleted_volume_id=volume_id)
        return volume_id

    async def destroy_machine(self, actor: Actor, instance_id: str) -> InstanceRecord:
        self._admin_gate(actor, "destroy_machine", instance_id)
        try:
            async with self._claimed(instance_id) as lease:
                machine_id = lease.record.machine_id
                actions = intents.destroy_machine(lease.record, self._now(), actor.user_id)
                try:
                    current = await self._apply(lease, actions)
                except Refused as exc:
                    raise CleanupRefused(str(exc)) from exc
                except ProviderError as exc:
                    raise ProviderUnavailable(f"cannot destroy machine {machine_id}: {exc}") from exc
        except ServiceError as exc:
            outcome = "error" if isinstance(exc, ProviderUnavailable) else "refused"
            await self._audit(actor, "destroy_machine", instance_id, outcome, error=exc.message)
            raise
        await self._audit(actor, "destroy_machine", instance_id, "ok", machine_id=machine_id)
        return await self._finish(current)

    async def rotate_gateway_token(self, actor: Actor, instance_id: str) -> InstanceRecord:
        """Admin: a new gateway token (SPEC §13). A running instance restarts so its machine gets the token at
        once (the old one stops working); a stopped one gets it at its next start. Refused while busy."""
        self._admin_gate(actor, "rotate_gateway_token", instance_id)
        try:
            async with self._claimed(instance_id) as lease:
                restart = lease.record.status == Status.RUNNING
                actions = intents.rotate_gateway_token(lease.record, self._now(), actor.user_id,
                                                       self.ctx.new_gateway_token())
                current = await self._apply(lease, actions)
        except ServiceError as exc:
            await self._audit(actor, "rotate_gateway_token", instance_id, "refused", error=exc.message)
            raise
        await self._audit(actor, "rotate_gateway_token", instance_id, "ok", restarted=restart)
        return await self._finish(current)

    # ------------------------------------------------------------------ planned host restart

    def note_planned_host_restart(self, *, budget_seconds: float = 10.0) -> int:
        """Before ``serve`` stops the local host it started (a planned restart, not a crash): mark every running
        instance so that the machine stop that follows is resumed in place at the next start instead of
        being treated as an unexpected stop (a fleet-wide relocation). Instances whose claim is held elsewhere,
        or past the time budget, are left alone (they simply recover). Returns how many were marked."""
        from sandkeep.engine.lifecycle import RESUME_AFTER_HOST_RESTART

        store = self.ctx.store
        deadline = self.ctx.clock.monotonic() + budget_seconds
        marked = 0
        cursor: str | None = None
        while self.ctx.clock.monotonic() < deadline:
            page = store.list_instances(status=[Status.RUNNING.value], cursor=cursor, limit=200)
            for item in page.items:
                if self.ctx.clock.monotonic() >= deadline:
                    break
                owner = f"{self.owner_prefix}/shutdown#{next(self._seq)}"
                record = store.claim(item.id, owner, self.ctx.settings.lease_ttl, self._now())
                if record is None:
                    continue
                try:
                    if record.status == Status.RUNNING and record.pending_action is None and record.machine_id:
                        record = store.update(record, owner, {"pending_action": RESUME_AFTER_HOST_RESTART,
                                                              "alarm_at": self._now()})
                        self.ctx.emitter.emit(record, "instance.host_restart_planned",
                                              details={"machine_id": record.machine_id})
                        marked += 1
                except FencedError:
                    continue
                finally:
                    store.release(record, owner)
            cursor = page.next_cursor
            if cursor is None:
                break
        return marked

    # ------------------------------------------------------------------ traffic

    def gateway_target(self, actor: Actor, instance_id: str) -> tuple[str, dict[str, str]] | None:
        """Base URL and headers to reach the gateway, its token included (never shown to users)."""
        record = self._load(instance_id)
        access.check_gateway(actor, record)
        if record.status != Status.RUNNING or not record.machine_id:
            return None
        base, headers = self.ctx.provider.proxy_target(record.app_name, record.machine_id)
        try:
            token = self.ctx.gateway_token(record)
        except SecretsError as exc:
            raise ProviderUnavailable(f"cannot read the gateway token of {instance_id}: {exc}") from exc
        if token:
            headers = {**headers, GATEWAY_TOKEN_HEADER: token}
        return base, headers
