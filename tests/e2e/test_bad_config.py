"""Bad configuration stops `sandkeep serve` with one clear line and exit code 1, never a traceback."""

from __future__ import annotations

from pathlib import Path

from sandkeep.net import free_port
from tests.e2e.serving import serve_fails


def test_an_unreachable_postgresql_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{free_port()}/sandkeep"
    line = serve_fails(tmp_path / "data", env={"SANDKEEP_DATABASE_URL": url})
    assert "cannot open the database postgresql+psycopg://postgres:***@127.0.0.1:" in line
    assert "Connection refused" in line and "hunter2" not in line


def test_a_malformed_database_url_is_one_line_without_echoing_it(tmp_path: Path) -> None:
    line = serve_fails(tmp_path / "data", env={"SANDKEEP_DATABASE_URL": "postgres//user:hunter2@db/x"})
    assert line.startswith("sandkeep serve: SANDKEEP_DATABASE_URL: not a valid database URL")
    assert "hunter2" not in line


def test_an_unsupported_database_is_one_line(tmp_path: Path) -> None:
    line = serve_fails(tmp_path / "data", env={"SANDKEEP_DATABASE_URL": "mysql://u@localhost/x"})
    assert "unsupported database 'mysql'" in line


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = serve_fails(tmp_path / "unused", "--data-dir", str(blocker / "data"))
    assert f"cannot use data directory {blocker / 'data'}" in line and "Not a directory" in line


def test_a_data_dir_on_a_read_only_filesystem_is_one_line(tmp_path: Path) -> None:
    # /proc refuses new entries even to root, the user CI runs as (chmod would not stop root)
    line = serve_fails(tmp_path / "unused", "--data-dir", "/proc/sandkeep-test-data")
    assert "cannot use data directory /proc/sandkeep-test-data" in line
