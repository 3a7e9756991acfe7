"""Dead hosts (SPEC §15): suspicion, the grace, the restore policy, fencing the old machine, flagging the old volume.

Pure decisions, like :mod:`sandkeep.engine.lifecycle` and :mod:`sandkeep.engine.recovery`:

1. **Suspect** (:func:`running_started`) — a ``running`` instance whose machine says ``started`` but whose host
   is ``unreachable`` (Fly's ``host_status``), or whose gateway failed ``health_fail_threshold`` probes in a row,
   is suspect: ``suspect_since`` is persisted and ``instance.host_unreachable`` (or
   ``instance.gateway_unresponsive``) emitted. A healthy answer before the grace ends clears it
   (``instance.host_recovered``).
2. **Grace** — after ``dead_host_grace`` the instance is relocated by the usual recovery (SPEC §7), whose fork is
   impossible on a dead host, so it restores the newest snapshot. With ``snapshot_restore_policy=approve`` an
   unreachable host's instance waits instead, visibly (``restore_approval = "awaiting"``, event
   ``instance.restore_awaiting_approval``), until an admin approves (``instance.restore_approved``).
3. **Fence** (:func:`fence`) — the recovery cannot destroy a machine on a dead host: it is remembered as
   ``fenced_machine_id`` and destroyed as soon as its host answers again, before anything else the pass decides
   (``instance.old_machine_fenced``). Traffic never goes to it: sandkeep routes by ``machine_id`` only. When the
   recovery failed (no snapshot) and the instance still lives on the old volume, the returning machine is the
   instance's own again and is adopted instead.
4. **Flag** (:func:`flag_old_volume`) — after a snapshot restore the old volume may hold writes newer than the
   snapshot: it joins ``flagged_volume_ids`` and is never deleted automatically (invariant 9); an admin deletes
   it. The owner's page shows ``incident_note``, which says what happened and what was lost.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from sandkeep.config import Settings
from sandkeep.engine.actions import (
    Action,
    Changes,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Emit,
    Observed,
    Persist,
    ProbeHealth,
    RequeueAfter,
    TakeSnapshot,
)
from sandkeep.engine.naming import volume_name
from sandkeep.provider.models import Machine
from sandkeep.store.records import InstanceRecord, Status

HOST_UNREACHABLE = "host_unreachable"
HEALTH_FAILED = "health_failed"
#: set at a cutover after a health relocation whose new gateway was not healthy either: the gateway itself (not
#: the host) is the problem, so health failures no longer relocate until a probe succeeds (no relocation churn)
HEALTH_UNCONFIRMED = "health_unconfirmed"
AWAITING = "awaiting"
APPROVED = "approved"

EVENT_HOST_UNREACHABLE = "instance.host_unreachable"
EVENT_GATEWAY_UNRESPONSIVE = "instance.gateway_unresponsive"
EVENT_HOST_RECOVERED = "instance.host_recovered"
EVENT_AWAITING_APPROVAL = "instance.restore_awaiting_approval"
EVENT_APPROVED = "instance.restore_approved"
EVENT_FENCED = "instance.old_machine_fenced"
EVENT_FLAGGED = "instance.old_volume_flagged"
EVENT_FLAGGED_DELETED = "instance.flagged_volume_deleted"

UNREACHABLE_STATUSES = frozenset({"unreachable", "unknown"})

#: cleared when a suspicion ends (host back, recovery over)
CLEAR_SUSPECT: Changes = {"suspect_since": None, "suspect_reason": None, "restore_approval": None}


def host_unreachable(machine: Machine | None) -> bool:
    return machine is not None and (machine.host_status or "ok") == "unreachable"


def host_down(machine: Machine | None) -> bool:
    """The machine's host does not answer actions (``unreachable``, or ``unknown``: Fly cannot tell)."""
    return machine is not None and (machine.host_status or "ok") in UNREACHABLE_STATUSES


def _iso(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC") if when is not None else "an unknown time"


# ---------------------------------------------------------------------------------------------- 1-2


def running_started(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action] | None:
    """``running`` and the machine says ``started``: None when all is well (the caller goes on), else what to do
    about a suspect instance."""
    machine = obs.machine
    assert machine is not None
    if host_unreachable(machine):
        reason = HOST_UNREACHABLE
    else:
        if settings.health_fail_threshold <= 0:
            return _recovered(record, settings, "no_probe") if record.suspect_since else None
        probe = obs.outcome(ProbeHealth(machine.id))
        if probe is None:
            return [ProbeHealth(machine.id, timeout=0.0)]  # one probe, no waiting
        if probe.value:
            if record.suspect_reason == HEALTH_UNCONFIRMED:
                return [Persist({"suspect_reason": None}), RequeueAfter(settings.interval_running)]
            return _recovered(record, settings, "healthy") if record.suspect_since else None
        if record.suspect_reason == HEALTH_UNCONFIRMED:
            return None  # never healthy since the last health relocation: moving again would not help
        count = record.health_fail_count + 1
        if record.suspect_since is None and count < settings.health_fail_threshold:
            return [Persist({"health_fail_count": count}),
                    Emit("reconcile.gateway_unhealthy", level="warning", value=float(count),
                         details={"machine_id": machine.id, "threshold": settings.health_fail_threshold}),
                    RequeueAfter(min(settings.interval_busy, settings.interval_running))]
        reason = record.suspect_reason or HEALTH_FAILED
    if record.suspect_since is None:
        event = EVENT_HOST_UNREACHABLE if reason == HOST_UNREACHABLE else EVENT_GATEWAY_UNRESPONSIVE
        return [Persist({"suspect_since": now, "suspect_reason": reason, "health_fail_count": 0}),
                Emit(event, label=reason, level="warning",
                     details={"machine_id": machine.id, "host_status": machine.host_status,
                              "machine_state": machine.state, "grace_s": settings.dead_host_grace})]
        # (no terminal action: the pass decides again, now with suspect_since set; a zero grace relocates at once)
    if reason == HOST_UNREACHABLE and record.suspect_reason != HOST_UNREACHABLE:
        return [Persist({"suspect_reason": HOST_UNREACHABLE}),
                Emit(EVENT_HOST_UNREACHABLE, label=reason, level="warning",
                     details={"machine_id": machine.id, "host_status": machine.host_status})]
    elapsed = (now - record.suspect_since).total_seconds()
    if elapsed < settings.dead_host_grace:
        return [RequeueAfter(max(0.5, min(settings.dead_host_grace - elapsed, settings.interval_running)))]
    if reason == HOST_UNREACHABLE and settings.snapshot_restore_policy == "approve" \
            and record.restore_approval != APPROVED:
        if record.restore_approval == AWAITING:
            return [RequeueAfter(settings.interval_running)]
        note = (f"The host of this instance stopped answering at {_iso(record.suspect_since)}. Moving it elsewhere "
                f"means restoring its newest snapshot, which loses what was written since; it waits for an "
                f"administrator to approve that (or for the host to come back).")
        return [Persist({"restore_approval": AWAITING, "incident_note": note}),
                Emit(EVENT_AWAITING_APPROVAL, label=reason, level="warning",
                     details={"machine_id": machine.id, "suspect_since": record.suspect_since.isoformat()}),
                RequeueAfter(settings.interval_running)]
    return None  # the caller begins the recovery (label alarm_<reason>)


def begin_label(record: InstanceRecord) -> str:
    return f"alarm_{record.suspect_reason or HOST_UNREACHABLE}"


def _recovered(record: InstanceRecord, settings: Settings, how: str) -> list[Action]:
    changes: Changes = {**CLEAR_SUSPECT, "health_fail_count": 0}
    if record.restore_approval is not None:  # the owner was told it waits: say how it ended
        changes["incident_note"] = (f"The host of this instance stopped answering at {_iso(record.suspect_since)} "
                                    f"and came back; nothing was lost.")
    return [Persist(changes),
            Emit(EVENT_HOST_RECOVERED, label=how,
                 details={"suspect_since": record.suspect_since.isoformat() if record.suspect_since else None,
                          "reason": record.suspect_reason}),
            RequeueAfter(settings.interval_running)]


def approve(record: InstanceRecord, now: datetime, actor_id: str) -> list[Action]:
    """Admin: approve the data-losing snapshot restore of an instance that awaits it (the caller checks that)."""
    return [Persist({"restore_approval": APPROVED, "alarm_at": now}),
            Emit(EVENT_APPROVED, label="admin", details={"actor": actor_id,
                                                         "suspect_since": record.suspect_since.isoformat()
                                                         if record.suspect_since else None})]


# ---------------------------------------------------------------------------------------------- snapshots


def _spread(instance_id: str) -> float:
    """A stable fraction in [0, 1) per instance: spreads the fleet's snapshots over the interval."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def snapshot_due(record: InstanceRecord, settings: Settings, now: datetime) -> bool:
    """sandkeep's own snapshot of a running instance's volume is due (SANDKEEP_SNAPSHOT_INTERVAL, 0 = never):
    an interval after the last one; the first at a stable offset into the interval after the start."""
    interval = settings.snapshot_interval
    if interval <= 0 or not record.volume_id:
        return False
    if record.last_snapshot_at is not None:
        return (now - record.last_snapshot_at).total_seconds() >= interval
    since = record.last_started_at or record.created_at
    return (now - since).total_seconds() >= _spread(record.id) * interval


def take_snapshot(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action] | None:
    """Running and healthy: take the periodic snapshot when due (once per pass; a failure waits for the next)."""
    if not snapshot_due(record, settings, now) or record.volume_id is None:
        return None
    if obs.outcome(TakeSnapshot(record.volume_id)) is not None:
        return None
    return [TakeSnapshot(record.volume_id), Persist({"last_snapshot_at": now})]


# ---------------------------------------------------------------------------------------------- 3


def fence(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """The old machine of a dead host: destroyed as soon as its host answers (before anything else)."""
    fid = record.fenced_machine_id
    if not fid or record.status == Status.DESTROYED:
        return []
    machine = obs.fenced_machine
    if obs.fenced_machine_missing or (machine is not None and machine.state == "destroyed"):
        return [Persist({"fenced_machine_id": None}),
                Emit(EVENT_FENCED, label="gone", details={"machine_id": fid})]
    if machine is None or host_down(machine):
        return []  # still dead (or the read failed): look again at the next pass
    if (record.status == Status.STOPPED and record.machine_id is None and record.volume_id
            and record.volume_id in machine.volume_ids):
        # the recovery never moved the instance (no snapshot): the returning machine is its own again
        return [Persist({"machine_id": fid, "fenced_machine_id": None, "incident_note": None}),
                Emit("reconcile.adopt_returned_machine", details={"machine_id": fid, "state": machine.state})]
    outcome = obs.outcome(DestroyMachine(fid))
    if outcome is None:
        return [DestroyMachine(fid, clear={"fenced_machine_id": None}, label="fence",
                               details=(("reason", "old_host_returned"),)),
                Emit(EVENT_FENCED, label="host_back", level="warning",
                     details={"machine_id": fid, "state": machine.state, "region": machine.region})]
    return []  # the destroy failed: the next pass tries again


def fence_instead_of_destroy(record: InstanceRecord, machine: Machine, next_step: str) -> list[Action]:
    """Recovery step 2 on a dead host: the machine cannot be destroyed now; remember it and move on."""
    return [Persist({"fenced_machine_id": machine.id, "machine_id": None, "recovery_step": next_step}),
            Emit("reconcile.old_machine_fence_pending", level="warning",
                 details={"machine_id": machine.id, "host_status": machine.host_status})]


# ---------------------------------------------------------------------------------------------- 4


def flag_old_volume(record: InstanceRecord, old_volume_id: str, now: datetime) -> tuple[Changes, list[Action]]:
    """Cutover after a snapshot restore: the old volume is flagged for an admin, never deleted here."""
    flagged = list(record.flagged_volume_ids)
    if old_volume_id not in flagged:
        flagged.append(old_volume_id)
    since = record.suspect_since
    point = record.recovery_point or "an unknown time"
    if since is not None:
        what = f"The host of this instance stopped answering at {_iso(since)}."
    else:
        what = "The disk of this instance could not be copied (its host did not answer)."
    note = (f"{what} It was moved to another host on {_iso(now)}, restored from a snapshot taken at {point}: "
            f"anything written after that is not on the running instance. The old disk is kept (not deleted) "
            f"until an administrator decides what to do with it.")
    changes: Changes = {"flagged_volume_ids": flagged, "recovery_point": None, "incident_note": note,
                        **CLEAR_SUSPECT}
    return changes, [Emit(EVENT_FLAGGED, label="snapshot_restore", level="warning",
                          details={"volume_id": old_volume_id, "recovery_point": record.recovery_point,
                                   "never_deleted_automatically": True})]


def delete_flagged(record: InstanceRecord, volume_id: str, actor_id: str) -> list[Action]:
    """Admin: delete one flagged old volume (the 7.5 safe delete); its id leaves the list once it is gone."""
    remaining = [v for v in record.flagged_volume_ids if v != volume_id]
    return [DeleteVolumeSafely(volume_id, reason="admin_flagged_volume_delete",
                               clear={"flagged_volume_ids": remaining}),
            Emit(EVENT_FLAGGED_DELETED, label="admin", details={"deleted_volume_id": volume_id, "actor": actor_id})]


# ---------------------------------------------------------------------------------------------- admin restore


def admin_restore(record: InstanceRecord, now: datetime, *, actor_id: str, retention: float, region: str,
                  size_gb: int | None, snapshot_id: str | None = None,
                  source_volume_id: str | None = None) -> list[Action]:
    """Admin: put the instance on a new volume restored from ``snapshot_id`` (or forked from a flagged/retained
    ``source_volume_id``), sized from the source. The previous volume is retained (its own retention); a volume
    retained before is flagged rather than forgotten. The machine on the previous volume is destroyed; a running
    instance starts again on the new volume. (The caller checks the status and the source.)"""
    previous = record.volume_id
    flagged = list(record.flagged_volume_ids)
    if record.retained_volume_id and record.retained_volume_id not in (previous, *flagged):
        flagged.append(record.retained_volume_id)
    changes: Changes = {"retained_volume_id": previous, "flagged_volume_ids": flagged,
                        "retained_volume_cleanup_after": now + timedelta(seconds=retention) if previous else None,
                        "last_snapshot_at": None, "alarm_at": now}
    if record.status == Status.RUNNING:
        changes.update({"status": Status.STARTING, "pending_action": "start"})
    actions: list[Action] = [
        CreateVolume(purpose="admin_restore", name=volume_name(record), regions=(region,), assign="volume_id",
                     assign_region=True, size_gb=size_gb, snapshot_id=snapshot_id, source_volume_id=source_volume_id,
                     compute_size=record.machine_size, extra=changes)]
    if record.machine_id:
        actions.append(DestroyMachine(record.machine_id, clear={"machine_id": None}, label="admin_restore"))
    actions.append(Emit("instance.admin_restore", label="snapshot" if snapshot_id else "volume_fork",
                        level="warning", details={"actor": actor_id, "snapshot_id": snapshot_id,
                                                  "source_volume_id": source_volume_id,
                                                  "previous_volume_id": previous, "size_gb": size_gb}))
    return actions
