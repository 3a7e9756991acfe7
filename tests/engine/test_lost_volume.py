"""Never start on an empty volume over existing data (SPEC §15, invariant 10), on the in-memory provider."""

from __future__ import annotations

from sandkeep.provider.errors import InvalidRequestError
from sandkeep.store.records import Status
from tests.engine.conftest import USER, Harness
from tests.engine.test_lifecycle_fake import force


async def stopped_with_data(h: Harness) -> tuple[str, str]:
    rec = await h.running()
    h.fake.volumes[rec.volume_id].data["f"] = "precious"
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
    assert h.fake.machines[started.machine_id].config.mounts[0].volume == vid
    assert len([v for v in h.fake.volumes.values() if v.app == started.app_name]) == 1  # nothing empty created


async def test_the_newest_of_several_own_volumes_is_adopted_and_flagged_ones_never(h: Harness) -> None:
    iid, vid = await stopped_with_data(h)
    rec = h.get(iid)
    h.clock.advance(60)
    newer = await h.fake.create_volume(rec.app_name, name=h.fake.volumes[vid].name, region="lcl-a")
    h.clock.advance(60)
    flagged = await h.fake.create_volume(rec.app_name, name=h.fake.volumes[vid].name, region="lcl-a")
    force(h, iid, volume_id="vol_lost", flagged_volume_ids=[flagged.id])
    assert (await h.reconcile(iid)).volume_id == newer.id


async def test_a_failed_lookup_fails_closed_for_an_instance_that_ran(h: Harness) -> None:
    iid, _vid = await stopped_with_data(h)
    force(h, iid, volume_id="vol_lost")
    before = set(h.fake.volumes)
    h.fake.fail_next("list_volumes", InvalidRequestError("listing refused", status=400))
    after = await h.reconcile(iid)
    assert set(h.fake.volumes) == before  # no empty volume over existing data
    assert after.volume_id == "vol_lost"
    failed = h.event(iid, "reconcile.volume_lookup_failed")
    assert "no empty volume is created" in (failed.error or "")
    assert "instance.data_loss" not in h.events(iid)


async def test_a_truly_missing_volume_is_replaced_loudly(h: Harness) -> None:
    iid, vid = await stopped_with_data(h)
    h.fake.volumes.pop(vid)
    final = await h.reconcile(iid)
    assert final.volume_id and final.volume_id != vid
    assert h.event(iid, "instance.data_loss").details["lost_volume_id"] == vid


async def test_sandkeep_takes_its_own_snapshots_every_interval(h: Harness) -> None:
    rec = await h.running()
    assert rec.volume_id
    h.clock.advance(h.engine.settings.snapshot_interval + 1)  # past the instance's offset into the interval
    first = await h.reconcile(rec.id)
    assert first.last_snapshot_at == h.clock.now()
    assert len(h.fake.snapshots.get(rec.volume_id, [])) == 1
    assert "instance.snapshot_taken" in h.events(rec.id)
    h.clock.advance(60)
    await h.reconcile(rec.id)
    assert len(h.fake.snapshots.get(rec.volume_id, [])) == 1  # not again before the interval
    h.clock.advance(h.engine.settings.snapshot_interval)
    assert (await h.reconcile(rec.id)).last_snapshot_at == h.clock.now()
    assert len(h.fake.snapshots.get(rec.volume_id, [])) == 2
