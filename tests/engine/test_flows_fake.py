"""Engine flows on the in-memory provider and the real SqlStore (SQLite), time on a FakeClock."""

from __future__ import annotations

import pytest

from sandkeep.engine.service import InstanceBusy, InvalidConfig, InvalidTransition, RecoveringRefused
from sandkeep.provider.errors import TransientError
from sandkeep.store.records import Status
from tests.engine.conftest import ADMIN, USER, Harness


async def test_provision_starts_and_runs(h: Harness) -> None:
    record = await h.service.create_instance(USER, user_id=USER.user_id, env={"GREETING": "hi"},
                                             secrets={"API_KEY": "s3cret"})
    assert record.status == Status.STARTING
    assert h.woken == [record.id]
    assert record.app_name.startswith("sk-") and len(record.app_name) <= 63
    final = await h.reconcile(record.id)
    assert final.status == Status.RUNNING
    assert final.machine_id and final.volume_id and final.region == "lcl-a"
    machine = h.fake.machines[final.machine_id]
    assert machine.config.env["API_KEY"] == "s3cret" and machine.config.env["GREETING"] == "hi"
    assert machine.config.metadata["sandbox_id"] == final.sandbox_id
    assert machine.config.metadata["instance_id"] == final.id
    assert "s3cret" not in str(final.secrets_encrypted)
    assert h.events(record.id)[:2] == ["instance.provisioned", "instance.start_requested"]
    assert "instance.started" in h.events(record.id)
    assert final.alarm_at is not None and final.alarm_at > h.clock.now()


async def test_stop_is_not_an_unexpected_stop(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.pending_action is None
    assert "instance.unexpected_stop_recovery_started" not in h.events(rec.id)
    assert h.fake.machines[rec.machine_id].state == "stopped"
    with pytest.raises(InvalidTransition):
        await h.service.stop(USER, rec.id)


async def test_unexpected_stop_recovers_to_another_region(h: Harness) -> None:
    rec = await h.running()
    h.fake.volumes[rec.volume_id].data["note"] = "hello"
    h.fake.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert final.region != "lcl-a" and final.volume_id != rec.volume_id
    assert h.fake.volumes[final.volume_id].data == {"note": "hello"}
    assert rec.volume_id not in h.fake.volumes  # no snapshots: deleted at once
    assert final.retained_volume_id is None and final.pending_recovery_volume_id is None
    assert h.fake.machines[rec.machine_id].state == "destroyed"
    assert len(h.fake.started_machines()) == 1
    names = h.events(rec.id)
    assert names.index("instance.unexpected_stop_recovery_started") < names.index(
        "instance.unexpected_stop_recovery_succeeded")
    ok = h.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
    assert ok.label == "alarm_relocated" and ok.duration_ms is not None
    started = h.event(rec.id, "instance.unexpected_stop_recovery_started")
    assert started.label == "alarm_stopped" and started.value == 1
    assert "detection_latency_ms" in started.details
    # the replacement's events name the replacement and its region, not the old record's
    created = h.event(rec.id, "reconcile.create_machine")
    assert created.label == "recovery"
    assert created.machine_id == final.machine_id and created.region == final.region
    assert created.volume_id == final.volume_id
    assert h.event(rec.id, "reconcile.gateway_health_probe").machine_id == final.machine_id


async def test_recovery_retains_old_volume_with_snapshots(h: Harness) -> None:
    rec = await h.running()
    await h.fake.create_snapshot(rec.app_name, rec.volume_id)
    h.fake.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert final.retained_volume_id == rec.volume_id
    assert final.retained_volume_cleanup_after is not None
    assert final.retained_volume_cleanup_after > h.clock.now()
    assert rec.volume_id in h.fake.volumes
    # the alarm fires the cleanup once the retention has passed
    h.clock.advance(h.engine.settings.retained_volume_retention + 1)
    after = await h.reconcile(rec.id)
    assert after.retained_volume_id is None and after.retained_volume_cleanup_after is None
    assert rec.volume_id not in h.fake.volumes
    assert set(h.fake.volumes) == {after.volume_id}  # SPEC §12.3: nothing leaked
    assert h.event(rec.id, "instance.retained_volume_deleted").label == "alarm_retained_recovery_cleanup"


async def test_transient_error_backs_off_without_status_change(h: Harness) -> None:
    rec = await h.running()
    h.fake.fail_next("get_machine", TransientError("boom", status=503))
    after = await h.reconcile(rec.id)
    assert after.status == Status.RUNNING and after.provider_error_count == 1
    h.fake.fail_next("get_machine", TransientError("boom", status=503))
    again = await h.reconcile(rec.id)
    assert again.provider_error_count == 2
    assert (again.alarm_at - h.clock.now()).total_seconds() >= (after.alarm_at - h.clock.now()).total_seconds()
    ok = await h.reconcile(rec.id)
    assert ok.provider_error_count == 0 and ok.status == Status.RUNNING


async def test_busy_gating_and_destroy_during_recovery(h: Harness) -> None:
    rec = await h.running()
    h.fake.boot = "slow"
    h.fake.crash(rec.machine_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.RECOVERING  # the replacement is still booting: 408 hand-off
    for action in (h.service.start, h.service.stop, h.service.restart):
        with pytest.raises(InstanceBusy):
            await action(USER, rec.id)
    with pytest.raises(RecoveringRefused):
        await h.service.destroy(USER, rec.id)
    with pytest.raises(RecoveringRefused):
        await h.service.destroy(ADMIN, rec.id)  # admin without force
    pending = mid.pending_recovery_volume_id
    assert pending in h.fake.volumes
    await h.service.destroy(ADMIN, rec.id, force=True)
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED
    assert not h.fake.volumes  # old, pending: all gone
    assert all(m.state == "destroyed" for m in h.fake.machines.values())
    with pytest.raises(InvalidTransition):
        await h.service.start(USER, rec.id)


async def test_unknown_size_is_invalid_config(h: Harness) -> None:
    with pytest.raises(InvalidConfig):
        await h.service.create_instance(USER, user_id=USER.user_id, size="huge-99x")
    with pytest.raises(InvalidConfig):
        await h.service.create_instance(USER, user_id=USER.user_id, env={"FLY_REGION": "x"})
    assert h.store.list_instances().items == []
