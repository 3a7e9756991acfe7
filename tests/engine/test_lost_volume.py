"""Never start on an empty volume over existing data (SPEC §15, invariant 10), on the one provider model."""

from __future__ import annotations

from sandkeep.store.records import Status
from tests.engine.conftest import USER, Harness
from tests.engine.test_lifecycle import force


async def stopped_with_data(h: Harness) -> tuple[str, str]:
    rec = await h.running()
    await h.put(rec.id, "f", b"precious")
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    assert rec.volume_id
    return rec.id, rec.volume_id


async def test_a_lost_volume_id_adopts_the_instances_own_volume(h: Harness) -> None:
    iid, vid = await stopped_with_data(h)
    force(h, iid, volume_id="vol_lost")  # the record lost track (404 for its id); the data still exists
    adopted = await h.reconcile(iid)
    assert adopted.volume_id == vid
    assert "instance.data_loss" not in h.events(iid)
    ev = h.event(iid, "reconcile.adopt_volume")
    assert ev.label == "lost_volume_id" and ev.details["lost_volume_id"] == "vol_lost"
    await h.service.start(USER, iid)
    started = await h.reconcile(iid)
    assert started.status == Status.RUNNING
    assert h.model.mounted(started.machine_id) == vid and h.model.data(vid) == {"f": b"precious"}
    assert h.model.volumes(started.app_name) == {vid}  # nothing empty created


async def test_the_newest_of_several_own_volumes_is_adopted_and_flagged_ones_never(h: Harness) -> None:
    iid, vid = await stopped_with_data(h)
    rec = h.get(iid)
    name = h.model.host.volumes[vid]["name"]
    await h.pass_time(60)
    newer = await h.model.client.create_volume(rec.app_name, name=name, region="lcl-a")
    await h.pass_time(60)
    flagged = await h.model.client.create_volume(rec.app_name, name=name, region="lcl-a")
    force(h, iid, volume_id="vol_lost", flagged_volume_ids=[flagged.id])
    assert (await h.reconcile(iid)).volume_id == newer.id


async def test_a_failed_lookup_fails_closed_for_an_instance_that_ran(h: Harness) -> None:
    iid, _vid = await stopped_with_data(h)
    force(h, iid, volume_id="vol_lost")
    before = h.model.volumes()
    h.model.refuse("GET", "/volumes", 400, "invalid_argument: listing refused")
    after = await h.reconcile(iid)
    assert h.model.volumes() == before  # no empty volume over existing data
    assert after.volume_id == "vol_lost"
    failed = h.event(iid, "reconcile.volume_lookup_failed")
    assert "no empty volume is created" in (failed.error or "")
    assert "instance.data_loss" not in h.events(iid)


async def test_a_truly_missing_volume_is_replaced_loudly(h: Harness) -> None:
    iid, vid = await stopped_with_data(h)
    await h.model.lose_volume(vid)
    final = await h.reconcile(iid)
    assert final.volume_id and final.volume_id != vid
    assert h.event(iid, "instance.data_loss").details["lost_volume_id"] == vid


async def test_sandkeep_takes_its_own_snapshots_every_interval(h: Harness) -> None:
    rec = await h.running()
    assert rec.volume_id
    await h.pass_time(h.engine.settings.snapshot_interval + 1)  # past the instance's offset into the interval
    before = h.clock.now()
    first = await h.reconcile(rec.id)
    assert first.last_snapshot_at is not None and before <= first.last_snapshot_at <= h.clock.now()
    assert len(h.model.snapshots(rec.volume_id)) == 1
    assert "instance.snapshot_taken" in h.events(rec.id)
    await h.pass_time(60)
    await h.reconcile(rec.id)
    assert len(h.model.snapshots(rec.volume_id)) == 1  # not again before the interval
    await h.pass_time(h.engine.settings.snapshot_interval)
    before = h.clock.now()
    second = await h.reconcile(rec.id)
    assert second.last_snapshot_at is not None and before <= second.last_snapshot_at <= h.clock.now()
    assert len(h.model.snapshots(rec.volume_id)) == 2
