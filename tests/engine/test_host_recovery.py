"""SPEC §7 behaviours against a real local host process, the real client and SqlStore (SQLite).

Tests that must stop a recovery half-way drive the engine by hand (no worker loop) and make the host answer
the machine wait with 503s (its fault injection): the pass backs off right after persisting the replacement
(step ``wait``). The 408 test uses ``slow_host``, whose first boot (1.5 s) outlasts a real 1 s wait.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandkeep.clock import FakeClock
from sandkeep.engine.service import Actor, CleanupRefused, InstanceBusy, RecoveringRefused
from sandkeep.store.records import InstanceRecord, Status
from tests.engine.conftest import ADMIN, PLATFORM, new_user
from tests.engine.hostsupport import Rig, rig
from tests.support.procs import HostHandle
from tests.support.wait import async_wait_until

PAUSE: dict[str, Any] = {"machine_wait_timeout": 1.0, "health_probe_timeout": 5.0}


async def provision(r: Rig, **kw: Any) -> InstanceRecord:
    user = new_user()
    created = await r.service.create_instance(PLATFORM, user_id=user, **kw)
    if r.engine.started:
        return await r.wait_status(created.id, "running")
    for _ in range(5):
        rec = await r.engine.reconcile_now(created.id)
        assert rec is not None
        if rec.status == Status.RUNNING:
            return rec
    raise AssertionError(f"not running: {r.events(created.id)}")


async def paused_recovery(r: Rig, rec: InstanceRecord, *, slow: bool = False) -> InstanceRecord:
    """Crash the machine and run one pass that stops at step 'wait' with the replacement persisted: by a real
    408 on ``slow_host``, else by the host failing the wait call with 503s (a transient error: back off)."""
    await r.crash(rec)
    await async_wait_until(lambda: _state(r, rec, "stopped"), timeout=20, message="machine stopped")
    if not slow:
        await r.local("POST", "/_local/faults", json={"operation": "machine.wait", "status": 503, "count": 3})
    try:
        mid = await r.engine.reconcile_now(rec.id)
    finally:
        if not slow:
            await r.local("DELETE", "/_local/faults")
    assert mid is not None
    assert mid.status == Status.RECOVERING, r.events(rec.id)
    assert mid.recovery_step == "wait" and mid.pending_recovery_volume_id and mid.machine_id != rec.machine_id
    if slow:
        assert "reconcile.unexpected_stop_recovery_wait_timeout" in r.events(rec.id)
    else:
        assert mid.provider_error_count == 1
    return mid


async def _state(r: Rig, rec: InstanceRecord, state: str, machine_id: str | None = None) -> bool:
    mid = machine_id or rec.machine_id
    return any(m["id"] == mid and m["state"] == state for m in await r.machines(rec.app_name))


def manual(r: Rig) -> Rig:
    r.service.wake = lambda _id: None
    return r


# ------------------------------------------------------------------------------------------ 7.2 / 7.3


async def test_relocation_keeps_data_and_excludes_old_region(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session) as r:
        rec = await provision(r)
        put = await r.gateway(rec, "PUT", "/data/note", b"survives")
        assert put.status_code == 201, put.text
        await r.crash(rec)
        final = await r.wait_recovered(rec)
        assert final.volume_id != rec.volume_id
        assert final.region != rec.region  # 3 regions: the old one is dropped
        got = await r.gateway(final, "GET", "/data/note")
        assert got.status_code == 200 and got.content == b"survives"
        vols = {v["id"] for v in await r.volumes(rec.app_name)}
        assert vols == {final.volume_id}  # no snapshots: the old volume was deleted at once
        started = [m["id"] for m in await r.machines(rec.app_name) if m["state"] == "started"]
        assert started == [final.machine_id]  # §12.2
        begin = await r.event(rec.id, "instance.unexpected_stop_recovery_started")
        assert begin.label == "alarm_stopped"
        assert "detection_latency_ms" in begin.details
        done = await r.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
        assert done.details["old_volume"] == "deleted" and done.details["gateway_healthy"] is True
        assert r.engine.detector.woken >= 1  # the host's watch stream woke it


async def test_old_volume_retained_when_it_has_snapshots(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session) as r:
        rec = await provision(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        await r.crash(rec)
        final = await r.wait_recovered(rec)
        assert final.retained_volume_id == rec.volume_id
        assert final.retained_volume_cleanup_after is not None
        left = (final.retained_volume_cleanup_after - r.clock.now()).total_seconds()
        assert left > r.engine.settings.retained_volume_retention - 120
        assert {v["id"] for v in await r.volumes(rec.app_name)} == {rec.volume_id, final.volume_id}


async def test_old_volume_deleted_after_force_destroying_its_attached_machine(
        tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        # a stray machine of this sandbox still holds the old volume: 7.5 force-destroys it first
        stray = await r.local("POST", f"/v1/apps/{rec.app_name}/machines", json={
            "name": "stray", "region": rec.region, "skip_launch": True,
            "config": {"image": "sandkeep/gateway", "mounts": [{"volume": rec.volume_id, "path": "/data"}],
                       "metadata": {"sandbox_id": rec.sandbox_id}}})
        stray_id = stray.json()["id"]
        await async_wait_until(lambda: _state(r, mid, "started"), timeout=30, message="replacement started")
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.RUNNING, r.events(rec.id)
        assert final.retained_volume_id is None
        vols = {v["id"] for v in await r.volumes(rec.app_name)}
        assert vols == {final.volume_id}
        assert not any(m["id"] == stray_id for m in await r.machines(rec.app_name))


async def test_408_keeps_recovering_then_reconcile_completes(tmp_path: Path, slow_host: HostHandle) -> None:
    async with rig(tmp_path, slow_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec, slow=True)
        assert mid.last_recovery_error is None
        assert "instance.unexpected_stop_recovery_failed" not in r.events(rec.id)
        await async_wait_until(lambda: _state(r, mid, "started"), timeout=30, message="replacement started")
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.RUNNING
        assert final.machine_id == mid.machine_id and final.volume_id == mid.pending_recovery_volume_id


# ------------------------------------------------------------------------------------------ 7.4 / 7.6


async def test_replacement_gone_stops_and_deletes_pending_volume(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        await r.local("DELETE", f"/v1/apps/{rec.app_name}/machines/{mid.machine_id}?force=true")
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.STOPPED
        assert final.last_recovery_error and "gone" in final.last_recovery_error
        assert final.last_recovery_error_at is not None
        assert final.pending_recovery_volume_id is None
        assert (await r.event(rec.id, "instance.unexpected_stop_recovery_failed")).label == "alarm_machine_gone"
        vols = {v["id"] for v in await r.volumes(rec.app_name)}
        assert vols == {rec.volume_id}  # pending deleted, the original kept (§12.7)
        assert final.volume_id == rec.volume_id


async def test_replacement_stopped_means_stopped(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        await async_wait_until(lambda: _state(r, mid, "started"), timeout=30, message="replacement started")
        await r.local("POST", f"/v1/apps/{rec.app_name}/machines/{mid.machine_id}/stop")
        await async_wait_until(lambda: _state(r, mid, "stopped"), timeout=30, message="replacement stopped")
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.STOPPED
        assert (await r.event(rec.id, "instance.unexpected_stop_recovery_failed")).label == "alarm_stopped"
        assert {v["id"] for v in await r.volumes(rec.app_name)} == {rec.volume_id}


async def test_replacement_failed_means_stopped(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, machine_wait_timeout=2.0) as r:
        rec = await provision(r)
        # the replacement gets the current configuration: an image that fails to boot
        await r.service.update_config(ADMIN, rec.id, env={"MARK": "1"})
        r.store.update(r.store.claim(rec.id, "t", 30, r.clock.now()), "t", {"image": "sandkeep/crashy"})
        r.store.release(r.get(rec.id), "t")
        await r.crash(rec)
        final = await r.wait_for(rec.id, lambda x: x.status == "stopped", "stopped")
        failed = await r.event(rec.id, "instance.unexpected_stop_recovery_failed")
        assert failed.label == "alarm_failed", r.events(rec.id)
        assert final.last_recovery_error
        assert {v["id"] for v in await r.volumes(rec.app_name)} == {rec.volume_id}


async def test_recovery_timeout_stops_with_timed_out(tmp_path: Path, quick_host: HostHandle) -> None:
    clock = FakeClock()
    async with rig(tmp_path, quick_host, start=False, clock=clock, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        clock.advance(r.engine.settings.recovery_timeout + 1)
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.STOPPED
        assert final.last_recovery_error and "timed out" in final.last_recovery_error
        assert (await r.event(rec.id, "instance.unexpected_stop_recovery_failed")).label == "alarm_timeout"
        machines = {m["id"]: m["state"] for m in await r.machines(rec.app_name)}
        assert mid.machine_id not in machines  # the replacement was destroyed
        assert {v["id"] for v in await r.volumes(rec.app_name)} == {rec.volume_id}


async def test_pending_volume_never_deleted_while_recovering(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        pending = mid.pending_recovery_volume_id
        # more alarms while the provider is flaky: each pass sees a transient error and must keep the fork
        await r.local("POST", "/_local/faults", json={"operation": "machine.get", "status": 503, "count": 9})
        try:
            for _ in range(3):
                again = await r.engine.reconcile_now(rec.id)
                assert again is not None and again.status == Status.RECOVERING
                assert again.pending_recovery_volume_id == pending
                assert pending in {v["id"] for v in await r.volumes(rec.app_name)}
        finally:
            await r.local("DELETE", "/_local/faults")
        deletes = r.store.list_events(instance_id=rec.id, name="reconcile.delete_volume").items
        assert all(e.details.get("deleted_volume_id") != pending for e in deletes)
        await async_wait_until(lambda: _state(r, mid, "started"), timeout=30, message="replacement started")
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.RUNNING and final.volume_id == pending


# ------------------------------------------------------------------------------------------ 7.5 / 7.7


async def _retained(r: Rig) -> tuple[InstanceRecord, InstanceRecord]:
    rec = await provision(r)
    await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
    await r.crash(rec)
    final = await r.wait_recovered(rec)
    assert final.retained_volume_id == rec.volume_id
    return rec, final


async def test_cleanup_refused_when_attached_machine_names_another_sandbox(
        tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session) as r:
        rec, _final = await _retained(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/machines", json={
            "name": "intruder", "region": rec.region, "skip_launch": True,
            "config": {"image": "sandkeep/gateway", "mounts": [{"volume": rec.volume_id, "path": "/data"}],
                       "metadata": {"sandbox_id": "sbx_someoneelse"}}})
        with pytest.raises(CleanupRefused) as refused:
            await r.service.cleanup_retained_volume(ADMIN, rec.id)
        assert "Refusing to destroy attached machine" in refused.value.message
        after = r.get(rec.id)
        assert after.retained_volume_id == rec.volume_id and after.retained_volume_cleanup_after is not None
        assert rec.volume_id in {v["id"] for v in await r.volumes(rec.app_name)}
        assert any(m["name"] == "intruder" for m in await r.machines(rec.app_name))
        audit = r.store.list_audit(instance_id=rec.id).items[0]
        assert audit.action == "retained_volume_cleanup" and audit.outcome == "refused"


async def test_admin_cleanup_clears_both_fields(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session) as r:
        rec, final = await _retained(r)
        deleted = await r.service.cleanup_retained_volume(ADMIN, rec.id)
        assert deleted == rec.volume_id
        after = r.get(rec.id)
        assert after.retained_volume_id is None and after.retained_volume_cleanup_after is None
        assert {v["id"] for v in await r.volumes(rec.app_name)} == {final.volume_id}  # §12.3
        assert (await r.event(rec.id, "instance.retained_volume_deleted")).label == "admin_retained_volume_cleanup"
        assert r.store.list_audit(instance_id=rec.id).items[0].outcome == "ok"


async def test_admin_cleanup_refused_while_recovering(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        await paused_recovery(r, rec)
        with pytest.raises(RecoveringRefused):
            await r.service.cleanup_retained_volume(ADMIN, rec.id)
        assert r.store.list_audit(instance_id=rec.id).items[0].outcome == "refused"


# ------------------------------------------------------------------------------------------ triggers


async def test_created_machine_does_not_trigger_recovery(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, start=False) as r:
        manual(r)
        rec = await provision(r)
        created = await r.local("POST", f"/v1/apps/{rec.app_name}/machines", json={
            "name": "idle", "region": rec.region, "skip_launch": True,
            "config": {"image": "sandkeep/gateway", "metadata": {"sandbox_id": rec.sandbox_id,
                                                                  "instance_id": rec.id}}})
        assert created.json()["state"] == "created"
        lease = r.store.claim(rec.id, "t", 30, r.clock.now())
        assert lease is not None
        r.store.release(r.store.update(lease, "t", {"machine_id": created.json()["id"]}), "t")
        after = await r.engine.reconcile_now(rec.id)
        assert after is not None and after.status == Status.RUNNING and after.health_fail_count == 0
        assert "instance.unexpected_stop_recovery_started" not in r.events(rec.id)


async def test_failed_machine_means_stopped(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, start=False) as r:
        manual(r)
        rec = await provision(r)
        machine = next(m for m in await r.machines(rec.app_name) if m["id"] == rec.machine_id)
        config = dict(machine["config"], image="sandkeep/crashy")
        await r.local("POST", f"/v1/apps/{rec.app_name}/machines/{rec.machine_id}", json={"config": config})
        await async_wait_until(lambda: _state(r, rec, "failed"), timeout=30, message="machine failed")
        after = await r.engine.reconcile_now(rec.id)
        assert after is not None and after.status == Status.STOPPED
        assert "instance.unexpected_stop_recovery_started" not in r.events(rec.id)
        assert (await r.event(rec.id, "instance.stopped")).label == "machine_failed"
        assert after.volume_id == rec.volume_id


async def test_healthy_check_resets_fail_count(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, start=False, unexpected_stop_threshold=2) as r:
        manual(r)
        rec = await provision(r)
        await r.crash(rec)
        await async_wait_until(lambda: _state(r, rec, "stopped"), timeout=20, message="machine stopped")
        once = await r.engine.reconcile_now(rec.id)
        assert once is not None and once.status == Status.RUNNING and once.health_fail_count == 1
        await r.local("POST", f"/v1/apps/{rec.app_name}/machines/{rec.machine_id}/start")
        await async_wait_until(lambda: _state(r, rec, "started"), timeout=20, message="machine started")
        healed = await r.engine.reconcile_now(rec.id)
        assert healed is not None and healed.status == Status.RUNNING and healed.health_fail_count == 0
        assert "instance.unexpected_stop_recovery_started" not in r.events(rec.id)


# ------------------------------------------------------------------------------------------ user actions


async def test_busy_gating_on_every_user_action(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        user = new_user()
        owner = Actor(user_id=user, role="user")
        starting = await r.service.create_instance(owner, user_id=user)
        assert starting.status == Status.STARTING
        for action in (r.service.start, r.service.stop, r.service.restart):
            with pytest.raises(InstanceBusy):
                await action(owner, starting.id)
        rec = await provision(r)
        owner = Actor(user_id=rec.user_id, role="user")
        await paused_recovery(r, rec)
        for action in (r.service.start, r.service.stop, r.service.restart):
            with pytest.raises(InstanceBusy) as busy:
                await action(owner, rec.id)
            assert busy.value.http_status == 409 and busy.value.code == "instance_busy"
        with pytest.raises(RecoveringRefused):
            await r.service.destroy(owner, rec.id)
        await r.service.destroy(ADMIN, rec.id, force=True)  # destroying is busy too
        for action in (r.service.start, r.service.stop, r.service.restart):
            with pytest.raises(InstanceBusy):
                await action(owner, rec.id)


async def test_destroy_during_recovery(tmp_path: Path, quick_host: HostHandle) -> None:
    async with rig(tmp_path, quick_host, start=False, **PAUSE) as r:
        manual(r)
        rec = await provision(r)
        mid = await paused_recovery(r, rec)
        destroying = await r.service.destroy(ADMIN, rec.id, force=True)
        assert destroying.status == Status.DESTROYING
        assert destroying.pending_destroy_machine_id == mid.machine_id
        final = await r.engine.reconcile_now(rec.id)
        assert final is not None and final.status == Status.DESTROYED, r.events(rec.id)
        assert await r.volumes(rec.app_name) == []
        assert [m for m in await r.machines(rec.app_name) if m["state"] != "destroyed"] == []
        assert r.store.list_audit(instance_id=rec.id).items[0].action == "force_destroy"


# ------------------------------------------------------------------------------------------ beyond the origin


async def test_region_outage_restores_newest_snapshot(tmp_path: Path, host: HostHandle) -> None:
    async with rig(tmp_path, host) as r:
        rec = await provision(r)
        assert (await r.gateway(rec, "PUT", "/data/before", b"kept")).status_code == 201
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        assert (await r.gateway(rec, "PUT", "/data/after", b"lost")).status_code == 201
        await r.local("POST", f"/_local/regions/{rec.region}/outage", json={"down": True})
        try:
            final = await r.wait_recovered(rec)
        finally:
            await r.local("POST", f"/_local/regions/{rec.region}/outage", json={"down": False})
        assert final.region != rec.region
        assert (await r.gateway(final, "GET", "/data/before")).content == b"kept"
        assert (await r.gateway(final, "GET", "/data/after")).status_code == 404  # after the snapshot: lost
        restored = await r.event(rec.id, "instance.restored_from_snapshot")
        assert restored.details["data_loss"] is True and restored.details["snapshot_created_at"]
        # it may hold writes newer than the snapshot: flagged for an admin, never deleted automatically (SPEC §15)
        assert final.flagged_volume_ids == [rec.volume_id] and final.retained_volume_id is None
