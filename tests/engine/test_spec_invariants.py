"""SPEC §7.3 / §7.7 / §12 invariants on the in-memory provider (review 3): alarms after an overdue cleanup,
the cutover's delete failure, a controller killed after every provider mutation, one started machine."""

from __future__ import annotations

from typing import Any

import pytest

from sandkeep.engine.runtime import Engine
from sandkeep.provider.errors import ConflictError
from sandkeep.provider.models import MachineConfig, Mount
from sandkeep.store.records import Status
from tests.engine.conftest import ADMIN, USER, Harness, engine_settings
from tests.engine.fakes import FakeMachine, FakeProber, FakeProvider


async def test_refused_overdue_cleanup_does_not_requeue_at_once(h: Harness) -> None:
    """A retained volume whose cleanup is refused (7.5) stays, and the alarm is not set to 'now' again
    (which would reconcile it in a tight loop, emitting a refusal every poll)."""
    rec = await h.running()
    await h.fake.create_snapshot(rec.app_name, rec.volume_id)
    h.fake.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    retained = recovered.retained_volume_id
    assert retained
    await h.fake.create_machine(rec.app_name, config=MachineConfig(
        image="x", mounts=[Mount(volume=retained)], metadata={"sandbox_id": "sbx_other"}))
    h.clock.advance(h.engine.settings.retained_volume_retention + 1)
    after = await h.reconcile(rec.id)
    assert after.retained_volume_id == retained and retained in h.fake.volumes
    assert after.alarm_at is not None and after.alarm_at > h.clock.now()
    # nothing is due now: a worker's claim of due alarms finds nothing
    assert await h.engine.run_due_once() == 0


async def test_cutover_delete_failure_retains_with_cleanup_due_now_then_alarm_deletes(h: Harness) -> None:
    """SPEC §7.3: no snapshots, the delete fails → retained with cleanup due immediately; the alarm retries."""
    rec = await h.running()
    old = rec.volume_id
    h.fake.crash(rec.machine_id)
    h.fake.fail_next("delete_volume", ConflictError("volume is busy", status=412))
    recovered = await h.reconcile(rec.id)
    assert recovered.status == Status.RUNNING and recovered.volume_id != old
    assert recovered.retained_volume_id == old and old in h.fake.volumes
    assert recovered.retained_volume_cleanup_after is not None
    assert recovered.retained_volume_cleanup_after <= h.clock.now()  # due now, not after the retention
    ok = h.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
    assert ok.details["old_volume"] == "delete_failed_retained"
    assert recovered.alarm_at is not None and recovered.alarm_at > h.clock.now()  # but no tight loop
    h.clock.advance(h.engine.settings.interval_running * 2)
    assert await h.engine.run_due_once() == 1
    final = h.get(rec.id)
    assert final.retained_volume_id is None and final.retained_volume_cleanup_after is None
    assert set(h.fake.volumes) == {final.volume_id}
    assert h.event(rec.id, "instance.retained_volume_deleted").label == "alarm_retained_recovery_cleanup"


async def test_snapshot_listing_outcomes(make_harness: Any) -> None:
    """SPEC §7.3: exists → retained for the retention; none → deleted; listing fails → retained full term."""
    h = make_harness()
    retention = h.engine.settings.retained_volume_retention
    outcomes: dict[str, Any] = {}
    for case in ("exists", "none", "fails"):
        rec = await h.running()
        if case == "exists":
            await h.fake.create_snapshot(rec.app_name, rec.volume_id)
        if case == "fails":
            h.fake.fail_next("list_snapshots", ConflictError("snapshots unavailable", status=409))
        h.fake.crash(rec.machine_id)
        final = await h.reconcile(rec.id)
        assert final.status == Status.RUNNING
        outcomes[case] = (rec.volume_id, final)
    for case in ("exists", "fails"):
        old, final = outcomes[case]
        assert final.retained_volume_id == old and old in h.fake.volumes
        assert final.retained_volume_cleanup_after is not None
        assert (final.retained_volume_cleanup_after - h.clock.now()).total_seconds() == pytest.approx(retention)
    old, final = outcomes["none"]
    assert final.retained_volume_id is None and old not in h.fake.volumes


async def test_admin_cleanup_keeps_fields_when_the_delete_fails(h: Harness) -> None:
    """SPEC §7.7: the two retained fields are cleared only after the delete succeeded."""
    from sandkeep.engine.service import ProviderUnavailable

    rec = await h.running()
    await h.fake.create_snapshot(rec.app_name, rec.volume_id)
    h.fake.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    retained, due = recovered.retained_volume_id, recovered.retained_volume_cleanup_after
    h.fake.fail_next("delete_volume", ConflictError("volume is busy", status=412))
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
    fake = h.fake
    boot = fake._boot
    violations: list[list[str]] = []

    def checked_boot(m: FakeMachine) -> None:
        boot(m)
        owner = m.config.metadata.get("instance_id")
        started = [x.id for x in fake.machines.values()
                   if x.state == "started" and x.config.metadata.get("instance_id") == owner]
        if len(started) > 1:
            violations.append(started)

    fake._boot = checked_boot  # type: ignore[method-assign]
    rec = await h.running()
    await h.service.restart(USER, rec.id)
    await h.reconcile(rec.id)
    fake.crash(h.get(rec.id).machine_id)
    await h.reconcile(rec.id)
    assert h.get(rec.id).status == Status.RUNNING
    # a failed recovery (the replacement fails to boot), then an admin retry that succeeds
    fake.boot = "fail"
    fake.crash(h.get(rec.id).machine_id)
    failed = await h.reconcile(rec.id)
    assert failed.status == Status.STOPPED and failed.last_recovery_error
    fake.boot = "instant"
    await h.service.retry_recovery(ADMIN, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert violations == []
    assert [m.id for m in fake.started_machines()] == [final.machine_id]


class Crash(BaseException):
    """The controller process dies (not an Exception: nothing catches it, the lease is not released)."""


MUTATIONS = ("create_volume", "create_machine", "destroy_machine", "delete_volume", "start_machine",
             "stop_machine", "update_machine")


def crash_after(fake: FakeProvider, n: int) -> list[int]:
    """Make the ``n``-th mutating provider call succeed and then kill the controller."""
    seen = [0]
    for name in MUTATIONS:
        original = getattr(fake, name)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            async def go() -> Any:
                result = await _original(*args, **kwargs)
                seen[0] += 1
                if seen[0] == n:
                    raise Crash(f"killed after mutation {n}")
                return result
            return go()

        setattr(fake, name, wrapped)
    return seen


@pytest.mark.parametrize("snapshots", [False, True], ids=["no-snapshots", "snapshots"])
async def test_killing_the_controller_after_any_provider_mutation_converges(
        tmp_path: Any, store: Any, clock: Any, snapshots: bool) -> None:
    """SPEC §12.6 / §5: kill the controller right after each provider mutation of a recovery (before it
    persists the result), restart on the same database: it converges to the same end state — running on one
    new volume with the data, one started machine, no duplicate forks or machines, nothing leaked."""
    n = 1
    while True:
        fake = FakeProvider(clock)
        settings = engine_settings(tmp_path, lease_ttl=30.0)
        first = Engine(settings, store, fake, clock, worker_id=f"a{n}", prober=FakeProber(fake))
        first.service.wake = lambda _id: None
        created = await first.service.create_instance(USER, user_id=USER.user_id)
        running = await first.reconcile_now(created.id)
        assert running is not None and running.status == Status.RUNNING
        fake.volumes[running.volume_id].data["k"] = "v1"
        if snapshots:
            await fake.create_snapshot(running.app_name, running.volume_id)
        fake.crash(running.machine_id)
        seen = crash_after(fake, n)
        crashed = False
        try:
            await first.reconcile_now(created.id)
        except Crash:
            crashed = True
        mutations = seen[0]
        fake2 = fake  # the provider lives on; only the controller died
        for name in MUTATIONS:  # un-wrap
            fake2.__dict__.pop(name, None)
        clock.advance(settings.lease_ttl + 1)  # the dead worker's lease expires
        second = Engine(settings, store, fake2, clock, worker_id=f"b{n}", prober=FakeProber(fake2))
        second.service.wake = lambda _id: None
        final = None
        for _ in range(6):
            final = await second.reconcile_now(created.id)
            assert final is not None
            if final.status == Status.RUNNING and final.recovery_step is None:
                break
            clock.advance(settings.interval_busy + 1)
        assert final is not None and final.status == Status.RUNNING, (n, final)
        assert final.volume_id != running.volume_id, n
        assert fake2.volumes[final.volume_id].data == {"k": "v1"}, n
        assert [m.id for m in fake2.started_machines(running.app_name)] == [final.machine_id], n
        live = {m.id for m in fake2.machines.values() if m.app == running.app_name and m.state != "destroyed"}
        assert live == {final.machine_id}, (n, live)
        expected = {final.volume_id} | ({running.volume_id} if snapshots else set())
        assert {v.id for v in fake2.volumes.values() if v.app == running.app_name} == expected, n
        assert final.pending_recovery_volume_id is None, n
        assert (final.retained_volume_id == running.volume_id) == snapshots, n
        await first.stop()
        await second.stop()
        if not crashed:
            # destroy old machine, fork, create replacement (+ delete the old volume): each was a kill point
            assert mutations >= 3 and n == mutations + 1, (n, mutations)
            break
        n += 1


async def test_force_destroy_is_audited_whatever_the_outcome(h: Harness) -> None:
    from sandkeep.engine.service import InvalidTransition

    rec = await h.running()
    h.fake.boot = "slow"
    h.fake.crash(rec.machine_id)
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
        h.fake.crash(rec.machine_id)  # the host goes down with serve and comes back with machines stopped
    resumed = await h.reconcile(a.id)
    assert resumed.status == Status.RUNNING and resumed.pending_action is None
    assert (resumed.machine_id, resumed.volume_id, resumed.region) == (a.machine_id, a.volume_id, a.region)
    names = h.events(a.id)
    assert "instance.unexpected_stop_recovery_started" not in names
    assert names[-3:] == ["instance.stopped", "reconcile.resume_after_host_restart", "instance.started"]
    assert h.event(a.id, "instance.stopped").label == "planned_host_restart"
    assert set(h.fake.volumes) == {a.volume_id, b.volume_id, c.volume_id}  # nothing forked
    # the note is used once: a later real crash is an unexpected stop again
    h.fake.crash(resumed.machine_id)
    again = await h.reconcile(a.id)
    assert again.status == Status.RUNNING and again.volume_id != a.volume_id
    assert h.event(a.id, "instance.unexpected_stop_recovery_started").label == "alarm_stopped"


async def test_planned_host_restart_note_is_dropped_when_the_machine_kept_running(h: Harness) -> None:
    rec = await h.running()
    assert h.service.note_planned_host_restart() == 1
    same = await h.reconcile(rec.id)  # the host did not restart after all
    assert same.status == Status.RUNNING and same.pending_action is None
    h.fake.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    assert recovered.volume_id != rec.volume_id  # an unexpected stop: relocated


async def test_cutover_probe_never_carries_the_recovery_past_its_timeout(make_harness: Any) -> None:
    """SPEC §12.5 / §7.3: a replacement that starts late, with an unhealthy gateway, still cuts over within the
    recovery timeout — the non-blocking probe is cut short instead of running into an alarm_timeout failure."""
    h = make_harness(recovery_timeout=100.0, health_probe_timeout=60.0, health_probe_interval=1.0)
    rec = await h.running()
    h.fake.boot = "slow"
    h.fake.crash(rec.machine_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.RECOVERING and mid.machine_id
    h.clock.advance(70)
    h.fake.finish_boot(mid.machine_id)
    h.prober.unhealthy.add(mid.machine_id)
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
    await h.fake.create_snapshot(rec.app_name, rec.volume_id)
    h.fake.crash(h.get(rec.id).machine_id)
    await h.reconcile(rec.id)  # trigger, recovery started + succeeded (old volume retained)
    h.clock.advance(h.engine.settings.retained_volume_retention + 1)
    await h.reconcile(rec.id)  # alarm cleanup: delete_volume + retained_volume_deleted
    h.fake.boot = "fail"
    h.fake.crash(h.get(rec.id).machine_id)
    failed = await h.reconcile(rec.id)  # the replacement fails to boot: recovery failed
    assert failed.status == Status.STOPPED
    await h.service.start(USER, rec.id)
    await h.reconcile(rec.id)  # start_failed
    h.fake.boot = "instant"
    stopped = h.get(rec.id)
    h.fake.machines.pop(stopped.machine_id)
    await h.reconcile(rec.id)  # clear_stale_machine
    h.fake.volumes.pop(stopped.volume_id)
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
    h.fake.boot = "slow"
    h.fake.crash(rec.machine_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.RECOVERING
    h.fake.set_state(mid.machine_id, state)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.last_recovery_error and final.last_recovery_error_at
    failed = h.event(rec.id, "instance.unexpected_stop_recovery_failed")
    assert failed.label == f"alarm_{state}" and failed.error and failed.duration_ms is not None
    assert final.volume_id == rec.volume_id and rec.volume_id in h.fake.volumes
    assert mid.pending_recovery_volume_id not in h.fake.volumes and final.pending_recovery_volume_id is None


async def test_destroy_keeps_each_pointer_until_the_provider_confirms(h: Harness) -> None:
    """SPEC §8: pointers are cleared only after the provider confirmed the delete; nothing is ever created."""
    rec = await h.running()
    await h.service.destroy(USER, rec.id)
    h.fake.fail_next("destroy_machine", ConflictError("machine is busy", status=409))
    first = await h.reconcile(rec.id)
    assert first.status == Status.DESTROYING
    assert first.pending_destroy_machine_id == rec.machine_id and first.pending_destroy_volume_id == rec.volume_id
    h.fake.fail_next("delete_volume", ConflictError("volume is busy", status=412))
    h.clock.advance(h.engine.settings.interval_busy * 2)
    second = await h.reconcile(rec.id)
    assert second.status == Status.DESTROYING
    assert second.pending_destroy_machine_id is None and second.machine_id is None  # confirmed: cleared
    assert second.pending_destroy_volume_id == rec.volume_id and rec.volume_id in h.fake.volumes  # kept
    h.clock.advance(h.engine.settings.interval_busy * 2)
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED and final.pending_destroy_volume_id is None and not h.fake.volumes
    created = [c for c in h.fake.calls if c[0] in ("created_machine", "created_volume")]
    assert len(created) == 2  # the original volume and machine only: destroy never creates anything
