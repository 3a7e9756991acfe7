"""Issue 11 (fleet scale): batched claim/finish/release fencing, engine heartbeats voiding a dead engine's
leases, a planned stop resuming at once, the API-only role, and the shared slots (wake-ups before alarms).

Functional tests on both databases (the ``store`` fixture); speed lives in ``bench/scale.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from sandkeep.clock import FakeClock
from sandkeep.engine.runtime import Engine, Slots
from sandkeep.store.base import FencedError, NotFound
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore
from tests.engine.conftest import USER, Harness

TTL = 30.0


def _row(clock: FakeClock, n: int, *, due: bool = True) -> InstanceRecord:
    now = clock.now()
    return InstanceRecord(id=f"ins_scale{n}", user_id=f"u{n}", sandbox_id=f"sbx_scale{n}", status=Status.RUNNING,
                          created_at=now, updated_at=now, app_name=f"app-{n}",
                          alarm_at=now - timedelta(seconds=1) if due else now + timedelta(hours=1))


def _insert(store: SqlStore, clock: FakeClock, count: int, *, due: bool = True) -> list[InstanceRecord]:
    return [store.insert_instance(_row(clock, i, due=due)) for i in range(count)]


# ------------------------------------------------------------------------------------------ store: batches


def test_finish_many_is_fenced_per_row(store: SqlStore, clock: FakeClock) -> None:
    _insert(store, clock, 3)
    claimed = store.claim_due("e1#1", TTL, clock.now(), 10)
    assert [r.id for r in claimed] == ["ins_scale0", "ins_scale1", "ins_scale2"]
    a, b, c = claimed
    # b's lease expires and another worker takes it: e1's finish of b must fail, a and c must succeed
    clock.advance(TTL + 1)
    assert store.claim(b.id, "e2#1", TTL, clock.now()) is not None
    later = clock.now() + timedelta(seconds=30)
    results = store.finish_many([(a, "e1#1", {"alarm_at": later}), (b, "e1#1", {"alarm_at": later}),
                                 (c, "e1#1", {"alarm_at": later})])
    assert isinstance(results[1], FencedError)
    for done, before in ((results[0], a), (results[2], c)):
        assert isinstance(done, InstanceRecord)
        stored = store.get_instance(before.id)
        assert stored is not None and stored.lease_owner is None and stored.alarm_at == later
        assert stored.version == before.version + 1 == done.version
    held = store.get_instance(b.id)
    assert held is not None and held.lease_owner == "e2#1" and held.alarm_at != later
    # a finished row cannot be finished again with the stale version
    again = store.finish_many([(a, "e1#1", {"alarm_at": later})])
    assert isinstance(again[0], FencedError)
    gone = a.copy(id="ins_nosuch")
    assert isinstance(store.finish_many([(gone, "e1#1", {"alarm_at": later})])[0], NotFound)


def test_finish_refuses_store_managed_fields(store: SqlStore, clock: FakeClock) -> None:
    (rec,) = _insert(store, clock, 1)
    (claimed,) = store.claim_due("e1#1", TTL, clock.now(), 1)
    with pytest.raises(ValueError):
        store.finish(claimed, "e1#1", {"lease_owner": "someone"})
    assert store.get_instance(rec.id).lease_owner == "e1#1"  # type: ignore[union-attr]


def test_release_many_only_drops_own_leases(store: SqlStore, clock: FakeClock) -> None:
    _insert(store, clock, 2)
    mine = store.claim_due("e1#1", TTL, clock.now(), 1)
    theirs = store.claim_due("e2#1", TTL, clock.now(), 1)
    store.release_many([(mine[0], "e1#1"), (theirs[0], "e1#1")])  # the second is not ours: untouched
    assert store.get_instance(mine[0].id).lease_owner is None  # type: ignore[union-attr]
    assert store.get_instance(theirs[0].id).lease_owner == "e2#1"  # type: ignore[union-attr]


def test_claim_due_batches_do_not_overlap(store: SqlStore, clock: FakeClock) -> None:
    _insert(store, clock, 5)
    first = store.claim_due("e1#1", TTL, clock.now(), 3)
    second = store.claim_due("e2#1", TTL, clock.now(), 3)
    assert len(first) == 3 and len(second) == 2
    assert not {r.id for r in first} & {r.id for r in second}
    assert store.claim_due("e3#1", TTL, clock.now(), 3) == []


def test_next_due_at_skips_leased_rows(store: SqlStore, clock: FakeClock) -> None:
    recs = _insert(store, clock, 2)
    assert store.next_due_at(clock.now()) == recs[0].alarm_at
    store.claim_due("e1#1", TTL, clock.now(), 2)
    assert store.next_due_at(clock.now()) is None


# ------------------------------------------------------------------------------------------ store: engines


def test_dead_engine_leases_are_voided_and_fenced(store: SqlStore, clock: FakeClock) -> None:
    _insert(store, clock, 2, due=False)
    assert store.engine_heartbeat("host:1:aa", "engine", clock.now(), 5.0) is False  # registered
    assert store.engine_heartbeat("host:1:aa", "engine", clock.now(), 5.0) is True  # beat
    assert store.engine_heartbeat("host:1:aa_other", "engine", clock.now(), 5.0) is False
    held = store.claim("ins_scale0", "host:1:aa#7", TTL, clock.now())
    other = store.claim("ins_scale1", "host:1:aa_other#1", TTL, clock.now())  # a longer id, same prefix
    assert held is not None and other is not None
    clock.advance(3)
    assert store.engine_heartbeat("host:1:aa_other", "engine", clock.now(), 5.0) is True
    assert store.void_dead_engines(clock.now()) == {}  # within its heartbeat ttl: alive
    clock.advance(3)  # aa's last beat is 6 s old (ttl 5), aa_other's 3 s
    assert store.void_dead_engines(clock.now()) == {"host:1:aa": 1}
    voided = store.get_instance("ins_scale0")
    assert voided is not None and voided.lease_owner is None and voided.version == held.version + 1
    assert voided.alarm_at is not None and voided.alarm_at <= clock.now()  # picked up at once
    # the dead holder's writes fail (fencing intact), another engine claims at once (no lease ttl wait)
    with pytest.raises(FencedError):
        store.update(held, "host:1:aa#7", {"health_fail_count": 1})
    with pytest.raises(FencedError):
        store.finish(held, "host:1:aa#7", {"alarm_at": clock.now()})
    assert store.claim("ins_scale0", "host:2:bb#1", TTL, clock.now()) is not None
    kept = store.get_instance("ins_scale1")
    assert kept is not None and kept.lease_owner == "host:1:aa_other#1"
    assert [e["id"] for e in store.list_engines()] == ["host:1:aa_other"]
    # the dead engine comes back: its row was gone, so it learns it was declared dead
    assert store.engine_heartbeat("host:1:aa", "engine", clock.now(), 5.0) is False


def test_engine_leave_voids_own_leases(store: SqlStore, clock: FakeClock) -> None:
    _insert(store, clock, 1, due=False)
    store.engine_heartbeat("e9", "engine", clock.now(), 5.0)
    held = store.claim("ins_scale0", "e9#1", TTL, clock.now())
    assert held is not None
    assert store.engine_leave("e9", clock.now()) == 1
    row = store.get_instance("ins_scale0")
    assert row is not None and row.lease_owner is None and row.alarm_at is not None
    assert row.alarm_at <= clock.now()
    assert store.list_engines() == []


# ------------------------------------------------------------------------------------------ engine


async def test_killed_engine_instances_are_picked_up_before_lease_ttl(
        make_harness: Callable[..., Harness]) -> None:
    a = make_harness(engine_heartbeat_ttl=5.0)
    b = make_harness(engine_heartbeat_ttl=5.0)
    rec = await a.running()
    await a.engine._heartbeat_once()
    held = await a.engine.claim(rec.id, a.engine._owner())
    assert held is not None
    assert await b.engine.reconcile_now(rec.id, wait=0) is None  # A's lease holds
    await a.pass_time(6)  # past A's heartbeat ttl, far from the 30 s lease ttl
    await b.engine._heartbeat_once()
    assert b.engine.voided_engines == {a.engine.worker_id: 1}
    assert await b.engine.reconcile_now(rec.id, wait=0) is not None
    with pytest.raises(FencedError):  # A's stale lease cannot write any more
        a.store.update(held, held.lease_owner or "", {"health_fail_count": 3})


async def test_planned_stop_releases_leases_for_a_restart(make_harness: Callable[..., Harness]) -> None:
    a = make_harness()
    rec = await a.running()
    await a.engine.start()
    held = await a.engine.claim(rec.id, a.engine._owner())
    assert held is not None
    await a.engine.stop()
    b = make_harness()
    assert await b.engine.reconcile_now(rec.id, wait=0) is not None  # no 30 s lease wait


async def test_api_role_never_reconciles(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    store, clock = h.store, h.clock
    api = Engine(h.engine.settings, store, h.model.client, clock, worker_id="api", prober=h.model.prober,
                 role="api")
    try:
        await api.start()
        assert not api.started and api.passive
        record = await api.service.create_instance(USER, user_id=USER.user_id)
        api.wake(record.id)
        await asyncio.sleep(0)
        assert not api._wakes
        row = store.get_instance(record.id)
        assert row is not None and row.lease_owner is None and row.alarm_at is not None
        assert row.alarm_at <= clock.now() + timedelta(seconds=60)
        assert h.model.machines() == []  # the API process created (and started) nothing
        assert store.list_engines() == []  # and never registered as an engine
        # an engine process picks the persisted intent up
        assert await h.engine.reconcile_now(record.id) is not None
    finally:
        await api.stop()


async def test_wakeups_take_slots_before_alarms() -> None:
    kicks: list[int] = []
    slots = Slots(2, lambda: kicks.append(1))
    slots.take(2)
    assert slots.free() == 0
    waiter = asyncio.ensure_future(slots.acquire_urgent())
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.release()  # handed straight to the waiting wake-up, not to the alarm loop
    await asyncio.sleep(0)
    assert waiter.done() and slots.used == 2 and kicks == []
    assert slots.free() == 0
    slots.release()
    assert slots.free() == 1 and kicks == [1]
    # a cancelled waiter gives nothing away and blocks nothing
    slots.take(1)
    gone = asyncio.ensure_future(slots.acquire_urgent())
    await asyncio.sleep(0)
    assert slots.free() == 0  # an urgent waiter holds alarm claims back
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert slots.free() == 0 and slots.used == 2
    slots.release()
    assert slots.free() == 1


def test_recovery_progress_for_the_fleet_page(store: SqlStore, clock: FakeClock) -> None:
    from types import SimpleNamespace

    from sandkeep.store.records import EventRecord
    from sandkeep.web.progress import fleet_progress

    recs = _insert(store, clock, 4, due=True)
    for rec in recs[:3]:
        store.update(store.claim(rec.id, "x#1", TTL, clock.now()) or rec, "x#1", {"status": Status.RECOVERING})
        store.release(store.get_instance(rec.id), "x#1")  # type: ignore[arg-type]
    store.claim(recs[0].id, "e1#1", TTL, clock.now())  # one recovery in flight, two queued
    for name in ("instance.unexpected_stop_recovery_succeeded", "instance.unexpected_stop_recovery_succeeded",
                 "instance.unexpected_stop_recovery_failed"):
        store.add_event(EventRecord(event=name, at=clock.now(), instance_id=recs[3].id,
                                    user_id="u3", details={}))
    store.add_event(EventRecord(event="instance.unexpected_stop_recovery_succeeded",
                                at=clock.now() - timedelta(hours=2), instance_id=recs[3].id, user_id="u3",
                                details={}))  # outside the hour
    store.engine_heartbeat("e1", "engine", clock.now(), 5.0)
    progress = fleet_progress(SimpleNamespace(store=store, clock=clock))
    assert {k: v for k, v in progress.items() if k != "engines"} == {
        "queued": 2, "in_flight": 1, "succeeded": 2, "failed": 1}
    assert [e["id"] for e in progress["engines"]] == ["e1"]
    assert fleet_progress(SimpleNamespace(clock=clock)) == {}  # no store: no fragment
