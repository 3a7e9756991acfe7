"""Migrations: the migrated schema equals the table metadata, on both backends."""

from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from sandkeep.clock import FakeClock
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord
from sandkeep.store.sql import SqlStore, head_revision, open_store
from sandkeep.store.tables import audit, events, instances, metadata


def _index_names(store: SqlStore, table: str) -> dict[str, tuple[list[str], bool]]:
    insp = inspect(store.engine)
    return {ix["name"]: ([str(c) for c in ix["column_names"]], bool(ix["unique"])) for ix in insp.get_indexes(table)
            if ix["name"]}


def test_fresh_database_has_no_revision_until_upgraded(url: str, clock: FakeClock) -> None:
    store = SqlStore(url, clock=clock)
    try:
        assert store.current_revision() is None
        assert not inspect(store.engine).has_table("instances")
        assert store.upgrade() == head_revision()
        assert store.current_revision() == head_revision()
        # a second upgrade is a no-op and keeps data
        assert store.upgrade() == head_revision()
    finally:
        store.close()


def _diff(store: SqlStore) -> list[object]:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_migrated_schema_matches_metadata(store: SqlStore) -> None:
    assert _diff(store) == []
    names = set(inspect(store.engine).get_table_names())
    assert {"instances", "events", "audit", "alembic_version"} <= names


def test_migrated_columns_cover_every_record_field(store: SqlStore) -> None:
    insp = inspect(store.engine)
    for table, record in ((instances, InstanceRecord), (events, EventRecord), (audit, AuditRecord)):
        db_columns = {c["name"] for c in insp.get_columns(table.name)}
        field_names = {f.name for f in fields(record)}
        assert field_names - db_columns == set(), f"{table.name} lacks columns"
        assert field_names == set(table.c.keys())


def test_indexes(store: SqlStore) -> None:
    ix = _index_names(store, "instances")
    assert ix["ix_instances_sandbox_id"] == (["sandbox_id"], True)
    assert ix["ix_instances_alarm_at"] == (["alarm_at"], False)
    assert ix["ix_instances_user_id"] == (["user_id"], False)
    assert ix["ix_instances_status"] == (["status"], False)
    assert ix["ix_instances_created_at_id"] == (["created_at", "id"], False)
    pk = inspect(store.engine).get_pk_constraint("instances")
    assert pk["constrained_columns"] == ["id"]
    ev = _index_names(store, "events")
    assert ev["ix_events_instance_id_id"] == (["instance_id", "id"], False)
    assert ev["ix_events_event_id"] == (["event", "id"], False)


def test_downgrade_to_base_and_back(store: SqlStore) -> None:
    assert store.downgrade("base") is None
    assert not inspect(store.engine).has_table("instances")
    # the drift check sees a missing schema (so an empty diff above means something)
    assert len(_diff(store)) >= 3
    assert store.upgrade() == head_revision()
    assert inspect(store.engine).has_table("instances")


def test_concurrent_start_ups_migrate_once(url: str, clock: FakeClock) -> None:
    """Several processes/threads starting at once on an empty database must all come up."""
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []
    revisions: list[str | None] = []

    def start() -> None:
        store = SqlStore(url, clock=clock)
        try:
            barrier.wait(timeout=30)
            revisions.append(store.upgrade())
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert revisions == [head_revision()] * 3


def test_open_store_rejects_unknown_database_scheme(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        open_store("mysql://root@localhost/x", clock)


def test_plain_postgresql_scheme_uses_psycopg(clock: FakeClock) -> None:
    store = SqlStore("postgresql://postgres@127.0.0.1:5432/test", clock=clock)
    try:
        assert store.engine.url.drivername == "postgresql+psycopg"
        assert store.dialect == "postgresql"
    finally:
        store.close()


def test_sqlite_file_parent_directory_is_created(tmp_path: Path, clock: FakeClock) -> None:
    target = tmp_path / "deep" / "er" / "sandkeep.db"
    store = open_store(f"sqlite:///{target}", clock)
    try:
        assert target.exists()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


def test_in_memory_sqlite_is_shared_by_threads(clock: FakeClock) -> None:
    from tests.store.conftest import new_instance

    store = open_store("sqlite://", clock)
    try:
        rec = store.insert_instance(new_instance(clock))
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(store.get_instance(rec.id) == rec))
        t.start()
        t.join(timeout=30)
        assert seen == [True]
        assert store.claim(rec.id, "w", 30, clock.now()) is not None
        assert store.claim(rec.id, "x", 30, clock.now()) is None
    finally:
        store.close()
