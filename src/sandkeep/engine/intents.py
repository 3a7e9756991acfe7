"""User and admin intents as pure decisions, beside :mod:`sandkeep.engine.lifecycle`.

Each is a function of the claimed record (and the time) that either refuses with a
:class:`~sandkeep.engine.service.ServiceError` or returns the same action types the reconcile decisions
return; :class:`sandkeep.engine.instances.InstanceService` runs them under the instance's lease with the
executor (:class:`sandkeep.engine.executor.Pass`, ``intent=True``). Only the admin actions carry a provider
effect (retained-volume cleanup, destroy machine); the user intents persist the intent and an alarm due now,
and the reconcile pass does the work.
"""

from __future__ import annotations

from datetime import datetime

from sandkeep.engine import recovery
from sandkeep.engine.actions import Action, Changes, DeleteVolumeSafely, DestroyMachine, Emit, Persist
from sandkeep.engine.service import InstanceBusy, InvalidTransition, RecoveringRefused
from sandkeep.store.records import InstanceRecord, Status


def gate(record: InstanceRecord, action: str) -> None:
    """Start/stop/restart are refused on a destroyed instance and while it is busy (SPEC §3)."""
    if record.status == Status.DESTROYED:
        raise InvalidTransition(f"instance {record.id} is destroyed")
    if record.busy:
        raise InstanceBusy(f"instance {record.id} is {record.status.value}; {action} is refused while busy",
                           status=record.status.value, instance_status=record.status.value)


def provision_start(record: InstanceRecord, now: datetime) -> list[Action]:
    """A fresh instance moves to ``starting`` (nothing when a worker already moved it on)."""
    if record.status != Status.PROVISIONED:
        return []
    return [Persist({"status": Status.STARTING, "alarm_at": now}),
            Emit("instance.start_requested", label="provision")]


def start(record: InstanceRecord, now: datetime) -> list[Action]:
    gate(record, "start")
    if record.status not in (Status.STOPPED, Status.PROVISIONED):
        raise InvalidTransition(f"instance {record.id} is already {record.status.value}", status=record.status.value)
    return [Persist({"status": Status.STARTING, "pending_action": "start", "alarm_at": now}),
            Emit("instance.start_requested", label="user_request")]


def stop(record: InstanceRecord, now: datetime) -> list[Action]:
    gate(record, "stop")
    if record.status != Status.RUNNING:
        raise InvalidTransition(f"instance {record.id} is {record.status.value}, not running",
                                status=record.status.value)
    if record.pending_action == "stop":
        return []
    return [Persist({"pending_action": "stop", "alarm_at": now}),
            Emit("instance.stop_requested", label="user_request")]


def restart(record: InstanceRecord, now: datetime) -> list[Action]:
    gate(record, "restart")
    if record.status not in (Status.RUNNING, Status.STOPPED):
        raise InvalidTransition(f"instance {record.id} is {record.status.value}; restart needs running or stopped",
                                status=record.status.value)
    return [Persist({"status": Status.RESTARTING, "pending_action": "restart", "alarm_at": now}),
            Emit("instance.restarting", label="user_request")]


def check_destroy(record: InstanceRecord, *, force: bool) -> None:
    """Destroy is refused on a destroyed instance, and while recovering unless an admin forces it (SPEC §8)."""
    if record.status == Status.DESTROYED:
        raise InvalidTransition(f"instance {record.id} is already destroyed")
    if record.status == Status.RECOVERING and not force:
        raise RecoveringRefused(f"instance {record.id} is recovering; destroy is refused until the recovery ends "
                                f"(admins may force it)", status=record.status.value)


def destroy(record: InstanceRecord, now: datetime, *, force: bool) -> list[Action]:
    """Phase one of the two-phase destroy: persist what to delete; the ``destroying`` pass deletes it."""
    check_destroy(record, force=force)
    if record.status == Status.DESTROYING:
        return []
    forced = record.status == Status.RECOVERING
    return [Persist({"status": Status.DESTROYING, "pending_destroy_machine_id": record.machine_id,
                     "pending_destroy_volume_id": record.volume_id, "pending_action": None,
                     "destroy_volume_attempts": 0, "alarm_at": now}),
            Emit("instance.destroy_started", label="admin_force" if forced else "user_request")]


def retry_recovery(record: InstanceRecord, now: datetime) -> tuple[str, list[Action]]:
    """Admin: a stopped instance whose recovery failed starts a new recovery; anything else is reconciled now.
    Returns the mode (``restarted`` | ``alarm_now``) and the actions."""
    if record.status in (Status.DESTROYING, Status.DESTROYED):
        raise InvalidTransition(f"instance {record.id} is {record.status.value}")
    if record.status == Status.STOPPED and record.last_recovery_error and record.volume_id:
        return "restarted", [Persist({**recovery.restart_fields(now), "alarm_at": now}),
                             Emit(recovery.EVENT_STARTED, label="admin_retry", value=0.0)]
    return "alarm_now", [Persist({"alarm_at": now})]


def cleanup_retained_volume(record: InstanceRecord, actor_id: str) -> list[Action]:
    """Admin (SPEC §7.7): delete the retained volume now through the 7.5 safe delete; refused while recovering."""
    if record.status == Status.RECOVERING:
        raise RecoveringRefused(f"instance {record.id} is recovering; retained volume cleanup is refused")
    volume_id = record.retained_volume_id
    if not volume_id:
        return []
    return [DeleteVolumeSafely(volume_id, reason="admin_retained_volume_cleanup",
                               clear={"retained_volume_id": None, "retained_volume_cleanup_after": None}),
            Emit("instance.retained_volume_deleted", label="admin_retained_volume_cleanup",
                 details={"deleted_volume_id": volume_id, "actor": actor_id})]


def destroy_machine(record: InstanceRecord, now: datetime, actor_id: str) -> list[Action]:
    """Admin: force-destroy the instance's machine (never one naming another sandbox); reconcile follows."""
    if record.status in (Status.DESTROYING, Status.DESTROYED):
        raise InvalidTransition(f"instance {record.id} is {record.status.value}")
    if not record.machine_id:
        raise InvalidTransition(f"instance {record.id} has no machine")
    return [DestroyMachine(record.machine_id, clear={"machine_id": None, "alarm_at": now}, label="admin",
                           details=(("actor", actor_id),))]


def rotate_gateway_token(record: InstanceRecord, now: datetime, actor_id: str, new_token: str) -> list[Action]:
    """Admin: a new gateway token (SPEC §13; ``new_token`` already encrypted). A running instance restarts so
    its machine gets the token at once; a stopped one gets it at its next start. Refused while busy."""
    gate(record, "gateway token rotation")
    changes: Changes = {"gateway_token_encrypted": new_token, "config_generation": record.config_generation + 1}
    restart = record.status == Status.RUNNING
    if restart:
        changes.update({"status": Status.RESTARTING, "pending_action": "restart", "alarm_at": now})
    actions: list[Action] = [Persist(changes), Emit("instance.gateway_token_rotated", label="admin",
                                                    details={"actor": actor_id, "restart": restart})]
    if restart:
        actions.append(Emit("instance.restarting", label="gateway_token_rotation"))
    return actions
