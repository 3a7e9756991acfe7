"""`sandkeep serve` with a host child of simulated machines (SANDKEEP_HOST_MACHINES=sim) and its options passed on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sandkeep.config import load_settings
from sandkeep.runtime import StartupError, host_child_options
from tests.e2e.serving import Serve, running_serve
from tests.support.wait import wait_until


def test_serve_passes_the_host_options_to_its_child() -> None:
    settings = load_settings({"SANDKEEP_HOST_MACHINES": "sim", "SANDKEEP_HOST_PROFILE": "realistic",
                              "SANDKEEP_HOST_RATE_LIMITS": "true", "SANDKEEP_HOST_HOSTS_PER_REGION": "5"})
    assert host_child_options(settings) == ["--machines", "sim", "--hosts-per-region", "5", "--profile",
                                            "realistic", "--rate-limits"]
    assert "--no-rate-limits" in host_child_options(load_settings({}))
    for bad in ({"SANDKEEP_HOST_MACHINES": "vm"}, {"SANDKEEP_HOST_PROFILE": "slow"},
                {"SANDKEEP_HOST_HOSTS_PER_REGION": "0"}):
        with pytest.raises(StartupError):
            host_child_options(load_settings(bad))


@pytest.fixture(scope="module")
def sim_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(tmp_path_factory.mktemp("sim-serve"),
                       extra_env={"SANDKEEP_HOST_MACHINES": "sim", "SANDKEEP_HOST_RATE_LIMITS": "true"}) as serve:
        yield serve


def test_instances_run_on_simulated_machines_and_recover(sim_serve: Serve) -> None:
    health = sim_serve.host("GET", "/healthz").json()
    assert health["machines"] == "sim"
    with sim_serve.client(f"u-{uuid.uuid4().hex[:8]}") as client:
        created = client.post("/v1/instances", json={})
        assert created.status_code == 201, created.text
        inst = sim_serve.wait_status(client, created.json()["id"], "running")
        base = f"/v1/instances/{inst['id']}/gateway/data"
        assert client.put(f"{base}/keep.txt", content=b"simulated but kept").status_code < 300
        crash = sim_serve.host("POST", f"/_local/apps/{inst['app_name']}/machines/{inst['machine_id']}/crash")
        assert crash.status_code == 200, crash.text

        def recovered() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/instances/{inst['id']}").json()
            return body if body["status"] == "running" and body["machine_id"] != inst["machine_id"] else None

        wait_until(recovered, timeout=90, message="recovery onto a new simulated machine")
        got = client.get(f"{base}/keep.txt")
        assert got.status_code == 200 and got.content == b"simulated but kept"
    # serve passed --rate-limits on: a burst of starts of one machine meets Fly's 1/s (burst 3) limit
    statuses = [sim_serve.host("POST", f"/v1/apps/{inst['app_name']}/machines/{inst['machine_id']}/start")
                .status_code for _ in range(6)]
    assert 429 in statuses, statuses

