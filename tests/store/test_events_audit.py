"""Events (SPEC §9) and the admin audit log: newest first, cursors, filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sandkeep.clock import FakeClock
from sandkeep.store.records import AuditRecord, EventRecord
from sandkeep.store.sql import InvalidCursor, SqlStore


def _event(clock: FakeClock, name: str, instance_id: str | None, **kw: object) -> EventRecord:
    clock.advance(1)
    return EventRecord(event=name, instance_id=instance_id, at=clock.now(), **kw)  # type: ignore[arg-type]


def test_event_round_trip(store: SqlStore, clock: FakeClock) -> None:
    ev = _event(clock, "instance.unexpected_stop_recovery_succeeded", "ins_1", user_id="u", sandbox_id="sbx_1",
                status="running", machine_id="m2", volume_id="v2", region="lcl-b", label="cutover",
                error=None, duration_ms=12345, value=1.5, details={"old_volume_id": "v1", "n": [1, 2]})
    saved = store.add_event(ev)
    assert saved.id is not None
    page = store.list_events(instance_id="ins_1")
    assert page.items == [saved]
    got = page.items[0]
    assert got.at == ev.at and got.at.tzinfo == UTC
    assert got.details == {"old_volume_id": "v1", "n": [1, 2]}
    assert got.duration_ms == 12345 and got.value == 1.5


def test_events_newest_first_with_cursor_and_filters(store: SqlStore, clock: FakeClock) -> None:
    saved = []
    for i in range(7):
        name = "instance.started" if i % 2 == 0 else "reconcile.delete_volume"
        saved.append(store.add_event(_event(clock, name, "ins_a" if i < 5 else "ins_b")))
    ids = [e.id for e in saved]
    assert ids == sorted(ids)  # type: ignore[type-var]

    seen: list[EventRecord] = []
    cursor = None
    while True:
        page = store.list_events(cursor=cursor, limit=3)
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [e.id for e in seen] == list(reversed(ids))

    only_a = store.list_events(instance_id="ins_a", limit=100).items
    assert [e.id for e in only_a] == list(reversed(ids[:5]))
    started_a = store.list_events(instance_id="ins_a", name="instance.started").items
    assert [e.id for e in started_a] == [ids[4], ids[2], ids[0]]
    first = store.list_events(name="reconcile.delete_volume", limit=2)
    assert [e.id for e in first.items] == [ids[5], ids[3]]
    assert first.next_cursor is not None
    rest = store.list_events(name="reconcile.delete_volume", limit=2, cursor=first.next_cursor)
    assert [e.id for e in rest.items] == [ids[1]] and rest.next_cursor is None
    assert store.list_events(name="no.such").items == []


def test_event_validation(store: SqlStore, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        store.add_event(EventRecord(event="x", instance_id=None, at=datetime(2026, 1, 1)))
    with pytest.raises(ValueError):
        store.add_event(EventRecord(event="x", instance_id=None, at=clock.now(), details={"f": object()}))
    with pytest.raises(InvalidCursor):
        store.list_events(cursor="%%%")
    audit_cursor = None
    for _ in range(3):
        store.add_audit(AuditRecord(actor="admin", role="admin", action="a", at=clock.now()))
    audit_cursor = store.list_audit(limit=1).next_cursor
    assert audit_cursor is not None
    with pytest.raises(InvalidCursor):
        store.list_events(cursor=audit_cursor)  # a cursor of another listing
    assert store.list_events().items == []


def test_audit_round_trip_and_pagination(store: SqlStore, clock: FakeClock) -> None:
    saved = []
    for i in range(5):
        clock.advance(1)
        saved.append(store.add_audit(AuditRecord(
            actor="admin-1", role="admin", action="retained_volume_cleanup" if i % 2 else "recovery_retry",
            at=clock.now(), instance_id="ins_x" if i < 3 else None, outcome="ok" if i != 2 else "refused",
            details={"i": i},
        )))
    page1 = store.list_audit(limit=2)
    assert page1.items == [saved[4], saved[3]]
    page2 = store.list_audit(limit=2, cursor=page1.next_cursor)
    assert page2.items == [saved[2], saved[1]]
    page3 = store.list_audit(limit=2, cursor=page2.next_cursor)
    assert page3.items == [saved[0]] and page3.next_cursor is None
    assert store.list_audit(instance_id="ins_x").items == [saved[2], saved[1], saved[0]]
    assert saved[2].outcome == "refused" and saved[2].details == {"i": 2}
    assert saved[0].at.tzinfo == UTC
