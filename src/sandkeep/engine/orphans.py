"""Orphan inventory (SPEC §15): machines and volumes of sandkeep's that no record references.

Per app, one machine list and one volume list (bounded: ``inventory_apps_per_pass`` apps per pass, a pause
between apps, a rate limit ends the pass). :func:`classify` is pure: it compares what the provider holds with the
instance records of that app.

* A **machine** is ours when its metadata names one of our instances (``instance_id``) *and* that instance's
  ``sandbox_id``. It is an orphan when that instance no longer references it (not ``machine_id``, not the fenced
  old machine of a dead host, not a pending destroy) and the instance is not busy changing its pointers.
* A **volume** is ours when its name is the volume name of one of our instances. It is an orphan when none of
  that instance's fields (current, pending recovery, retained, flagged, pending destroy) names it.
* Everything else is **foreign** (another sandbox, another deployment, a hand-made volume): reported, never
  touched. Flagged old volumes (invariant 9) are never orphans.

Orphans are reported (event ``reconcile.orphan_found``, fleet-wide at ``/v1/events?name=…`` and on the admin
events page) and deleted after ``orphan_grace`` since this process first saw them, under the owning instance's
lease, after re-reading its record, with the SPEC §7.5 ownership check (``reconcile.orphan_deleted``). First
sightings are kept in the database (table ``orphans``): an engine restart, or another engine process doing the
next pass, does not restart the grace. Admins see them at ``GET /v1/admin/orphans``, ``sandkeep admin orphans``
and on the admin page.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from sandkeep import metrics
from sandkeep.engine.executor import Refused, destroy_own_machine, safe_delete_volume
from sandkeep.engine.lease import EngineContext, claim
from sandkeep.engine.naming import METADATA_INSTANCE, METADATA_SANDBOX, volume_name
from sandkeep.logs import get_logger
from sandkeep.provider.errors import NotFoundError, ProviderError, RateLimitedError
from sandkeep.provider.models import Machine, Volume
from sandkeep.store.records import InstanceRecord, OrphanRecord, Status

log = get_logger("sandkeep.orphans")

#: statuses whose pointers are in motion: their resources are never called orphans
MOVING = frozenset({Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING})


@dataclass(frozen=True)
class Orphan:
    kind: str  # "machine" | "volume"
    resource_id: str
    instance_id: str
    reason: str
    region: str | None = None


def _volume_refs(rec: InstanceRecord) -> set[str]:
    refs = {rec.volume_id, rec.pending_recovery_volume_id, rec.retained_volume_id, rec.pending_destroy_volume_id,
            *rec.flagged_volume_ids}
    return {r for r in refs if r}


def _machine_refs(rec: InstanceRecord) -> set[str]:
    return {r for r in (rec.machine_id, rec.fenced_machine_id, rec.pending_destroy_machine_id) if r}


def classify(machines: list[Machine], volumes: list[Volume],
             records: list[InstanceRecord]) -> tuple[list[Orphan], list[str]]:
    """Orphans of our instances, and the ids of foreign resources (never touched)."""
    by_id = {r.id: r for r in records}
    by_volume_name = {volume_name(r): r for r in records}
    orphans: list[Orphan] = []
    foreign: list[str] = []
    for m in machines:
        if m.state in ("destroyed", "destroying"):
            continue
        rec = by_id.get(m.metadata.get(METADATA_INSTANCE, ""))
        if rec is None or m.metadata.get(METADATA_SANDBOX) != rec.sandbox_id:
            foreign.append(m.id)
            continue
        if rec.status in MOVING or m.id in _machine_refs(rec):
            continue
        reason = "instance destroyed" if rec.status == Status.DESTROYED else "not referenced by its instance"
        orphans.append(Orphan("machine", m.id, rec.id, reason, m.region))
    for v in volumes:
        if (v.state or "created") in ("destroyed", "destroying", "pending_destroy"):
            continue
        rec = by_volume_name.get(v.name or "")
        if rec is None:
            foreign.append(v.id)
            continue
        if rec.status in MOVING or v.id in _volume_refs(rec):
            continue
        reason = "instance destroyed" if rec.status == Status.DESTROYED else "not referenced by its instance"
        orphans.append(Orphan("volume", v.id, rec.id, reason, v.region))
    return orphans, foreign


class OrphanSweeper:
    """Runs the inventory every ``inventory_interval`` (0 disables it)."""

    def __init__(self, ctx: EngineContext, owner: str) -> None:
        self.ctx = ctx
        self.owner = owner
        self.last: dict[str, list[Orphan]] = {}  # app -> orphans seen at the last pass

    async def run(self) -> None:
        interval = self.ctx.settings.inventory_interval
        if interval <= 0:
            return
        while True:  # real-time waits, like the engine's other loops (the grace is on the engine's clock)
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a bug end the loop
                log.exception("orphans.sweep_crashed", error=str(exc))

    def _apps(self) -> dict[str, list[InstanceRecord]]:
        apps: dict[str, list[InstanceRecord]] = {}
        cursor: str | None = None
        while True:
            page = self.ctx.store.list_instances(include_destroyed=True, cursor=cursor, limit=500)
            for rec in page.items:
                apps.setdefault(rec.app_name, []).append(rec)
            cursor = page.next_cursor
            if not cursor:
                return apps

    async def sweep(self) -> int:
        """One inventory pass; returns the number of orphans deleted."""
        settings, provider = self.ctx.settings, self.ctx.provider
        deleted = 0
        for n, (app, records) in enumerate(sorted(self._apps().items())):
            if n >= settings.inventory_apps_per_pass:
                break
            if n and settings.inventory_app_pause > 0:
                await asyncio.sleep(settings.inventory_app_pause)
            try:
                machines = await provider.list_machines(app, metadata={})
                volumes = await provider.list_volumes(app)
            except NotFoundError:
                continue
            except RateLimitedError as exc:
                log.warning("orphans.rate_limited", app_name=app, error=str(exc))
                break
            except ProviderError as exc:
                log.warning("orphans.list_failed", app_name=app, error=str(exc))
                continue
            orphans, _foreign = classify(machines, volumes, records)
            self.last[app] = orphans
            deleted += await self._handle(app, orphans, records)
        known = self.ctx.store.list_orphans()
        for kind in ("machine", "volume"):
            metrics.ORPHANS.labels(kind=kind).set(sum(1 for o in known if o.kind == kind))
        return deleted

    async def _handle(self, app: str, orphans: list[Orphan], records: list[InstanceRecord]) -> int:
        """Record the sightings (one no longer seen is forgotten: the grace starts over if it returns), report
        the new ones and delete those whose grace has passed."""
        grace, now = self.ctx.settings.orphan_grace, self.ctx.clock.now()
        rows = self.ctx.store.record_orphans(app, [
            OrphanRecord(app_name=app, kind=o.kind, resource_id=o.resource_id, instance_id=o.instance_id,
                         region=o.region, reason=o.reason, first_seen_at=now, last_seen_at=now) for o in orphans], now)
        first_seen = {(r.kind, r.resource_id): r.first_seen_at for r in rows}
        deleted = 0
        for orphan in orphans:
            first = first_seen.get((orphan.kind, orphan.resource_id), now)
            if first == now:
                rec = next(r for r in records if r.id == orphan.instance_id)
                await self.ctx.emitter.aemit(rec, "reconcile.orphan_found", label=orphan.kind, level="warning",
                                             details={"resource_id": orphan.resource_id, "reason": orphan.reason,
                                                      "delete_after": (now + timedelta(seconds=grace)).isoformat()})
            if (now - first).total_seconds() >= grace and await self._delete(orphan):
                deleted += 1
                self.ctx.store.forget_orphan(app, orphan.kind, orphan.resource_id)
        return deleted

    async def _delete(self, orphan: Orphan) -> bool:
        lease = await claim(self.ctx, orphan.instance_id, f"{self.owner}/orphans", wait=0.0)
        if lease is None:
            return False
        try:
            rec = lease.record
            refs = _machine_refs(rec) if orphan.kind == "machine" else _volume_refs(rec)
            if rec.status in MOVING or orphan.resource_id in refs:
                return False  # referenced again meanwhile
            try:
                if orphan.kind == "machine":
                    await destroy_own_machine(self.ctx, rec, orphan.resource_id)
                else:
                    await safe_delete_volume(self.ctx, rec, orphan.resource_id)
            except Refused as exc:
                await self.ctx.emitter.aemit(rec, "reconcile.orphan_delete_refused", label=orphan.kind, level="error",
                                      error=str(exc), details={"resource_id": orphan.resource_id})
                return False
            except ProviderError as exc:
                log.warning("orphans.delete_failed", resource_id=orphan.resource_id, error=str(exc))
                return False
            await self.ctx.emitter.aemit(rec, "reconcile.orphan_deleted", label=orphan.kind, level="warning",
                                  details={"resource_id": orphan.resource_id, "reason": orphan.reason})
            return True
        finally:
            await asyncio.shield(lease.release())
