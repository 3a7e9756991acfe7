"""tests/dbsupport.py itself: skip/fail behaviour and fresh PostgreSQL databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests import dbsupport
from tests.support.procs import free_port


@pytest.fixture()
def unreachable_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dbsupport, "PG_PORT", free_port())
    dbsupport.postgres_available.cache_clear()
    yield
    dbsupport.postgres_available.cache_clear()


def test_absent_postgres_skips_with_reason(unreachable_postgres: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dbsupport.REQUIRE_ENV, raising=False)
    ok, reason = dbsupport.postgres_available()
    assert not ok and "unreachable" in reason
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        dbsupport.require_postgres()


def test_absent_postgres_fails_when_required(unreachable_postgres: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbsupport.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SANDKEEP_REQUIRE_POSTGRES=1"):
        dbsupport.require_postgres()


@pytest.mark.postgres
def test_fresh_database_is_created_and_dropped() -> None:
    dbsupport.require_postgres()
    url, cleanup = dbsupport.create_postgres_database()
    name = url.rsplit("/", 1)[1]
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    def exists() -> bool:
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test") as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    assert exists()
    # a session left open does not block the drop
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name):
        pass
    holder = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name)
    try:
        cleanup()
    finally:
        holder.close()
    assert not exists()
    cleanup()  # idempotent


def test_sqlite_url(tmp_path: Path) -> None:
    assert dbsupport.sqlite_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'sandkeep.db'}"
