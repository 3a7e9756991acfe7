"""Several engines and restarts on one database, against a real local host (SPEC §5, §12.6)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from sandkeep.clock import FakeClock
from sandkeep.secrets import SecretBox
from sandkeep.store.records import Status
from tests.dbsupport import sqlite_url
from tests.engine.conftest import PLATFORM, new_user
from tests.engine.hostsupport import rig
from tests.support.procs import HostHandle
from tests.support.wait import async_wait_until


async def test_controller_restart_mid_recovery_converges(tmp_path: Path, quick_host: HostHandle) -> None:
    clock = FakeClock()
    key = SecretBox.generate_key()
    db = sqlite_url(tmp_path)
    async with rig(tmp_path, quick_host, start=False, clock=clock, key=key, db=db, worker_id="a") as a:
        a.service.wake = lambda _id: None
        created = await a.service.create_instance(PLATFORM, user_id=new_user(), secrets={"TOKEN": "t0k"})
        rec = None
        for _ in range(5):
            rec = await a.engine.reconcile_now(created.id)
            if rec is not None and rec.status == Status.RUNNING:
                break
        assert rec is not None and rec.status == Status.RUNNING
        put = await a.gateway(rec, "PUT", "/data/k", b"v1")
        assert put.status_code == 201
        await a.crash(rec)
        # the controller dies right after forking: creating the replacement machine fails, then it is gone
        await a.local("POST", "/_local/faults", json={"operation": "machine.create", "status": 503, "count": 3})
        try:
            mid = await a.engine.reconcile_now(rec.id)
        finally:
            await a.local("DELETE", "/_local/faults")
        assert mid is not None and mid.status == Status.RECOVERING
        assert mid.pending_recovery_volume_id and mid.recovery_step == "creating_machine"
        # and it died holding the lease
        assert a.store.claim(rec.id, "dead-worker", 30, clock.now()) is not None
    clock.advance(31 + 300)  # past the dead worker's lease and any backoff
    async with rig(tmp_path, quick_host, clock=clock, key=key, db=db, worker_id="b") as b:
        final = await b.wait_recovered(rec, timeout=60)
        assert final.volume_id == mid.pending_recovery_volume_id  # the fork was reused, not made twice
        vols = {v["id"] for v in await b.volumes(rec.app_name)}
        assert vols == {final.volume_id}
        got = await b.gateway(final, "GET", "/data/k")
        assert got.status_code == 200 and got.content == b"v1"
        machines = await b.machines(rec.app_name)
        assert [m["id"] for m in machines if m["state"] == "started"] == [final.machine_id]
        assert machines[-1]["config"]["env"]["TOKEN"] == "t0k"  # the replacement got the current config


async def test_two_engines_never_reconcile_the_same_instance_at_once(tmp_path: Path,
                                                                      host_session: HostHandle) -> None:
    holders: dict[str, str] = {}
    overlaps: list[tuple[str, str, str]] = []
    acquired: Counter[str] = Counter()

    def trace(what: str, instance_id: str, owner: str) -> None:
        if what == "acquire":
            other = holders.get(instance_id)
            if other is not None and other != owner:
                overlaps.append((instance_id, other, owner))
            holders[instance_id] = owner
            acquired[owner.split("#")[0].split("/")[0]] += 1
        elif holders.get(instance_id) == owner:
            del holders[instance_id]

    key = SecretBox.generate_key()
    db = sqlite_url(tmp_path)
    async with rig(tmp_path, host_session, worker_id="e1", key=key, db=db, trace=trace) as one, \
            rig(tmp_path, host_session, worker_id="e2", key=key, db=db, trace=trace) as two:
        services = [one.service, two.service]
        created = [await services[i % 2].create_instance(PLATFORM, user_id=new_user()) for i in range(4)]
        recs = await asyncio.gather(*(one.wait_status(c.id, "running") for c in created))
        await asyncio.gather(*(one.crash(r) for r in recs[:2]))
        finals = await asyncio.gather(*(one.wait_recovered(r) for r in recs[:2]))
        for final in finals:
            assert final.status == Status.RUNNING
        # a few more alarm rounds with both engines polling
        await async_wait_until(lambda: _rounds(acquired), timeout=30, message="both engines took turns")
    assert overlaps == []
    assert acquired["e1"] > 0 and acquired["e2"] > 0


async def _rounds(acquired: Counter[str]) -> bool:
    return sum(acquired.values()) > 40
