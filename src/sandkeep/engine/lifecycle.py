"""Lifecycle decisions (SPEC §3, §5, §8): starting/restarting, running, stopped, provisioned, destroying.

Pure functions ``(record, Observed, settings, now) -> list[Action]``; recovery lives in
:mod:`sandkeep.engine.recovery`, the routing in :mod:`sandkeep.engine.reconcile`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from sandkeep.config import Settings
from sandkeep.engine import deadhost, recovery
from sandkeep.engine.actions import (
    Action,
    Changes,
    CreateMachine,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Done,
    Emit,
    EnsureApp,
    FindVolumes,
    Needs,
    Observed,
    Persist,
    ProbeHealth,
    RequeueAfter,
    RestartMachine,
    RotateGatewayToken,
    StartMachine,
    StopMachine,
    UpdateMachine,
    WaitMachine,
    usable_own_volumes,
)
from sandkeep.engine.naming import machine_generation, machine_name, volume_name
from sandkeep.engine.policy import GONE_STATES, PROGRESS_STATES, creation_regions
from sandkeep.provider.errors import NotFoundError, WaitTimeoutError
from sandkeep.provider.models import Machine
from sandkeep.store.records import InstanceRecord, Status

VolumeHolder = Literal["pending_destroy_volume_id", "volume_id", "pending_recovery_volume_id", "retained_volume_id"]

RESTART_ISSUED = "restart_issued"
#: set on running instances by a clean ``serve`` shutdown that takes its local host down with it: the
#: machine's stop that follows is planned, so it is started again in place instead of being relocated
RESUME_AFTER_HOST_RESTART = "resume_after_host_restart"


def _machine_gone(obs: Observed) -> bool:
    return obs.machine_missing or (obs.machine is not None and obs.machine.state in GONE_STATES)


def _needs_update(record: InstanceRecord, machine: Machine) -> bool:
    if record.volume_id and record.volume_id not in machine.volume_ids:
        return True
    if machine.config is not None and machine.config.image != record.image:
        return True
    return machine_generation(machine.metadata) != record.config_generation


def _pick_owned(record: InstanceRecord, obs: Observed) -> Machine | None:
    # never the fenced old machine of a dead host (SPEC 15: no traffic; only the fence decides about it, once its
    # host answers)
    owned = [m for m in obs.owned_machines if m.state not in GONE_STATES and m.id != record.fenced_machine_id]
    if not owned:
        return None
    on_volume = [m for m in owned if record.volume_id and record.volume_id in m.volume_ids]
    started = [m for m in (on_volume or owned) if m.state == "started"]
    return (started or on_volume or owned)[-1]


def _adopt_orphan(record: InstanceRecord, obs: Observed) -> list[Action] | None:
    machine = _pick_owned(record, obs)
    if machine is None:
        return None
    return [Persist({"machine_id": machine.id}),
            Emit("reconcile.adopt_orphan_machine", details={"machine_id": machine.id, "state": machine.state})]


def _is_stale_provision(record: InstanceRecord, settings: Settings, now: datetime) -> bool:
    return (record.status in (Status.PROVISIONED, Status.STOPPED) and record.last_started_at is None
            and now - record.created_at > timedelta(seconds=settings.stale_provision_after))


def auto_destroy(record: InstanceRecord) -> list[Action]:
    return [Emit("reconcile.auto_destroy_stale_provision", details={"created_at": record.created_at.isoformat()}),
            Persist({"status": Status.DESTROYING, "pending_destroy_machine_id": record.machine_id,
                     "pending_destroy_volume_id": record.volume_id, "pending_action": None}),
            Emit("instance.destroy_started", label="stale_provision")]


def _not_candidates(record: InstanceRecord) -> tuple[str | None, ...]:
    return (record.volume_id, record.retained_volume_id, record.pending_recovery_volume_id,
            *record.flagged_volume_ids)


def replace_lost_volume(record: InstanceRecord, obs: Observed, settings: Settings) -> list[Action]:
    """The volume is gone (404). Never start on an empty volume over existing data (SPEC §15, invariant 10):
    adopt the newest usable volume of the instance's own name first; if that lookup fails for an instance that
    has started before, fail closed (no volume is created); only a truly missing volume is replaced by an empty
    one, loudly (``instance.data_loss``)."""
    lost = record.volume_id
    if obs.outcome(CreateVolume("replacement")) is None:
        found = obs.outcome(FindVolumes())
        if found is None:
            return [FindVolumes()]
        if found.ok:
            own = frozenset({obs.machine.id} if obs.machine is not None else set())
            candidates = usable_own_volumes(list(found.value or []), exclude=_not_candidates(record),
                                            own_machines=own)
            if candidates:
                volume = candidates[0]
                return [Persist({"volume_id": volume.id, "region": volume.region or record.region}),
                        Emit("reconcile.adopt_volume", label="lost_volume_id", level="warning",
                             details={"lost_volume_id": lost, "volume_id": volume.id,
                                      "created_at": volume.created_at})]
        elif record.last_started_at is not None:
            return [Emit("reconcile.volume_lookup_failed", level="error",
                         error=f"volume {lost} is gone and the volumes of this instance cannot be listed "
                               f"({found.message}); no empty volume is created over data that may exist",
                         details={"lost_volume_id": lost}),
                    RequeueAfter(settings.interval_busy)]
    created = obs.outcome(CreateVolume("replacement"))
    if created is not None and not created.ok:
        return [Emit("reconcile.replace_lost_volume_failed", level="error", error=created.message),
                RequeueAfter(settings.interval_busy)]
    preferred = obs.machine.region if obs.machine is not None and obs.machine.region else record.region
    return [CreateVolume(purpose="replacement", name=volume_name(record),
                         regions=creation_regions(settings.region_list, preferred), assign="volume_id",
                         assign_region=True, size_gb=settings.volume_size_gb, compute_size=record.machine_size),
            Emit("instance.data_loss", label="volume_missing", level="error",
                 error=f"volume {lost} is gone; the instance continues on an empty replacement volume",
                 details={"lost_volume_id": lost}),
            Emit("reconcile.replace_lost_volume", details={"lost_volume_id": lost})]


# ------------------------------------------------------------------------------------------ starting


def start_failed(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime, *, label: str,
                 error: str, clear_machine: bool = False) -> list[Action]:
    actions: list[Action] = []
    machine = obs.machine
    if (machine is not None and not clear_machine and machine.state in ("started", "starting")
            and obs.outcome(StopMachine(machine.id)) is None):
        actions.append(StopMachine(machine.id))  # never leave a half-started machine behind a stopped record
    changes: Changes = {"status": Status.STOPPED, "last_stopped_at": now, "pending_action": None}
    if clear_machine:
        changes["machine_id"] = None
    what = "restart" if record.status == Status.RESTARTING else "start"
    actions += [Persist(changes),
                Emit("instance.start_failed", label=label, error=error, level="error", details={"action": what}),
                RequeueAfter(settings.interval_idle)]
    return actions


def _starting_elapsed(record: InstanceRecord, now: datetime) -> float:
    return (now - (record.status_changed_at or record.updated_at)).total_seconds()


def needs_starting(record: InstanceRecord) -> Needs:
    return Needs(machine=bool(record.machine_id), volume=bool(record.volume_id),
                 owned_machines=record.machine_id is None, named_volumes=record.volume_id is None)


def deadlines_starting(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """The hard start timeout ends a start whatever the provider says (even when it cannot be read)."""
    elapsed = _starting_elapsed(record, now)
    if elapsed > settings.start_hard_timeout:
        verb = "restart" if record.status == Status.RESTARTING else "start"
        return start_failed(record, obs, settings, now, label="timeout",
                            error=f"{verb} timed out after {int(elapsed)} s (hard limit)")
    return []


def on_transient_starting(record: InstanceRecord, obs: Observed, settings: Settings,
                          now: datetime) -> list[Action] | None:
    """A provider that keeps failing past the start timeout fails the start (naming the error); before that
    the usual backoff (None)."""
    elapsed = _starting_elapsed(record, now)
    if elapsed <= settings.start_timeout:
        return None
    verb = "restart" if record.status == Status.RESTARTING else "start"
    latest = str(obs.transient)[:500]
    return [Persist({"last_provider_error": latest, "last_provider_error_at": now}),
            *start_failed(record, obs, settings, now, label="provider_error",
                          error=f"{verb} timed out after {int(elapsed)} s: the provider kept failing: {latest}")]


def _provision_app_and_volume(record: InstanceRecord, obs: Observed, settings: Settings,
                              now: datetime) -> list[Action] | None:
    """The first steps of a start: the provider app, then the volume (adopted before created). None when both
    are there already."""
    # the provider app
    if record.volume_id is None or record.machine_id is None:
        app = obs.outcome(EnsureApp())
        if app is None:
            return [EnsureApp()]
        if not app.ok:
            return start_failed(record, obs, settings, now, label="app_failed",
                                error=f"cannot create the provider app {record.app_name}: {app.message}")
    # the volume: persist-then-create is implicit (the name is derived from the id); adopt before creating
    if record.volume_id is None:
        ours = frozenset(m.id for m in obs.owned_machines)
        free = usable_own_volumes(obs.named_volumes, exclude=_not_candidates(record), own_machines=ours)
        free.sort(key=lambda v: v.attached_machine_id is None)  # (stable) one our machine mounts, else the newest
        if free:
            volume = free[0]
            return [Persist({"volume_id": volume.id, "region": volume.region}),
                    Emit("reconcile.adopt_volume", details={"volume_id": volume.id})]
        if record.last_started_at is not None and obs.outcome(CreateVolume("primary")) is None:
            # it ran before and no volume of its own is left: an empty volume now is data loss, said loudly
            return [Emit("instance.data_loss", label="volume_missing", level="error",
                         error="no volume of this instance is left; it continues on an empty volume"),
                    *_create_primary(record, settings)]
        created = obs.outcome(CreateVolume("primary"))
        if created is not None and not created.ok:
            return start_failed(record, obs, settings, now, label="volume_create_failed",
                                error=f"cannot create the volume: {created.message}")
        return _create_primary(record, settings)
    return None


def _create_primary(record: InstanceRecord, settings: Settings) -> list[Action]:
    return [CreateVolume(purpose="primary", name=volume_name(record),
                         regions=creation_regions(settings.region_list, record.region), assign="volume_id",
                         assign_region=True, size_gb=settings.volume_size_gb, compute_size=record.machine_size),
            Emit("reconcile.create_volume")]


def decide_starting(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """``starting`` and ``restarting``: follow the machine, apply the timeouts; 404 means stopped."""
    restarting = record.status == Status.RESTARTING
    elapsed = _starting_elapsed(record, now)
    verb = "restart" if restarting else "start"
    machine = obs.machine
    if elapsed > settings.start_timeout and not (machine is not None and machine.state in PROGRESS_STATES):
        cause = f": last provider error: {record.last_provider_error}" if record.last_provider_error else ""
        return start_failed(record, obs, settings, now, label="timeout",
                            error=f"{verb} timed out after {int(elapsed)} s{cause}")
    provisioned = _provision_app_and_volume(record, obs, settings, now)
    if provisioned is not None:
        return provisioned
    assert record.volume_id is not None  # _provision_app_and_volume answers for a record without one
    if obs.volume_missing:
        if (machine is not None and record.volume_id in machine.volume_ids and machine.state != "started"
                and obs.outcome(DestroyMachine(machine.id)) is None):
            # the machine mounts a volume that is gone: replace both
            return [DestroyMachine(machine.id, clear={"machine_id": None}), *replace_lost_volume(record, obs,
                                                                                                    settings)]
        return replace_lost_volume(record, obs, settings)
    # the machine
    if record.machine_id is None:
        adopt = _adopt_orphan(record, obs)
        if adopt is not None:
            return adopt
        created = obs.outcome(CreateMachine("primary"))
        if created is not None and not created.ok:
            # (a MissingVolumeError ends here too: the next reconcile sees the volume missing and replaces it)
            return start_failed(record, obs, settings, now, label="machine_create_failed",
                                error=f"cannot create the machine: {created.message}")
        region = obs.volume.region if obs.volume is not None and obs.volume.region else record.region
        return [CreateMachine(purpose="primary", name=machine_name(record), volume_id=record.volume_id,
                              region=region)]
    if _machine_gone(obs) or machine is None:
        return start_failed(record, obs, settings, now, label="machine_gone",
                            error=f"machine {record.machine_id} is gone", clear_machine=True)
    mid = machine.id
    issued_effects: tuple[tuple[str, UpdateMachine | RestartMachine | StartMachine], ...] = (
        ("update", UpdateMachine(mid)), ("restart", RestartMachine(mid)), ("start", StartMachine(mid)))
    for verb_done, effect in issued_effects:
        outcome = obs.outcome(effect)
        if outcome is not None and not outcome.ok:
            return start_failed(record, obs, settings, now, label=f"{verb_done}_failed",
                                error=f"{verb_done} of machine {mid} failed: {outcome.message}")
    if record.gateway_token_encrypted is None and obs.outcome(RotateGatewayToken()) is None:
        # an instance from before gateway tokens (SPEC §13): give it one; the generation bump makes the
        # machine updated with it before it starts
        return [RotateGatewayToken(reason="missing")]
    state = machine.state
    if restarting and record.pending_action == "restart":
        issued: list[Action] = []
        if _needs_update(record, machine):
            # as on Fly, the update (re)launches the machine: a running one restarts, a stopped one starts (no
            # start of our own to collide with it; should it stay stopped, the stopped rule below starts it)
            issued.append(UpdateMachine(mid, record.volume_id))
        elif state in ("started", "starting"):
            issued.append(RestartMachine(mid))
        else:
            issued.append(StartMachine(mid))
        return [*issued, Persist({"pending_action": RESTART_ISSUED})]
    if state == "started":
        if _needs_update(record, machine) and obs.outcome(UpdateMachine(mid)) is None and not restarting:
            return [UpdateMachine(mid, record.volume_id)]
        probe = obs.outcome(ProbeHealth(mid))
        if probe is None:
            return [ProbeHealth(mid, timeout=settings.health_probe_timeout)]
        if probe.value:
            return [Persist({"status": Status.RUNNING, "last_started_at": now, "pending_action": None,
                             "health_fail_count": 0}),
                    Emit("instance.started", label="restart" if restarting else "start"),
                    RequeueAfter(settings.interval_running)]
        return [Emit("reconcile.gateway_unhealthy", level="warning", details={"machine_id": mid}),
                RequeueAfter(settings.interval_busy)]
    if state == "failed":
        return start_failed(record, obs, settings, now, label="machine_failed",
                            error=f"machine {mid} failed to start")
    if state in ("stopped", "suspended") and obs.outcome(StartMachine(mid)) is None:
        if _needs_update(record, machine) and obs.outcome(UpdateMachine(mid)) is None:
            return [UpdateMachine(mid, record.volume_id)]  # launches it (Fly: unless skip_launch)
        return [StartMachine(mid)]
    waited = obs.outcome(WaitMachine(mid, "started"))
    if waited is None:
        return [WaitMachine(mid)]
    if waited.ok or isinstance(waited.error, WaitTimeoutError):
        return [RequeueAfter(settings.interval_busy)]
    if isinstance(waited.error, NotFoundError):
        return start_failed(record, obs, settings, now, label="machine_gone", error=f"machine {mid} is gone",
                            clear_machine=True)
    return start_failed(record, obs, settings, now, label="wait_failed",
                        error=f"waiting for machine {mid} failed: {waited.message}")


# ------------------------------------------------------------------------------------------ running


def _stop_flow(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    machine = obs.machine
    if machine is not None and machine.state in ("started", "starting", "created", "stopping"):
        mid = machine.id
        stop = obs.outcome(StopMachine(mid))
        if machine.state != "stopping" and stop is None:
            return [StopMachine(mid)]
        if stop is not None and not stop.ok:
            return [Emit("instance.stop_failed", level="error", error=stop.message),
                    RequeueAfter(settings.interval_busy)]
        waited = obs.outcome(WaitMachine(mid, "stopped"))
        if waited is None:
            return [WaitMachine(mid, state="stopped")]
        if not waited.ok:
            return [RequeueAfter(settings.interval_busy)]
        return [RequeueAfter(settings.interval_busy)]
    return [Persist({"status": Status.STOPPED, "last_stopped_at": now, "pending_action": None,
                     "health_fail_count": 0}),
            Emit("instance.stopped", label="user_request"),
            RequeueAfter(settings.interval_idle)]


def _resume_after_host_restart(record: InstanceRecord, obs: Observed, now: datetime) -> list[Action]:
    """The machine stopped because serve took its local host down on purpose: start it again, same machine and
    volume, no recovery. Anything else (still started, gone, failed, volume missing): forget the note and let
    the usual rules decide."""
    machine = obs.machine
    if (machine is not None and machine.state in ("stopped", "suspended") and record.volume_id
            and not obs.volume_missing):
        return [Emit("instance.stopped", label="planned_host_restart", details={"machine_id": machine.id}),
                Persist({"status": Status.STARTING, "pending_action": "start", "last_stopped_at": now,
                         "health_fail_count": 0}),
                Emit("reconcile.resume_after_host_restart", details={"machine_id": machine.id})]
    return [Persist({"pending_action": None})]


def needs_running(record: InstanceRecord) -> Needs:
    return Needs(machine=bool(record.machine_id), volume=bool(record.volume_id),
                 owned_machines=record.machine_id is None)


def decide_running(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    if record.pending_action == "stop":
        return _stop_flow(record, obs, settings, now)
    if record.pending_action == RESUME_AFTER_HOST_RESTART:
        return _resume_after_host_restart(record, obs, now)
    if record.machine_id is None:
        adopt = _adopt_orphan(record, obs)
        if adopt is not None:
            return adopt
        return [Persist({"status": Status.STOPPED, "last_stopped_at": now}),
                Emit("reconcile.clear_stale_machine", details={"reason": "no machine"}),
                Emit("instance.stopped", label="machine_gone"), RequeueAfter(settings.interval_idle)]
    if _machine_gone(obs) or obs.machine is None:
        return [Persist({"machine_id": None, "status": Status.STOPPED, "last_stopped_at": now,
                         "health_fail_count": 0}),
                Emit("reconcile.clear_stale_machine", details={"machine_id": record.machine_id}),
                Emit("instance.stopped", label="machine_gone"), RequeueAfter(settings.interval_idle)]
    machine = obs.machine
    state = machine.state
    if obs.volume_missing and state not in ("stopped", "failed"):  # a stop first: recovery reports the loss
        return replace_lost_volume(record, obs, settings)
    if state == "started":
        suspect = deadhost.running_started(record, obs, settings, now)  # dead host? (SPEC §15)
        if suspect is not None:
            return suspect
        if record.suspect_since is not None:  # the grace is over (and any approval given): relocate
            return recovery.begin(record, obs, settings, now, fail_count=0, label=deadhost.begin_label(record))
        if record.volume_id and record.volume_id not in machine.volume_ids:
            update = obs.outcome(UpdateMachine(machine.id))
            if update is None:
                return [UpdateMachine(machine.id, record.volume_id),
                        Emit("reconcile.remount_volume", details={"volume_id": record.volume_id})]
            if not update.ok:  # e.g. the replacement volume is in another region: a new machine
                destroyed = obs.outcome(DestroyMachine(machine.id))
                if destroyed is None:
                    return [DestroyMachine(machine.id, clear={"machine_id": None}),
                            Persist({"status": Status.STARTING, "pending_action": "start"})]
                return [Emit("reconcile.remount_failed", level="error", error=destroyed.message),
                        RequeueAfter(settings.interval_busy)]
        snapshot = deadhost.take_snapshot(record, obs, settings, now)  # sandkeep's own, every snapshot_interval
        if snapshot is not None:
            return snapshot
        if record.health_fail_count:
            return [Persist({"health_fail_count": 0}), RequeueAfter(settings.interval_running)]
        return [RequeueAfter(settings.interval_running)]
    if state == "stopped":
        count = record.health_fail_count + 1
        if count >= max(1, settings.unexpected_stop_threshold):
            return recovery.begin(record, obs, settings, now, fail_count=count, label="alarm_stopped")
        return [Persist({"health_fail_count": count}),
                Emit("reconcile.unexpected_stop_observed", value=float(count)),
                RequeueAfter(settings.interval_busy)]
    if state == "failed":
        if settings.relocate_failed:
            return recovery.begin(record, obs, settings, now, fail_count=record.health_fail_count + 1,
                                  label="alarm_failed")
        return [Persist({"status": Status.STOPPED, "last_stopped_at": now, "health_fail_count": 0}),
                Emit("reconcile.machine_failed", details={"machine_id": machine.id}),
                Emit("instance.stopped", label="machine_failed"), RequeueAfter(settings.interval_idle)]
    if state == "created":  # never an unexpected stop (SPEC §3)
        return [RequeueAfter(settings.interval_running)]
    return [RequeueAfter(settings.interval_busy)]


# ------------------------------------------------------------------------------------------ stopped / provisioned


needs_stopped = needs_running


def deadlines_idle(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """``stopped`` / ``provisioned``: a provision that never started is destroyed after a while."""
    return auto_destroy(record) if _is_stale_provision(record, settings, now) else []


def decide_stopped(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    if record.pending_action:
        return [Persist({"pending_action": None})]
    if record.machine_id is None:
        adopt = _adopt_orphan(record, obs)
        if adopt is not None:
            return adopt
    elif _machine_gone(obs) or obs.machine is None:
        return [Persist({"machine_id": None}),
                Emit("reconcile.clear_stale_machine", details={"machine_id": record.machine_id})]
    if obs.volume_missing:
        return replace_lost_volume(record, obs, settings)
    if obs.machine is not None and obs.machine.state == "started":
        if _needs_update(record, obs.machine):
            # a machine of an older generation (e.g. the gateway token was rotated since: a failed create, a dead
            # host's machine back) would refuse the record's token (401): the start flow updates it and probes
            # its health before it serves
            return [Persist({"status": Status.STARTING, "pending_action": "start"}),
                    Emit("reconcile.adopt_started_machine", details={"machine_id": obs.machine.id,
                                                                     "update": True})]
        return [Persist({"status": Status.RUNNING, "last_started_at": now, "health_fail_count": 0}),
                Emit("reconcile.adopt_started_machine", details={"machine_id": obs.machine.id}),
                Emit("instance.started", label="adopted"), RequeueAfter(settings.interval_running)]
    return [RequeueAfter(settings.interval_idle)]


def needs_provisioned(record: InstanceRecord) -> Needs:
    return Needs()  # the decision looks at the record only


def decide_provisioned(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    if record.pending_action == "start":
        return [Persist({"status": Status.STARTING})]
    return [RequeueAfter(settings.interval_idle)]


# ------------------------------------------------------------------------------------------ destroying (§8)


def needs_destroying(record: InstanceRecord) -> Needs:
    return Needs(machine=bool(record.machine_id), owned_machines=True)


def decide_destroying(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """Retry the pending deletes only; never create anything."""
    machines: list[str] = []
    for mid in (record.pending_destroy_machine_id, record.machine_id, record.fenced_machine_id,
                *[m.id for m in obs.owned_machines]):
        if mid and mid not in machines:
            machines.append(mid)
    for mid in machines:
        outcome = obs.outcome(DestroyMachine(mid))
        if outcome is None:
            clear: Changes = {}
            if record.pending_destroy_machine_id == mid:
                clear["pending_destroy_machine_id"] = None
            if record.machine_id == mid:
                clear["machine_id"] = None
            if record.fenced_machine_id == mid:  # a dead host's machine: the destroy waits for its host
                clear["fenced_machine_id"] = None
            return [DestroyMachine(mid, clear=clear)]
        if not outcome.ok:
            return [Emit("reconcile.destroy_machine_failed", level="warning", error=outcome.message,
                         details={"machine_id": mid}),
                    RequeueAfter(settings.interval_busy)]
    holders: tuple[tuple[VolumeHolder, str | None], ...] = (
        ("pending_destroy_volume_id", record.pending_destroy_volume_id), ("volume_id", record.volume_id),
        ("pending_recovery_volume_id", record.pending_recovery_volume_id),
        ("retained_volume_id", record.retained_volume_id))
    volumes: list[str] = []
    for _, vid in holders:
        if vid and vid not in volumes:
            volumes.append(vid)
    gave_up = record.destroy_volume_attempts >= settings.destroy_volume_attempts
    if not gave_up:
        for vid in volumes:
            outcome = obs.outcome(DeleteVolumeSafely(vid))
            if outcome is None:
                cleared: Changes = {}
                for holder, held in holders:
                    if held == vid:
                        cleared[holder] = None
                if vid == record.retained_volume_id:
                    cleared["retained_volume_cleanup_after"] = None
                return [DeleteVolumeSafely(vid, reason="destroy", clear=cleared)]
            attempts = record.destroy_volume_attempts + 1
            if attempts >= settings.destroy_volume_attempts:
                return [Persist({"destroy_volume_attempts": attempts}),
                        Emit("instance.destroy_volume_gave_up", level="error", error=outcome.message,
                             value=float(attempts), details={"volume_ids": volumes})]
            return [Persist({"destroy_volume_attempts": attempts}),
                    Emit("reconcile.delete_volume_failed", level="warning", error=outcome.message,
                         value=float(attempts), details={"volume_id": vid}),
                    RequeueAfter(settings.interval_busy)]
    return [Persist({"status": Status.DESTROYED, "destroyed_at": now, "machine_id": None, "alarm_at": None,
                     "pending_action": None, "recovery_started_at": None, "recovery_step": None}),
            Emit("instance.destroyed", details={"leaked_volume_ids": volumes} if gave_up else {}),
            Done()]
