"""Secrets generated once into the data dir: one value for every process, mode 0600."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

from sandkeep.host.server import load_or_create_token
from sandkeep.runtime import load_or_create_secret
from sandkeep.secrets import read_or_create_private


def test_created_once_private_and_then_read(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "jwt-secret"
    value, created = read_or_create_private(path, lambda: "first")
    assert (value, created) == ("first", True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_private(path, lambda: "second") == ("first", False)


def test_an_empty_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    assert read_or_create_private(path, lambda: "fresh") == ("fresh", True)


def test_concurrent_creators_all_get_the_first_value(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    n = count()
    with ThreadPoolExecutor(8) as pool:
        values = list(pool.map(lambda _: read_or_create_private(path, lambda: f"v{next(n)}")[0], range(32)))
    assert len(set(values)) == 1
    assert path.read_text().strip() == values[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.key"]  # no temp files left behind


def test_env_value_wins_and_writes_nothing(tmp_path: Path) -> None:
    assert load_or_create_secret(tmp_path / "jwt-secret", "from-env", lambda: "x") == ("from-env", False)
    assert load_or_create_token(tmp_path, "env-token") == ("env-token", None)
    assert not any(tmp_path.iterdir())
    token, path = load_or_create_token(tmp_path, None)
    assert path == tmp_path / "token" and load_or_create_token(tmp_path, None) == (token, path)
