"""``sandkeep serve --role``: the option and setting are validated before anything starts."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from sandkeep.cli.serve_cmd import serve
from sandkeep.config import Settings, load_settings
from sandkeep.runtime import StartupError, open_runtime
from tests.support.procs import HostHandle


def test_role_option_is_validated() -> None:
    result = CliRunner().invoke(serve, ["--role", "workers"])
    assert result.exit_code == 2
    assert "--role" in result.output and "'all', 'api', 'engine'" in result.output


def test_role_comes_from_option_or_environment() -> None:
    assert load_settings({}).role == "all"
    assert load_settings({"SANDKEEP_ROLE": "engine"}).role == "engine"
    assert load_settings({"SANDKEEP_ROLE": "engine"}, role="api").role == "api"


async def test_unknown_role_from_environment_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="unknown role 'workers'"):
        async with open_runtime(Settings(home=tmp_path / "home", role="workers")):
            pass  # pragma: no cover - never reached


@pytest.mark.parametrize("days", [0, 61])
async def test_snapshot_retention_outside_flys_range_refuses_to_start(tmp_path: Path, days: int) -> None:
    assert load_settings({"SANDKEEP_SNAPSHOT_RETENTION": "12"}).snapshot_retention == 12
    with pytest.raises(StartupError, match="SANDKEEP_SNAPSHOT_RETENTION must be 1-60 days"):
        async with open_runtime(Settings(home=tmp_path / "home", snapshot_retention=days)):
            pass  # pragma: no cover - never reached


async def test_serve_creates_volumes_with_the_configured_snapshot_retention(tmp_path: Path,
                                                                            host_session: HostHandle) -> None:
    """The runtime's provider sends SANDKEEP_SNAPSHOT_RETENTION with every volume create; the host keeps it."""
    settings = Settings(home=tmp_path / "home", host_url=host_session.url, host_token=host_session.token,
                        host_proxy_url=host_session.proxy_url, regions=",".join(host_session.regions),
                        snapshot_retention=12)
    async with open_runtime(settings, start_engine=False) as rt:
        assert rt.provider is not None
        app = f"sk-ret-{uuid.uuid4().hex[:8]}"
        await rt.provider.ensure_app(app, "personal")
        made = await rt.provider.create_volume(app, name="data", region=host_session.regions[0], size_gb=1)
        async with httpx.AsyncClient(headers=host_session.headers()) as http:
            got = (await http.get(f"{host_session.url}/v1/apps/{app}/volumes/{made.id}")).json()
        assert got["snapshot_retention"] == 12
