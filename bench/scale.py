"""Engine throughput at scale: ``python -m bench.scale [--db sqlite|postgres] [--n N] [--seconds S]``.

One Engine (the real one, real clock) on the real SqlStore, against a stub provider that answers every
machine/volume read at once with a healthy started machine: it measures the engine and the store, not the
provider. N running instances are inserted with their alarm due now; the engine starts and we measure

* ``reconciles/s``: passes finished per second (alarm claims until all N have run once, or ``--seconds``);
* ``cpu_ms_per_reconcile``: this process's CPU time / passes;
* ``writes_per_reconcile``: committed write transactions / passes (counted on the SQLAlchemy engine);
* ``alarm_lag_p99``: with ``--steady`` the instances are spread over one 30 s interval and the run lasts
  ``--seconds``; the p99 of (claim time - alarm_at) is read from the engine's alarm-lag histogram.

Runs against whatever ``sandkeep`` is importable, so ``PYTHONPATH=/work/main/src`` measures another tree
with the same script. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event

from sandkeep import metrics
from sandkeep.clock import SystemClock
from sandkeep.config import Settings
from sandkeep.engine.runtime import Engine
from sandkeep.provider.models import Machine, MachineConfig, Volume
from sandkeep.secrets import SecretBox
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import open_store


class StubProvider:
    """Every read answers at once: the machine is started with its volume mounted."""

    supports_watch = False

    async def get_machine(self, app_name: str, machine_id: str) -> Machine:
        return Machine(id=machine_id, state="started", region="lcl-a",
                       config=MachineConfig(image="x", mounts=[{"volume": "vol_" + machine_id[2:], "path": "/data"}]))

    async def get_volume(self, app_name: str, volume_id: str) -> Volume:
        return Volume(id=volume_id, state="created", region="lcl-a", attached_machine_id="m_" + volume_id[4:])

    async def list_machines(self, app_name: str, **kw: Any) -> list[Machine]:
        return []

    async def create_snapshot(self, app_name: str, volume_id: str) -> None:
        return None  # sandkeep's own hourly snapshot (SANDKEEP_SNAPSHOT_INTERVAL): Fly answers 200 without a body

    async def aclose(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        async def nope(*a: Any, **kw: Any) -> Any:
            raise RuntimeError(f"stub provider: {name} not expected in a healthy reconcile")
        return nope


class StubProber:
    async def probe(self, *a: Any, **kw: Any) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _pg_url() -> tuple[str, Any]:
    import psycopg
    name = "sk_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def _records(n: int, now: datetime, spread: float) -> list[InstanceRecord]:
    out = []
    for i in range(n):
        out.append(InstanceRecord(
            id=f"ins_b{i:07d}", user_id=f"u{i}", sandbox_id=f"sbx_b{i:07d}", status=Status.RUNNING,
            created_at=now, updated_at=now, app_name=f"app-{i}", machine_id=f"m_{i}", volume_id=f"vol_{i}",
            region="lcl-a", status_changed_at=now, last_started_at=now,
            alarm_at=now + timedelta(seconds=spread * i / max(1, n))))
    return out


def _bulk_insert(store: Any, records: list[InstanceRecord]) -> None:
    from sandkeep.store import sql
    rows = [sql._instance_row(r) for r in records]
    with store.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(sql.insert(sql.instances), rows[i:i + 1000])


def _set_alarms(store: Any, n: int, now: datetime, spread: float) -> None:
    from sqlalchemy import bindparam, update

    from sandkeep.store import sql
    stmt = update(sql.instances).where(sql.instances.c.id == bindparam("b_id")).values(alarm_at=bindparam("b_at"))
    with store.engine.begin() as conn:
        conn.execute(stmt, [{"b_id": f"ins_b{i:07d}", "b_at": now + timedelta(seconds=spread * i / max(1, n))}
                            for i in range(n)])


class LagRecorder:
    """Stands in for the alarm-lag histogram: keeps every observation (exact percentiles)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)

    def p99(self) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)


async def run(db: str, n: int, seconds: float, steady: bool, settings_kw: dict[str, Any],
              takeover: bool = False) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="skbench-")
    drop = None
    if db == "postgres":
        url, drop = _pg_url()
    else:
        url = f"sqlite:///{tmp}/bench.db"
    clock = SystemClock()
    store = open_store(url, clock)
    writes = 0

    def on_commit(conn: Any) -> None:
        nonlocal writes
        writes += 1
    event.listen(store._engine, "commit", on_commit)
    spread = 30.0 if steady else 0.0
    _bulk_insert(store, _records(n, clock.now(), 0.0))
    if db == "postgres":  # what autovacuum does to a table this size in production: planner statistics
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE instances")
    # alarms relative to the engine's start (the inserts take a while): due now, or spread over one interval
    now = clock.now()
    _set_alarms(store, n, now, spread)
    beat_at = None
    if takeover:
        # a dead engine: registered, holding every instance's lease (claimed mid-pass), then silent
        if hasattr(store, "engine_heartbeat"):
            store.engine_heartbeat("dead:1:x", "engine", clock.now(), 5.0)
        held = 0
        while held < n:
            got = store.claim_due("dead:1:x#1", 30.0, clock.now(), min(1000, n - held))
            if not got:
                break
            held += len(got)
        beat_at = time.monotonic()
    lag = LagRecorder()
    metrics.ALARM_LAG = lag  # type: ignore[assignment]
    kw: dict[str, Any] = {"home": tmp, "secrets_key": SecretBox.generate_key(), "regions": "lcl-a",
                          "detect_poll_interval": 0.0}
    kw.update(settings_kw)
    settings = Settings(**kw)
    engine = Engine(settings, store, StubProvider(), clock, prober=StubProber())  # type: ignore[arg-type]
    passes = metrics.RECONCILE_PASSES.labels(status="running")
    base = passes._value.get()
    writes = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    await engine.start()
    deadline = t0 + seconds
    reached: dict[float, float] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        done = passes._value.get() - base
        for q in (0.5, 0.99, 1.0):
            if q not in reached and done >= q * n:
                reached[q] = time.monotonic()
        if not steady and done >= n and metrics.ENGINE_PASSES_IN_FLIGHT._value.get() == 0:
            break
    done = passes._value.get() - base
    took = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    w = writes
    await engine.stop()
    store.close()
    if drop:
        drop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {}
    if takeover and beat_at is not None:
        out = {f"pickup_p{int(q * 100)}_s": round(t - beat_at, 2) for q, t in reached.items()}
    return {**out, "db": db, "n": n, "steady": steady, "seconds": round(took, 2), "reconciles": int(done),
            "reconciles_per_s": round(done / took, 1), "cpu_ms_per_reconcile": round(1000 * cpu / max(1, done), 3),
            "writes_per_reconcile": round(w / max(1, done), 2), "alarm_lag_p99": lag.p99(),
            "cpu_fraction": round(cpu / took, 3), "maxrss_kib": rss, "settings": settings_kw}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", default="sqlite", choices=["sqlite", "postgres"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--steady", action="store_true")
    p.add_argument("--takeover", action="store_true", help="a dead engine holds every lease at the start")
    p.add_argument("--set", action="append", default=[], help="setting=value (float/int)")
    a = p.parse_args()
    kw: dict[str, Any] = {}
    for item in a.set:
        k, v = item.split("=", 1)
        kw[k] = float(v) if "." in v else int(v)
    print(json.dumps(asyncio.run(run(a.db, a.n, a.seconds, a.steady, kw, a.takeover))))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
