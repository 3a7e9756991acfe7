"""Pure decision tables of SPEC §15 (dead hosts): suspicion, grace, restore policy, fencing, flagging.

``reconcile.decide`` is called directly with a hand-built record and observation (no provider, no store).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from sandkeep.config import Settings
from sandkeep.engine import deadhost, recovery
from sandkeep.engine.actions import (
    Action,
    Changes,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Emit,
    ListSnapshots,
    Observed,
    Outcome,
    Persist,
    ProbeHealth,
    RequeueAfter,
    TakeSnapshot,
)
from sandkeep.engine.naming import build_machine_config
from sandkeep.engine.reconcile import decide, needs
from sandkeep.provider.errors import HostUnavailableError
from sandkeep.provider.models import Machine, Volume, VolumeSnapshot
from sandkeep.store.records import InstanceRecord, Status
from tests.engine.test_decisions_table import NOW, check_shape, make_record

SETTINGS = Settings(dead_host_grace=300.0, health_fail_threshold=3)


def running(**changes: object) -> InstanceRecord:
    return make_record(Status.RUNNING, "fresh", **changes)


def obs_for(rec: InstanceRecord, *, host_status: str = "ok", state: str = "started",
            volume_host_status: str | None = None) -> Observed:
    obs = Observed()
    config = build_machine_config(rec, volume_id=rec.pending_recovery_volume_id or rec.volume_id or "v1",
                                  secrets={}, gateway_port=8080)
    obs.machine = Machine(id=rec.machine_id or "m1", state=state, region="lcl-a", host_status=host_status,
                          config=config)
    obs.volume = Volume(id=rec.volume_id or "v1", name="vol", region="lcl-a", size_gb=3,
                        host_status=volume_host_status or host_status)
    return obs


def changes_of(actions: list[Action]) -> Changes:
    out: Changes = {}
    for a in actions:
        if isinstance(a, Persist):
            out.update(a.changes)
    return out


def events_of(actions: list[Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, Emit)]


# ------------------------------------------------------------------------------------------ suspicion


def test_unreachable_host_makes_a_running_instance_suspect_without_probing() -> None:
    rec = running()
    actions = decide(rec, obs_for(rec, host_status="unreachable"), SETTINGS, NOW)
    check_shape(actions)
    assert changes_of(actions)["suspect_since"] == NOW
    assert changes_of(actions)["suspect_reason"] == deadhost.HOST_UNREACHABLE
    assert events_of(actions) == [deadhost.EVENT_HOST_UNREACHABLE]
    assert not any(isinstance(a, ProbeHealth) for a in actions)


@pytest.mark.parametrize(("elapsed", "policy", "approval", "expect"), [
    (10.0, "auto", None, "wait"),
    (299.0, "approve", None, "wait"),
    (301.0, "auto", None, "recover"),
    (301.0, "approve", None, "await"),
    (301.0, "approve", "awaiting", "wait"),
    (301.0, "approve", "approved", "recover"),
])
def test_grace_and_policy(elapsed: float, policy: str, approval: str | None, expect: str) -> None:
    rec = running(suspect_since=NOW - timedelta(seconds=elapsed), suspect_reason=deadhost.HOST_UNREACHABLE,
                  restore_approval=approval)
    settings = SETTINGS.replace(snapshot_restore_policy=policy)
    actions = decide(rec, obs_for(rec, host_status="unreachable"), settings, NOW)
    check_shape(actions)
    changes = changes_of(actions)
    if expect == "wait":
        assert len(actions) == 1 and isinstance(actions[0], RequeueAfter)
        assert actions[0].seconds <= max(0.5, settings.dead_host_grace - elapsed) or approval == "awaiting"
    elif expect == "recover":
        assert changes["status"] == Status.RECOVERING
        assert recovery.EVENT_STARTED in events_of(actions)
        started = next(a for a in actions if isinstance(a, Emit) and a.event == recovery.EVENT_STARTED)
        assert started.label == "alarm_host_unreachable"
    else:
        assert changes == {"restore_approval": "awaiting", "incident_note": changes["incident_note"]}
        assert deadhost.EVENT_AWAITING_APPROVAL in events_of(actions)
        assert "status" not in changes  # stays running, visibly waiting


def test_zero_grace_relocates_in_the_same_pass() -> None:
    rec = running()
    settings = SETTINGS.replace(dead_host_grace=0.0)
    first = decide(rec, obs_for(rec, host_status="unreachable"), settings, NOW)
    rec2 = rec.copy(**changes_of(first))
    second = decide(rec2, obs_for(rec2, host_status="unreachable"), settings, NOW)
    assert changes_of(second)["status"] == Status.RECOVERING


def test_health_failures_count_up_to_the_threshold_then_suspect() -> None:
    rec = running()
    obs = obs_for(rec)
    assert decide(rec, obs, SETTINGS, NOW) == [ProbeHealth("m1", timeout=0.0)]
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=False)
    actions = decide(rec, obs, SETTINGS, NOW)
    assert changes_of(actions) == {"health_fail_count": 1} and isinstance(actions[-1], RequeueAfter)
    rec3 = rec.copy(health_fail_count=2)
    actions = decide(rec3, obs, SETTINGS, NOW)
    assert changes_of(actions)["suspect_reason"] == deadhost.HEALTH_FAILED
    assert events_of(actions) == [deadhost.EVENT_GATEWAY_UNRESPONSIVE]


def test_health_suspicion_never_waits_for_approval_because_a_fork_is_possible() -> None:
    rec = running(suspect_since=NOW - timedelta(hours=1), suspect_reason=deadhost.HEALTH_FAILED)
    obs = obs_for(rec)
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=False)
    actions = decide(rec, obs, SETTINGS.replace(snapshot_restore_policy="approve"), NOW)
    assert changes_of(actions)["status"] == Status.RECOVERING


def test_a_healthy_probe_clears_the_suspicion() -> None:
    rec = running(suspect_since=NOW - timedelta(seconds=5), suspect_reason=deadhost.HEALTH_FAILED,
                  restore_approval="awaiting")
    obs = obs_for(rec)
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=True)
    actions = decide(rec, obs, SETTINGS, NOW)
    changes = changes_of(actions)
    assert changes["suspect_since"] is None and changes["restore_approval"] is None
    assert "nothing was lost" in str(changes["incident_note"])
    assert events_of(actions) == [deadhost.EVENT_HOST_RECOVERED]


def test_no_probe_when_the_threshold_is_zero() -> None:
    rec = running()
    actions = decide(rec, obs_for(rec), SETTINGS.replace(health_fail_threshold=0), NOW)
    assert actions == [RequeueAfter(SETTINGS.interval_running)]


# ------------------------------------------------------------------------------------------ recovery steps


def recovering(**changes: object) -> InstanceRecord:
    base: dict[str, object] = {"recovery_step": None, "pending_recovery_volume_id": None,
                               "recovery_started_at": NOW}
    return make_record(Status.RECOVERING, "fresh", **{**base, **changes})


@pytest.mark.parametrize("host_status", ["unreachable", "unknown"])
def test_the_old_machine_on_a_dead_host_is_fenced_not_destroyed(host_status: str) -> None:
    rec = recovering()
    actions = decide(rec, obs_for(rec, host_status=host_status, state="started"), SETTINGS, NOW)
    assert not any(isinstance(a, DestroyMachine) for a in actions)
    assert changes_of(actions) == {"fenced_machine_id": "m1", "machine_id": None, "recovery_step": recovery.STEP_FORK}


def test_a_destroy_refused_as_host_unavailable_fences_too() -> None:
    rec = recovering()
    obs = obs_for(rec)
    obs.outcomes[DestroyMachine("m1")] = Outcome(False, error=HostUnavailableError("host gone", status=412))
    assert changes_of(decide(rec, obs, SETTINGS, NOW))["fenced_machine_id"] == "m1"


def test_restore_records_the_recovery_point_and_sizes_from_the_source() -> None:
    rec = recovering(recovery_step=recovery.STEP_FORK, machine_id=None, fenced_machine_id="m1")
    obs = obs_for(rec, volume_host_status="unreachable")
    obs.fenced_machine = Machine(id="m1", state="started", region="lcl-a", host_status="unreachable")
    assert decide(rec, obs, SETTINGS, NOW) == [ListSnapshots("v1")]
    obs.outcomes[ListSnapshots("v1")] = Outcome(True, value=[
        VolumeSnapshot(id="s1", created_at="2026-11-30T01:00:00Z"), VolumeSnapshot(id="s2",
                                                                                 created_at="2026-11-30T02:00:00Z")])
    actions = decide(rec, obs, SETTINGS, NOW)
    restore = next(a for a in actions if isinstance(a, CreateVolume))
    assert restore.snapshot_id == "s2" and restore.size_gb == 3
    assert restore.extra["recovery_point"] == "2026-11-30T02:00:00Z"
    restored = restore.announce  # emitted once the restore exists, before its id is written
    assert restored is not None and restored.event == "instance.restored_from_snapshot"
    assert restored.details["recovery_point"] == "2026-11-30T02:00:00Z" and restored.details["data_loss"] is True
    # the intent comes first: the step and the recovery point, persisted before the restore is asked for
    assert actions[0] == Persist({"recovery_step": recovery.STEP_RESTORING, "recovery_point": "2026-11-30T02:00:00Z"})
    assert actions.index(restore) == 1


def test_a_restore_adopted_after_a_crash_records_its_data_loss() -> None:
    """Sim small seed 4435: the pass that restored a snapshot (the source's host unreachable) died on a database
    write before it recorded anything; the next pass adopted the volume by name as if it were a fork, and the
    restore's data loss went unrecorded (``recovery_point`` None, no ``instance.restored_from_snapshot``). The
    provider does not say whether a volume is a fork or a restore: the intent persisted before the restore does."""
    started = NOW - timedelta(seconds=20)
    rec = recovering(recovery_step=recovery.STEP_RESTORING, machine_id=None, fenced_machine_id="m1",
                     pending_recovery_volume_id=None, recovery_started_at=started,
                     recovery_point="2026-11-30T02:00:00Z")
    assert needs(rec).named_volumes
    obs = obs_for(rec, volume_host_status="unreachable")
    obs.named_volumes = [Volume(id="v-restored", name="vol", region="lcl-b", size_gb=3,
                                created_at=(started + timedelta(seconds=2)).isoformat())]
    actions = decide(rec, obs, SETTINGS, NOW)
    loss = actions[0]
    assert isinstance(loss, Emit) and loss.event == "instance.restored_from_snapshot", actions
    assert loss.details["recovery_point"] == "2026-11-30T02:00:00Z"
    assert loss.details["adopted_volume_id"] == "v-restored"
    assert changes_of(actions) == {"pending_recovery_volume_id": "v-restored", "recovery_step": recovery.STEP_MACHINE}
    # a fork adopted in a recovery that never issued a restore records no loss
    forked = rec.copy(recovery_step=recovery.STEP_FORKING, recovery_point=None)
    assert not any(isinstance(a, Emit) and a.event == "instance.restored_from_snapshot"
                   for a in decide(forked, obs, SETTINGS, NOW))


def test_cutover_after_a_restore_flags_the_old_volume_and_never_deletes_it() -> None:
    rec = make_record(Status.RECOVERING, "fresh", recovery_point="2026-11-30T02:00:00Z",
                      suspect_since=NOW - timedelta(minutes=6), suspect_reason=deadhost.HOST_UNREACHABLE,
                      fenced_machine_id="m0", retained_volume_id="v0")
    obs = obs_for(rec)
    obs.pending_volume = Volume(id="v2", name="vol", region="lcl-b", size_gb=3)
    obs.fenced_machine = Machine(id="m0", state="started", region="lcl-a", host_status="unreachable")
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=True)
    actions = decide(rec, obs, SETTINGS, NOW)
    check_shape(actions)
    assert not any(isinstance(a, (DeleteVolumeSafely, ListSnapshots)) for a in actions)
    changes = changes_of(actions)
    assert changes["status"] == Status.RUNNING and changes["volume_id"] == "v2"
    assert changes["flagged_volume_ids"] == ["v1"] and changes["retained_volume_id"] == "v0"
    assert changes["suspect_since"] is None and "2026-11-30T02:00:00Z" in str(changes["incident_note"])
    assert deadhost.EVENT_FLAGGED in events_of(actions)


# ------------------------------------------------------------------------------------------ fencing


@pytest.mark.parametrize("status", [Status.RUNNING, Status.RECOVERING, Status.STOPPED, Status.STARTING])
def test_fence_goes_first_once_the_host_answers(status: Status) -> None:
    rec = make_record(status, "fresh", fenced_machine_id="m0", volume_id="v2")
    assert needs(rec).fenced_machine
    obs = obs_for(rec)
    obs.fenced_machine = Machine(id="m0", state="started", region="lcl-a", host_status="ok")
    actions = decide(rec, obs, SETTINGS, NOW)
    assert actions[0] == DestroyMachine("m0")
    assert deadhost.EVENT_FENCED in events_of(actions)
    # still dead: nothing about it is decided, the status's own decision runs
    obs.fenced_machine = Machine(id="m0", state="started", region="lcl-a", host_status="unreachable")
    assert DestroyMachine("m0") not in decide(rec, obs, SETTINGS, NOW)


def test_a_stopped_instance_still_on_the_old_volume_adopts_the_returning_machine() -> None:
    rec = make_record(Status.STOPPED, "fresh", machine_id=None, fenced_machine_id="m0")
    obs = Observed()
    obs.fenced_machine = Machine(id="m0", state="started", region="lcl-a", host_status="ok",
                                 config=build_machine_config(rec, volume_id="v1", secrets={}, gateway_port=8080))
    actions = decide(rec, obs, SETTINGS, NOW)
    assert changes_of(actions)["machine_id"] == "m0" and changes_of(actions)["fenced_machine_id"] is None
    assert not any(isinstance(a, DestroyMachine) for a in actions)


@pytest.mark.parametrize("status", [Status.STOPPED, Status.STARTING])
def test_the_fenced_machine_is_never_adopted_as_an_orphan_while_its_host_is_dead(status: Status) -> None:
    """Small seed 399: a recovery failed (the source's host dead, no snapshot), leaving the instance stopped with
    the old machine fenced; the next pass adopted that machine (still `started` on the dead host) as an orphan
    and the gateway routed to it (SPEC 15: a fenced machine never receives traffic)."""
    rec = make_record(status, "fresh", machine_id=None, fenced_machine_id="m0")
    dead = Machine(id="m0", state="started", region="lcl-a", host_status="unreachable",
                   config=build_machine_config(rec, volume_id="v1", secrets={}, gateway_port=8080))
    obs = Observed()
    obs.fenced_machine = dead
    obs.owned_machines = [dead]
    actions = decide(rec, obs, SETTINGS, NOW)
    assert changes_of(actions).get("machine_id") != "m0"
    assert "reconcile.adopt_orphan_machine" not in events_of(actions)


def test_flagged_volumes_are_never_touched_by_housekeeping_even_years_later() -> None:
    rec = make_record(Status.RUNNING, "overdue", flagged_volume_ids=["v0"], volume_id="v1")
    obs = obs_for(rec)
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=True)
    later = NOW + timedelta(days=3650)
    actions = decide(rec, obs, SETTINGS, later)
    assert not any(isinstance(a, DeleteVolumeSafely) for a in actions)


# ------------------------------------------------------------------------------------------ own snapshots


def test_own_snapshots_are_spread_and_then_periodic() -> None:
    settings = SETTINGS.replace(snapshot_interval=3600.0)
    offsets = {deadhost._spread(f"ins_{n}") for n in range(50)}
    assert len(offsets) == 50 and min(offsets) < 0.2 and max(offsets) > 0.8  # spread over the interval
    rec = running(last_started_at=NOW - timedelta(hours=2))
    assert deadhost.snapshot_due(rec, settings, NOW)  # past any offset
    assert not deadhost.snapshot_due(rec, settings.replace(snapshot_interval=0.0), NOW)
    taken = rec.copy(last_snapshot_at=NOW - timedelta(minutes=59))
    assert not deadhost.snapshot_due(taken, settings, NOW)
    assert deadhost.snapshot_due(taken, settings, NOW + timedelta(minutes=1))
    obs = obs_for(rec)
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=True)
    actions = decide(rec, obs, settings, NOW)
    assert actions == [TakeSnapshot("v1"), Persist({"last_snapshot_at": NOW})]
    obs.outcomes[TakeSnapshot("v1")] = Outcome(False, error=HostUnavailableError("x", status=412))
    assert decide(rec, obs, settings, NOW) == [RequeueAfter(settings.interval_running)]  # next pass retries


def test_destroy_waits_for_the_fenced_machine_and_leaves_flagged_volumes_to_an_admin() -> None:
    rec = make_record(Status.DESTROYING, "fresh", machine_id=None, fenced_machine_id="m0",
                      flagged_volume_ids=["v0"])
    obs = Observed()
    obs.fenced_machine = Machine(id="m0", state="started", region="lcl-a", host_status="unreachable")
    actions = decide(rec, obs, SETTINGS, NOW)
    assert actions == [DestroyMachine("m0")]
    assert isinstance(actions[0], DestroyMachine) and actions[0].clear == {"fenced_machine_id": None}
    obs.outcomes[DestroyMachine("m0")] = Outcome(False, error=HostUnavailableError("gone", status=412))
    assert isinstance(decide(rec, obs, SETTINGS, NOW)[-1], RequeueAfter)  # not finalized while it may return
    done = rec.copy(fenced_machine_id=None, volume_id=None)
    final = decide(done, Observed(), SETTINGS, NOW)
    assert changes_of(final)["status"] == Status.DESTROYED
    assert not any(isinstance(a, DeleteVolumeSafely) and a.volume_id == "v0" for a in final)


def test_a_gateway_unhealthy_after_a_health_relocation_is_not_relocated_again() -> None:
    rec = make_record(Status.RECOVERING, "fresh", suspect_since=NOW - timedelta(minutes=6),
                      suspect_reason=deadhost.HEALTH_FAILED)
    obs = obs_for(rec)
    obs.pending_volume = Volume(id="v2", name="vol", region="lcl-b", size_gb=3)
    obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=False)  # the new gateway is not healthy either
    obs.outcomes[ListSnapshots("v1")] = Outcome(True, value=[])
    obs.outcomes[DeleteVolumeSafely("v1")] = Outcome(True, value=True)
    changes = changes_of(decide(rec, obs, SETTINGS, NOW))
    assert changes["status"] == Status.RUNNING and changes["suspect_reason"] == deadhost.HEALTH_UNCONFIRMED
    after = running(suspect_reason=deadhost.HEALTH_UNCONFIRMED, health_fail_count=5)
    run_obs = obs_for(after)
    run_obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=False)
    actions = decide(after, run_obs, SETTINGS, NOW)
    assert "suspect_since" not in changes_of(actions) and not any(
        isinstance(a, Persist) and a.changes.get("status") == Status.RECOVERING for a in actions)
    run_obs.outcomes[ProbeHealth("m1")] = Outcome(True, value=True)  # healthy again: back to normal
    assert changes_of(decide(after, run_obs, SETTINGS, NOW)) == {"suspect_reason": None}
