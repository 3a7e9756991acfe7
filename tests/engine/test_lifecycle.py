"""Every reconcile branch on the one provider model (tests/support/model.py: the host's Fly model with simulated
machines behind the real Machines client) + SqlStore, time on the simulation's virtual clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from sandkeep.engine.naming import volume_name
from sandkeep.engine.service import CleanupRefused, Forbidden, InvalidTransition, RecoveringRefused
from sandkeep.provider.models import MachineConfig, Mount
from sandkeep.store.records import Status
from tests.engine.conftest import ADMIN, USER, Harness

NEVER = 30 * 86400.0  # a boot delay no test waits out


def force(h: Harness, instance_id: str, **changes: Any) -> None:
    """Write fields directly, as a test owner holding the lease for one write."""
    lease = h.store.claim(instance_id, "test", 30, h.clock.now())
    assert lease is not None
    h.store.release(h.store.update(lease, "test", changes), "test")


def slow_boots(h: Harness, seconds: float = NEVER) -> None:
    """New machines take ``seconds`` to boot (the engine's wait hands off with a 408 meanwhile)."""
    h.model.host.opt.delays["machine.boot.first"] = seconds


# ------------------------------------------------------------------------------------------ starting


async def test_start_hard_timeout_stops(h: Harness) -> None:
    slow_boots(h)
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.STARTING and mid.machine_id  # still booting: stays starting
    await h.pass_time(h.engine.settings.start_timeout + 1)  # soft timeout: still progressing
    assert (await h.reconcile(rec.id)).status == Status.STARTING
    await h.pass_time(h.engine.settings.start_hard_timeout)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    failed = h.event(rec.id, "instance.start_failed")
    assert failed.label == "timeout" and "hard" in failed.error
    assert h.model.state(final.machine_id) == "stopped"  # never left half-started


async def test_soft_timeout_without_progress_stops(make_harness: Any) -> None:
    h = make_harness(image="sandkeep/no-such-image")  # the provider refuses the create (422 unknown image)
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    assert h.event(rec.id, "instance.start_failed").label == "machine_create_failed"


async def test_start_machine_gone_means_stopped(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    await h.service.start(USER, rec.id)
    await h.model.destroy(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.machine_id is None
    assert h.event(rec.id, "instance.start_failed").label == "machine_gone"


async def test_failed_boot_on_start_means_stopped(h: Harness) -> None:
    h.model.boot = "fail"
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    assert h.event(rec.id, "instance.start_failed").label == "machine_failed"


async def test_idempotent_create_adopts_volume_and_machine(h: Harness) -> None:
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    # a crashed earlier attempt already made the volume and the machine, but never recorded them
    provider = h.model.client
    await provider.ensure_app(rec.app_name, "personal")
    vol = await provider.create_volume(rec.app_name, name=volume_name(rec), region="lcl-b")
    machine = await provider.create_machine(rec.app_name, config=MachineConfig(
        image="sandkeep/gateway", mounts=[Mount(volume=vol.id)],
        metadata={"sandbox_id": rec.sandbox_id, "instance_id": rec.id, "user_id": rec.user_id,
                  "config_generation": "0"}), name=rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert final.volume_id == vol.id and final.machine_id == machine.id and final.region == "lcl-b"
    assert h.model.volumes(rec.app_name) == {vol.id} and h.model.machines(rec.app_name) == [machine.id]


async def test_restart_applies_changed_configuration(h: Harness) -> None:
    rec = await h.running(env={"A": "1"})
    updated = await h.service.update_config(USER, rec.id, env={"A": "2"}, secrets={"S": "x"}, size="shared-cpu-2x")
    assert updated.config_generation == rec.config_generation + 1
    assert h.model.config(rec.machine_id)["env"]["A"] == "1"  # applied at the next start or restart
    await h.service.restart(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    cfg = h.model.config(rec.machine_id)
    assert cfg["env"]["A"] == "2" and cfg["env"]["S"] == "x" and cfg["guest"]["cpus"] == 2
    assert cfg["metadata"]["config_generation"] == str(updated.config_generation)
    assert ("POST", f"/v1/apps/{rec.app_name}/machines/{rec.machine_id}") in h.model.requests  # an update
    # removing a secret with null
    await h.service.update_config(USER, rec.id, secrets={"S": None})
    assert "S" not in h.get(rec.id).secrets_encrypted


async def test_restart_from_stopped_and_start_applies_config(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    await h.service.update_config(USER, rec.id, env={"NEW": "yes"})
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert h.model.config(rec.machine_id)["env"]["NEW"] == "yes"


# ------------------------------------------------------------------------------------------ running / stopped


async def test_running_machine_404_clears_and_stops(h: Harness) -> None:
    rec = await h.running()
    await h.model.destroy(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.machine_id is None
    assert "reconcile.clear_stale_machine" in h.events(rec.id)


async def test_failed_machine_stops_without_relocation(h: Harness) -> None:
    rec = await h.running()
    await h.model.fail(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and final.volume_id == rec.volume_id
    assert "instance.unexpected_stop_recovery_started" not in h.events(rec.id)


async def test_failed_machine_relocates_when_enabled(make_harness: Any) -> None:
    h = make_harness(relocate_failed=True)
    rec = await h.running()
    await h.model.fail(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.machine_id != rec.machine_id
    assert h.event(rec.id, "instance.unexpected_stop_recovery_started").label == "alarm_failed"


async def test_threshold_and_healthy_check_reset(make_harness: Any) -> None:
    h = make_harness(unexpected_stop_threshold=2)
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    once = await h.reconcile(rec.id)
    assert once.status == Status.RUNNING and once.health_fail_count == 1
    await h.model.start(rec.machine_id)
    assert (await h.reconcile(rec.id)).health_fail_count == 0
    await h.model.crash(rec.machine_id)
    await h.reconcile(rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.machine_id != rec.machine_id
    assert h.event(rec.id, "instance.unexpected_stop_recovery_started").value == 2


async def test_started_while_stopped_is_adopted(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    await h.model.start(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert "reconcile.adopt_started_machine" in h.events(rec.id)


async def test_orphan_machine_adopted_by_metadata(h: Harness) -> None:
    rec = await h.running()
    force(h, rec.id, machine_id=None)
    final = await h.reconcile(rec.id)
    assert final.machine_id == rec.machine_id and final.status == Status.RUNNING
    assert "reconcile.adopt_orphan_machine" in h.events(rec.id)


async def test_missing_volume_is_data_loss_and_replaced(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    await h.model.lose_volume(rec.volume_id)
    final = await h.reconcile(rec.id)
    assert final.volume_id and final.volume_id != rec.volume_id and final.volume_id in h.model.volumes()
    loss = h.event(rec.id, "instance.data_loss")
    assert loss.details["lost_volume_id"] == rec.volume_id
    assert "reconcile.replace_lost_volume" in h.events(rec.id)
    await h.service.start(USER, rec.id)
    started = await h.reconcile(rec.id)
    assert started.status == Status.RUNNING
    assert h.model.mounted(started.machine_id) == final.volume_id


async def test_stale_provision_is_auto_destroyed(h: Harness) -> None:
    h.model.no_capacity("lcl-a", "lcl-b", "lcl-c")  # no region can hold its volume
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    stopped = await h.reconcile(rec.id)
    assert stopped.status == Status.STOPPED and stopped.last_started_at is None, h.events(rec.id)
    assert stopped.alarm_at is not None
    await h.pass_time(h.engine.settings.stale_provision_after + 1)
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED
    assert "reconcile.auto_destroy_stale_provision" in h.events(rec.id)


async def test_leftover_pending_volume_deleted_when_not_recovering(h: Harness) -> None:
    rec = await h.running()
    leftover = await h.model.client.create_volume(rec.app_name, name=volume_name(rec), region="lcl-b")
    force(h, rec.id, pending_recovery_volume_id=leftover.id)
    final = await h.reconcile(rec.id)
    assert final.pending_recovery_volume_id is None
    assert h.model.volumes(rec.app_name) == {rec.volume_id}


# ------------------------------------------------------------------------------------------ recovery details


async def test_recovery_with_two_regions_moves_old_region_last(make_harness: Any) -> None:
    h = make_harness(regions="lcl-a,lcl-b")
    rec = await h.running()
    h.model.no_capacity("lcl-b")
    await h.model.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.region == "lcl-a"  # capacity fallback to the old region


async def test_fork_capacity_everywhere_fails_and_keeps_original(h: Harness) -> None:
    rec = await h.running()
    h.model.no_capacity("lcl-b", "lcl-c")
    await h.model.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and "fork" in (final.last_recovery_error or "")
    assert h.event(rec.id, "instance.unexpected_stop_recovery_failed").label == "alarm_fork_failed"
    assert rec.volume_id in h.model.volumes()  # never deleted on failure


async def test_snapshot_restore_when_source_host_unreachable(h: Harness) -> None:
    rec = await h.running()
    await h.put(rec.id, "f", b"old")
    await h.model.snapshot(rec.volume_id)
    await h.model.crash(rec.machine_id)
    h.model.unreachable(rec.volume_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.region == "lcl-b", h.events(rec.id)  # the walk's first
    assert h.model.data(final.volume_id) == {"f": b"old"}
    restored = h.event(rec.id, "instance.restored_from_snapshot")
    assert restored.details["snapshot_created_at"] and restored.details["data_loss"] is True
    # it may hold writes newer than the snapshot: flagged for an admin (invariant 9), not retained for a cleanup
    assert final.flagged_volume_ids == [rec.volume_id] and final.retained_volume_id is None
    assert restored.details["recovery_point"] == restored.details["snapshot_created_at"]


async def test_unreachable_source_without_snapshot_fails(h: Harness) -> None:
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    h.model.unreachable(rec.volume_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED and "no snapshot" in (final.last_recovery_error or ""), h.events(rec.id)


async def test_source_volume_missing_fails(h: Harness) -> None:
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    await h.model.lose_volume(rec.volume_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    assert final.last_recovery_error == "source volume missing"


async def test_crash_after_fork_create_adopts_the_fork(h: Harness) -> None:
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    # the first pass dies right after the provider made the fork, before its id was persisted
    original_persist = h.engine.ctx.store.update
    calls = {"n": 0}

    def crash_on_pending(record: Any, owner: str, changes: dict[str, Any]) -> Any:
        if changes.get("pending_recovery_volume_id"):
            calls["n"] += 1
            raise RuntimeError("controller killed")
        return original_persist(record, owner, changes)

    h.engine.ctx.store.update = crash_on_pending  # type: ignore[method-assign]
    try:
        await h.engine.reconcile_now(rec.id)
    finally:
        h.engine.ctx.store.update = original_persist  # type: ignore[method-assign]
    assert calls["n"] == 1
    mid = h.get(rec.id)
    assert mid.status == Status.RECOVERING and mid.recovery_step == "forking"
    assert mid.pending_recovery_volume_id is None
    forks = h.model.volumes(rec.app_name) - {rec.volume_id}
    assert len(forks) == 1
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and {final.volume_id} == forks
    assert "reconcile.adopt_recovery_volume" in h.events(rec.id)
    assert h.model.volumes(rec.app_name) == {final.volume_id}


async def test_unhealthy_gateway_does_not_block_cutover(h: Harness) -> None:
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    h.model.boot = "sick"  # the replacement boots, but its gateway answers /health with 503
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert h.event(rec.id, "instance.unexpected_stop_recovery_succeeded").details["gateway_healthy"] is False


async def test_snapshot_listing_failure_retains(h: Harness) -> None:
    rec = await h.running()
    await h.model.crash(rec.machine_id)
    h.model.refuse("GET", f"/volumes/{rec.volume_id}/snapshots", 400, "invalid_argument: snapshots unavailable")
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.retained_volume_id == rec.volume_id, h.events(rec.id)
    assert final.retained_volume_cleanup_after is not None
    assert final.retained_volume_cleanup_after > h.clock.now() + timedelta(days=6)


async def test_rate_limit_backs_off_at_least_retry_after(h: Harness) -> None:
    rec = await h.running()
    h.model.fail_next("machine.get", 429, retry_after=120.0)
    after = await h.reconcile(rec.id)
    assert after.status == Status.RUNNING and after.provider_error_count == 1
    assert (after.alarm_at - h.clock.now()).total_seconds() >= 120


# ------------------------------------------------------------------------------------------ destroy


async def test_two_phase_destroy_deletes_everything(h: Harness) -> None:
    rec = await h.running()
    await h.model.snapshot(rec.volume_id)
    await h.model.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    assert recovered.retained_volume_id
    destroying = await h.service.destroy(USER, rec.id)
    assert destroying.pending_destroy_machine_id == recovered.machine_id
    assert destroying.pending_destroy_volume_id == recovered.volume_id
    final = await h.reconcile(rec.id)
    assert final.status == Status.DESTROYED and final.alarm_at is None
    assert not h.model.volumes(rec.app_name)
    assert h.events(rec.id)[-1] == "instance.destroyed"
    # a destroyed instance is never recreated
    again = await h.reconcile(rec.id)
    assert again.status == Status.DESTROYED and not h.model.volumes(rec.app_name)
    with pytest.raises(InvalidTransition):
        await h.service.destroy(USER, rec.id)


async def test_destroy_gives_up_loudly_after_attempts(make_harness: Any) -> None:
    h = make_harness(destroy_volume_attempts=3)
    rec = await h.running()
    await h.service.destroy(USER, rec.id)
    for _ in range(3):
        h.model.refuse("DELETE", f"/volumes/{rec.volume_id}", 412, "failed_precondition: volume busy")
        await h.reconcile(rec.id)
    final = h.get(rec.id)
    assert final.status == Status.DESTROYED and final.destroy_volume_attempts == 3
    gave_up = h.event(rec.id, "instance.destroy_volume_gave_up")
    assert gave_up.error and "volume busy" in gave_up.error
    assert rec.volume_id in h.model.volumes()
    assert final.pending_destroy_volume_id == rec.volume_id  # kept, for the operator


# ------------------------------------------------------------------------------------------ admin


async def test_admin_actions_are_audited(h: Harness) -> None:
    rec = await h.running()
    with pytest.raises(Forbidden):
        await h.service.retry_recovery(USER, rec.id)
    debug = h.service.debug(ADMIN, rec.id)
    assert {"alarm_at", "lease_owner", "lease_expires_at", "version", "recovery_step"} <= set(debug)
    assert await h.service.cleanup_retained_volume(ADMIN, rec.id) is None
    destroyed = await h.service.destroy_machine(ADMIN, rec.id)
    assert destroyed.machine_id is None and h.model.state(rec.machine_id) in ("destroyed", "gone")
    after = await h.reconcile(rec.id)
    assert after.status == Status.STOPPED
    actions = [(a.action, a.outcome) for a in h.service.list_audit(ADMIN, instance_id=rec.id).items]
    assert ("destroy_machine", "ok") in actions and ("retained_volume_cleanup", "ok") in actions


async def test_retry_recovery_after_failure_relocates(h: Harness) -> None:
    rec = await h.running()
    h.model.no_capacity("lcl-b", "lcl-c")
    await h.model.crash(rec.machine_id)
    failed = await h.reconcile(rec.id)
    assert failed.status == Status.STOPPED and failed.last_recovery_error
    h.model.capacity_back()
    await h.service.retry_recovery(ADMIN, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.region == "lcl-b"  # the first region of the walk (§7.2.3)
    assert final.last_recovery_error is None
    assert h.service.list_audit(ADMIN, instance_id=rec.id).items[0].action == "retry_recovery"


async def squat(h: Harness, app: str, volume_id: str) -> None:
    """Another sandbox's machine mounts the volume (metadata names that sandbox)."""
    await h.model.client.create_machine(app, config=MachineConfig(
        image="sandkeep/gateway", mounts=[Mount(volume=volume_id)], metadata={"sandbox_id": "sbx_other"}))


async def test_admin_cleanup_refused_for_foreign_machine(h: Harness) -> None:
    rec = await h.running()
    await h.model.snapshot(rec.volume_id)
    await h.model.crash(rec.machine_id)
    recovered = await h.reconcile(rec.id)
    retained = recovered.retained_volume_id
    assert retained
    await squat(h, rec.app_name, retained)
    with pytest.raises(CleanupRefused):
        await h.service.cleanup_retained_volume(ADMIN, rec.id)
    assert h.get(rec.id).retained_volume_id == retained and retained in h.model.volumes()
    # the alarm-driven cleanup refuses too, and keeps the fields
    await h.pass_time(h.engine.settings.retained_volume_retention + 1)
    after = await h.reconcile(rec.id)
    assert after.retained_volume_id == retained and retained in h.model.volumes()
    assert "reconcile.delete_volume_refused" in h.events(rec.id)


async def test_user_cannot_touch_other_users_instance(h: Harness) -> None:
    from sandkeep.engine.service import Actor, InstanceNotFound

    rec = await h.running()
    other = Actor(user_id="user-b", role="user")
    for action in (h.service.start, h.service.stop, h.service.restart, h.service.destroy):
        with pytest.raises(InstanceNotFound):
            await action(other, rec.id)
    with pytest.raises(Forbidden):
        await h.service.create_instance(other, user_id="user-a")
    with pytest.raises(RecoveringRefused):
        force(h, rec.id, status=Status.RECOVERING)
        await h.service.destroy(USER, rec.id)


async def test_machine_create_on_missing_volume_fails_once(h: Harness) -> None:
    rec = await h.service.create_instance(USER, user_id=USER.user_id)
    # the create does not see the volume made a moment ago (Fly's answer for a mount of an unknown volume)
    h.model.refuse("POST", f"/v1/apps/{rec.app_name}/machines", 400, "volume not found: (not yet visible)")
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED, h.events(rec.id)
    assert h.model.created("volumes") == 1 and len(h.model.volumes(rec.app_name)) == 1  # no retry loop, no new one
    assert h.event(rec.id, "instance.start_failed").label == "machine_create_failed"


async def test_lost_volume_while_running_remounts(h: Harness) -> None:
    rec = await h.running()
    await h.model.lose_volume(rec.volume_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.volume_id != rec.volume_id, h.events(rec.id)
    assert h.model.mounted(rec.machine_id) == final.volume_id
    assert "instance.data_loss" in h.events(rec.id) and "reconcile.remount_volume" in h.events(rec.id)


async def test_a_machine_adopted_after_a_failed_create_gets_the_rotated_gateway_token(h: Harness) -> None:
    """Small seed 290: a recovery could not move the instance (dead host, no snapshot) and fenced its machine; a
    restart's create failed (422, the volume is the fenced machine's) after rotating the gateway token; the host
    came back and the machine, booted with the old token, was adopted and served: every read got 401. The token
    rotation moves the generation, so the adopted machine is updated with the token before it serves."""
    rec = await h.running()
    mid = rec.machine_id
    host = h.model.host.volumes[rec.volume_id]["host"]
    h.model.host.kill_host(host)  # the recovery found no way out: the machine is fenced, the instance stopped
    force(h, rec.id, status=Status.STOPPED, machine_id=None, fenced_machine_id=mid)
    await h.service.restart(USER, rec.id)
    failed = await h.reconcile(rec.id)  # the create is refused: the volume is attached to the fenced machine
    assert failed.status == Status.STOPPED and failed.machine_id is None
    assert h.event(rec.id, "instance.start_failed").label == "machine_create_failed"
    assert h.engine.ctx.gateway_token(failed) != h.engine.ctx.gateway_token(rec)  # rotated for the create
    h.model.host.revive_host(host)
    final = await h.reconcile(rec.id)  # the fence hands the machine back; the stopped pass adopts it
    assert final.status == Status.RUNNING and final.machine_id == mid
    assert "reconcile.adopt_returned_machine" in h.events(rec.id)
    cfg = h.model.config(mid)
    assert cfg["env"]["SANDKEEP_GATEWAY_TOKEN"] == h.engine.ctx.gateway_token(final)
    assert cfg["metadata"]["config_generation"] == str(final.config_generation)
