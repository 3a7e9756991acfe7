"""A controller killed while its recovery waits for the replacement converges (issue 10, SPEC §12.6).

``kill -9`` of ``sandkeep serve`` takes its local host down too: the replacement comes back ``stopped`` (exit
137, not asked for). Three things made the successor fail that recovery: (a) the alarm set for the wait lay a
wait plus two lease TTLs ahead, (b) the detector never looked at what stopped while nobody watched, (c) a
replacement stopped by its host was a failed recovery. Decisions are tested directly; the rest runs against the
host's own model in process on a virtual clock (:mod:`tests.engine.test_recovery_deadline`).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from sandkeep.config import Settings
from sandkeep.engine import recovery
from sandkeep.engine.actions import Emit, Outcome, Persist, StartMachine, WaitMachine
from sandkeep.engine.detector import Detector
from sandkeep.provider.errors import TransientError
from sandkeep.provider.models import Machine, MachineEvent
from sandkeep.store.records import InstanceRecord, Status
from tests.engine.conftest import USER
from tests.engine.test_decisions_table import NOW, make_record, observe
from tests.engine.test_recovery_deadline import World, world
from tests.support.wait import async_wait_until

SETTINGS = Settings()
BOOT = {"machine.boot.first": 3.0}  # a new machine takes 3 s to start: the recovery waits for it


def _stopped(requested: bool | None) -> Machine:
    events = [] if requested is None else [MachineEvent(type="exit", status="stopped", timestamp=1, request={
        "exit_event": {"exit_code": 0 if requested else 137, "requested_stop": requested}})]
    return Machine(id="m1", state="stopped", region="lcl-b", events=events)


def test_a_replacement_stopped_by_its_host_is_started_again_a_bounded_number_of_times() -> None:
    rec = make_record(Status.RECOVERING, "fresh")
    obs = observe(rec, "stopped")
    obs.machine = _stopped(requested=False)
    actions = recovery.decide(rec, obs, SETTINGS, NOW)
    assert [a for a in actions if not isinstance(a, Emit)] == [
        Persist({"recovery_step": "wait:1"}), StartMachine("m1")]
    # started again in this pass (the provider may still say stopped): the wait follows it up, no failure
    again = rec.copy(recovery_step="wait:1")
    obs.outcomes = {StartMachine("m1"): Outcome(True)}
    assert recovery.decide(again, obs, SETTINGS, NOW) == [WaitMachine("m1")]
    # every allowed start used up: the next unasked stop fails the recovery
    spent = rec.copy(recovery_step=f"wait:{SETTINGS.recovery_replacement_starts}")
    obs = observe(spent, "stopped")
    obs.machine = _stopped(requested=False)
    failing = recovery.decide(spent, obs, SETTINGS, NOW)
    assert any(isinstance(a, Persist) and a.changes.get("recovery_step") == "failing_replacement:alarm_stopped"
               for a in failing), failing


def test_a_replacement_someone_stopped_still_fails_the_recovery() -> None:
    for requested in (True, None):  # a stop that was asked for, or one the provider does not explain
        rec = make_record(Status.RECOVERING, "fresh")
        obs = observe(rec, "stopped")
        obs.machine = _stopped(requested=requested)
        actions = recovery.decide(rec, obs, SETTINGS, NOW)
        assert not any(isinstance(a, StartMachine) for a in actions)
        assert any(isinstance(a, Persist) and a.changes.get("recovery_step") == "failing_replacement:alarm_stopped"
                   for a in actions), actions


async def _waiting_recovery(w: World) -> tuple[InstanceRecord, str]:
    """A running instance whose machine crashed; its recovery has created the replacement and handed the wait
    off (a 408). Returns the record and the replacement's id (started by now)."""
    created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
    rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
    assert rec.machine_id
    w.faults.configure({"operation": "machine.wait", "status": 408})
    await w.host.crash_machine(rec.app_name, rec.machine_id)
    await w.settle(rec.machine_id, "stopped")
    waiting = await w.drive(rec.id, lambda r: r.recovery_step == recovery.STEP_WAIT)
    assert waiting.machine_id and waiting.machine_id != rec.machine_id
    w.faults.clear()
    await w.settle(waiting.machine_id, "started")
    return waiting, waiting.machine_id


def _started(w: World, app: str) -> list[str]:
    return [m["id"] for m in w.host.machines.values() if m["app"] == app and m["state"] == "started"]


async def test_a_replacement_killed_with_its_host_is_started_again_and_the_recovery_succeeds(tmp_path: Path) -> None:
    async with world(tmp_path, delays=BOOT) as w:
        rec, replacement = await _waiting_recovery(w)
        await w.host.crash_machine(rec.app_name, replacement)  # exit 137, not asked for: what a host restart does
        await w.settle(replacement, "stopped")
        final = await w.drive(rec.id, lambda r: r.status in (Status.RUNNING, Status.STOPPED))
        assert final.status == Status.RUNNING, final.last_recovery_error
        assert final.machine_id == replacement  # the same replacement, on the recovery volume
        assert _started(w, rec.app_name) == [replacement]
        restarts = w.store.list_events(instance_id=rec.id, name="reconcile.recovery_replacement_restart").items
        assert len(restarts) == 1


async def test_the_alarm_during_a_wait_lies_just_past_the_wait(tmp_path: Path) -> None:
    """A controller that dies inside a wait leaves its successor an alarm one busy interval past the wait."""
    async with world(tmp_path, delays=BOOT, machine_wait_timeout=10.0, lease_ttl=30.0) as w:
        created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
        rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
        assert rec.machine_id
        w.faults.configure({"operation": "machine.wait", "latency": 9.0})  # the wait call blocks 9 s
        await w.host.crash_machine(rec.app_name, rec.machine_id)
        await w.settle(rec.machine_id, "stopped")
        task = asyncio.create_task(w.engine.reconcile_now(rec.id))
        for _ in range(5_000):  # no virtual time passes while this loop keeps the event loop busy
            now = w.get(rec.id)
            if now.recovery_step == recovery.STEP_WAIT and now.lease_owner is None:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError(f"the pass never released its lease for the wait: {w.get(rec.id)}")
        assert now.alarm_at is not None
        ahead = (now.alarm_at - w.clock.now()).total_seconds()
        assert ahead <= 10.0 + w.engine.settings.interval_busy, ahead  # was 10 + 2 x 30
        await task


async def test_the_detector_sweeps_at_start_up(tmp_path: Path) -> None:
    """What stopped while no controller watched (the replacement, killed with the host) is woken at once."""
    async with world(tmp_path, delays=BOOT) as w:
        rec, replacement = await _waiting_recovery(w)
        await w.host.crash_machine(rec.app_name, replacement)
        await w.settle(replacement, "stopped")
        woken: list[str] = []
        detector = Detector(w.engine.settings, w.store, w.client, woken.append)
        assert detector.uses_watch
        task = asyncio.create_task(detector.run())
        try:
            for _ in range(300):
                if woken:
                    break
                await w.clock.sleep(0.1)
            assert woken == [rec.id]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_killed_after_the_cutover_deleted_the_old_volume_it_completes_even_past_the_timeout(
        tmp_path: Path) -> None:
    """The controller died between deleting the old volume and the cutover write, and came back after the
    recovery timeout: the fork is the only copy of the data now, so the recovery completes (a timeout would
    delete it)."""
    async with world(tmp_path, delays=BOOT, recovery_timeout=30.0) as w:
        rec, replacement = await _waiting_recovery(w)
        assert rec.pending_recovery_volume_id
        await w.host.delete_volume(rec.app_name, rec.volume_id or "")  # what the cutover did before the kill
        w.clock.advance(60.0)  # the successor comes back past the recovery timeout
        await w.engine.reconcile_now(rec.id)
        final = w.get(rec.id)
        assert final.status == Status.RUNNING, final.last_recovery_error
        assert (final.machine_id, final.volume_id) == (replacement, rec.pending_recovery_volume_id)
        assert rec.pending_recovery_volume_id in w.host.volumes


class _FlakyStream:
    """A provider whose watch stream breaks once (its host restarted): events of that gap are lost."""

    supports_watch = True

    def __init__(self) -> None:
        self.watches = 0
        self.listed = 0
        self.stopped: set[str] = set()

    async def watch_events(self, since: int, timeout: float) -> tuple[int, list[dict[str, object]]]:
        self.watches += 1
        if self.watches == 3:  # the stream breaks; the machine stops while nobody listens
            self.stopped.add("m1")
            raise TransientError("host restarting", operation="watch")
        if timeout > 0:
            await asyncio.sleep(0.01)
        return 7, []

    async def list_machines(self, app: str, **_: object) -> list[Machine]:
        self.listed += 1
        return [Machine(id="m1", state="stopped" if "m1" in self.stopped else "started", region="r1")]


async def test_the_detector_sweeps_again_after_its_event_stream_broke(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
        rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
        w.store.update(w.store.claim(rec.id, "t", 30, w.clock.now()), "t", {"machine_id": "m1"})
        w.store.release(w.get(rec.id), "t")
        provider = _FlakyStream()
        woken: list[str] = []
        detector = Detector(w.engine.settings, w.store, provider, woken.append)  # type: ignore[arg-type]
        task = asyncio.create_task(detector.run())
        try:
            async def swept() -> list[str] | None:
                return woken or None

            await async_wait_until(swept, timeout=10, message="a wake after the stream broke")
            assert woken == [rec.id] and provider.listed == 2  # at start-up (nothing), after the break (m1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
