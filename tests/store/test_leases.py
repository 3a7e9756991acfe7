"""Leases and fenced writes (SPEC §5), single-threaded semantics."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sandkeep.clock import FakeClock
from sandkeep.store.base import FencedError, NotFound
from sandkeep.store.records import Status
from sandkeep.store.sql import SqlStore
from tests.store.conftest import new_instance

TTL = 30.0


def test_claim_takes_a_free_lease_and_bumps_version(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    claimed = store.claim(rec.id, "w1", TTL, clock.now())
    assert claimed is not None
    assert claimed.lease_owner == "w1"
    assert claimed.lease_expires_at == clock.now() + timedelta(seconds=TTL)
    assert claimed.version == rec.version + 1
    assert store.get_instance(rec.id) == claimed


def test_claim_refused_while_held_even_for_the_same_owner(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    first = store.claim(rec.id, "w1", TTL, clock.now())
    assert first is not None
    clock.advance(TTL - 1)
    assert store.claim(rec.id, "w2", TTL, clock.now()) is None
    assert store.claim(rec.id, "w1", TTL, clock.now()) is None
    assert store.get_instance(rec.id) == first


def test_claim_of_missing_instance_is_none(store: SqlStore, clock: FakeClock) -> None:
    assert store.claim("ins_missing", "w1", TTL, clock.now()) is None


def test_claim_after_expiry_and_takeover_fences_the_old_worker(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock, status=Status.RUNNING))
    a = store.claim(rec.id, "worker-a", TTL, clock.now())
    assert a is not None
    clock.advance(TTL + 1)  # worker-a stalls past its lease
    b = store.claim(rec.id, "worker-b", TTL, clock.now())
    assert b is not None and b.version == a.version + 1
    b2 = store.update(b, "worker-b", {"status": Status.STOPPED, "pending_action": None})

    with pytest.raises(FencedError):
        store.update(a, "worker-a", {"status": Status.RECOVERING, "pending_action": "recover"})
    with pytest.raises(FencedError):
        store.renew(a, "worker-a", TTL, clock.now())
    store.release(a, "worker-a")  # not ours any more: a no-op, no error

    row = store.get_instance(rec.id)
    assert row == b2
    assert row is not None
    assert row.status == Status.STOPPED
    assert row.lease_owner == "worker-b"


def test_expired_lease_still_writes_when_nobody_took_over(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "worker-a", TTL, clock.now())
    assert a is not None
    clock.advance(TTL * 3)
    updated = store.update(a, "worker-a", {"health_fail_count": 1})
    assert updated.health_fail_count == 1


def test_update_is_fenced_on_version(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "w", TTL, clock.now())
    assert a is not None
    clock.advance(2)
    a2 = store.update(a, "w", {"region": "lcl-a", "status": "starting"})
    assert a2.version == a.version + 1
    assert a2.region == "lcl-a" and a2.status == Status.STARTING
    assert a2.updated_at == clock.now()
    assert a2.lease_owner == "w" and a2.lease_expires_at == a.lease_expires_at
    with pytest.raises(FencedError, match="version"):
        store.update(a, "w", {"region": "lcl-c"})  # stale read
    assert store.get_instance(rec.id) == a2


def test_update_without_lease_is_fenced(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    with pytest.raises(FencedError):
        store.update(rec, "w", {"region": "lcl-a"})
    assert store.get_instance(rec.id) == rec


def test_update_of_missing_instance(store: SqlStore, clock: FakeClock) -> None:
    with pytest.raises(NotFound):
        store.update(new_instance(clock), "w", {"region": "x"})


def test_update_rejects_unknown_and_managed_fields_without_writing(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "w", TTL, clock.now())
    assert a is not None
    for changes in ({"nope": 1}, {"busy": True}, {"version": 99}, {"lease_owner": "x"}, {"id": "ins_x"},
                    {"lease_expires_at": clock.now()}, {"status": "weird"}, {"alarm_at": "tomorrow"},
                    {"env": ["A"]}, {"region": "ok", "bogus": 1}):
        with pytest.raises(ValueError):
            store.update(a, "w", changes)
    assert store.get_instance(rec.id) == a
    # the record is still usable afterwards
    assert store.update(a, "w", {"region": "ok"}).region == "ok"


def test_update_env_and_times_round_trip(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "w", TTL, clock.now())
    assert a is not None
    due = clock.now() + timedelta(minutes=30)
    a2 = store.update(a, "w", {"env": {"X": "y"}, "secrets_encrypted": {"S": "tok"}, "alarm_at": due,
                               "config_generation": 2})
    assert store.get_instance(rec.id) == a2
    assert a2.env == {"X": "y"} and a2.alarm_at == due


def test_renew_extends_without_changing_version(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "w", TTL, clock.now())
    assert a is not None
    clock.advance(20)
    renewed = store.renew(a, "w", TTL, clock.now())
    assert renewed.version == a.version
    assert renewed.lease_expires_at == clock.now() + timedelta(seconds=TTL)
    clock.advance(20)  # past the first expiry, inside the renewed one
    assert store.claim(rec.id, "other", TTL, clock.now()) is None
    # the record from before the renew still writes (same version)
    assert store.update(a, "w", {"region": "r"}).version == a.version + 1


def test_release_frees_the_lease_for_others(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    a = store.claim(rec.id, "w", TTL, clock.now())
    assert a is not None
    a2 = store.update(a, "w", {"region": "r"})
    store.release(a, "w")  # releasing with an older record copy still releases our lease
    row = store.get_instance(rec.id)
    assert row is not None
    assert row.lease_owner is None and row.lease_expires_at is None and row.version == a2.version
    with pytest.raises(FencedError):
        store.update(a2, "w", {"region": "s"})  # released: no more writes without a new claim
    b = store.claim(rec.id, "w2", TTL, clock.now())
    assert b is not None and b.lease_owner == "w2"


def test_claim_validates_arguments(store: SqlStore, clock: FakeClock) -> None:
    from datetime import datetime

    rec = store.insert_instance(new_instance(clock))
    with pytest.raises(ValueError):
        store.claim(rec.id, "w", 0, clock.now())
    with pytest.raises(ValueError):
        store.claim(rec.id, "w", TTL, datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        store.claim_due("w", TTL, clock.now(), 0)
    with pytest.raises(ValueError, match="owner"):
        store.claim(rec.id, "", TTL, clock.now())
    with pytest.raises(ValueError, match="owner"):
        store.claim_due(None, TTL, clock.now(), 5)  # type: ignore[arg-type]
    assert store.get_instance(rec.id) == rec


def test_claim_due_picks_due_unleased_in_alarm_order(store: SqlStore, clock: FakeClock) -> None:
    now = clock.now()
    late = store.insert_instance(new_instance(clock, alarm_at=now - timedelta(seconds=1)))
    early = store.insert_instance(new_instance(clock, alarm_at=now - timedelta(minutes=5)))
    exactly_now = store.insert_instance(new_instance(clock, alarm_at=now))
    future = store.insert_instance(new_instance(clock, alarm_at=now + timedelta(seconds=1)))  # not due yet
    store.insert_instance(new_instance(clock, alarm_at=None))  # no alarm
    held = store.insert_instance(new_instance(clock, alarm_at=now - timedelta(hours=1)))
    assert store.claim(held.id, "someone", TTL, now) is not None

    got = store.claim_due("w", TTL, now, limit=2)
    assert [r.id for r in got] == [early.id, late.id]
    assert all(r.lease_owner == "w" for r in got)
    got2 = store.claim_due("w2", TTL, now, limit=10)
    assert [r.id for r in got2] == [exactly_now.id]
    assert store.claim_due("w3", TTL, now, limit=10) == []

    # once the holder's lease expires, its due instance comes back
    clock.advance(TTL + 1)
    later = clock.now()
    again = store.claim_due("w4", TTL, later, limit=10)
    # every lease above expired too, and `future` is due now: all come back, oldest alarm first
    assert [r.id for r in again] == [held.id, early.id, late.id, exactly_now.id, future.id]


def test_next_alarm_at(store: SqlStore, clock: FakeClock) -> None:
    assert store.next_alarm_at() is None
    now = clock.now()
    store.insert_instance(new_instance(clock))
    assert store.next_alarm_at() is None
    store.insert_instance(new_instance(clock, alarm_at=now + timedelta(minutes=3)))
    store.insert_instance(new_instance(clock, alarm_at=now + timedelta(minutes=1)))
    nxt = store.next_alarm_at()
    assert nxt == now + timedelta(minutes=1)
    assert nxt is not None and nxt.tzinfo is not None
