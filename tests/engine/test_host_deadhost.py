"""SPEC §15 against a real local host process: a host dies under a running instance.

Each test kills the host (zone) of the instance's volume through ``/_local/hosts/{zone}/die`` and brings it back
in a ``finally`` (the host process is shared by the session). Grace 0 so nothing waits for minutes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from sandkeep import metrics
from sandkeep.engine.orphans import OrphanSweeper
from sandkeep.engine.service import InvalidTransition
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.tables import orphans as orphans_table
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


@dataclass(frozen=True)
class Sample:
    step: str
    serving: tuple[str, ...]  # machines the host lists as started on a host that answers
    routed: str | None  # the machine sandkeep sends the instance's traffic to (None: none, not running)


class Sampler:
    """Samples the host's machine list and sandkeep's routing at every step a test drives (split brain check).

    A machine whose host is dead may still *say* ``started`` (Fly's last known state) but serves nothing; what
    counts is a started machine on a host that answers."""

    def __init__(self, r: Rig, rec: InstanceRecord) -> None:
        self.r, self.rec = r, rec
        self.samples: list[Sample] = []

    async def sample(self, step: str) -> Sample:
        serving = tuple(sorted(m["id"] for m in await self.r.machines(self.rec.app_name)
                               if m["state"] == "started" and m.get("host_status", "ok") == "ok"))
        target = self.r.service.gateway_target(ADMIN, self.rec.id)
        got = Sample(step, serving, target[1]["fly-force-instance-id"] if target else None)
        self.samples.append(got)
        return got

    async def until(self, predicate: Any, step: str, timeout: float = 60.0) -> InstanceRecord:
        """Wait for ``predicate(record)``, sampling at every poll (and once more when it holds)."""
        async def check() -> InstanceRecord | None:
            await self.sample(step)
            record = self.r.get(self.rec.id)
            return record if predicate(record) else None

        found = await async_wait_until(check, timeout=timeout,
                                       message=f"{self.rec.id}: {step} (events: {self.r.events(self.rec.id)})")
        await self.sample(step)
        return found

    def doubled(self) -> list[Sample]:
        return [s for s in self.samples if len(s.serving) > 1]

    def assert_no_split_brain(self) -> None:
        assert self.samples and not self.doubled(), self.doubled()[:3]

    def assert_never_routed_to(self, machine_id: str | None, since: int = 0) -> None:
        assert machine_id and all(s.routed != machine_id for s in self.samples[since:]), \
            [s for s in self.samples[since:] if s.routed == machine_id][:3]

    def assert_fenced_window_only(self, old: str, new: str, since: int = 0) -> None:
        """Two machines serve only in the window the engine cannot prevent: the old host came back with its machine
        ``started`` (as Fly resumes them) and the engine has not destroyed it yet; traffic goes to the new one."""
        for s in self.samples[since:]:
            if len(s.serving) > 1:
                assert set(s.serving) == {old, new} and s.routed in (None, new), s


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
            done = await r.event(rec.id, "instance.unexpected_stop_recovery_succeeded")  # the last of these
            events = r.events(rec.id)
            assert "instance.host_unreachable" in events and "instance.old_volume_flagged" in events
            restored = await r.event(rec.id, "instance.restored_from_snapshot")
            assert restored.details["recovery_point"]
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
        s = Sampler(r, rec)
        await s.sample("provisioned")
        await r.local("POST", "/_local/faults", json={"operation": "volume.snapshots.list", "status": 503})
        try:
            async with dead(r, zone):
                await s.until(lambda x: x.status == "recovering" and x.fenced_machine_id is not None,
                              "recovering, old machine waiting to be fenced")
                mark = len(s.samples)  # from here on the old machine is no longer the instance's
            await s.sample("host returned")
            await s.until(lambda x: x.fenced_machine_id is None, "old machine fenced")
        finally:
            await r.local("DELETE", "/_local/faults")
        final = await s.until(lambda x: x.status == "running" and x.machine_id != rec.machine_id,
                              "running on the fork")
        # the old machine came back started, but the replacement did not exist yet: never two serving machines
        s.assert_no_split_brain()
        s.assert_never_routed_to(rec.machine_id, since=mark)
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
        gauge = {k: metrics.REGISTRY.get_sample_value("sandkeep_orphans", {"kind": k}) for k in ("machine", "volume")}
        assert gauge == {"machine": 1.0, "volume": 2.0}
        listed = {o["id"]: o for o in r.service.list_orphans(ADMIN)}
        assert set(listed) == {leftover, guarded, stray}
        assert listed[stray]["kind"] == "machine" and listed[leftover]["kind"] == "volume"
        assert listed[leftover]["app_name"] == app and listed[leftover]["region"] == rec.region
        assert listed[leftover]["instance_id"] == rec.id
        assert listed[leftover]["deletes_at"] == listed[leftover]["first_seen_at"] + timedelta(seconds=3600)
        # a restarted engine (a new sweeper) keeps the first sightings: the grace is not restarted
        first = {o.resource_id: o.first_seen_at for o in r.store.list_orphans()}
        assert await OrphanSweeper(r.engine.ctx, "w2").sweep() == 0
        assert {o.resource_id: o.first_seen_at for o in r.store.list_orphans()} == first
        assert len(r.store.list_events(instance_id=rec.id, name="reconcile.orphan_found").items) == 3  # not again
        with r.store.engine.begin() as conn:  # the grace has passed
            for rid, at in first.items():
                conn.execute(update(orphans_table).where(orphans_table.c.resource_id == rid)
                             .values(first_seen_at=at - timedelta(seconds=3601)))
        assert await sweeper.sweep() == 2
        vols = {v["id"] for v in await r.volumes(app)}
        machines = {m["id"]: m["state"] for m in await r.machines(app)}
        assert leftover not in vols and machines.get(stray) in (None, "destroyed")
        assert {rec.volume_id, foreign, guarded} <= vols  # ours in use, foreign, and the refused one
        assert machines.get(other) not in (None, "destroyed") and machines[rec.machine_id] == "started"
        refused = await r.event(rec.id, "reconcile.orphan_delete_refused")
        assert refused.details["resource_id"] == guarded and "sbx_foreign" in (refused.error or "")
        assert r.get(rec.id).status == Status.RUNNING
        assert {o.resource_id for o in r.store.list_orphans()} == {guarded}  # the refused one stays listed
        assert metrics.REGISTRY.get_sample_value("sandkeep_orphans", {"kind": "volume"}) == 1.0
        assert metrics.REGISTRY.get_sample_value("sandkeep_orphans", {"kind": "machine"}) == 0.0


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


async def test_host_death_and_return_wake_the_instance_without_its_alarm(
        tmp_path: Path, host_session: HostHandle) -> None:
    """The running reconcile interval is an hour: only the detector waking the instance on the host's
    ``host_status`` watch events can relocate it and fence the returning machine within these deadlines.
    The host returns after the relocation with the old machine ``started`` (as Fly resumes it): the only moment
    two machines serve is before the engine's wake-up pass destroys it, and no traffic is routed to it then."""
    async with rig(tmp_path, host_session, interval_running=3600.0, **DEAD) as r:
        rec = await provision(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        zone = await zone_of(r, rec)
        s = Sampler(r, rec)
        await s.sample("provisioned")
        async with dead(r, zone):
            moved = await s.until(lambda x: x.status == "running" and x.machine_id != rec.machine_id,
                                  "relocated after the host died", timeout=45)
            mark = len(s.samples)
            assert moved.fenced_machine_id == rec.machine_id
            assert "instance.host_unreachable" in r.events(rec.id)
        await s.sample("host returned")
        await s.until(lambda x: x.fenced_machine_id is None, "old machine fenced after its host returned",
                      timeout=45)
        assert moved.machine_id
        s.assert_never_routed_to(rec.machine_id, since=mark)
        s.assert_fenced_window_only(rec.machine_id, moved.machine_id)
        assert s.samples[-1].serving == (moved.machine_id,)
        machines = {m["id"]: m["state"] for m in await r.machines(rec.app_name)}
        assert machines.get(rec.machine_id) in (None, "destroyed")
        assert rec.volume_id in {v["id"] for v in await r.volumes(rec.app_name)}  # kept, flagged
        assert r.get(rec.id).flagged_volume_ids == [rec.volume_id]
        assert r.engine.detector.woken >= 2  # the death and the return


async def test_host_back_after_the_restore_before_the_cutover(tmp_path: Path, host_session: HostHandle) -> None:
    """The host returns while the recovery creates the replacement machine on the snapshot-restored volume
    (machine creates are slowed down to make the window): the data-losing restore is done, so the instance moves
    on to the new volume; the old machine is destroyed, never routed to; the old volume is kept and flagged."""
    async with rig(tmp_path, host_session, interval_running=3600.0, **DEAD) as r:
        rec = await provision(r)
        await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
        assert (await r.gateway(rec, "PUT", "/data/after", b"newer than the snapshot")).status_code == 201
        zone = await zone_of(r, rec)
        s = Sampler(r, rec)
        await s.sample("provisioned")
        await r.local("POST", "/_local/faults", json={"operation": "machine.create", "latency": 2.0})
        try:
            async with dead(r, zone):
                await s.until(lambda x: x.status == "recovering" and x.pending_recovery_volume_id is not None,
                              "snapshot restored, replacement being created")
                mark = len(s.samples)
            await s.sample("host returned")
            final = await s.until(lambda x: x.status == "running" and x.machine_id not in (None, rec.machine_id)
                                  and x.fenced_machine_id is None, "running on the replacement, old one fenced")
        finally:
            await r.local("DELETE", "/_local/faults")
        assert final.machine_id
        s.assert_never_routed_to(rec.machine_id, since=mark)
        s.assert_fenced_window_only(rec.machine_id, final.machine_id)
        assert s.samples[-1].serving == (final.machine_id,)
        assert final.flagged_volume_ids == [rec.volume_id]
        assert rec.volume_id in {v["id"] for v in await r.volumes(rec.app_name)}
        assert "instance.old_machine_fenced" in r.events(rec.id)
        machines = {m["id"]: m["state"] for m in await r.machines(rec.app_name)}
        assert machines.get(rec.machine_id) in (None, "destroyed")


async def test_dead_host_restore_is_sized_from_the_snapshots_source(tmp_path: Path, host_session: HostHandle) -> None:
    """The volume was extended before its snapshot: the restore after the host died asks for a volume at least as
    large as the snapshot's source (the host refuses a smaller one, as Fly does) and the data reads back."""
    async with rig(tmp_path, host_session, **DEAD) as r:
        rec = await provision(r)
        app = rec.app_name
        await r.local("PUT", f"/v1/apps/{app}/volumes/{rec.volume_id}/extend", json={"size_gb": 3})
        assert (await r.gateway(rec, "PUT", "/data/kept", b"before the snapshot")).status_code == 201
        await r.local("POST", f"/v1/apps/{app}/volumes/{rec.volume_id}/snapshots")
        zone = await zone_of(r, rec)
        async with dead(r, zone):
            final = await r.wait_recovered(rec)
        vols = {v["id"]: v for v in await r.volumes(app)}
        assert vols[final.volume_id]["size_gb"] >= 3
        assert (await r.event(rec.id, "instance.restored_from_snapshot")).details["snapshot_volume_size"]
        got = await r.gateway(final, "GET", "/data/kept")
        assert got.status_code == 200 and got.content == b"before the snapshot"


async def test_a_lost_volume_id_adopts_the_own_volume_on_the_real_host(tmp_path: Path,
                                                                      host_session: HostHandle) -> None:
    """The record lost its volume id (the host answers 404 for it) while the data still exists: the start adopts
    the instance's own volume by name instead of creating an empty one over it (SPEC §15)."""
    async with rig(tmp_path, host_session) as r:
        rec = await provision(r)
        assert (await r.gateway(rec, "PUT", "/data/precious", b"still here")).status_code == 201
        await r.service.stop(PLATFORM, rec.id)
        await r.wait_status(rec.id, "stopped")

        async def lose() -> bool:  # a test writer holding the lease for one write (the engine may hold it now)
            lease = r.store.claim(rec.id, "test", 30, r.clock.now())
            if lease is None:
                return False
            r.store.release(r.store.update(lease, "test", {"volume_id": "vol_lostLostLost00"}), "test")
            return True

        await async_wait_until(lose, timeout=30, message="the record's lease, to lose its volume id")
        await r.service.start(PLATFORM, rec.id)
        back = await r.wait_status(rec.id, "running")
        assert back.volume_id == rec.volume_id
        assert "reconcile.adopt_volume" in r.events(rec.id) and "instance.data_loss" not in r.events(rec.id)
        assert [v["id"] for v in await r.volumes(rec.app_name)] == [rec.volume_id]  # no empty volume made
        got = await r.gateway(back, "GET", "/data/precious")
        assert got.status_code == 200 and got.content == b"still here"
