"""Unexpected-stop recovery, end to end (SPEC §7.1-§7.7).

The story, as persisted steps (``record.recovery_step``); every step re-reads the record and the provider,
so a controller killed at any point resumes where it stopped (level-triggered):

1. **Begin** (:func:`begin`, 7.1) — ``running`` + machine ``stopped`` (or ``failed`` with
   ``relocate_failed``): status ``recovering``, ``recovery_started_at``, fail count 0, no pending volume,
   error cleared; event ``instance.unexpected_stop_recovery_started`` (label ``alarm_stopped``).
2. **Prepare** (step ``None``, 7.2.1-2) — the source volume must exist ("source volume missing" fails);
   force-destroy the stopped machine and clear ``machine_id``.
3. **Fork** (steps ``fork``/``forking``, 7.2.3) — reuse ``pending_recovery_volume_id`` if it still exists;
   else fork the old volume over the regions with the old one de-prioritised (capacity errors fall through
   to the next region, anything else fails), persisting the fork's id in the same breath. ``forking`` marks
   "a create may be in flight": after a crash, an unattached volume of our name is adopted instead of
   forking twice. When the source volume's host is unreachable, the newest snapshot is restored instead
   (event ``instance.restored_from_snapshot``: data since the snapshot is lost).
4. **Machine** (steps ``machine``/``creating_machine``, 7.2.4) — create the replacement on the recovery
   volume in its region with the current configuration; ``machine_id`` is persisted before any wait; after
   a crash a machine whose metadata names this instance and mounts the recovery volume is adopted.
5. **Wait** (step ``wait``, 7.2.5 and 7.4) — one provider wait call; a 408 is a hand-off, not a failure:
   the instance stays ``recovering`` and the next reconcile looks again. ``started`` → complete;
   ``stopped``/``failed``/``destroyed`` → fail ``alarm_<state>``; 404 → fail ``alarm_machine_gone``.
6. **Complete** (:func:`_complete`, 7.3) — gateway health probe (bounded, never blocks), then the old
   volume: snapshots → retained for ``retained_volume_retention``; none → deleted now via the safe delete
   (7.5; a failed delete retains it with cleanup due now); listing failed → retained. One write makes the
   instance ``running`` on the new volume/region; event ``instance.unexpected_stop_recovery_succeeded``.
7. **Fail / timeout** (:func:`fail`, 7.6) — persisted as step ``failing:<label>`` (or
   ``failing_replacement:<label>`` when ``machine_id`` is the replacement) so the cleanup survives a crash:
   force-destroy the replacement, delete the pending recovery volume (7.5; failure is only a warning — the
   leftover rule retries it later), then ``stopped`` with ``last_recovery_error``; event
   ``instance.unexpected_stop_recovery_failed``. The original volume is never deleted on failure.

Retained-volume cleanup (7.7) lives in :mod:`sandkeep.engine.reconcile` (alarm) and
:mod:`sandkeep.engine.instances` (admin); both use the 7.5 safe delete in the executor.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sandkeep.config import Settings
from sandkeep.engine import deadhost
from sandkeep.engine.actions import (
    Action,
    Changes,
    CreateMachine,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Emit,
    ListSnapshots,
    Needs,
    Observed,
    Persist,
    ProbeHealth,
    RequeueAfter,
    StartMachine,
    UpdateMachine,
    WaitMachine,
    newest_snapshot,
)
from sandkeep.engine.naming import machine_generation, machine_name, volume_name
from sandkeep.engine.policy import TERMINAL_REPLACEMENT_STATES, detection_latency_ms, elapsed_ms, recovery_regions
from sandkeep.provider.errors import HostUnavailableError, NotFoundError, WaitTimeoutError
from sandkeep.provider.models import Machine
from sandkeep.store.records import InstanceRecord, Status

STEP_FORK = "fork"
STEP_FORKING = "forking"
STEP_RESTORING = "restoring"
"""A snapshot restore was issued, its recovery point persisted first: the provider does not say whether a volume
is a fork or a restore, so this intent is what tells a pass after a crash that the volume it adopts lost data (sim
small seed 4435: adopted as a fork, the restore's data loss went unrecorded)."""
STEP_MACHINE = "machine"
STEP_CREATING_MACHINE = "creating_machine"
STEP_WAIT = "wait"
STEP_WAIT_AGAIN = "wait:"
"""``wait:<n>``: waiting for a replacement started again ``n`` times after it stopped unasked (:func:`_wait`)."""
STEP_CUTOVER = "cutover"
"""The cutover has issued the old volume's delete (persisted first): whether it happened may be unknown -- a delete is
never abandoned, but its pass may die or lose its lease while the provider still holds the request, and it may land
later (sim small seed 2300). From here the recovery volume is the copy to keep: the recovery completes rather than
time out, and a failure keeps the recovery volume as the instance's volume instead of deleting it."""
FAILING = "failing:"
FAILING_REPLACEMENT = "failing_replacement:"

EVENT_STARTED = "instance.unexpected_stop_recovery_started"
EVENT_SUCCEEDED = "instance.unexpected_stop_recovery_succeeded"
EVENT_FAILED = "instance.unexpected_stop_recovery_failed"


# ---------------------------------------------------------------------------------------------- 7.1


def restart_fields(now: datetime) -> Changes:
    """What (re)starting a recovery writes: ``recovering`` from step one, the clock reset, errors cleared.
    Shared by :func:`begin` and the admin's retry (:func:`sandkeep.engine.intents.retry_recovery`)."""
    return {"status": Status.RECOVERING, "recovery_started_at": now, "health_fail_count": 0, "recovery_step": None,
            "last_recovery_error": None, "last_recovery_error_at": None, "pending_action": None,
            "recovery_point": None}


def begin(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime, *, fail_count: int,
          label: str = "alarm_stopped") -> list[Action]:
    machine = obs.machine
    details: dict[str, object] = {"old_state": record.status.value, "new_state": Status.RECOVERING.value,
                                  "fly_state": machine.state if machine else None,
                                  "machine_id": record.machine_id, "region": record.region}
    latency = detection_latency_ms(machine, now)
    started_details = dict(details)
    if latency is not None:
        started_details["detection_latency_ms"] = latency
    actions: list[Action] = [
        Emit("reconcile.unexpected_stop_recovery_trigger", label=label, value=float(fail_count), details=details),
    ]
    if record.pending_recovery_volume_id:
        actions.append(Emit("reconcile.pending_recovery_volume_forgotten", level="warning",
                            error="a leftover pending recovery volume could not be deleted before a new recovery",
                            details={"volume_id": record.pending_recovery_volume_id}))
    actions += [
        Persist({**restart_fields(now), "pending_recovery_volume_id": None}),
        Emit(EVENT_STARTED, label=label, value=float(fail_count), details=started_details),
    ]
    return actions


# ---------------------------------------------------------------------------------------------- 7.2 / 7.4


def needs(record: InstanceRecord) -> Needs:
    """What the recovery steps look at: the old (or replacement) machine, the source and the pending volume,
    our machines while a create may be in flight, our named volumes while a fork may be."""
    step = record.recovery_step
    return Needs(machine=bool(record.machine_id), volume=bool(record.volume_id),
                 pending_volume=bool(record.pending_recovery_volume_id),
                 owned_machines=step == STEP_CREATING_MACHINE,
                 named_volumes=step in (STEP_FORKING, STEP_RESTORING) and record.pending_recovery_volume_id is None)


def deadlines(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """A failing recovery finishes its cleanup, and the recovery timeout applies, before anything else."""
    step = record.recovery_step or ""
    if step.startswith((FAILING, FAILING_REPLACEMENT)):
        return _finish_fail(record, obs, settings, now)
    elapsed = (now - (record.recovery_started_at or now)).total_seconds()
    if elapsed >= settings.recovery_timeout and not _cutting_over(record, obs):  # calls end there too (policy)
        return fail(record, settings, now, label="alarm_timeout",
                    error=f"recovery timed out after {int(elapsed)} s (limit {int(settings.recovery_timeout)} s)")
    return []


def _cutting_over(record: InstanceRecord, obs: Observed) -> bool:
    """The cutover already disposed of the old volume (in this pass, or before a crash: it is gone while the
    started replacement waits): the recovery volume holds the only copy, so the recovery completes rather than
    fail -- a fail would delete that copy (SPEC §12.7 protects the data, the timeout only the waiting)."""
    if record.recovery_step == STEP_CUTOVER:
        return True
    if not record.volume_id or not (record.recovery_step or "").startswith(STEP_WAIT):
        return False
    deleted = obs.outcome(DeleteVolumeSafely(record.volume_id))
    if deleted is not None and deleted.ok:
        return True
    return (obs.volume_missing and obs.machine is not None and obs.machine.state == "started"
            and obs.pending_volume is not None)


def on_transient(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """A provider hiccup while recovering: look again soon (never later than the timeout), no backoff."""
    return [Emit("reconcile.provider_unavailable", level="warning", error=str(obs.transient)),
            RequeueAfter(_busy(record, settings, now))]


def decide(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """Reconcile while ``recovering`` (after :func:`deadlines`, with the provider read)."""
    step = record.recovery_step or ""
    if step == "":
        return _prepare(record, obs, settings, now)
    if step in (STEP_FORK, STEP_FORKING, STEP_RESTORING):
        return _fork(record, obs, settings, now)
    if step in (STEP_MACHINE, STEP_CREATING_MACHINE):
        return _machine(record, obs, settings, now)
    if step in (STEP_WAIT, STEP_CUTOVER) or step.startswith(STEP_WAIT_AGAIN):
        return _wait(record, obs, settings, now)
    return [Emit("reconcile.unknown_recovery_step", level="warning", details={"step": step}),
            Persist({"recovery_step": None})]


def _busy(record: InstanceRecord, settings: Settings, now: datetime) -> float:
    started = record.recovery_started_at or now
    remaining = settings.recovery_timeout - (now - started).total_seconds()
    return max(0.5, min(settings.interval_busy, remaining + 0.5))


def _prepare(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    # 7.2.1: the source volume (and its region) must exist
    if record.volume_id is None or obs.volume_missing:
        return fail(record, settings, now, label="alarm_source_volume_missing", error="source volume missing")
    # 7.2.2: force-destroy the stopped machine (404 is fine), clear machine_id
    if record.machine_id:
        if obs.machine is not None and deadhost.host_down(obs.machine):
            # its host does not answer: it cannot be destroyed now; fenced as soon as it does (SPEC §15)
            return deadhost.fence_instead_of_destroy(record, obs.machine, STEP_FORK)
        outcome = obs.outcome(DestroyMachine(record.machine_id))
        if (outcome is not None and not outcome.ok and obs.machine is not None
                and isinstance(outcome.error, HostUnavailableError)):
            return deadhost.fence_instead_of_destroy(record, obs.machine, STEP_FORK)
        if outcome is not None and not outcome.ok:
            return fail(record, settings, now, label="alarm_destroy_failed",
                        error=f"cannot destroy the stopped machine {record.machine_id}: {outcome.message}")
        return [DestroyMachine(record.machine_id, clear={"machine_id": None, "recovery_step": STEP_FORK})]
    return [Persist({"recovery_step": STEP_FORK})]


FORK_CLOCK_SLACK = timedelta(seconds=5)
"""How much earlier than the recovery's start (on sandkeep's clock) the provider may date a fork this recovery made."""


def _made_since(created_at: str | None, since: datetime | None) -> bool:
    """Whether a provider timestamp is not older than ``since`` (less the slack); unknown means no."""
    if not created_at or since is None:
        return False
    try:
        made = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    if made.tzinfo is None:
        made = made.replace(tzinfo=since.tzinfo)
    return made >= since - FORK_CLOCK_SLACK


def _fork(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    source = obs.volume
    if record.volume_id is None or obs.volume_missing or source is None:
        return fail(record, settings, now, label="alarm_source_volume_missing", error="source volume missing")
    pending = record.pending_recovery_volume_id
    if pending:
        if obs.pending_volume is not None:  # reuse the fork made earlier
            return [Persist({"recovery_step": STEP_MACHINE})]
        return [Emit("reconcile.pending_recovery_volume_missing", level="warning", details={"volume_id": pending}),
                Persist({"pending_recovery_volume_id": None, "recovery_step": STEP_FORK})]
    if record.recovery_step in (STEP_FORKING, STEP_RESTORING):
        # a fork may have been created just before a crash: adopt it instead of forking twice
        # -- only one made by *this* recovery: a fork left by an earlier, failed one predates whatever the instance
        # wrote since (sim seed 3266: adopting it lost those writes); it is a leftover for the orphan inventory
        leftovers = [v for v in obs.named_volumes
                     if v.id not in (record.volume_id, record.retained_volume_id) and not v.attached_machine_id
                     and (v.state or "created") not in ("destroyed", "destroying", "pending_destroy")
                     and _made_since(v.created_at, record.recovery_started_at)]
        if leftovers:
            adopted = max(leftovers, key=lambda v: (v.created_at or "", v.id))
            adopt: list[Action] = [
                Persist({"pending_recovery_volume_id": adopted.id, "recovery_step": STEP_MACHINE}),
                Emit("reconcile.adopt_recovery_volume", details={"volume_id": adopted.id, "region": adopted.region})]
            if record.recovery_point is not None:
                # a restore was issued in this recovery (its point persisted first): the volume may be that restore,
                # and the pass that made it may have died before recording the loss -- record it (again), first
                return [_restored_event(record.volume_id, None, record.recovery_point, None, adopted=adopted.id),
                        *adopt]
            return adopt
    unreachable = (source.host_status or "ok") == "unreachable"
    fork_outcome = obs.outcome(CreateVolume("recovery"))
    if fork_outcome is not None and not fork_outcome.ok:
        # the fork is impossible (the source's host is unreachable): restore the newest snapshot instead
        if not unreachable and not isinstance(fork_outcome.error, HostUnavailableError):
            return fail(record, settings, now, label="alarm_fork_failed",
                        error=f"fork of {source.id} failed: {fork_outcome.message}")
        unreachable = True
    regions = recovery_regions(settings.region_list, source.region)
    if unreachable:
        return _restore_from_snapshot(record, obs, settings, now, regions)
    fork = CreateVolume(purpose="recovery", name=volume_name(record), regions=regions,
                        assign="pending_recovery_volume_id", size_gb=source.size_gb,
                        source_volume_id=source.id, compute_size=record.machine_size,
                        extra={"recovery_step": STEP_MACHINE})
    return [Persist({"recovery_step": STEP_FORKING}), fork,
            Emit("reconcile.fork_volume", details={"source_volume_id": source.id, "regions": list(regions)})]


def _restore_from_snapshot(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime,
                           regions: tuple[str, ...]) -> list[Action]:
    """Beyond the origin: the source volume's host is unreachable, so restore its newest snapshot."""
    assert record.volume_id is not None
    listing = obs.outcome(ListSnapshots(record.volume_id))
    if listing is None:
        return [ListSnapshots(record.volume_id)]
    if not listing.ok:
        return fail(record, settings, now, label="alarm_source_unreachable",
                    error=f"the source volume's host is unreachable and its snapshots cannot be listed: "
                          f"{listing.message}")
    snapshot = newest_snapshot(list(listing.value or []))
    if snapshot is None:
        return fail(record, settings, now, label="alarm_source_unreachable",
                    error="the source volume's host is unreachable and it has no snapshot")
    restore_outcome = obs.outcome(CreateVolume("restore"))
    if restore_outcome is not None and not restore_outcome.ok:
        return fail(record, settings, now, label="alarm_restore_failed",
                    error=f"restore of snapshot {snapshot.id} failed: {restore_outcome.message}")
    # intent first: the step and the recovery point, so a pass after a crash knows a volume it adopts is a restore
    # (never cleared again in this recovery: should the source come back and a fork follow, a late restore may still
    # be the volume adopted -- a loss recorded that may not have happened, never one that went unrecorded)
    restore = CreateVolume(purpose="restore", name=volume_name(record), regions=regions,
                           assign="pending_recovery_volume_id", snapshot_id=snapshot.id,
                           size_gb=obs.volume.size_gb if obs.volume else None, compute_size=record.machine_size,
                           extra={"recovery_step": STEP_MACHINE, "recovery_point": snapshot.created_at},
                           announce=_restored_event(record.volume_id, snapshot.id, snapshot.created_at,
                                                    snapshot.volume_size))
    return [Persist({"recovery_step": STEP_RESTORING, "recovery_point": snapshot.created_at}), restore]


def _restored_event(source_volume_id: str | None, snapshot_id: str | None, point: str | None,
                    snapshot_volume_size: int | None, *, adopted: str | None = None) -> Emit:
    """The data-loss record of a restore (SPEC 12.1): emitted when the restore exists, again when it is adopted."""
    details: dict[str, object] = {"source_volume_id": source_volume_id, "snapshot_id": snapshot_id,
                                  "snapshot_created_at": point, "recovery_point": point,
                                  "snapshot_volume_size": snapshot_volume_size, "data_loss": True}
    if adopted is not None:
        details["adopted_volume_id"] = adopted
    return Emit("instance.restored_from_snapshot", label="restored_from_snapshot", level="warning",
                error=f"data written after {point} is lost", details=details, required=True)


def _machine(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    pending = record.pending_recovery_volume_id
    if not pending:
        return [Persist({"recovery_step": STEP_FORK})]
    if obs.pending_volume_missing or obs.pending_volume is None:
        return [Emit("reconcile.pending_recovery_volume_missing", level="warning", details={"volume_id": pending}),
                Persist({"pending_recovery_volume_id": None, "recovery_step": STEP_FORK})]
    volume = obs.pending_volume
    if record.machine_id:
        return [Persist({"recovery_step": STEP_WAIT})]
    if record.recovery_step == STEP_CREATING_MACHINE:
        # a create may have happened before a crash: adopt the machine that names us and mounts the fork
        adopted = [m for m in obs.owned_machines if volume.id in m.volume_ids]
        if adopted:
            machine = adopted[-1]
            stale = machine_generation(machine.metadata) != record.config_generation
            if stale:
                # made by an earlier attempt whose answer was lost (abandoned at its lease's end, executed late):
                # it carries the gateway token of that attempt, and every create rotates it -- it would refuse
                # the record's token (401; seed 912). The current configuration goes on first.
                updated = obs.outcome(UpdateMachine(machine.id))
                if updated is None:
                    return [UpdateMachine(machine.id, volume.id)]
                if not updated.ok:
                    return fail(record, settings, now, label="alarm_create_machine_failed",
                                error=f"cannot update the replacement machine {machine.id} an earlier create "
                                      f"left: {updated.message}")
            return [Persist({"machine_id": machine.id, "recovery_step": STEP_WAIT}),
                    Emit("reconcile.adopt_replacement_machine",
                         details={"machine_id": machine.id, "updated": stale})]
    created = obs.outcome(CreateMachine("recovery"))
    if created is not None and not created.ok:
        return fail(record, settings, now, label="alarm_create_machine_failed",
                    error=f"cannot create the replacement machine: {created.message}")
    return [Persist({"recovery_step": STEP_CREATING_MACHINE}),
            CreateMachine(purpose="recovery", name=machine_name(record, recovery=True), volume_id=volume.id,
                          region=volume.region, extra={"recovery_step": STEP_WAIT})]


def _wait(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    machine_id = record.machine_id
    if not machine_id:
        return [Persist({"recovery_step": STEP_MACHINE})]
    if obs.machine_missing or obs.machine is None:
        return fail(record, settings, now, label="alarm_machine_gone",
                    error=f"replacement machine {machine_id} is gone (404)", replacement=True)
    state = obs.machine.state
    if state == "started":
        return _complete(record, obs, settings, now)
    restarted = False
    if state == "stopped" and _stopped_unasked(obs.machine):
        # its host restarted (or killed it) under it: the replacement and its volume are fine -- start it again,
        # a bounded number of times; the recovery timeout still applies (SPEC §12.5)
        step = record.recovery_step or STEP_WAIT
        starts = int(step[len(STEP_WAIT_AGAIN):] or 0) if step.startswith(STEP_WAIT_AGAIN) else 0
        again = obs.outcome(StartMachine(machine_id))
        if again is None and starts < settings.recovery_replacement_starts:
            return [Emit("reconcile.recovery_replacement_restart", level="warning",
                         details={"machine_id": machine_id, "attempt": starts + 1,
                                  "exit_code": _last_exit(obs.machine)}),
                    Persist({"recovery_step": (STEP_CUTOVER if step == STEP_CUTOVER
                                               else f"{STEP_WAIT_AGAIN}{starts + 1}")}),
                    StartMachine(machine_id)]
        if again is not None and not again.ok:
            return fail(record, settings, now, label="alarm_stopped",
                        error=f"replacement machine {machine_id} is stopped and cannot be started again: "
                              f"{again.message}", replacement=True)
        restarted = again is not None  # started again in this pass: the wait below follows it up
    if state in TERMINAL_REPLACEMENT_STATES and not restarted:
        label_state = "destroyed" if state == "destroying" else state
        return fail(record, settings, now, label=f"alarm_{label_state}",
                    error=f"replacement machine {machine_id} is {state}", replacement=True)
    waited = obs.outcome(WaitMachine(machine_id, "started"))
    if waited is None:
        return [WaitMachine(machine_id)]
    if waited.ok:
        return [RequeueAfter(_busy(record, settings, now))]
    if isinstance(waited.error, WaitTimeoutError):
        # the 408 hand-off (7.2.5): not a failure; reconcile finishes it
        return [Emit("reconcile.unexpected_stop_recovery_wait_timeout", level="warning",
                     error=waited.message, details={"machine_id": machine_id, "state": state,
                                                    "note": "reconcile will continue"}),
                RequeueAfter(_busy(record, settings, now))]
    if isinstance(waited.error, NotFoundError):
        return fail(record, settings, now, label="alarm_machine_gone",
                    error=f"replacement machine {machine_id} is gone (404)", replacement=True)
    return fail(record, settings, now, label="alarm_wait_failed",
                error=f"waiting for the replacement machine failed: {waited.message}", replacement=True)


def _stopped_unasked(machine: Machine | None) -> bool:
    """The machine's newest exit was not asked for (Fly's ``exit_event.requested_stop`` is false): its host
    restarted or killed it. A stop someone asked for, or one the provider does not explain, stays a failure."""
    exits = [e for e in (machine.events if machine else []) if e.type == "exit"]
    if not exits:
        return False
    newest = max(exits, key=lambda e: e.timestamp or 0)
    return newest.requested_stop is False


def _last_exit(machine: Machine | None) -> int | None:
    exits = [e for e in (machine.events if machine else []) if e.type == "exit"]
    return max(exits, key=lambda e: e.timestamp or 0).exit_code if exits else None


# ---------------------------------------------------------------------------------------------- 7.3


def _complete(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    assert record.machine_id is not None
    new_volume = obs.pending_volume
    if new_volume is None:
        return fail(record, settings, now, label="alarm_recovery_volume_missing",
                    error="recovery volume missing at cutover", replacement=True)
    probe = obs.outcome(ProbeHealth(record.machine_id))
    if probe is None:
        # bounded, never blocking, and never carrying the recovery past its timeout (SPEC §12.5): a probe
        # that ran over would turn a started, cut-over-ready replacement into an alarm_timeout failure
        remaining = settings.recovery_timeout - (now - (record.recovery_started_at or now)).total_seconds()
        budget = min(settings.health_probe_timeout, remaining - settings.health_probe_interval)
        return [ProbeHealth(record.machine_id, timeout=max(0.0, budget))]
    healthy = bool(probe.value)
    old_id = record.volume_id
    retained_id = record.retained_volume_id
    cleanup_after = record.retained_volume_cleanup_after
    old_handling = "missing"
    warnings: list[Action] = []
    flag_changes: Changes = {}
    deleted_now = obs.outcome(DeleteVolumeSafely(old_id)) if old_id else None
    if old_id and record.recovery_point is not None and deleted_now is None:
        # restored from a snapshot: the old volume may hold newer writes; flagged for an admin, never deleted
        flag_changes, flag_notes = deadhost.flag_old_volume(record, old_id, now)
        warnings += flag_notes
        old_handling = "flagged"
    elif deleted_now is not None and deleted_now.ok:
        old_handling = "deleted"
    elif old_id and obs.volume is not None:
        listing = obs.outcome(ListSnapshots(old_id))
        if listing is None:
            return [ListSnapshots(old_id)]
        new_retained: str | None = None
        if listing.ok and listing.value:
            new_retained, due = old_id, now + timedelta(seconds=settings.retained_volume_retention)
            old_handling = "retained"
        elif listing.ok:
            deleted = obs.outcome(DeleteVolumeSafely(old_id))
            if deleted is None:
                marker: list[Action] = ([] if record.recovery_step == STEP_CUTOVER
                                        else [Persist({"recovery_step": STEP_CUTOVER})])  # intent before the act
                return [*marker, DeleteVolumeSafely(old_id, reason="unexpected_stop_recovery_immediate_cleanup")]
            if deleted.ok:
                old_handling = "deleted"
            else:  # retain with cleanup due now, so the alarm retries
                new_retained, due = old_id, now
                old_handling = "delete_failed_retained"
        else:
            new_retained, due = old_id, now + timedelta(seconds=settings.retained_volume_retention)
            old_handling = "snapshot_listing_failed_retained"
        if new_retained is not None:
            if retained_id and retained_id != new_retained:
                # a volume retained by an earlier recovery: dispose of it rather than lose track of it
                superseded = obs.outcome(DeleteVolumeSafely(retained_id))
                if superseded is None:
                    return [DeleteVolumeSafely(retained_id, reason="superseded_retained_volume")]
                if not superseded.ok:
                    warnings.append(Emit("reconcile.retained_volume_abandoned", level="error",
                                         error=superseded.message, details={"volume_id": retained_id}))
            retained_id, cleanup_after = new_retained, due
    duration = elapsed_ms(record.recovery_started_at, now)
    changes: Changes = {
        "status": Status.RUNNING, "volume_id": new_volume.id, "region": new_volume.region or record.region,
        "recovery_started_at": None, "pending_recovery_volume_id": None, "recovery_step": None,
        "retained_volume_id": retained_id, "retained_volume_cleanup_after": cleanup_after,
        "last_started_at": now, "last_recovery_error": None, "last_recovery_error_at": None,
        "health_fail_count": 0, "pending_action": None, "last_snapshot_at": None, **deadhost.CLEAR_SUSPECT,
        **flag_changes,
    }
    if record.suspect_reason == deadhost.HEALTH_FAILED and not healthy:
        changes["suspect_reason"] = deadhost.HEALTH_UNCONFIRMED  # no relocation churn for a broken gateway
    notes: list[Action] = []
    if old_handling.endswith("retained") or old_handling == "retained":
        notes.append(Emit("reconcile.retain_volume", label=old_handling,
                          details={"volume_id": old_id, "cleanup_after": cleanup_after.isoformat()
                                   if cleanup_after else None}))
    return [*warnings, *notes,
            Persist(changes),
            Emit(EVENT_SUCCEEDED, label="alarm_relocated", duration_ms=duration,
                 details={"old_volume_id": old_id, "old_region": record.region, "old_volume": old_handling,
                          "gateway_healthy": healthy, "retained_volume_id": retained_id,
                          "recovery_point": record.recovery_point,
                          "fenced_machine_id": record.fenced_machine_id}),
            RequeueAfter(settings.interval_running)]


# ---------------------------------------------------------------------------------------------- 7.6


def fail(record: InstanceRecord, settings: Settings, now: datetime, *, label: str, error: str,
         replacement: bool | None = None) -> list[Action]:
    """Start the fail/timeout cleanup; persisted first so a crash in the middle still finishes it."""
    if replacement is None:  # machine_id is the replacement once the old machine was destroyed (step 2)
        replacement = bool(record.machine_id) and (record.recovery_step or "") not in ("",)
    prefix = FAILING_REPLACEMENT if replacement and record.machine_id else FAILING
    keep: Changes = {}
    if record.recovery_step == STEP_CUTOVER and record.pending_recovery_volume_id:
        # the old volume's delete was issued (and may land yet): the recovery volume is the copy kept, as the
        # instance's volume, never deleted by the cleanup (SPEC 12.7)
        keep = {"volume_id": record.pending_recovery_volume_id, "pending_recovery_volume_id": None}
    return [Emit("reconcile.unexpected_stop_recovery_failing", label=label, error=error, level="warning"),
            Persist({"recovery_step": f"{prefix}{label}", "last_recovery_error": error,
                     "last_recovery_error_at": now, **keep})]


def _finish_fail(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    step = record.recovery_step or FAILING
    replacement = step.startswith(FAILING_REPLACEMENT)
    label = step.split(":", 1)[1] if ":" in step else "alarm_failed"
    error = record.last_recovery_error or "recovery failed"
    warnings: list[Action] = []
    if replacement and record.machine_id:
        destroyed = obs.outcome(DestroyMachine(record.machine_id))
        if destroyed is None:
            return [DestroyMachine(record.machine_id, clear={"machine_id": None})]
        if not destroyed.ok:
            warnings.append(Emit("reconcile.destroy_machine_failed", level="warning", error=destroyed.message,
                                 details={"machine_id": record.machine_id}))
    pending = record.pending_recovery_volume_id
    if pending and pending != record.volume_id:
        deleted = obs.outcome(DeleteVolumeSafely(pending))
        if deleted is None:
            return [DeleteVolumeSafely(pending, reason="unexpected_stop_recovery_failed",
                                       clear={"pending_recovery_volume_id": None})]
        if not deleted.ok:  # only a warning: the leftover rule deletes it at a later alarm
            warnings.append(Emit("reconcile.delete_volume_failed", level="warning", error=deleted.message,
                                 details={"volume_id": pending}))
    duration = elapsed_ms(record.recovery_started_at, now)
    changes: Changes = {
        "status": Status.STOPPED, "last_stopped_at": now, "recovery_started_at": None, "recovery_step": None,
        "pending_action": None, "health_fail_count": 0, "last_recovery_error": error,
        "last_recovery_error_at": record.last_recovery_error_at or now, "recovery_point": None,
        **deadhost.CLEAR_SUSPECT,
    }
    if record.suspect_since is not None:
        changes["incident_note"] = (
            f"The host of this instance stopped answering and it could not be moved ({error}). It stays stopped "
            f"with its data on the old host; it resumes if that host comes back.")
    return [*warnings,
            Persist(changes),
            Emit(EVENT_FAILED, label=label, error=error, duration_ms=duration, level="error"),
            RequeueAfter(settings.interval_idle)]
