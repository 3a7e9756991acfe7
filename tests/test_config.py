from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from tools import settings_table

from sandkeep.config import SETTINGS, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_has_a_field_with_the_same_default() -> None:
    by_name = {f.name: f for f in fields(Settings)}
    assert {s.name for s in SETTINGS} == set(by_name)
    defaults = Settings()
    for s in SETTINGS:
        if s.name == "home":
            continue
        assert getattr(defaults, s.name) == s.default, s.name


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in readme]
    assert not missing, f"README does not document: {missing}"
    assert settings_table.embedded(readme) == settings_table.render(), (
        "README's settings table is stale: run `python tools/settings_table.py --write`")


def test_environment_values_are_parsed_by_type() -> None:
    s = load_settings({"SANDKEEP_RECOVERY_TIMEOUT": "12.5", "SANDKEEP_DESTROY_VOLUME_ATTEMPTS": "3",
                       "SANDKEEP_RELOCATE_FAILED": "yes", "SANDKEEP_HOME": "/tmp/x"})
    assert s.recovery_timeout == 12.5
    assert s.destroy_volume_attempts == 3
    assert s.relocate_failed is True
    assert s.home == Path("/tmp/x")


@pytest.mark.parametrize(("env", "value"), [
    ("SANDKEEP_RECOVERY_TIMEOUT", "soon"),
    ("SANDKEEP_RECOVERY_TIMEOUT", "-1"),
    ("SANDKEEP_DESTROY_VOLUME_ATTEMPTS", "many"),
    ("SANDKEEP_RELOCATE_FAILED", "perhaps"),
])
def test_bad_values_name_the_variable(env: str, value: str) -> None:
    with pytest.raises(SettingsError, match=env):
        load_settings({env: value})


def test_overrides_win_and_none_keeps() -> None:
    s = load_settings({"SANDKEEP_PROVIDER": "fly"}, provider=None, regions="x,y")
    assert s.provider == "fly"
    assert s.region_list == ["iad", "ord", "dfw"]
    assert load_settings({}, regions="x, y").region_list == ["x", "y"]


def test_default_database_is_sqlite_in_home(tmp_path: Path) -> None:
    s = load_settings({"SANDKEEP_HOME": str(tmp_path)})
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'sandkeep.db'}"
