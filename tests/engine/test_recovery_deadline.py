"""SPEC §12.5 under a slow provider: every provider call a recovery makes is bounded by what is left of its
timeout (issue 10, "recovery timeout overrun").

The world is the host's own Fly model in process (simulated machines, the real Machines client, the host's
fault rules) on a :class:`~tests.support.vclock.VirtualClock`, so a 12 s machine create and a 6 s recovery
timeout race in virtual time: no wall time passes and nothing depends on scheduling luck.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandkeep.config import Settings
from sandkeep.engine.runtime import Engine
from sandkeep.host.core import Host, HostOptions
from sandkeep.host.faults import Faults
from sandkeep.host.inprocess import in_process_api, in_process_client
from sandkeep.provider.client import MachinesClient
from sandkeep.secrets import SecretBox
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import sqlite_url
from tests.engine.conftest import USER
from tests.support.vclock import VirtualClock

REGIONS = ["r1", "r2", "r3"]


class Healthy:
    async def probe(self, app_name: str, machine_id: str, gateway_token: str | None = None) -> bool:
        return True

    async def aclose(self) -> None:
        return None


@dataclass
class World:
    clock: VirtualClock
    host: Host
    faults: Faults
    client: MachinesClient
    store: SqlStore
    engine: Engine

    def get(self, instance_id: str) -> InstanceRecord:
        record = self.store.get_instance(instance_id)
        assert record is not None
        return record

    async def drive(self, instance_id: str, until: Callable[[InstanceRecord], bool], *,
                    passes: int = 60) -> InstanceRecord:
        """Reconcile at each alarm (virtual time jumps to it) until ``until`` holds."""
        for _ in range(passes):
            record = self.get(instance_id)
            if until(record):
                return record
            if record.alarm_at is not None and record.alarm_at > self.clock.now():
                self.clock.advance((record.alarm_at - self.clock.now()).total_seconds())
            await self.engine.reconcile_now(instance_id)
        raise AssertionError(f"not reached after {passes} passes: {self.get(instance_id)}")

    async def settle(self, machine_id: str, state: str) -> None:
        for _ in range(600):  # up to a virtual minute
            if self.host.machines[machine_id]["state"] == state:
                return
            await self.clock.sleep(0.1)
        raise AssertionError(f"machine {machine_id} never reached {state}")


@asynccontextmanager
async def world(tmp_path: Path, *, delays: dict[str, float] | None = None, **settings: Any) -> AsyncIterator[World]:
    clock = VirtualClock()
    host = Host(HostOptions(data_dir=tmp_path / "host", regions=REGIONS, machines="sim", seed=10,
                            destroyed_retention=0.0, delays=delays or {}), clock)
    host.load()
    faults = Faults(seed=10)
    client = in_process_client(host, api=in_process_api(host, faults=faults))
    store = open_store(sqlite_url(tmp_path), clock)
    values: dict[str, Any] = {"home": tmp_path / "home", "secrets_key": SecretBox.generate_key(),
                              "regions": ",".join(REGIONS), "jitter_fraction": 0.0, "interval_busy": 1.0,
                              "lease_ttl": 30.0, "claim_wait": 1.0, "health_probe_timeout": 2.0,
                              "health_probe_interval": 0.5, "detect_poll_interval": 0.0, **settings}
    engine = Engine(Settings(**values), store, client, clock, worker_id="w1", prober=Healthy())
    engine.service.wake = lambda instance_id: None
    try:
        yield World(clock, host, faults, client, store, engine)
    finally:
        await engine.stop()
        await client.aclose()
        await host.shutdown()
        store.close()


SLOW_CREATES = {
    "latency": {"operation": "machine.create", "latency": 12.0},  # one call that takes 12 s
    "retry_after": {"operation": "machine.create", "status": 429, "retry_after": 20.0},  # retried after 20 s
    "slow_5xx": {"operation": "machine.create", "status": 503, "latency": 2.5},  # 5 attempts x 2.5 s + backoff
}


@pytest.mark.parametrize("fault", list(SLOW_CREATES))
async def test_a_slow_machine_create_cannot_carry_a_recovery_past_its_timeout(tmp_path: Path, fault: str) -> None:
    async with world(tmp_path, recovery_timeout=6.0) as w:
        created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
        rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
        assert rec.machine_id and rec.volume_id
        w.faults.configure(SLOW_CREATES[fault])
        await w.host.crash_machine(rec.app_name, rec.machine_id)
        await w.settle(rec.machine_id, "stopped")

        final = await w.drive(rec.id, lambda r: r.status == Status.STOPPED)

        # it ends at its limit (within one reconcile interval), not when the slow create would have answered
        assert final.last_recovery_error == "recovery timed out after 6 s (limit 6 s)", final.last_recovery_error
        failed = w.store.list_events(instance_id=rec.id, name="instance.unexpected_stop_recovery_failed").items
        assert [e.label for e in failed] == ["alarm_timeout"]
        assert failed[0].duration_ms is not None
        assert failed[0].duration_ms <= (6.0 + w.engine.settings.interval_busy) * 1000
        # the failure cleaned up after itself: the original volume stays, nothing else does (§12.7)
        machines = [m for m in w.host.machines.values() if m["app"] == rec.app_name
                    and m["state"] not in ("destroyed", "destroying")]
        assert [m["id"] for m in machines] == [], machines
        volumes = [v["id"] for v in w.host.volumes.values() if v.get("app") == rec.app_name
                   and v.get("state") not in ("destroyed", "pending_destroy")]
        assert volumes == [rec.volume_id]


def test_a_recovery_whose_cutover_deleted_the_old_volume_completes_even_past_its_timeout() -> None:
    """Once the old volume is gone (the cutover deleted it, maybe just before a crash), the recovery volume is
    the only copy of the data: timing out now would delete it with the failed recovery (SPEC §12.7)."""
    from sandkeep.engine import recovery
    from sandkeep.engine.actions import DeleteVolumeSafely, Outcome, Persist, ProbeHealth
    from sandkeep.engine.reconcile import decide
    from tests.engine.test_decisions_table import NOW, SETTINGS, make_record, observe

    rec = make_record(Status.RECOVERING, "overdue")
    assert rec.recovery_step == recovery.STEP_WAIT
    gone = observe(rec, "started")
    gone.volume, gone.volume_missing = None, True  # after a crash: the old volume is gone
    actions = decide(rec, gone, SETTINGS, NOW)
    assert isinstance(actions[0], ProbeHealth), actions  # the cutover goes on
    deleted = observe(rec, "started")
    deleted.outcomes = {DeleteVolumeSafely("v1"): Outcome(True), ProbeHealth("m1"): Outcome(True, value=True)}
    actions = decide(rec, deleted, SETTINGS, NOW)  # in this pass
    assert any(isinstance(a, Persist) and a.changes.get("status") == Status.RUNNING for a in actions), actions
    # with the old volume still there, an overdue recovery fails as before (and keeps the old volume)
    kept = decide(rec, observe(rec, "started"), SETTINGS, NOW)
    assert any(isinstance(a, Persist) and a.changes.get("recovery_step") == "failing_replacement:alarm_timeout"
               for a in kept), kept
