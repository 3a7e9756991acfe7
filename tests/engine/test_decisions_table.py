"""Table-driven tests of the pure decisions: every status x every observed machine state x deadlines.

``reconcile.decide(record, observed, settings, now)`` is called directly (no provider, no store, no executor).
Two layers: invariants that hold for every combination, and a table of expected first moves.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from datetime import datetime, timedelta
from typing import get_type_hints

import pytest

from sandkeep.clock import FakeClock
from sandkeep.config import Settings
from sandkeep.engine import recovery
from sandkeep.engine.actions import (
    TERMINAL,
    Action,
    Backoff,
    Changes,
    CreateMachine,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Done,
    Emit,
    EnsureApp,
    ListSnapshots,
    Needs,
    Observed,
    Outcome,
    Persist,
    ProbeHealth,
    RequeueAfter,
    RotateGatewayToken,
    StartMachine,
    UpdateMachine,
    WaitMachine,
)
from sandkeep.engine.naming import build_machine_config
from sandkeep.engine.reconcile import RULES, decide, needs
from sandkeep.provider.errors import TransientError
from sandkeep.provider.models import Machine, Volume
from sandkeep.store.records import InstanceRecord, Status

SETTINGS = Settings()
NOW = FakeClock().now()
MACHINE_STATES = ("missing", "created", "starting", "started", "stopping", "stopped", "suspended", "failed",
                  "replacing", "destroyed")
STATUSES = tuple(s for s in Status if s != Status.DESTROYED)
DEADLINES = ("fresh", "overdue")
EFFECTS = (CreateVolume, CreateMachine, DestroyMachine, DeleteVolumeSafely, EnsureApp)
CHANGE_KEYS = set(get_type_hints(Changes))
RECORD_FIELDS = {f.name for f in fields(InstanceRecord)}


def make_record(status: Status, deadline: str, **changes: object) -> InstanceRecord:
    """An instance in ``status`` with machine m1 on volume v1; ``overdue`` puts every clock far in the past."""
    age = timedelta(days=30) if deadline == "overdue" else timedelta(seconds=1)
    then = NOW - age
    rec = InstanceRecord(id="ins_1", user_id="u", sandbox_id="sbx_1", status=status, created_at=then,
                         updated_at=then, app_name="sk-x", machine_id="m1", volume_id="v1", region="lcl-a",
                         status_changed_at=then, last_started_at=None if status == Status.PROVISIONED else then,
                         gateway_token_encrypted="encrypted-token")
    if status == Status.RECOVERING:
        rec = rec.copy(recovery_started_at=then, recovery_step=recovery.STEP_WAIT, pending_recovery_volume_id="v2")
    if status == Status.PROVISIONED:
        rec = rec.copy(machine_id=None, volume_id=None, pending_action="start")
    return rec.copy(**changes)


def observe(rec: InstanceRecord, state: str, *, transient: bool = False) -> Observed:
    obs = Observed()
    if transient:
        obs.transient = TransientError("provider hiccup", operation="get_machine")
        return obs
    if rec.machine_id:
        if state == "missing":
            obs.machine_missing = True
        else:
            volume = rec.pending_recovery_volume_id if rec.status == Status.RECOVERING else rec.volume_id
            config = build_machine_config(rec, volume_id=volume or "v1", secrets={}, gateway_port=8080)
            obs.machine = Machine(id=rec.machine_id, state=state, region="lcl-b", config=config)
    if rec.volume_id:
        obs.volume = Volume(id=rec.volume_id, name="vol", region="lcl-a", size_gb=1)
    if rec.pending_recovery_volume_id:
        obs.pending_volume = Volume(id=rec.pending_recovery_volume_id, name="vol", region="lcl-b", size_gb=1)
    return obs


def check_shape(actions: list[Action]) -> None:
    """Non-empty; nothing after a terminal action; every persisted field is a real, typed record field."""
    assert actions, "a decision always says what to do"
    for i, action in enumerate(actions):
        if isinstance(action, TERMINAL):
            assert i == len(actions) - 1, f"{action!r} must end the list: {actions!r}"
        if isinstance(action, Persist):
            assert set(action.changes) <= CHANGE_KEYS <= RECORD_FIELDS
        for clear in (getattr(action, "clear", {}), getattr(action, "extra", {})):
            assert set(clear) <= CHANGE_KEYS


@pytest.mark.parametrize(("status", "state", "deadline"), list(itertools.product(STATUSES, MACHINE_STATES, DEADLINES)))
def test_every_status_state_and_deadline_decides_sanely(status: Status, state: str, deadline: str) -> None:
    rec = make_record(status, deadline)
    actions = decide(rec, observe(rec, state), SETTINGS, NOW)
    check_shape(actions)
    if status == Status.DESTROYING:  # SPEC §8: deletes only, never anything created
        assert not any(isinstance(a, (CreateVolume, CreateMachine, StartMachine, UpdateMachine)) for a in actions)
    if status != Status.DESTROYING:
        assert not any(isinstance(a, Persist) and a.changes.get("status") == Status.DESTROYED for a in actions)
    # the original volume is never deleted by a recovery decision (SPEC §7.6)
    if status == Status.RECOVERING:
        assert not any(isinstance(a, DeleteVolumeSafely) and a.volume_id == rec.volume_id for a in actions)


@pytest.mark.parametrize(("status", "deadline"), list(itertools.product(STATUSES, DEADLINES)))
def test_a_provider_hiccup_is_answered_once_after_the_deadlines(status: Status, deadline: str) -> None:
    rec = make_record(status, deadline)
    obs = observe(rec, "started", transient=True)
    actions = decide(rec, obs, SETTINGS, NOW)
    check_shape(actions)
    overdue_rules = deadline == "overdue" and RULES[status].deadlines(rec, Observed(), SETTINGS, NOW)
    if overdue_rules:  # a passed deadline decides even when the provider cannot be read
        assert not isinstance(actions[-1], Backoff)
    elif status == Status.RECOVERING:  # recovering keeps its pace (never past the timeout): no backoff
        assert isinstance(actions[-1], RequeueAfter)
        assert any(isinstance(a, Emit) and a.event == "reconcile.provider_unavailable" for a in actions)
    elif status == Status.PROVISIONED:  # looks at the record only: nothing is read, so nothing can fail
        assert needs(rec) == Needs()
    else:
        assert actions == [Backoff(str(obs.transient))]


def persisted(actions: list[Action]) -> Changes:
    out: Changes = {}
    for a in actions:
        if isinstance(a, Persist):
            out.update(a.changes)
    return out


def first(actions: list[Action]) -> Action:
    return actions[0]


# status, machine state, deadline, what the decision must do (a predicate over the actions)
TABLE: list[tuple[Status, str, str, str]] = [
    (Status.RUNNING, "started", "fresh", "probe"),  # one gateway probe per pass (dead-host suspicion)
    (Status.RUNNING, "created", "fresh", "requeue_running"),
    (Status.RUNNING, "stopped", "fresh", "begin_recovery"),
    (Status.RUNNING, "failed", "fresh", "stopped"),
    (Status.RUNNING, "missing", "fresh", "stopped_clear_machine"),
    (Status.RUNNING, "destroyed", "fresh", "stopped_clear_machine"),
    (Status.STOPPED, "started", "fresh", "running"),
    (Status.STOPPED, "stopped", "fresh", "requeue_idle"),
    (Status.STOPPED, "missing", "fresh", "clear_machine"),
    (Status.STARTING, "started", "fresh", "probe"),
    (Status.STARTING, "stopped", "fresh", "start_machine"),
    (Status.STARTING, "starting", "fresh", "wait"),
    (Status.STARTING, "failed", "fresh", "stopped"),
    (Status.STARTING, "missing", "fresh", "stopped_clear_machine"),
    (Status.STARTING, "started", "overdue", "stopped"),
    (Status.STARTING, "stopped", "fresh", "rotate_token"),
    (Status.STARTING, "starting", "overdue", "stopped"),
    (Status.RESTARTING, "started", "overdue", "stopped"),
    (Status.RECOVERING, "started", "fresh", "probe"),
    (Status.RECOVERING, "starting", "fresh", "wait"),
    (Status.RECOVERING, "stopped", "fresh", "recovery_failing"),
    (Status.RECOVERING, "missing", "fresh", "recovery_failing"),
    (Status.RECOVERING, "started", "overdue", "recovery_failing"),
    (Status.DESTROYING, "stopped", "fresh", "destroy_machine"),
    (Status.DESTROYING, "missing", "fresh", "destroy_machine"),
    (Status.PROVISIONED, "missing", "fresh", "starting"),
    (Status.PROVISIONED, "missing", "overdue", "destroying"),
    (Status.STOPPED, "stopped", "overdue", "destroying"),
]


def expect(kind: str, actions: list[Action], rec: InstanceRecord) -> None:
    changes = persisted(actions)
    last = actions[-1]
    if kind == "requeue_running":
        assert actions == [RequeueAfter(SETTINGS.interval_running)]
    elif kind == "requeue_idle":
        assert actions == [RequeueAfter(SETTINGS.interval_idle)]
    elif kind == "begin_recovery":
        assert changes["status"] == Status.RECOVERING and changes["recovery_started_at"] == NOW
        assert any(isinstance(a, Emit) and a.event == recovery.EVENT_STARTED for a in actions)
    elif kind == "stopped":
        assert changes["status"] == Status.STOPPED and changes["last_stopped_at"] == NOW
    elif kind == "stopped_clear_machine":
        assert changes["status"] == Status.STOPPED and changes["machine_id"] is None
    elif kind == "clear_machine":
        assert changes == {"machine_id": None}
    elif kind == "running":
        assert changes["status"] == Status.RUNNING and isinstance(last, RequeueAfter)
    elif kind == "probe":
        assert isinstance(first(actions), ProbeHealth) and first(actions) == ProbeHealth("m1")
    elif kind == "start_machine":
        assert actions[0] == StartMachine("m1")
    elif kind == "wait":
        assert actions == [WaitMachine("m1")]
    elif kind == "recovery_failing":
        assert str(changes["recovery_step"]).startswith((recovery.FAILING, recovery.FAILING_REPLACEMENT))
        assert changes["last_recovery_error"]
    elif kind == "destroy_machine":
        assert actions == [DestroyMachine("m1")]
        action = actions[0]
        assert isinstance(action, DestroyMachine) and action.clear == {"machine_id": None}
    elif kind == "rotate_token":
        assert actions == [RotateGatewayToken()]
    elif kind == "starting":
        assert changes == {"status": Status.STARTING}
    elif kind == "destroying":
        assert changes["status"] == Status.DESTROYING and changes["pending_action"] is None
    else:  # pragma: no cover
        raise AssertionError(kind)
    assert not isinstance(last, Done)


@pytest.mark.parametrize(("status", "state", "deadline", "kind"), TABLE,
                         ids=[f"{s.value}-{m}-{d}-{k}" for s, m, d, k in TABLE])
def test_expected_first_moves(status: Status, state: str, deadline: str, kind: str) -> None:
    rec = make_record(status, deadline)
    if kind == "destroying":  # a provision that never started
        rec = rec.copy(last_started_at=None)
    if kind == "rotate_token":  # an instance from before gateway tokens
        rec = rec.copy(gateway_token_encrypted=None)
    actions = decide(rec, observe(rec, state), SETTINGS, NOW)
    check_shape(actions)
    expect(kind, actions, rec)


def test_outcomes_are_looked_up_by_the_action_itself() -> None:
    """A failed start of the machine turns a ``starting`` instance ``stopped``; parameters are not identity."""
    from sandkeep.engine.actions import Outcome

    rec = make_record(Status.STARTING, "fresh")
    obs = observe(rec, "stopped")
    obs.outcomes[StartMachine("m1")] = Outcome(False, error=TransientError("nope", operation="start"))
    changes = persisted(decide(rec, obs, SETTINGS, NOW))
    assert changes["status"] == Status.STOPPED
    assert DestroyMachine("m1", clear={"machine_id": None}) == DestroyMachine("m1")
    assert hash(CreateVolume("primary", name="a")) == hash(CreateVolume("primary", name="b"))
    assert CreateVolume("primary") != CreateVolume("recovery")


def test_recovery_needs_follow_the_step() -> None:
    rec = make_record(Status.RECOVERING, "fresh", recovery_step=recovery.STEP_FORKING, pending_recovery_volume_id=None)
    assert needs(rec).named_volumes and not needs(rec).owned_machines
    rec = rec.copy(recovery_step=recovery.STEP_CREATING_MACHINE)
    assert needs(rec).owned_machines and not needs(rec).named_volumes
    assert needs(make_record(Status.DESTROYING, "fresh")).volume is False


def test_when_the_deadline_is_past_due() -> None:
    """The overdue records really are past every deadline the rules know about."""
    for status in STATUSES:
        rec = make_record(status, "overdue")
        elapsed = NOW - (rec.status_changed_at or rec.created_at)
        assert isinstance(elapsed, timedelta) and elapsed.total_seconds() > SETTINGS.start_hard_timeout
        assert isinstance(NOW, datetime)


def test_a_replacement_left_by_an_earlier_create_gets_the_current_config_before_it_is_adopted() -> None:
    """Seed 912: an earlier attempt's create was abandoned at its lease's end and executed late; the retry rotated
    the gateway token (every create does). The machine left behind carries the old token and generation: it is
    updated with the current configuration first, then adopted -- adopted as it was, it refused every read (401)."""
    rec = make_record(Status.RECOVERING, "fresh", machine_id=None, recovery_step=recovery.STEP_CREATING_MACHINE,
                      config_generation=3)
    stale = build_machine_config(rec.copy(config_generation=2), volume_id="v2", secrets={}, gateway_port=8080)
    obs = observe(rec, "started")
    obs.owned_machines = [Machine(id="m9", state="started", region="lcl-b", config=stale)]
    assert "v2" in obs.owned_machines[0].volume_ids
    first = decide(rec, obs, SETTINGS, NOW)
    assert first == [UpdateMachine("m9", "v2")]
    obs.outcomes[UpdateMachine("m9")] = Outcome(ok=True)
    then = decide(rec, obs, SETTINGS, NOW)
    assert then[0] == Persist({"machine_id": "m9", "recovery_step": recovery.STEP_WAIT})
    # a machine of the record's own generation is adopted at once
    current = build_machine_config(rec, volume_id="v2", secrets={}, gateway_port=8080)
    fresh = observe(rec, "started")
    fresh.owned_machines = [Machine(id="m9", state="started", region="lcl-b", config=current)]
    assert decide(rec, fresh, SETTINGS, NOW)[0] == Persist({"machine_id": "m9", "recovery_step": recovery.STEP_WAIT})


def test_once_the_old_volumes_delete_is_issued_the_recovery_never_deletes_its_recovery_volume() -> None:
    """Seed 2300: the cutover's delete of the old volume was held 120 s by the provider; meanwhile the recovery timed
    out and its cleanup deleted the recovery volume; then the old volume's delete landed: no copy was left. The
    cutover now persists that it issued the delete (``cutover``) before issuing it; from there the timeout does not
    fail the recovery, and a failure keeps the recovery volume as the instance's volume."""
    rec = make_record(Status.RECOVERING, "fresh", machine_id="m2")
    obs = observe(rec, "started")
    obs.outcomes[ProbeHealth("m2")] = Outcome(ok=True, value=True)
    obs.outcomes[ListSnapshots("v1")] = Outcome(ok=True, value=[])
    first = decide(rec, obs, SETTINGS, NOW)
    assert first[0] == Persist({"recovery_step": recovery.STEP_CUTOVER}) and isinstance(first[1], DeleteVolumeSafely)
    # a later pass, past the timeout, the old volume's delete still in flight at the provider: no failure
    late = rec.copy(recovery_step=recovery.STEP_CUTOVER,
                    recovery_started_at=NOW - timedelta(seconds=SETTINGS.recovery_timeout + 60))
    actions = decide(late, observe(late, "started"), SETTINGS, NOW)
    assert not any(isinstance(a, Emit) and a.event == "reconcile.unexpected_stop_recovery_failing" for a in actions)
    # and if the replacement is gone, the failure keeps the recovery volume instead of deleting it
    failing = recovery.fail(late, SETTINGS, NOW, label="alarm_machine_gone", error="gone", replacement=True)
    persisted = next(a for a in failing if isinstance(a, Persist)).changes
    assert persisted["volume_id"] == "v2" and persisted["pending_recovery_volume_id"] is None


def test_a_fork_left_by_an_earlier_failed_recovery_is_not_adopted() -> None:
    """Seed 3266: a fork abandoned at a recovery's deadline landed anyway; the recovery failed, the instance ran and
    was written to again, and the next recovery adopted that fork by name -- losing the new writes. Only a fork made
    since this recovery began is adopted; an older one is a leftover (the orphan inventory's)."""
    started = NOW - timedelta(seconds=30)
    rec = make_record(Status.RECOVERING, "fresh", machine_id=None, recovery_step=recovery.STEP_FORKING,
                      pending_recovery_volume_id=None, recovery_started_at=started)
    obs = observe(rec, "started")
    stale = Volume(id="v-old-fork", name="vol", region="lcl-b", size_gb=1,
                   created_at=(started - timedelta(minutes=2)).isoformat())
    mine = Volume(id="v-new-fork", name="vol", region="lcl-b", size_gb=1,
                  created_at=(started + timedelta(seconds=3)).isoformat())
    obs.named_volumes = [stale]
    assert not any(isinstance(a, Persist) and a.changes.get("pending_recovery_volume_id") == "v-old-fork"
                   for a in decide(rec, obs, SETTINGS, NOW))
    obs.named_volumes = [stale, mine]
    assert decide(rec, obs, SETTINGS, NOW)[0] == Persist({"pending_recovery_volume_id": "v-new-fork",
                                                          "recovery_step": recovery.STEP_MACHINE})
