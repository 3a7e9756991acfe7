"""SPEC §15 against a real local host process: a host dies under a running instance.

Each test kills the host (zone) of the instance's volume through ``/_local/hosts/{zone}/die`` and brings it back
in a ``finally`` (the host process is shared by the session). Grace 0 so nothing waits for minutes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sandkeep.engine.service import InvalidTransition
from sandkeep.store.records import InstanceRecord, Status
from tests.engine.conftest import ADMIN, PLATFORM, new_user
from tests.engine.hostsupport import Rig, rig
from tests.support.procs import HostHandle
from tests.support.wait import async_wait_until

DEAD: dict[str, Any] = {"dead_host_grace": 0.0}


async def provision(r: Rig) -> InstanceRecord:
    created = await r.service.create_instance(PLATFORM, user_id=new_user())
    return await r.wait_status(created.id, "running")


async def zone_of(r: Rig, rec: InstanceRecord) -> str:
    vols = {v["id"]: v for v in await r.volumes(rec.app_name)}
    zone = vols[rec.volume_id]["zone"]
    assert zone
    return str(zone)


@asynccontextmanager
async def dead(r: Rig, zone: str) -> AsyncIterator[None]:
    await r.local("POST", f"/_local/hosts/{zone}/die")
    try:
        yield
    finally:
        await r.local("POST", f"/_local/hosts/{zone}/return")


async def started_machines(r: Rig, app: str, *, reachable_only: bool = False) -> list[str]:
    return [m["id"] for m in await r.machines(app) if m["state"] == "started"
            and (not reachable_only or m.get("host_status", "ok") == "ok")]


async def test_dead_host_restores_newest_snapshot_fences_old_machine_and_flags_old_volume(
        tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, **DEAD) as r:
        rec = await provision(r)
        assert (await r.gateway(rec, "PUT", "/data/before", b"in the snapshot")).status_code == 201
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        assert (await r.gateway(rec, "PUT", "/data/after", b"newer than the snapshot")).status_code == 201
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            final = await r.wait_recovered(rec)
            # the old machine is remembered for fencing; it is never what sandkeep routes to
            assert final.fenced_machine_id == rec.machine_id and final.machine_id != rec.machine_id
            assert final.volume_id != rec.volume_id
            assert final.flagged_volume_ids == [rec.volume_id]
            assert final.incident_note and "snapshot" in final.incident_note
            events = r.events(rec.id)
            assert "instance.host_unreachable" in events and "instance.old_volume_flagged" in events
            restored = r.event(rec.id, "instance.restored_from_snapshot")
            assert restored.details["recovery_point"]
            done = r.event(rec.id, "instance.unexpected_stop_recovery_succeeded")
            assert done.details["old_volume"] == "flagged" and done.details["recovery_point"]
            before = await r.gateway(final, "GET", "/data/before")
            assert before.status_code == 200 and before.content == b"in the snapshot"
            assert (await r.gateway(final, "GET", "/data/after")).status_code == 404  # lost, and said so
        # the host is back: the old machine resumes started (as Fly's do); sandkeep destroys it, never routes
        # to it, and keeps the old volume
        routed: set[str] = set()

        async def fenced() -> bool:
            target = r.service.gateway_target(ADMIN, rec.id)
            if target is not None:
                routed.add(target[1]["fly-force-instance-id"])
            # the fencing write, then its event (written after it, on the engine's store thread)
            return r.get(rec.id).fenced_machine_id is None and "instance.old_machine_fenced" in r.events(rec.id)

        await async_wait_until(fenced, timeout=30, message=f"old machine fenced ({r.events(rec.id)})")
        assert routed == {final.machine_id}  # sampled while the old machine was back: traffic never went to it
        assert "instance.old_machine_fenced" in r.events(rec.id)
        machines = {m["id"]: m["state"] for m in await r.machines(rec.app_name)}
        assert machines.get(rec.machine_id) in (None, "destroyed")
        assert await started_machines(r, rec.app_name) == [final.machine_id]
        # the old volume, which holds the newer write, is still there and still flagged (invariant 9)
        assert rec.volume_id in {v["id"] for v in await r.volumes(rec.app_name)}
        after = r.get(rec.id)
        assert after.flagged_volume_ids == [rec.volume_id] and after.status == Status.RUNNING
        # only an admin deletes it
        deleted = await r.service.delete_flagged_volume(ADMIN, rec.id, rec.volume_id)
        assert deleted == rec.volume_id
        assert rec.volume_id not in {v["id"] for v in await r.volumes(rec.app_name)}
        assert r.get(rec.id).flagged_volume_ids == []


async def test_dead_host_without_snapshot_stops_then_resumes_when_the_host_returns(
        tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, **DEAD) as r:
        rec = await provision(r)
        assert (await r.gateway(rec, "PUT", "/data/kept", b"never lost")).status_code == 201
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            stopped = await r.wait_status(rec.id, "stopped")
            assert stopped.last_recovery_error and "no snapshot" in stopped.last_recovery_error
            assert stopped.fenced_machine_id == rec.machine_id and stopped.volume_id == rec.volume_id
            assert stopped.incident_note
        # the host returns: its machine is the instance's own again (same volume): adopted, nothing lost
        back = await r.wait_for(rec.id, lambda x: x.status == "running" and x.machine_id == rec.machine_id,
                                "running again on the returned machine")
        assert back.fenced_machine_id is None and back.volume_id == rec.volume_id
        got = await r.gateway(back, "GET", "/data/kept")
        assert got.status_code == 200 and got.content == b"never lost"


async def test_approve_policy_waits_for_an_admin(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, snapshot_restore_policy="approve", **DEAD) as r:
        rec = await provision(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        with pytest.raises(InvalidTransition):  # nothing awaits approval yet
            await r.service.approve_restore(ADMIN, rec.id)
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            waiting = await r.wait_for(rec.id, lambda x: x.restore_approval == "awaiting", "awaiting approval")
            assert waiting.status == Status.RUNNING and waiting.machine_id == rec.machine_id

            async def told() -> bool:  # the event follows its write (both on the engine's store thread)
                return "instance.restore_awaiting_approval" in r.events(rec.id)
            await async_wait_until(told, timeout=30, message="restore_awaiting_approval event")
            assert "recovering" not in {e.status for e in r.store.list_events(instance_id=rec.id).items}
            await r.service.approve_restore(ADMIN, rec.id)
            final = await r.wait_recovered(rec)
            assert final.flagged_volume_ids == [rec.volume_id]
            assert "instance.restore_approved" in r.events(rec.id)
        await r.wait_for(rec.id, lambda x: x.fenced_machine_id is None, "old machine fenced")


async def test_host_back_before_approval_clears_the_suspicion(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session, snapshot_restore_policy="approve", **DEAD) as r:
        rec = await provision(r)
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            await r.wait_for(rec.id, lambda x: x.restore_approval == "awaiting", "awaiting approval")
        back = await r.wait_for(rec.id, lambda x: x.suspect_since is None, "suspicion cleared")
        assert back.status == Status.RUNNING and back.machine_id == rec.machine_id
        assert back.restore_approval is None and back.flagged_volume_ids == []

        async def told() -> bool:  # the event follows its write (both on the engine's store thread)
            return "instance.host_recovered" in r.events(rec.id)
        await async_wait_until(told, timeout=30, message=f"host_recovered event ({r.events(rec.id)})")


async def test_host_back_mid_recovery_fences_first_then_forks_without_loss(
        tmp_path: Path, host_session: HostHandle) -> None:
    """The host returns while the recovery is stuck before its restore (snapshot listing fails): the old
    machine is destroyed first, and the fork that is possible again keeps every write (no snapshot restore)."""
    async with rig(tmp_path, host_session, **DEAD) as r:
        rec = await provision(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        assert (await r.gateway(rec, "PUT", "/data/after", b"newer than the snapshot")).status_code == 201
        zone = await zone_of(r, rec)
        await r.local("POST", "/_local/faults", json={"operation": "volume.snapshots.list", "status": 503})
        try:
            async with dead(r, zone):
                await r.wait_for(rec.id, lambda x: x.status == "recovering" and x.fenced_machine_id is not None,
                                 "recovering, old machine waiting to be fenced")
            await r.wait_for(rec.id, lambda x: x.fenced_machine_id is None, "old machine fenced")
        finally:
            await r.local("DELETE", "/_local/faults")
        final = await r.wait_recovered(rec)
        assert final.flagged_volume_ids == [] and final.volume_id != rec.volume_id
        assert "instance.restored_from_snapshot" not in r.events(rec.id)
        got = await r.gateway(final, "GET", "/data/after")
        assert got.status_code == 200 and got.content == b"newer than the snapshot"
        assert await started_machines(r, rec.app_name) == [final.machine_id]


async def test_orphan_inventory_deletes_only_our_unreferenced_resources_after_the_grace(
        tmp_path: Path, host_session: HostHandle) -> None:
    from datetime import timedelta

    from sandkeep.engine.naming import volume_name

    async with rig(tmp_path, host_session, inventory_interval=0.0, inventory_app_pause=0.0,
                   orphan_grace=3600.0) as r:
        rec = await provision(r)
        app, name = rec.app_name, volume_name(rec)
        leftover = (await r.local("POST", f"/v1/apps/{app}/volumes",
                                  json={"name": name, "region": rec.region, "size_gb": 1})).json()["id"]
        foreign = (await r.local("POST", f"/v1/apps/{app}/volumes",
                                 json={"name": "someone_else", "region": rec.region, "size_gb": 1})).json()["id"]
        # a volume of our name that a machine of another sandbox mounts: the 7.5 check refuses it
        guarded = (await r.local("POST", f"/v1/apps/{app}/volumes",
                                 json={"name": name, "region": rec.region, "size_gb": 1})).json()["id"]
        other = (await r.local("POST", f"/v1/apps/{app}/machines", json={
            "name": "other", "region": rec.region, "skip_launch": True,
            "config": {"image": "sandkeep/gateway", "mounts": [{"volume": guarded, "path": "/data"}],
                       "metadata": {"sandbox_id": "sbx_foreign"}}})).json()["id"]
        stray = (await r.local("POST", f"/v1/apps/{app}/machines", json={
            "name": "stray", "region": rec.region, "skip_launch": True,
            "config": {"image": "sandkeep/gateway",
                       "metadata": {"sandbox_id": rec.sandbox_id, "instance_id": rec.id}}})).json()["id"]
        sweeper = r.engine.orphans
        assert await sweeper.sweep() == 0  # reported, inside the grace
        found = {e.details["resource_id"] for e in r.store.list_events(instance_id=rec.id,
                                                                       name="reconcile.orphan_found").items}
        assert found == {leftover, guarded, stray}
        for key in sweeper.first_seen:  # the grace has passed
            sweeper.first_seen[key] -= timedelta(seconds=3601)
        assert await sweeper.sweep() == 2
        vols = {v["id"] for v in await r.volumes(app)}
        machines = {m["id"]: m["state"] for m in await r.machines(app)}
        assert leftover not in vols and machines.get(stray) in (None, "destroyed")
        assert {rec.volume_id, foreign, guarded} <= vols  # ours in use, foreign, and the refused one
        assert machines.get(other) not in (None, "destroyed") and machines[rec.machine_id] == "started"
        refused = r.event(rec.id, "reconcile.orphan_delete_refused")
        assert refused.details["resource_id"] == guarded and "sbx_foreign" in (refused.error or "")
        assert r.get(rec.id).status == Status.RUNNING


async def test_admin_restore_from_a_snapshot_and_from_the_flagged_volume(
        tmp_path: Path, host_session: HostHandle) -> None:
    """After a dead host: the admin lists snapshots, then forks the flagged old volume (which holds the write
    newer than the snapshot) into the instance; the snapshot-restored volume is retained, not deleted."""
    async with rig(tmp_path, host_session, **DEAD) as r:
        rec = await provision(r)
        assert (await r.gateway(rec, "PUT", "/data/before", b"old")).status_code == 201
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        assert (await r.gateway(rec, "PUT", "/data/after", b"newer")).status_code == 201
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            moved = await r.wait_recovered(rec)
        await r.wait_for(rec.id, lambda x: x.fenced_machine_id is None, "old machine fenced")
        snaps = await r.service.list_volume_snapshots(ADMIN, rec.id)
        assert any(s["volume_id"] == rec.volume_id and s["volume_role"] == "flagged" for s in snaps)
        with pytest.raises(Exception, match="not a retained or flagged volume"):
            await r.service.restore_volume(ADMIN, rec.id, volume_id=moved.volume_id)  # the current one
        await r.service.restore_volume(ADMIN, rec.id, volume_id=rec.volume_id)
        back = await r.wait_for(rec.id, lambda x: x.status == "running" and x.volume_id not in
                                (rec.volume_id, moved.volume_id), "running on the fork of the flagged volume")
        assert back.retained_volume_id == moved.volume_id and back.retained_volume_cleanup_after is not None
        assert rec.volume_id in back.flagged_volume_ids  # the source stays for the admin to delete
        got = await r.gateway(back, "GET", "/data/after")
        assert got.status_code == 200 and got.content == b"newer"  # nothing lost after all
        assert "instance.admin_restore" in r.events(rec.id)
        # and a snapshot restore, sized from its source volume
        snap = next(s for s in snaps if s["volume_id"] == rec.volume_id)
        await r.service.restore_volume(ADMIN, rec.id, snapshot_id=snap["snapshot_id"])
        again = await r.wait_for(rec.id, lambda x: x.status == "running" and x.volume_id != back.volume_id,
                                 "running on the restored snapshot")
        vols = {v["id"]: v for v in await r.volumes(rec.app_name)}
        assert vols[again.volume_id]["size_gb"] >= vols[rec.volume_id]["size_gb"]
        assert again.retained_volume_id == back.volume_id and moved.volume_id in again.flagged_volume_ids
        assert (await r.gateway(again, "GET", "/data/after")).status_code == 404
