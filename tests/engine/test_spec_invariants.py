"""SPEC §7.3 / §7.7 / §12 invariants on the one provider model (review 3): alarms after an overdue cleanup,
the cutover's delete failure, a controller killed after every provider mutation, one started machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandkeep.engine.runtime import Engine
from sandkeep.sim.loop import SimClock
from sandkeep.store.records import Status
from sandkeep.store.sql import open_store
from tests.engine.conftest import ADMIN, USER, Harness, engine_settings
from tests.engine.test_lifecycle import slow_boots, squat
from tests.support.model import Model


async def test_refused_overdue_cleanup_does_not_requeue_at_once(h: Harness) -> None:
    """A retained volume whose cleanup is refused (7.5) stays, and the alarm is not set to 'now' again
    (which would reconcile it in a tight loop, emitting a refusal every poll)."""
    rec = await h.running()
    await h.model.snapshot(rec.volume_id)
    await h.model.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    retained = recovered.retained_volume_id
    assert retained
    await squat(h, rec.app_name, retained)
    await h.pass_time(h.engine.settings.retained_volume_retention + 1)
    after = await h.reconcile(rec.id)
    assert after.retained_volume_id == retained and retained in h.model.volumes()
    assert after.alarm_at is not None and after.alarm_at > h.clock.now()
    # nothing is due now: a worker's claim of due alarms finds nothing
    assert await h.engine.run_due_once() == 0


async def test_cutover_delete_failure_retains_with_cleanup_due_now_then_alarm_deletes(h: Harness) -> None:
    """SPEC §7.3: no snapshots, the delete fails → retained with cleanup due immediately; the alarm retries."""
    rec = await h.running()
    old = rec.volume_id
    await h.model.crash(rec.machine_id)
    h.model.refuse("DELETE", f"/volumes/{old}", 412, "failed_precondition: volume is busy")
    recovered = await h.reconcile(rec.id)
    assert recovered.status == Status.RUNNING and recovered.volume_id != old
    assert recovered.retained_volume_id == old and old in h.model.volumes()
    assert recovered.retained_volume_cleanup_after is not None
    assert recovered.retained_volume_cleanup_after <= h.clock.now()  # due now, not after the retention
    ok = h.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
    assert ok.details["old_volume"] == "delete_failed_retained"
    assert recovered.alarm_at is not None and recovered.alarm_at > h.clock.now()  # but no tight loop
    await h.pass_time(h.engine.settings.interval_running * 2)
    assert await h.engine.run_due_once() == 1
    final = h.get(rec.id)
    assert final.retained_volume_id is None and final.retained_volume_cleanup_after is None
    assert h.model.volumes() == {final.volume_id}
    assert h.event(rec.id, "instance.retained_volume_deleted").label == "alarm_retained_recovery_cleanup"


async def test_snapshot_listing_outcomes(make_harness: Any) -> None:
    """SPEC §7.3: exists → retained for the retention; none → deleted; listing fails → retained full term."""
    h = make_harness()
    retention = h.engine.settings.retained_volume_retention
    outcomes: dict[str, Any] = {}
    for case in ("exists", "none", "fails"):
        rec = await h.running()
        if case == "exists":
            await h.model.snapshot(rec.volume_id)
        if case == "fails":
            h.model.refuse("GET", f"/volumes/{rec.volume_id}/snapshots", 409, "snapshots unavailable")
        await h.model.crash(rec.machine_id)
        final = await h.reconcile(rec.id)
        assert final.status == Status.RUNNING
        outcomes[case] = (rec.volume_id, final, h.clock.now())
    for case in ("exists", "fails"):
        old, final, at = outcomes[case]
        assert final.retained_volume_id == old and old in h.model.volumes()
        assert final.retained_volume_cleanup_after is not None
        # the full term from the cutover (a few simulated seconds of the pass before ``at``)
        assert (final.retained_volume_cleanup_after - at).total_seconds() == pytest.approx(retention, abs=60)
    old, final, _at = outcomes["none"]
    assert final.retained_volume_id is None and old not in h.model.volumes()


async def test_admin_cleanup_keeps_fields_when_the_delete_fails(h: Harness) -> None:
    """SPEC §7.7: the two retained fields are cleared only after the delete succeeded."""
    from sandkeep.engine.service import ProviderUnavailable

    rec = await h.running()
    await h.model.snapshot(rec.volume_id)
    await h.model.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    retained, due = recovered.retained_volume_id, recovered.retained_volume_cleanup_after
    h.model.refuse("DELETE", f"/volumes/{retained}", 412, "failed_precondition: volume is busy")
    with pytest.raises(ProviderUnavailable):
        await h.service.cleanup_retained_volume(ADMIN, rec.id)
    kept = h.get(rec.id)
    assert kept.retained_volume_id == retained and kept.retained_volume_cleanup_after == due
    assert "instance.retained_volume_deleted" not in h.events(rec.id)
    assert await h.service.cleanup_retained_volume(ADMIN, rec.id) == retained
    done = h.get(rec.id)
    assert done.retained_volume_id is None and done.retained_volume_cleanup_after is None
    assert h.event(rec.id, "instance.retained_volume_deleted").label == "admin_retained_volume_cleanup"


async def test_at_most_one_started_machine_through_every_flow(h: Harness) -> None:
    """SPEC §12.2, checked at every machine boot of start, restart, recovery, failed recovery and retry."""
    host = h.model.host
    set_state = host._set_state
    violations: list[list[str]] = []
    boots = [0]

    def checked(m: dict[str, Any], state: str, *args: Any, **kwargs: Any) -> None:
        set_state(m, state, *args, **kwargs)  # every machine state change of the model
        if state == "started":
            boots[0] += 1
            owner = m["config"]["metadata"].get("instance_id")
            started = [x["id"] for x in host.machines.values()
                       if x["state"] == "started" and x["config"]["metadata"].get("instance_id") == owner]
            if len(started) > 1:
                violations.append(started)

    host._set_state = checked  # type: ignore[method-assign]
    rec = await h.running()
    await h.service.restart(USER, rec.id)
    await h.reconcile(rec.id)
    await h.model.crash(h.get(rec.id).machine_id)
    await h.reconcile(rec.id)
    assert h.get(rec.id).status == Status.RUNNING
    # a failed recovery (the replacement fails to boot), then an admin retry that succeeds
    h.model.boot = "fail"
    await h.model.crash(h.get(rec.id).machine_id)
    failed = await h.reconcile(rec.id)
    assert failed.status == Status.STOPPED and failed.last_recovery_error
    h.model.boot = "ok"
    await h.service.retry_recovery(ADMIN, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert violations == [] and boots[0] >= 4  # start, restart, recovery, retry
    assert h.model.started() == [final.machine_id]


class Crash(BaseException):
    """The controller process dies (not an Exception: nothing catches it, the lease is not released)."""


MUTATIONS = ("create_volume", "create_machine", "destroy_machine", "delete_volume", "start_machine",
             "stop_machine", "update_machine")


def crash_after(provider: Any, n: int) -> list[int]:
    """Make the ``n``-th mutating provider call succeed and then kill the controller."""
    seen = [0]
    for name in MUTATIONS:
        original = getattr(provider, name)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            async def go() -> Any:
                result = await _original(*args, **kwargs)
                seen[0] += 1
                if seen[0] == n:
                    raise Crash(f"killed after mutation {n}")
                return result
            return go()

        setattr(provider, name, wrapped)
    return seen


@pytest.mark.parametrize("snapshots", [False, True], ids=["no-snapshots", "snapshots"])
async def test_killing_the_controller_after_any_provider_mutation_converges(
        tmp_path: Path, db_url: str, sim_clock: SimClock, snapshots: bool) -> None:
    """SPEC §12.6 / §5: kill the controller right after each provider mutation of a recovery (before it
    persists the result), restart on the same database: it converges to the same end state — running on one
    new volume with the data, one started machine, no duplicate forks or machines, nothing leaked."""
    clock = sim_clock
    store = open_store(db_url, clock)
    settings = engine_settings(tmp_path, lease_ttl=30.0)
    n = 1
    try:
        while True:
            model = Model(tmp_path / f"host{n}", clock)  # a provider of its own per kill point
            provider = model.client
            first = Engine(settings, store, provider, clock, worker_id=f"a{n}", prober=model.prober)
            first.service.wake = lambda _id: None
            created = await first.service.create_instance(USER, user_id=USER.user_id)
            running = await first.reconcile_now(created.id)
            assert running is not None and running.status == Status.RUNNING
            target = first.service.gateway_target(USER, created.id)
            assert target is not None
            assert (await model.gateway.put("/data/k", content=b"v1", headers=target[1])).status_code == 201
            if snapshots:
                await model.snapshot(running.volume_id)
            await model.crash(running.machine_id)
            seen = crash_after(provider, n)
            crashed = False
            try:
                await first.reconcile_now(created.id)
            except Crash:
                crashed = True
            mutations = seen[0]
            for name in MUTATIONS:  # un-wrap: the provider lives on; only the controller died
                provider.__dict__.pop(name, None)
            await clock.sleep(settings.lease_ttl + 1)  # the dead worker's lease expires
            second = Engine(settings, store, provider, clock, worker_id=f"b{n}", prober=model.prober)
            second.service.wake = lambda _id: None
            final = None
            for _ in range(6):
                final = await second.reconcile_now(created.id)
                assert final is not None
                if final.status == Status.RUNNING and final.recovery_step is None:
                    break
                await clock.sleep(settings.interval_busy + 1)
            assert final is not None and final.status == Status.RUNNING, (n, final)
            app = running.app_name
            assert final.volume_id != running.volume_id, n
            assert model.data(final.volume_id) == {"k": b"v1"}, n
            assert model.started(app) == [final.machine_id], n
            assert model.machines(app) == [final.machine_id], (n, model.machines(app))
            expected = {final.volume_id} | ({running.volume_id} if snapshots else set())
            assert model.volumes(app) == expected, n
            assert final.pending_recovery_volume_id is None, n
            assert (final.retained_volume_id == running.volume_id) == snapshots, n
            await first.stop()
            await second.stop()
            await model.close()
            if not crashed:
                # destroy old machine, fork, create replacement (+ delete the old volume): each was a kill point
                assert mutations >= 3 and n == mutations + 1, (n, mutations)
                break
            n += 1
    finally:
        store.close()


async def test_force_destroy_is_audited_whatever_the_outcome(h: Harness) -> None:
    from sandkeep.engine.service import InvalidTransition

    rec = await h.running()
    slow_boots(h)
    await h.model.crash(rec.machine_id)
    assert (await h.reconcile(rec.id)).status == Status.RECOVERING
    await h.service.destroy(ADMIN, rec.id, force=True)
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED
    # SPEC §7.6: the recovery's fail path never ran over the destroy
    assert "instance.unexpected_stop_recovery_failed" not in h.events(rec.id)
    with pytest.raises(InvalidTransition):
        await h.service.destroy(ADMIN, rec.id, force=True)
    h.service.audit_denied(USER, "retry_recovery", rec.id, "403 forbidden: this route needs an admin token")
    entries = [(a.action, a.outcome, a.actor) for a in reversed(h.store.list_audit(instance_id=rec.id).items)]
    assert entries == [("force_destroy", "ok", "root"), ("force_destroy", "refused", "root"),
                       ("retry_recovery", "refused", "user-a")]
    first = h.store.list_audit(instance_id=rec.id).items[-1]
    assert first.details["status_before"] == "recovering"


async def test_planned_host_restart_resumes_in_place_instead_of_recovering(h: Harness) -> None:
    """serve's clean shutdown stops its local host (every machine stops): a planned restart, not a crash."""
    a = await h.running()
    b = await h.running()
    c = await h.running()
    await h.service.stop(USER, c.id)
    assert (await h.reconcile(c.id)).status == Status.STOPPED
    assert h.service.note_planned_host_restart() == 2  # the running ones only
    for rec in (a, b):
        await h.model.crash(rec.machine_id)  # the host goes down with serve and comes back with machines stopped
    resumed = await h.reconcile(a.id)
    assert resumed.status == Status.RUNNING and resumed.pending_action is None
    assert (resumed.machine_id, resumed.volume_id, resumed.region) == (a.machine_id, a.volume_id, a.region)
    names = h.events(a.id)
    assert "instance.unexpected_stop_recovery_started" not in names
    assert names[-3:] == ["instance.stopped", "reconcile.resume_after_host_restart", "instance.started"]
    assert h.event(a.id, "instance.stopped").label == "planned_host_restart"
    assert h.model.volumes() == {a.volume_id, b.volume_id, c.volume_id}  # nothing forked
    # the note is used once: a later real crash is an unexpected stop again
    await h.model.crash(resumed.machine_id)
    again = await h.reconcile(a.id)
    assert again.status == Status.RUNNING and again.volume_id != a.volume_id
    assert h.event(a.id, "instance.unexpected_stop_recovery_started").label == "alarm_stopped"


async def test_planned_host_restart_note_is_dropped_when_the_machine_kept_running(h: Harness) -> None:
    rec = await h.running()
    assert h.service.note_planned_host_restart() == 1
    same = await h.reconcile(rec.id)  # the host did not restart after all
    assert same.status == Status.RUNNING and same.pending_action is None
    await h.model.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    assert recovered.volume_id != rec.volume_id  # an unexpected stop: relocated


async def test_cutover_probe_never_carries_the_recovery_past_its_timeout(make_harness: Any) -> None:
    """SPEC §12.5 / §7.3: a replacement that starts late, with an unhealthy gateway, still cuts over within the
    recovery timeout — the non-blocking probe is cut short instead of running into an alarm_timeout failure."""
    h = make_harness(recovery_timeout=100.0, health_probe_timeout=60.0, health_probe_interval=1.0)
    rec = await h.running()
    slow_boots(h, 70.0)  # the replacement starts ~70 s into the recovery (after the first pass's 60 s wait)...
    h.model.boot = "sick"  # ...and its gateway answers /health with 503
    await h.model.crash(rec.machine_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.RECOVERING and mid.machine_id
    await h.model.settle(mid.machine_id, "started")
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING, final.last_recovery_error
    ok = h.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
    assert ok.duration_ms is not None and ok.duration_ms <= 100_000
    assert ok.details["gateway_healthy"] is False


SPEC_EVENTS = (
    "instance.provisioned", "instance.started", "instance.stopped", "instance.restarting",
    "instance.destroy_started", "instance.destroyed", "instance.start_failed",
    "instance.unexpected_stop_recovery_started", "instance.unexpected_stop_recovery_succeeded",
    "instance.unexpected_stop_recovery_failed", "instance.retained_volume_deleted",
    "reconcile.unexpected_stop_recovery_trigger", "reconcile.clear_stale_machine", "reconcile.delete_volume",
    "reconcile.replace_lost_volume",
)


async def test_every_spec_event_is_a_row_a_json_log_line_and_a_metric(
        make_harness: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """SPEC §9: each named event is emitted where the spec says, as an event row with the §9 fields, one JSON
    log line and a Prometheus count; recovery labels as in §7."""
    import json

    from sandkeep import metrics
    from sandkeep.logs import configure_logging

    def count(name: str) -> float:
        return metrics.REGISTRY.get_sample_value("sandkeep_events_total", {"event": name}) or 0.0

    configure_logging("info")  # as serve does, before the engine (its loggers bind the configuration)
    h = make_harness()
    before = {name: count(name) for name in SPEC_EVENTS}
    rec = await h.running()  # provisioned, started
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)  # stopped
    await h.service.restart(USER, rec.id)
    await h.reconcile(rec.id)  # restarting, started
    await h.model.snapshot(h.get(rec.id).volume_id)
    await h.model.crash(h.get(rec.id).machine_id)
    await h.reconcile(rec.id)  # trigger, recovery started + succeeded (old volume retained)
    await h.pass_time(h.engine.settings.retained_volume_retention + 1)
    await h.reconcile(rec.id)  # alarm cleanup: delete_volume + retained_volume_deleted
    h.model.boot = "fail"
    await h.model.crash(h.get(rec.id).machine_id)
    failed = await h.reconcile(rec.id)  # the replacement fails to boot: recovery failed
    assert failed.status == Status.STOPPED
    await h.service.start(USER, rec.id)
    await h.reconcile(rec.id)  # start_failed
    h.model.boot = "ok"
    stopped = h.get(rec.id)
    await h.model.destroy(stopped.machine_id)
    await h.reconcile(rec.id)  # clear_stale_machine
    await h.model.lose_volume(stopped.volume_id)
    await h.reconcile(rec.id)  # replace_lost_volume
    await h.service.destroy(USER, rec.id)
    assert (await h.reconcile(rec.id)).status == Status.DESTROYED

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logged = {line.get("event") for line in lines if line.get("instance_id") == rec.id}
    for name in SPEC_EVENTS:
        row = h.event(rec.id, name)
        assert row.instance_id == rec.id and row.user_id == rec.user_id and row.sandbox_id == rec.sandbox_id
        assert row.status and row.at is not None, name
        assert name in logged, f"{name}: no JSON log line"
        assert count(name) >= before[name] + 1, f"{name}: not counted"
    assert h.event(rec.id, "instance.unexpected_stop_recovery_failed").label == "alarm_failed"
    assert h.event(rec.id, "instance.retained_volume_deleted").label == "alarm_retained_recovery_cleanup"
    started = h.event(rec.id, "instance.unexpected_stop_recovery_started")
    assert started.label == "alarm_stopped" and started.value == 1.0
    succeeded = h.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
    assert succeeded.label == "alarm_relocated" and succeeded.duration_ms is not None


@pytest.mark.parametrize("state", ["stopped", "failed", "destroyed"])
async def test_replacement_terminal_state_fails_with_alarm_state_label(h: Harness, state: str) -> None:
    """SPEC §7.4: replacement stopped / failed / destroyed → stopped with label alarm_<state>; the original
    volume is kept (§7.6) and the pending recovery volume deleted."""
    rec = await h.running()
    slow_boots(h, 120.0)  # the replacement is still booting after the first pass's 60 s wait
    await h.model.crash(rec.machine_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.RECOVERING
    if state == "stopped":
        await h.model.stop(mid.machine_id)
    elif state == "failed":
        h.model.boot = "fail"
        await h.model.settle(mid.machine_id, "failed")
    else:
        h.model.host.opt.destroyed_retention = 3600.0  # as on Fly: a destroyed machine is listed a while
        await h.model.destroy(mid.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.last_recovery_error and final.last_recovery_error_at
    failed = h.event(rec.id, "instance.unexpected_stop_recovery_failed")
    assert failed.label == f"alarm_{state}" and failed.error and failed.duration_ms is not None
    assert final.volume_id == rec.volume_id and rec.volume_id in h.model.volumes()
    assert mid.pending_recovery_volume_id not in h.model.volumes() and final.pending_recovery_volume_id is None


async def test_destroy_keeps_each_pointer_until_the_provider_confirms(h: Harness) -> None:
    """SPEC §8: pointers are cleared only after the provider confirmed the delete; nothing is ever created."""
    rec = await h.running()
    await h.service.destroy(USER, rec.id)
    h.model.refuse("DELETE", f"/machines/{rec.machine_id}", 409, "machine is busy")
    first = await h.reconcile(rec.id)
    assert first.status == Status.DESTROYING
    assert first.pending_destroy_machine_id == rec.machine_id and first.pending_destroy_volume_id == rec.volume_id
    h.model.refuse("DELETE", f"/volumes/{rec.volume_id}", 412, "failed_precondition: volume is busy")
    await h.pass_time(h.engine.settings.interval_busy * 2)
    second = await h.reconcile(rec.id)
    assert second.status == Status.DESTROYING
    assert second.pending_destroy_machine_id is None and second.machine_id is None  # confirmed: cleared
    assert second.pending_destroy_volume_id == rec.volume_id and rec.volume_id in h.model.volumes()  # kept
    await h.pass_time(h.engine.settings.interval_busy * 2)
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED and final.pending_destroy_volume_id is None
    assert not h.model.volumes(rec.app_name)
    # the original volume and machine only: destroy never creates anything
    assert h.model.created("volumes") == 1 and h.model.created("machines") == 1
