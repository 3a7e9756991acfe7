"""Start, stop, restart with a changed configuration, and destroy against a real local host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandkeep.engine.service import Actor
from sandkeep.store.records import InstanceRecord, Status
from tests.engine.conftest import new_user
from tests.engine.hostsupport import rig
from tests.support.procs import HostHandle
from tests.support.wait import async_wait_until


async def test_stop_start_restart_destroy(tmp_path: Path, host_session: HostHandle) -> None:
    async with rig(tmp_path, host_session) as r:
        user = new_user()
        owner = Actor(user_id=user, role="user")
        created = await r.service.create_instance(owner, user_id=user, env={"COLOR": "red"},
                                                  secrets={"TOKEN": "abc"})
        rec = await r.wait_status(created.id, "running")
        assert (await r.gateway(rec, "PUT", "/data/x", b"1")).status_code == 201

        await r.service.stop(owner, rec.id)
        stopped = await r.wait_status(rec.id, "stopped")
        machines = {m["id"]: m for m in await r.machines(rec.app_name)}
        assert machines[rec.machine_id]["state"] == "stopped"
        assert "instance.unexpected_stop_recovery_started" not in r.events(rec.id)
        assert stopped.last_stopped_at is not None

        await r.service.update_config(owner, rec.id, env={"COLOR": "blue"}, secrets={"TOKEN": "xyz"})
        await r.service.start(owner, rec.id)
        started = await r.wait_status(rec.id, "running")
        assert started.machine_id == rec.machine_id
        machine = next(m for m in await r.machines(rec.app_name) if m["id"] == rec.machine_id)
        assert machine["config"]["env"]["COLOR"] == "blue" and machine["config"]["env"]["TOKEN"] == "xyz"
        assert (await r.gateway(started, "GET", "/data/x")).content == b"1"

        await r.service.update_config(owner, rec.id, size="shared-cpu-2x")
        await r.service.restart(owner, rec.id)
        restarted = await r.wait_for(rec.id, lambda x: x.status == "running" and x.pending_action is None,
                                     "running after restart")
        machine = next(m for m in await r.machines(rec.app_name) if m["id"] == rec.machine_id)
        assert machine["config"]["guest"]["cpus"] == 2
        assert machine["config"]["metadata"]["config_generation"] == str(restarted.config_generation)
        assert "instance.restarting" in r.events(rec.id)

        # a plain restart (no configuration change) restarts the same machine
        before = restarted.version
        starts = await _start_events(r, rec.app_name, rec.machine_id)
        await r.service.restart(owner, rec.id)
        again = await r.wait_for(rec.id, lambda x: x.status == "running" and x.version > before + 1
                                 and x.pending_action is None, "running after a plain restart")
        assert again.machine_id == rec.machine_id
        assert await _start_events(r, rec.app_name, rec.machine_id) > starts
        assert (await r.gateway(again, "GET", "/data/x")).content == b"1"

        await r.service.destroy(owner, rec.id)
        await r.wait_status(rec.id, "destroyed")
        assert await r.volumes(rec.app_name) == []
        assert [m for m in await r.machines(rec.app_name) if m["state"] != "destroyed"] == []
        assert r.get(rec.id).status == Status.DESTROYED


async def _start_events(r: Any, app: str, machine_id: str | None) -> int:
    resp = await r.local("GET", f"/v1/apps/{app}/machines/{machine_id}/events")
    return sum(1 for e in resp.json() if e.get("type") == "start")


async def test_an_instance_from_before_gateway_tokens_gets_one_at_its_next_start(tmp_path: Path,
                                                                                 host_session: HostHandle) -> None:
    """Migration v0002 leaves existing instances without a token, and their machines without one in their env:
    the next start gives the instance a token and updates the machine with it before it starts."""
    async with rig(tmp_path, host_session) as r:
        user = new_user()
        owner = Actor(user_id=user, role="user")
        created = await r.service.create_instance(owner, user_id=user)
        rec = await r.wait_status(created.id, "running")
        assert rec.gateway_token_encrypted and (await r.gateway(rec, "PUT", "/data/x", b"1")).status_code == 201
        await r.service.stop(owner, rec.id)
        stopped = await r.wait_status(rec.id, "stopped")
        # what an upgraded database holds: no token on the record, none in the machine's env
        async def claim() -> InstanceRecord | None:  # the worker may still hold the lease of the stop
            return r.store.claim(rec.id, "test", 30.0, r.clock.now())

        claimed = await async_wait_until(claim, timeout=30, message="the instance's lease")
        r.store.release(r.store.update(claimed, "test", {"gateway_token_encrypted": None}), "test")
        app, mid = stopped.app_name, stopped.machine_id
        machine = next(m for m in await r.machines(app) if m["id"] == mid)
        legacy = {**machine["config"], "env": {k: v for k, v in machine["config"]["env"].items()
                                               if k != "SANDKEEP_GATEWAY_TOKEN"}}
        await r.local("POST", f"/v1/apps/{app}/machines/{mid}", json={"config": legacy, "skip_launch": True})

        await r.service.start(owner, rec.id)
        started = await r.wait_status(rec.id, "running")
        assert started.machine_id == mid and started.gateway_token_encrypted
        assert started.gateway_token_encrypted != rec.gateway_token_encrypted
        assert "instance.gateway_token_rotated" in r.events(rec.id)
        machine = next(m for m in await r.machines(app) if m["id"] == mid)
        assert machine["config"]["env"]["SANDKEEP_GATEWAY_TOKEN"] == r.engine.ctx.gateway_token(started)
        assert (await r.gateway(started, "GET", "/data/x")).content == b"1"
