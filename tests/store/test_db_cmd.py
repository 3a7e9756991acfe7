"""`sandkeep db upgrade|current`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect

from sandkeep.cli.main import cli
from sandkeep.clock import FakeClock
from sandkeep.store.sql import SqlStore, head_revision

CLEAN_ENV = {"SANDKEEP_DATABASE_URL": "", "SANDKEEP_HOME": ""}


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.output


def test_upgrade_creates_the_data_dir_and_default_sqlite_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "home"
    code, out = _run("db", "current", "--data-dir", str(data_dir), "--check")
    assert code == 1, out
    assert "none (empty database)" in out and "needs `sandkeep db upgrade`" in out

    code, out = _run("db", "upgrade", "--data-dir", str(data_dir))
    assert code == 0, out
    assert f"upgraded from empty to {head_revision()}" in out
    db_file = data_dir / "sandkeep.db"
    assert db_file.exists()
    store = SqlStore(f"sqlite:///{db_file}", clock=FakeClock())
    try:
        assert store.current_revision() == head_revision()
        assert inspect(store.engine).has_table("instances")
    finally:
        store.close()

    code, out = _run("db", "upgrade", "--data-dir", str(data_dir))
    assert code == 0 and f"already at revision {head_revision()}" in out
    code, out = _run("db", "current", "--data-dir", str(data_dir), "--check")
    assert code == 0, out
    assert f"current:  {head_revision()}" in out and "up to date" in out


def test_home_from_environment(tmp_path: Path) -> None:
    home = tmp_path / "envhome"
    code, out = _run("db", "upgrade", env={"SANDKEEP_HOME": str(home)})
    assert code == 0, out
    assert (home / "sandkeep.db").exists()


def test_upgrade_with_database_url_on_each_backend(url: str) -> None:
    code, out = _run("db", "upgrade", "--database-url", url)
    assert code == 0, out
    code, out = _run("db", "current", "--check", env={"SANDKEEP_DATABASE_URL": url})
    assert code == 0, out
    assert head_revision() in out
    store = SqlStore(url, clock=FakeClock())
    try:
        assert store.current_revision() == head_revision()
    finally:
        store.close()


@pytest.mark.parametrize("bad", ["mysql://x@localhost/db", "not a url"])
def test_bad_database_url_is_a_clear_error(bad: str, tmp_path: Path) -> None:
    code, out = _run("db", "upgrade", "--database-url", bad, "--data-dir", str(tmp_path / "d"))
    assert code == 1
    assert "Error:" in out and "Traceback" not in out
    assert not (tmp_path / "d").exists()


def test_unreachable_postgres_is_a_clear_error() -> None:
    code, out = _run("db", "current", "--database-url", "postgresql+psycopg://postgres@127.0.0.1:1/nope")
    assert code == 1
    assert "Error: cannot read" in out and "Traceback" not in out
