"""The reconcile dispatcher: route by status (SPEC §5), after the housekeeping every status shares.

``decide(record, observed, settings, now) -> list[Action]`` is pure; the executor runs it in a loop
(observe → decide → act) until a decision ends the pass (RequeueAfter / Backoff / Done).
"""

from __future__ import annotations

from datetime import datetime

from sandkeep.config import Settings
from sandkeep.engine import lifecycle, recovery
from sandkeep.engine.actions import Action, DeleteVolumeSafely, Done, Emit, Observed, Persist
from sandkeep.store.records import InstanceRecord, Status


def housekeeping(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """SPEC §5 "Always": leftover pending recovery volume (never while recovering), due retained volume."""
    if record.status in (Status.RECOVERING, Status.DESTROYING, Status.DESTROYED):
        return []
    pending = record.pending_recovery_volume_id
    if pending:
        if pending in (record.volume_id, record.retained_volume_id):
            return [Persist({"pending_recovery_volume_id": None})]  # it is in use: just forget the pointer
        if obs.outcome(DeleteVolumeSafely(pending)) is None:
            return [DeleteVolumeSafely(pending, reason="leftover_pending_recovery_volume",
                                       clear={"pending_recovery_volume_id": None})]
    retained = record.retained_volume_id
    due = record.retained_volume_cleanup_after
    if retained and due is not None and due <= now:
        if retained == record.volume_id:
            return [Persist({"retained_volume_id": None, "retained_volume_cleanup_after": None})]
        if obs.outcome(DeleteVolumeSafely(retained)) is None:
            return [DeleteVolumeSafely(retained, reason="alarm_retained_recovery_cleanup",
                                       clear={"retained_volume_id": None, "retained_volume_cleanup_after": None}),
                    Emit("instance.retained_volume_deleted", label="alarm_retained_recovery_cleanup",
                         details={"deleted_volume_id": retained})]
    return []


def decide(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    status = record.status
    if status == Status.DESTROYED:
        return [Persist({"alarm_at": None}), Done()] if record.alarm_at is not None else [Done()]
    if status == Status.DESTROYING:
        return lifecycle.decide_destroying(record, obs, settings, now)
    chores = housekeeping(record, obs, settings, now)
    if chores:
        return chores
    if status == Status.RECOVERING:
        return recovery.decide(record, obs, settings, now)
    if status in (Status.STARTING, Status.RESTARTING):
        return lifecycle.decide_starting(record, obs, settings, now)
    if status == Status.RUNNING:
        return lifecycle.decide_running(record, obs, settings, now)
    if status == Status.STOPPED:
        return lifecycle.decide_stopped(record, obs, settings, now)
    return lifecycle.decide_provisioned(record, obs, settings, now)
