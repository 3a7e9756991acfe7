"""Races that must have exactly one winner: threads on both backends, processes on a shared SQLite file.

Each race lines the contenders up on a barrier and lets them go at once; the assertions fail if the
claim were a read-then-write instead of one conditional UPDATE.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandkeep.clock import FakeClock, SystemClock
from sandkeep.store.base import FencedError
from sandkeep.store.records import InstanceRecord
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import sqlite_url
from tests.store.conftest import new_instance

TTL = 30.0
JOIN_TIMEOUT = 120.0


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a contender hung"
    assert errors == []
    return results


def test_threads_racing_to_claim_one_winner(store: SqlStore, clock: FakeClock) -> None:
    now = clock.now()
    for _ in range(5):  # several rounds to give a broken claim a chance to double-win
        rec = store.insert_instance(new_instance(clock))
        rid = rec.id

        def claim(i: int, rid: str = rid) -> InstanceRecord | None:
            return store.claim(rid, f"w{i}", TTL, now)

        results: list[InstanceRecord | None] = _race(6, claim)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        row = store.get_instance(rec.id)
        assert row == winners[0]
        assert row is not None and row.version == rec.version + 1


def test_threads_racing_to_update_one_commit(store: SqlStore, clock: FakeClock) -> None:
    """Two writers holding the same (owner, version) read: only one write lands, the other is fenced."""
    rec = store.insert_instance(new_instance(clock))
    claimed = store.claim(rec.id, "w", TTL, clock.now())
    assert claimed is not None

    def write(i: int) -> str:
        try:
            store.update(claimed, "w", {"pending_action": f"writer-{i}"})
            return "ok"
        except FencedError:
            return "fenced"

    results = _race(4, write)
    assert Counter(results) == {"ok": 1, "fenced": 3}
    row = store.get_instance(rec.id)
    assert row is not None and row.version == claimed.version + 1


def test_threads_claim_due_never_hand_out_the_same_instance(store: SqlStore, clock: FakeClock) -> None:
    now = clock.now()
    due = {store.insert_instance(new_instance(clock, alarm_at=now - timedelta(seconds=i))).id for i in range(40)}
    store.insert_instance(new_instance(clock, alarm_at=now + timedelta(hours=1)))  # not due
    results: list[list[InstanceRecord]] = _race(4, lambda i: store.claim_due(f"w{i}", TTL, now, 12))
    claimed = [r.id for batch in results for r in batch]
    assert len(claimed) == len(set(claimed)), "an instance was handed to two workers"
    assert set(claimed) == due  # 4 x 12 >= 40: every due instance went to exactly one worker
    for i, batch in enumerate(results):
        for r in batch:
            row = store.get_instance(r.id)
            assert row is not None and row.lease_owner == f"w{i}"


def test_stale_worker_cannot_commit_after_takeover_under_contention(store: SqlStore, clock: FakeClock) -> None:
    rec = store.insert_instance(new_instance(clock))
    old = store.claim(rec.id, "old", TTL, clock.now())
    assert old is not None
    clock.advance(TTL + 0.001)
    new = store.claim(rec.id, "new", TTL, clock.now())
    assert new is not None

    def act(i: int) -> str:
        try:
            if i == 0:
                store.update(old, "old", {"region": "stale"})
            else:
                store.update(new, "new", {"region": "fresh"})
            return "ok"
        except FencedError:
            return "fenced"

    assert _race(2, act) == ["fenced", "ok"]
    row = store.get_instance(rec.id)
    assert row is not None and row.region == "fresh" and row.lease_owner == "new"


# --------------------------------------------------------------------------------------------------
# processes on one SQLite file (WAL + busy_timeout + BEGIN IMMEDIATE)


def _proc_claim(url: str, instance_ids: list[str], owner: str, now_iso: str, barrier: Any, out: Any) -> None:
    try:
        store = SqlStore(url, clock=SystemClock())
        try:
            now = datetime.fromisoformat(now_iso)
            barrier.wait(timeout=JOIN_TIMEOUT)
            won = [iid for iid in instance_ids if store.claim(iid, owner, TTL, now) is not None]
            out.put((owner, won))
        finally:
            store.close()
    except BaseException as exc:
        out.put((owner, f"error: {exc!r}"))


def _proc_claim_due(url: str, owner: str, now_iso: str, limit: int, barrier: Any, out: Any) -> None:
    try:
        store = SqlStore(url, clock=SystemClock())
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            got = store.claim_due(owner, TTL, datetime.fromisoformat(now_iso), limit)
            out.put((owner, [r.id for r in got]))
        finally:
            store.close()
    except BaseException as exc:
        out.put((owner, f"error: {exc!r}"))


def _run_procs(target: Callable[..., None], args_for: Callable[[int, Any, Any], tuple[Any, ...]],
               n: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=args_for(i, barrier, out)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=JOIN_TIMEOUT) for _ in range(n))
    finally:
        for p in procs:
            p.join(timeout=JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results


@pytest.fixture()
def sqlite_store(tmp_path: Path, clock: FakeClock) -> Any:
    store = open_store(sqlite_url(tmp_path), clock)
    yield store
    store.close()


def test_processes_racing_to_claim_on_sqlite_one_winner(sqlite_store: SqlStore, clock: FakeClock) -> None:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    recs = [sqlite_store.insert_instance(new_instance(clock)) for _ in range(12)]
    ids = [r.id for r in recs]
    now_iso = clock.now().isoformat()
    results = _run_procs(_proc_claim, lambda i, b, q: (url, ids, f"proc-{i}", now_iso, b, q), 3)
    for value in results.values():
        assert isinstance(value, list), results
    wins = Counter(iid for won in results.values() for iid in won)
    assert all(wins[iid] == 1 for iid in ids), f"instances claimed by several processes: {wins}"
    for owner, won in results.items():
        for iid in won:
            row = sqlite_store.get_instance(iid)
            assert row is not None and row.lease_owner == owner and row.version == 1


def test_processes_claim_due_on_sqlite_disjoint(sqlite_store: SqlStore, clock: FakeClock) -> None:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    now = clock.now()
    due = {sqlite_store.insert_instance(new_instance(clock, alarm_at=now - timedelta(seconds=i))).id
           for i in range(30)}
    now_iso = now.isoformat()
    results = _run_procs(_proc_claim_due, lambda i, b, q: (url, f"proc-{i}", now_iso, 12, b, q), 3)
    for value in results.values():
        assert isinstance(value, list), results
    claimed = [iid for ids in results.values() for iid in ids]
    assert len(claimed) == len(set(claimed)), "an instance was handed to two processes"
    assert set(claimed) == due
    for owner, ids in results.items():
        for iid in ids:
            row = sqlite_store.get_instance(iid)
            assert row is not None and row.lease_owner == owner


def test_threads_racing_to_create_within_a_quota_never_exceed_it(store: SqlStore, clock: FakeClock) -> None:
    """insert_instance(max_for_user=n): the count and the insert cannot interleave across connections
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock per user), so 8 racers leave exactly n rows."""
    from sandkeep.store.base import QuotaReached
    from sandkeep.store.records import Status

    store.insert_instance(new_instance(clock, user_id="quota-u", status=Status.DESTROYED))  # does not count

    def create(i: int) -> str:
        try:
            store.insert_instance(new_instance(clock, user_id="quota-u"), max_for_user=3)
        except QuotaReached as exc:
            assert exc.count == 3
            return "refused"
        return "created"

    results = _race(8, create)
    assert Counter(results) == {"created": 3, "refused": 5}
    assert len(store.list_instances(user_id="quota-u").items) == 3
    store.insert_instance(new_instance(clock, user_id="quota-v"), max_for_user=3)  # other users are not affected
