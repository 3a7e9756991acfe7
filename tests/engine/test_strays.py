"""SPEC 12.2 after a machine create whose outcome is unknown (sim small seed 3867).

A start's create was abandoned at its deadline; the instance failed its start, an admin retried its recovery, and a
new machine served it -- then the abandoned create landed a minute late and started a second machine. The executor
now records ``unsettled_create_at`` when a create fails without proving it did nothing (a 5xx, no answer, a
deadline), and until ``create_landing_window`` has passed every pass of a running or stopped instance looks for a
started machine of the instance's that the record does not name, and stops it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sandkeep.config import Settings
from sandkeep.engine.actions import Emit, Observed, Outcome, Persist, RequeueAfter, StopMachine
from sandkeep.engine.naming import build_machine_config
from sandkeep.engine.reconcile import decide, needs
from sandkeep.provider.models import Machine, Volume
from sandkeep.store.records import Status
from tests.engine.conftest import USER
from tests.engine.test_decisions_table import NOW, make_record
from tests.engine.test_recovery_deadline import world

SETTINGS = Settings(create_landing_window=600.0, interval_running=30.0, interval_idle=1800.0)


def observed(rec: object, *owned: Machine) -> Observed:
    obs = Observed()
    config = build_machine_config(rec, volume_id="v1", secrets={}, gateway_port=8080)  # type: ignore[arg-type]
    obs.machine = Machine(id="m1", state="started", region="lcl-a", config=config)
    obs.volume = Volume(id="v1", name="vol", region="lcl-a", size_gb=1)
    obs.owned_machines = [obs.machine, *owned]
    return obs


def test_a_stray_started_machine_is_stopped_while_a_create_is_unsettled() -> None:
    rec = make_record(Status.RUNNING, "fresh", unsettled_create_at=NOW - timedelta(seconds=70))
    assert needs(rec).owned_machines, "the pass lists the instance's machines while a create may land"
    stray = Machine(id="m-late", state="started", region="lcl-a")
    actions = decide(rec, observed(rec, stray), SETTINGS, NOW)
    assert actions[0] == StopMachine("m-late")
    assert isinstance(actions[1], Emit) and actions[1].event == "reconcile.stray_machine_stopped"
    # the record's own machine, its fenced old machine and a stopped stray are left alone
    stopped = Machine(id="m-late", state="stopped", region="lcl-a")
    assert not any(isinstance(a, StopMachine) for a in decide(rec, observed(rec, stopped), SETTINGS, NOW))
    fenced = rec.copy(fenced_machine_id="m-old")
    assert not any(isinstance(a, StopMachine) for a in decide(
        fenced, observed(fenced, Machine(id="m-old", state="started", region="lcl-a")), SETTINGS, NOW))
    # once stopped (or its stop failed), the pass goes on; the routine requeue is no longer than the running one
    obs = observed(rec, stray)
    obs.outcomes[StopMachine("m-late")] = Outcome(ok=True)
    then = decide(rec, obs, SETTINGS, NOW)
    assert not any(isinstance(a, StopMachine) for a in then)


def test_without_an_unsettled_create_nothing_is_listed_or_stopped() -> None:
    rec = make_record(Status.RUNNING, "fresh")
    assert not needs(rec).owned_machines
    actions = decide(rec, observed(rec, Machine(id="m-late", state="started", region="lcl-a")), SETTINGS, NOW)
    assert not any(isinstance(a, StopMachine) for a in actions)


def test_a_stopped_instance_looks_again_within_the_running_interval_and_forgets_after_the_window() -> None:
    rec = make_record(Status.STOPPED, "fresh", unsettled_create_at=NOW - timedelta(seconds=30))
    obs = observed(rec)
    assert obs.machine is not None
    obs.machine = obs.machine.model_copy(update={"state": "stopped"})
    obs.owned_machines = [obs.machine]
    actions = decide(rec, obs, SETTINGS, NOW)
    assert actions[-1] == RequeueAfter(SETTINGS.interval_running), actions  # not interval_idle (1800 s)
    late = rec.copy(unsettled_create_at=NOW - timedelta(seconds=SETTINGS.create_landing_window + 1))
    assert decide(late, obs, SETTINGS, NOW)[0] == Persist({"unsettled_create_at": None})


async def test_a_create_answered_503_is_recorded_unsettled_and_a_late_machine_is_stopped(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
        w.faults.configure({"operation": "machine.create", "status": 503})  # every attempt: 503
        await w.engine.reconcile_now(created.id)
        marked = w.get(created.id)
        assert marked.unsettled_create_at is not None, marked
        assert marked.machine_id is None and marked.provider_error_count > 0, "the create failed (backing off)"
        w.faults.clear()
        rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
        assert rec.machine_id and rec.volume_id and rec.unsettled_create_at is not None
        # the provider carries out a create the engine gave up on: a second machine of the instance's starts
        # (on a volume of its own: a fork left from an earlier attempt, say; the instance's is attached)
        spare = await w.client.create_volume(rec.app_name, name="spare", region=rec.region or "r1")
        config = w.engine.ctx.machine_config(rec, spare.id)
        late = await w.client.create_machine(rec.app_name, config=config, name="late", region=rec.region)
        await w.settle(late.id, "started")
        await w.engine.reconcile_now(rec.id)
        await w.settle(late.id, "stopped")
        assert w.host.machines[rec.machine_id]["state"] == "started", "the instance's own machine is untouched"
        stopped = w.store.list_events(instance_id=rec.id, name="reconcile.stray_machine_stopped").items
        assert [e.details["machine_id"] for e in stopped] == [late.id]
        # after the landing window the mark is forgotten, and passes stop listing the machines
        w.clock.advance(w.engine.settings.create_landing_window + 1)
        final = await w.drive(rec.id, lambda r: r.unsettled_create_at is None)
        assert final.status == Status.RUNNING and final.machine_id == rec.machine_id
