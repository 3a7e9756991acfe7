"""Database URLs for tests: SQLite files and fresh PostgreSQL databases (reuse these in any test folder).

PostgreSQL is expected at 127.0.0.1:5432, user ``postgres``, trust auth, with an admin database ``test``
(see DEVELOPERS.md). When it is unreachable, tests that need it are skipped with the reason shown, unless
``SANDKEEP_REQUIRE_POSTGRES=1`` (CI), which turns the skip into a failure.

Typical use::

    from tests.dbsupport import BACKENDS, database_url

    @pytest.fixture(params=BACKENDS)
    def db_url(request, tmp_path):
        with database_url(request.param, tmp_path) as url:
            yield url

or import the ready-made ``db_url`` (both backends) / ``pg_url`` (PostgreSQL only) fixtures into a
conftest.py (``from tests.dbsupport import db_url  # noqa: F401``). URLs are of empty databases: open them
with ``sandkeep.store.sql.open_store(url, clock)``, which migrates.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "test"
PG_CONNECT_TIMEOUT = 3
REQUIRE_ENV = "SANDKEEP_REQUIRE_POSTGRES"
DB_PREFIX = "sk_test_"

#: pytest params for backend-parametrized fixtures (ids ``sqlite`` / ``postgres``).
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def sqlite_url(tmp_path: Path, name: str = "sandkeep.db") -> str:
    """A SQLite URL for a (not yet existing) database file under ``tmp_path``."""
    return f"sqlite:///{(tmp_path / name).resolve()}"


def postgres_url(database: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _admin_connect() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB,
                           connect_timeout=PG_CONNECT_TIMEOUT, autocommit=True)


@functools.cache
def postgres_available() -> tuple[bool, str]:
    """(True, "") when the test PostgreSQL answers, else (False, why). Checked once per process."""
    try:
        with _admin_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return False, f"PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}, db {PG_ADMIN_DB}) unreachable: {exc}"
    return True, ""


def postgres_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def require_postgres() -> None:
    """Skip the calling test (visible reason) when PostgreSQL is absent; fail instead when required."""
    ok, reason = postgres_available()
    if ok:
        return
    if postgres_required():
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    pytest.skip(reason)


def create_postgres_database(prefix: str = DB_PREFIX) -> tuple[str, Callable[[], None]]:
    """Create a fresh, uniquely named database; returns (SQLAlchemy URL, cleanup that drops it).

    Does not skip: call :func:`require_postgres` first (the fixtures and :func:`fresh_postgres_url` do).
    The cleanup is idempotent and disconnects any session still using the database.
    """
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    with _admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def cleanup() -> None:
        with _admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    return postgres_url(name), cleanup


@contextmanager
def fresh_postgres_url(prefix: str = DB_PREFIX) -> Iterator[str]:
    """A fresh PostgreSQL database for the block (skips/fails like :func:`require_postgres`)."""
    require_postgres()
    url, cleanup = create_postgres_database(prefix)
    try:
        yield url
    finally:
        cleanup()


@contextmanager
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend`` (``"sqlite"`` or ``"postgres"``) for the block."""
    if backend == "sqlite":
        yield sqlite_url(tmp_path)
    elif backend in ("postgres", "postgresql"):
        with fresh_postgres_url() as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL, once per backend (ids sqlite / postgres). Not migrated."""
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database URL (skipped with a reason when PostgreSQL is absent)."""
    with fresh_postgres_url() as url:
        yield url
