"""Engine flows against the one provider model (issue 10): the host model with simulated machines behind the
real MachinesClient over in-process ASGI, the real SqlStore (SQLite), on the simulation's virtual clock.

These are the flows of ``test_flows_fake.py`` without the hand-written fake: the provider's answers, waits,
forks, snapshots and faults are the host's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sandkeep.engine.service import (
    USER_ID_RE,
    Actor,
    InstanceBusy,
    InvalidConfig,
    InvalidTransition,
    RecoveringRefused,
)
from sandkeep.sim.loop import VirtualLoop, run_virtual
from sandkeep.sim.scenario import quiet_logs
from sandkeep.sim.world import Controller, World, deterministic
from sandkeep.store.records import InstanceRecord, Status

USER = Actor(user_id="user-a", role="user")
ADMIN = Actor(user_id="root", role="admin")
REGIONS = ["lcl-a", "lcl-b", "lcl-c"]
SETTINGS: dict[str, Any] = {"interval_running": 30.0, "interval_busy": 5.0, "lease_ttl": 30.0, "claim_wait": 1.0,
                            "health_probe_timeout": 10.0, "machine_wait_timeout": 30.0, "jitter_fraction": 0.0}


class Flow:
    def __init__(self, world: World, c: Controller) -> None:
        self.w, self.c = world, c
        self.service = c.engine.service
        self.woken: list[str] = []
        self.service.wake = self.woken.append  # passes run when the test says so, not in the background
        self.host = world.host

    def get(self, iid: str) -> InstanceRecord:
        rec = self.w.sql.get_instance(iid)
        assert rec is not None
        return rec

    def events(self, iid: str) -> list[str]:
        return [e.event for e in self.w.events_of(iid)]

    async def reconcile(self, iid: str) -> InstanceRecord:
        assert await self.c.engine.reconcile_now(iid) is not None, "could not claim"
        return self.get(iid)

    async def running(self) -> InstanceRecord:
        rec = await self.service.create_instance(USER, user_id=USER.user_id)
        final = await self.reconcile(rec.id)
        assert final.status == Status.RUNNING, self.events(rec.id)
        return final

    async def put(self, iid: str, key: str, value: bytes) -> int:
        target = self.service.gateway_target(USER, iid)
        assert target is not None
        return (await self.w.gateway.put(f"/data/{key}", content=value, headers=target[1])).status_code

    async def read(self, iid: str, key: str) -> bytes | None:
        target = self.service.gateway_target(USER, iid)
        assert target is not None
        resp = await self.w.gateway.get(f"/data/{key}", headers=target[1])
        return resp.content if resp.status_code == 200 else None

    def started(self) -> list[str]:
        return [m["id"] for m in self.host.machines.values() if m["state"] == "started"]

    def live_volumes(self) -> set[str]:
        return {v["id"] for v in self.host.volumes.values() if v.get("state") not in ("destroyed", "pending_destroy")}


def run_flow(body: Callable[[Flow], Awaitable[None]], **changes: Any) -> None:
    async def main(loop: VirtualLoop) -> None:
        world = World(7, loop, {**SETTINGS, **changes}, regions=REGIONS)
        await world.start()
        try:
            await body(Flow(world, await world.boot_controller(start=False)))
        finally:
            await world.close()

    with deterministic(7), quiet_logs(False):
        run_virtual(main)


def test_provision_starts_and_runs_on_the_model() -> None:
    async def body(f: Flow) -> None:
        rec = await f.service.create_instance(USER, user_id=USER.user_id, env={"GREETING": "hi"},
                                              secrets={"API_KEY": "s3cret"})
        assert rec.status == Status.STARTING and USER_ID_RE.match(rec.user_id)
        final = await f.reconcile(rec.id)
        assert final.status == Status.RUNNING and final.region == "lcl-a"
        m = f.host.machines[final.machine_id]
        assert m["state"] == "started"
        assert m["config"]["metadata"]["sandbox_id"] == final.sandbox_id
        assert m["config"]["metadata"]["instance_id"] == final.id
        assert m["config"]["env"]["GREETING"] == "hi" and m["config"]["env"]["API_KEY"] == "s3cret"
        assert f.events(rec.id)[:2] == ["instance.provisioned", "instance.start_requested"]
        assert await f.put(rec.id, "k", b"v") == 201 and await f.read(rec.id, "k") == b"v"

    run_flow(body)


def test_a_stop_is_not_an_unexpected_stop_on_the_model() -> None:
    async def body(f: Flow) -> None:
        rec = await f.running()
        await f.service.stop(USER, rec.id)
        final = await f.reconcile(rec.id)
        assert final.status == Status.STOPPED
        assert f.host.machines[rec.machine_id]["state"] == "stopped"
        assert "instance.unexpected_stop_recovery_started" not in f.events(rec.id)
        with pytest.raises(InvalidTransition):
            await f.service.stop(USER, rec.id)

    run_flow(body)


def test_an_unexpected_stop_recovers_to_another_region_with_the_data() -> None:
    async def body(f: Flow) -> None:
        rec = await f.running()
        assert await f.put(rec.id, "note", b"hello") == 201
        await f.host.crash_machine(rec.app_name, rec.machine_id)
        final = await f.reconcile(rec.id)
        assert final.status == Status.RUNNING, f.events(rec.id)
        assert final.region != "lcl-a" and final.volume_id != rec.volume_id
        assert await f.read(rec.id, "note") == b"hello", "the fork carried the data"
        assert f.live_volumes() == {final.volume_id}, "no snapshots: the old volume is deleted at once"
        assert f.started() == [final.machine_id]
        names = f.events(rec.id)
        assert names.index("instance.unexpected_stop_recovery_started") < names.index(
            "instance.unexpected_stop_recovery_succeeded")

    run_flow(body)


def test_recovery_retains_the_old_volume_with_snapshots_until_retention_passes() -> None:
    async def body(f: Flow) -> None:
        rec = await f.running()
        await f.host.create_snapshot(rec.app_name, rec.volume_id)
        await f.host.crash_machine(rec.app_name, rec.machine_id)
        final = await f.reconcile(rec.id)
        assert final.status == Status.RUNNING and final.retained_volume_id == rec.volume_id
        assert rec.volume_id in f.live_volumes()
        await f.w.clock.sleep(f.w.settings.retained_volume_retention + 1)
        after = await f.reconcile(rec.id)
        assert after.retained_volume_id is None
        assert f.live_volumes() == {after.volume_id}, "SPEC 12.3: nothing leaked"
        assert "instance.retained_volume_deleted" in f.events(rec.id)

    run_flow(body, retained_volume_retention=3600.0)


def test_a_transient_provider_error_backs_off_without_a_status_change() -> None:
    async def body(f: Flow) -> None:
        rec = await f.running()
        f.w.faults.configure({"operation": "machine.get", "status": 503, "count": 20})
        after = await f.reconcile(rec.id)
        assert after.status == Status.RUNNING and after.provider_error_count >= 1
        f.w.faults.clear()
        ok = await f.reconcile(rec.id)
        assert ok.provider_error_count == 0 and ok.status == Status.RUNNING

    run_flow(body)


def test_busy_gating_and_a_forced_destroy_during_recovery() -> None:
    async def body(f: Flow) -> None:
        rec = await f.running()
        f.host.opt.delays["machine.boot.first"] = 600.0  # the replacement boots slowly: the wait hands off (408)
        await f.host.crash_machine(rec.app_name, rec.machine_id)
        mid = await f.reconcile(rec.id)
        assert mid.status == Status.RECOVERING, f.events(rec.id)
        for action in (f.service.start, f.service.stop, f.service.restart):
            with pytest.raises(InstanceBusy):
                await action(USER, rec.id)
        with pytest.raises(RecoveringRefused):
            await f.service.destroy(ADMIN, rec.id)
        await f.service.destroy(ADMIN, rec.id, force=True)
        final = await f.reconcile(rec.id)
        assert final.status == Status.DESTROYED, f.events(rec.id)
        assert not f.live_volumes(), "old and pending volumes: all gone"
        assert not f.started()

    run_flow(body)


def test_an_unknown_size_or_a_reserved_env_name_is_invalid_config() -> None:
    async def body(f: Flow) -> None:
        with pytest.raises(InvalidConfig):
            await f.service.create_instance(USER, user_id=USER.user_id, size="huge-99x")
        with pytest.raises(InvalidConfig):
            await f.service.create_instance(USER, user_id=USER.user_id, env={"FLY_REGION": "x"})
        assert f.w.records() == [] and not f.host.machines

    run_flow(body)
