"""Batched claims and finishes (issue 11, the fast engine) on both databases: one-statement ``claim_due`` never
hands out more than its limit nor the same row twice, and ``finish_many``'s one-``executemany`` path keeps each
item's fencing (a fenced item in a batch is reported alone; the others are written, exactly once)."""

from __future__ import annotations

import threading
from datetime import timedelta

from sandkeep.clock import FakeClock
from sandkeep.store.base import FencedError, NotFound
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore
from tests.store.conftest import new_instance
from tests.store.test_concurrency import _race

TTL = 30.0


def _due(store: SqlStore, clock: FakeClock, count: int) -> list[InstanceRecord]:
    now = clock.now()
    # equal alarms for half of them: the tie is broken by id, and the limit still holds
    return [store.insert_instance(new_instance(clock, status=Status.RUNNING,
                                               alarm_at=now - timedelta(seconds=i // 2))) for i in range(count)]


def test_claim_due_takes_at_most_limit_oldest_first(store: SqlStore, clock: FakeClock) -> None:
    rows = _due(store, clock, 30)
    oldest_first = sorted(rows, key=lambda r: (r.alarm_at, r.id))
    got = store.claim_due("e1#1", TTL, clock.now(), 7)
    assert [r.id for r in got] == [r.id for r in oldest_first[:7]]
    assert all(r.lease_owner == "e1#1" and r.version == 1 for r in got)
    more = store.claim_due("e1#2", TTL, clock.now(), 100)
    assert len(more) == 23 and not {r.id for r in more} & {r.id for r in got}
    assert store.claim_due("e1#3", TTL, clock.now(), 100) == []
    for r in got:
        stored = store.get_instance(r.id)
        assert stored is not None and stored.lease_owner == "e1#1"


def test_racing_claim_due_batches_respect_the_limit_and_never_overlap(store: SqlStore, clock: FakeClock) -> None:
    due = {r.id for r in _due(store, clock, 60)}
    results: list[list[InstanceRecord]] = _race(4, lambda i: store.claim_due(f"w{i}#1", TTL, clock.now(), 10))
    assert all(len(batch) <= 10 for batch in results)
    claimed = [r.id for batch in results for r in batch]
    assert len(claimed) == len(set(claimed)), "an instance was handed to two engines"
    assert set(claimed) <= due
    left = store.claim_due("late#1", TTL, clock.now(), 100)
    assert set(claimed) | {r.id for r in left} == due


def test_finish_many_batch_with_fenced_items_writes_the_others_once(store: SqlStore, clock: FakeClock) -> None:
    _due(store, clock, 6)
    claimed = store.claim_due("e1#1", TTL, clock.now(), 6)
    assert len(claimed) == 6
    # two of them change hands (voided, then claimed by another engine), one is deleted from under us
    clock.advance(TTL + 1)
    stolen = [store.claim(claimed[i].id, "e2#1", TTL, clock.now()) for i in (1, 4)]
    assert all(s is not None for s in stolen)
    later = clock.now() + timedelta(seconds=30)
    items = [(r, "e1#1", {"alarm_at": later}) for r in claimed]
    items.append((claimed[0].copy(id="ins_nosuch"), "e1#1", {"alarm_at": later}))
    results = store.finish_many(items)
    assert len(results) == 7
    assert isinstance(results[1], FencedError) and isinstance(results[4], FencedError)
    assert isinstance(results[6], NotFound)
    for i in (0, 2, 3, 5):
        done = results[i]
        assert isinstance(done, InstanceRecord)
        stored = store.get_instance(claimed[i].id)
        assert stored is not None
        assert stored.version == claimed[i].version + 1 == done.version  # written exactly once
        assert stored.lease_owner is None and done.lease_owner is None and stored.alarm_at == later
        assert done.alarm_at == later and done.status == stored.status
    for i in (1, 4):
        stored = store.get_instance(claimed[i].id)
        assert stored is not None and stored.lease_owner == "e2#1" and stored.alarm_at != later


def test_finish_many_groups_different_changes(store: SqlStore, clock: FakeClock) -> None:
    _due(store, clock, 4)
    a, b, c, d = store.claim_due("e1#1", TTL, clock.now(), 4)
    later = clock.now() + timedelta(seconds=30)
    results = store.finish_many([(a, "e1#1", {"alarm_at": later}),
                                 (b, "e1#1", {"alarm_at": later, "provider_error_count": 2,
                                              "last_provider_error": "boom"}),
                                 (c, "e1#1", {"alarm_at": later}),
                                 (d, "e1#2", {"alarm_at": later})])  # not d's owner: fenced
    assert isinstance(results[3], FencedError)
    done_b = results[1]
    assert isinstance(done_b, InstanceRecord) and done_b.provider_error_count == 2
    stored_b = store.get_instance(b.id)
    assert stored_b is not None and stored_b.last_provider_error == "boom" and stored_b.lease_owner is None
    for rec, res in ((a, results[0]), (c, results[2])):
        assert isinstance(res, InstanceRecord) and res.version == rec.version + 1
        assert res == store.get_instance(rec.id)
    stored_d = store.get_instance(d.id)
    assert stored_d is not None and stored_d.lease_owner == "e1#1" and stored_d.version == d.version


def test_finish_many_racing_a_void_is_all_or_nothing_per_row(store: SqlStore, clock: FakeClock) -> None:
    """A dead-engine void (bumps versions, drops leases) racing a batch of finishes: every row ends either
    finished by the batch (its result a record) or voided (its result FencedError), never both or neither."""
    _due(store, clock, 40)
    claimed = store.claim_due("e1:1:x#1", TTL, clock.now(), 40)
    later = clock.now() + timedelta(seconds=30)
    start = threading.Barrier(2)
    out: dict[str, object] = {}

    def finish() -> None:
        start.wait(timeout=60)
        out["finish"] = store.finish_many([(r, "e1:1:x#1", {"alarm_at": later}) for r in claimed])

    def void() -> None:
        start.wait(timeout=60)
        with store._write() as conn:  # what void_dead_engines does for one dead engine
            out["void"] = store._void(conn, "e1:1:x", clock.now())

    threads = [threading.Thread(target=finish), threading.Thread(target=void)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    results = out["finish"]
    assert isinstance(results, list) and len(results) == 40
    finished = [r for r in results if isinstance(r, InstanceRecord)]
    fenced = [r for r in results if isinstance(r, FencedError)]
    assert len(finished) + len(fenced) == 40
    assert out["void"] == len(fenced)  # the void took exactly the rows the batch did not finish
    for rec, res in zip(claimed, results, strict=True):
        stored = store.get_instance(rec.id)
        assert stored is not None and stored.lease_owner is None
        assert stored.version == rec.version + 1  # one writer won the row
        assert (stored.alarm_at == later) == isinstance(res, InstanceRecord)
