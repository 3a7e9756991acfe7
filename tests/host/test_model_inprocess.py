"""The host's model driven in process: simulated machines on a FakeClock, no HTTP and no OS process.

This is how the deterministic simulation (issue 10) uses the model: every delay on the injected clock, every
random choice from the injected seed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from sandkeep.clock import FakeClock
from sandkeep.gateway import TOKEN_ENV, TOKEN_HEADER
from sandkeep.host.core import Host, HostError, HostOptions
from sandkeep.host.sim import SimGateway

TOKEN = {TOKEN_HEADER: "tok"}


async def _settle(host: Host, mid: str, state: str) -> dict[str, Any]:
    """Let the model's tasks run (no real time passes) until machine ``mid`` is in ``state``."""
    for _ in range(1000):
        m = host.machines[mid]
        if m["state"] == state:
            return m
        await asyncio.sleep(0)
    raise AssertionError(f"machine {mid} never reached {state}: {host.machines[mid]['state']}")


def _children() -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()}
    except OSError:
        return set()


async def _world(tmp_path: Path, seed: int, **opts: Any) -> tuple[Host, dict[str, Any], dict[str, Any]]:
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1", "r2"], machines="sim", seed=seed,
                            delays={"machine.create": 0.5, "machine.boot.first": 1.5, "volume.create": 1.0},
                            **opts), FakeClock())
    host.load()
    host.create_app({"app_name": "sim"})
    vol = await host.create_volume("sim", {"name": "data", "region": "r1", "size_gb": 1})
    m, _ = await host.create_machine("sim", {"config": {"image": "sandkeep/gateway", "env": {TOKEN_ENV: "tok"},
                                                         "mounts": [{"volume": vol["id"], "path": "/data"}]}})
    return host, vol, m


async def test_simulated_machines_run_in_process_on_the_fake_clock(tmp_path: Path) -> None:
    before = _children()
    host, vol, m = await _world(tmp_path / "a", seed=7, bytes_per_gb=64)
    clock = host.clock
    assert isinstance(clock, FakeClock)
    try:
        start = clock.monotonic()
        await _settle(host, m["id"], "started")
        assert clock.monotonic() - start >= 1.5, "the boot delay passed on the fake clock"
        assert m["host"] == vol["host"] and vol["host"].startswith("r1-z")
        _, gw = host.proxy_target(m["id"])
        assert isinstance(gw, SimGateway)
        assert (await gw.handle("PUT", "/data/k", TOKEN, b"hello"))[0] == 201
        assert (await gw.handle("GET", "/data/k", TOKEN, b""))[2] == b"hello"
        assert (await gw.handle("GET", "/data/k", {}, b""))[0] == 401, "the gateway token is required"
        status, _, _ = await gw.handle("PUT", "/data/big", TOKEN, b"x" * 100)
        assert status == 507, "the volume's size limit (1 GB of 64 bytes here) holds"
        assert (host.volume_dir(vol) / "data" / "k").read_bytes() == b"hello", "kept in the volume"
        assert _children() == before, "no OS process was started"

        host.kill_host(vol["host"])
        assert host.machine_json(m)["host_status"] == "unreachable" and m["state"] == "started"
        with pytest.raises(HostError) as exc:
            await host.stop_machine("sim", m["id"])
        assert exc.value.status == 412
        assert host.proxy_target(m["id"])[1] is None
        host.revive_host(vol["host"])
        assert host.proxy_target(m["id"])[1] is gw, "the same machine resumed"

        await host.crash_machine("sim", m["id"])
        await _settle(host, m["id"], "stopped")
        assert m["events"][0]["request"]["exit_code"] == 137
        await host.start_machine("sim", m["id"])
        await _settle(host, m["id"], "started")
        _, gw2 = host.proxy_target(m["id"])
        assert gw2 is not None and gw2 is not gw
        assert (await gw2.handle("GET", "/data/k", TOKEN, b""))[2] == b"hello", "the data survived the crash"
        await host.stop_machine("sim", m["id"], sig=signal.SIGTERM)
        await _settle(host, m["id"], "stopped")
        assert m["events"][0]["request"]["requested_stop"] is True
    finally:
        await host.shutdown()


async def test_the_same_seed_gives_the_same_world(tmp_path: Path) -> None:
    worlds = [await _world(tmp_path / str(i), seed=seed) for i, seed in enumerate((11, 11, 12))]
    try:
        (h1, v1, m1), (h2, v2, m2), (_, v3, m3) = worlds
        assert (v1["id"], v1["host"], m1["id"], m1["name"]) == (v2["id"], v2["host"], m2["id"], m2["name"])
        assert (v1["id"], m1["id"]) != (v3["id"], m3["id"])
        assert h1.clock.now() == h2.clock.now()
    finally:
        for host, _, _ in worlds:
            await host.shutdown()


async def test_simulated_images_behave_like_their_processes(tmp_path: Path) -> None:
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1"], machines="sim", stop_timeout=5.0), FakeClock())
    host.load()
    host.create_app({"app_name": "img"})
    try:
        crashy, _ = await host.create_machine("img", {"config": {"image": "sandkeep/crashy"}})
        await _settle(host, crashy["id"], "failed")
        oneshot, _ = await host.create_machine("img", {"config": {"image": "sandkeep/oneshot",
                                                                  "env": {"EXIT_CODE": "7"}}})
        await _settle(host, oneshot["id"], "stopped")
        assert oneshot["events"][0]["request"]["exit_code"] == 7
        stubborn, _ = await host.create_machine("img", {"config": {"image": "sandkeep/stubborn"}})
        await _settle(host, stubborn["id"], "started")
        start = host.clock.monotonic()
        await host.stop_machine("img", stubborn["id"])
        await _settle(host, stubborn["id"], "stopped")
        assert host.clock.monotonic() - start >= 5.0, "SIGTERM ignored: killed after the grace period"
        assert stubborn["events"][0]["request"]["exit_code"] == 137
    finally:
        await host.shutdown()


async def test_the_real_client_drives_the_model_in_process(tmp_path: Path) -> None:
    """The provider adapter: sandkeep's MachinesClient (retries, classification) against the model, no socket."""
    import httpx

    from sandkeep.host.faults import Faults
    from sandkeep.host.inprocess import PROXY_URL, in_process_api, in_process_client, proxy_transport
    from sandkeep.provider.errors import HostUnavailableError
    from sandkeep.provider.models import MachineConfig, Mount

    host = Host(HostOptions(data_dir=tmp_path, regions=["r1", "r2"], machines="sim", seed=3), FakeClock())
    host.load()
    faults = Faults(seed=1)
    faults.configure({"operation": "volume.create", "status": 503, "count": 1})
    client = in_process_client(host, api=in_process_api(host, faults=faults), backoff_base=0.0)
    gateway = httpx.AsyncClient(base_url=PROXY_URL, transport=proxy_transport(host))
    before = _children()
    try:
        await client.ensure_app("inproc", "personal")
        vol = await client.create_volume("inproc", name="data", region="r1", size_gb=1)  # a 503, retried
        assert faults.rules[0].injected == 1 and vol.zone and vol.host_status == "ok"
        m = await client.create_machine("inproc", config=MachineConfig(
            image="sandkeep/gateway", env={TOKEN_ENV: "tok"}, mounts=[Mount(volume=vol.id)]), region="r1")
        await _settle(host, m.id, "started")
        assert (await client.get_machine("inproc", m.id)).state == "started"
        headers = {"fly-force-instance-id": m.id, **TOKEN}
        assert (await gateway.put("/data/k", content=b"v", headers=headers)).status_code == 201
        assert (await gateway.get("/data/k", headers=headers)).content == b"v"
        host.kill_host(vol.zone or "")
        with pytest.raises(HostUnavailableError):
            await client.create_volume("inproc", name="data", region="r2", source_volume_id=vol.id)
        assert (await client.get_machine("inproc", m.id)).host_status == "unreachable"
        assert _children() == before, "no OS process was started"
    finally:
        await gateway.aclose()
        await client.aclose()
        await host.shutdown()
