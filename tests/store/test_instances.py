"""Instance rows: round trips, UTC handling, uniqueness, listing with cursors, counting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from sandkeep.clock import FakeClock
from sandkeep.store.base import AlreadyExists
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import InvalidCursor, SqlStore
from tests.store.conftest import new_instance


def test_insert_and_get_round_trip_every_field(store: SqlStore, clock: FakeClock) -> None:
    t = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    record = new_instance(
        clock,
        status=Status.RECOVERING,
        machine_id="m1", volume_id="v1", region="lcl-b", machine_size="performance-2x",
        image="img:1", env={"A": "1", "B": "two words"}, secrets_encrypted={"TOKEN": "gAAAA-fernet"},
        config_generation=3, last_started_at=t, last_stopped_at=t + timedelta(seconds=1),
        status_changed_at=t, health_fail_count=2, alarm_at=t + timedelta(minutes=5),
        pending_action="restart", recovery_started_at=t, recovery_step="fork_volume",
        pending_recovery_volume_id="v2", retained_volume_id="v0", retained_volume_cleanup_after=t + timedelta(days=7),
        last_recovery_error="boom: ünïcode", last_recovery_error_at=t, pending_destroy_machine_id="m9",
        pending_destroy_volume_id="v9", destroy_volume_attempts=4, destroyed_at=None, provider_error_count=1,
        last_provider_error="503", version=7, lease_owner=None, lease_expires_at=None,
    )
    stored = store.insert_instance(record)
    assert stored == record
    fetched = store.get_instance(record.id)
    assert fetched == record
    assert fetched is not None
    assert isinstance(fetched.status, Status)
    for name in InstanceRecord.field_names():
        value = getattr(fetched, name)
        if isinstance(value, datetime):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0), name


def test_times_are_normalised_to_utc(store: SqlStore, clock: FakeClock) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 6, 1, 14, 0, 0, 123456, tzinfo=plus_two)
    record = store.insert_instance(new_instance(clock, created_at=local, alarm_at=local))
    fetched = store.get_instance(record.id)
    assert fetched is not None
    assert fetched.created_at == local
    assert fetched.created_at.tzinfo == UTC
    assert fetched.created_at.hour == 12
    assert fetched.alarm_at is not None and fetched.alarm_at.tzinfo == UTC


def test_naive_datetimes_are_refused(store: SqlStore, clock: FakeClock) -> None:
    record = new_instance(clock, created_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        store.insert_instance(record)
    assert store.get_instance(record.id) is None


def test_get_missing_is_none(store: SqlStore) -> None:
    assert store.get_instance("ins_nope") is None


def test_duplicate_id_or_sandbox_id(store: SqlStore, clock: FakeClock) -> None:
    first = store.insert_instance(new_instance(clock))
    with pytest.raises(AlreadyExists):
        store.insert_instance(new_instance(clock, id=first.id))
    with pytest.raises(AlreadyExists):
        store.insert_instance(new_instance(clock, sandbox_id=first.sandbox_id))
    page = store.list_instances()
    assert [r.id for r in page.items] == [first.id]


def test_invalid_values_are_refused(store: SqlStore, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="status"):
        store.insert_instance(new_instance(clock, status="sleeping"))
    with pytest.raises(ValueError, match="env"):
        store.insert_instance(new_instance(clock, env={"A": 1}))
    with pytest.raises(ValueError, match="health_fail_count"):
        store.insert_instance(new_instance(clock, health_fail_count="3"))
    with pytest.raises(ValueError, match="user_id"):
        store.insert_instance(new_instance(clock, user_id=None))
    assert store.list_instances().items == []


def _make_fleet(store: SqlStore, clock: FakeClock) -> list[InstanceRecord]:
    made: list[InstanceRecord] = []
    specs = [
        ("user-a", Status.RUNNING, "lcl-a"),
        ("user-b", Status.RUNNING, "lcl-b"),
        ("user-a", Status.STOPPED, "lcl-a"),
        ("user-a", Status.DESTROYED, "lcl-a"),
        ("user-b", Status.RECOVERING, "lcl-c"),
        ("user-a", Status.RUNNING, "lcl-b"),
        ("user-c", Status.PROVISIONED, None),
    ]
    for i, (user, status, region) in enumerate(specs):
        if i % 3 == 0:
            clock.advance(1)  # several share a created_at: the id breaks the tie
        made.append(store.insert_instance(new_instance(clock, user_id=user, status=status, region=region)))
    return made


def _all_pages(store: SqlStore, **filters: object) -> tuple[list[InstanceRecord], int]:
    items: list[InstanceRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = store.list_instances(cursor=cursor, limit=2, **filters)  # type: ignore[arg-type]
        pages += 1
        items.extend(page.items)
        if page.next_cursor is None:
            return items, pages
        cursor = page.next_cursor
        assert pages < 20


def test_list_paginates_in_creation_order_without_gaps_or_repeats(store: SqlStore, clock: FakeClock) -> None:
    fleet = _make_fleet(store, clock)
    items, pages = _all_pages(store, include_destroyed=True)
    expected = sorted(fleet, key=lambda r: (r.created_at, r.id))
    assert [r.id for r in items] == [r.id for r in expected]
    assert pages == 4  # 7 items, 2 per page
    # default hides destroyed
    visible, _ = _all_pages(store)
    assert [r.id for r in visible] == [r.id for r in expected if r.status != Status.DESTROYED]


def test_list_filters(store: SqlStore, clock: FakeClock) -> None:
    fleet = _make_fleet(store, clock)
    by_user, _ = _all_pages(store, user_id="user-a")
    assert {r.id for r in by_user} == {r.id for r in fleet if r.user_id == "user-a" and r.status != Status.DESTROYED}
    running_or_recovering, _ = _all_pages(store, status=["running", "recovering"])
    assert {r.id for r in running_or_recovering} == {
        r.id for r in fleet if r.status in (Status.RUNNING, Status.RECOVERING)
    }
    single, _ = _all_pages(store, status="running", user_id="user-a", region="lcl-b")
    assert [r.id for r in single] == [fleet[5].id]
    destroyed, _ = _all_pages(store, status=["destroyed"])
    assert [r.id for r in destroyed] == [fleet[3].id]
    with pytest.raises(ValueError, match="unknown status"):
        store.list_instances(status=["bogus"])


def test_list_bad_cursor_and_limit(store: SqlStore, clock: FakeClock) -> None:
    _make_fleet(store, clock)
    for bad in ("garbage!!", "eyJrIjoiZXZlbnRzIiwiaSI6MX0", "bnVsbA"):
        with pytest.raises(InvalidCursor):
            store.list_instances(cursor=bad)
    with pytest.raises(ValueError, match="limit"):
        store.list_instances(limit=0)
    with pytest.raises(ValueError, match="limit"):
        store.list_instances(limit=100000)


def test_count_by_status(store: SqlStore, clock: FakeClock) -> None:
    assert store.count_by_status() == {}
    _make_fleet(store, clock)
    assert store.count_by_status() == {
        "running": 3, "stopped": 1, "destroyed": 1, "recovering": 1, "provisioned": 1,
    }
