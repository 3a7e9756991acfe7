"""Detection on the simulated host at fleet scale: ``python -m bench.sim_detect --n 10000``.

Two processes on loopback:

* **the host**: ``sandkeep host --machines sim --profile realistic`` (a child process; the real host model,
  its real HTTP API and proxy, simulated machines);
* **sandkeep** (this process, the one measured): the real Engine on SQLite with the real Machines API client
  (the local provider: its detector follows the host's ``/_local/watch`` stream) and the real gateway prober
  through the host's proxy. Settings are the defaults (30 s running interval, 64 engine slots...).

Bring-up: for each of N instances this process creates, over the host's HTTP API with ``--concurrency``
requests in flight, the app, the volume and the machine exactly as sandkeep's engine would (the engine's
own ``build_machine_config``: metadata naming the instance, its gateway token), and waits for it to be
started; then it inserts the N ``running`` instance records into sandkeep's database in bulk (what the
engine would have written after creating them), alarms spread over one running interval. The engine starts
and does one full round of healthy reconciles (settle); sandkeep's CPU is sampled over ``--idle`` seconds;
then ``--crashes`` machines, chosen at random, are crashed one by one, ``--crash-every`` s apart, through
the host's fault API (``POST /_local/apps/{app}/machines/{id}/crash``, what a user would call). Measured
per crashed instance: crash (wall time just before the POST) -> the ``instance.unexpected_stop_recovery_started``
event (the pass the detection woke decides to recover and writes ``recovering``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from tests.support.procs import start_host_process

from sandkeep import metrics
from sandkeep.clock import SystemClock
from sandkeep.config import Settings
from sandkeep.engine.naming import build_machine_config, volume_name
from sandkeep.engine.runtime import Engine
from sandkeep.logs import configure_logging
from sandkeep.provider.client import MachinesClient
from sandkeep.secrets import SecretBox
from sandkeep.store import sql
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import open_store

REGION = "lcl-a"
EVENT = "instance.unexpected_stop_recovery_started"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _passes() -> float:
    return float(metrics.RECONCILE_PASSES.labels(status="running")._value.get())


async def bring_up(api: httpx.AsyncClient, settings: Settings, box: SecretBox, n: int, concurrency: int,
                   now: datetime) -> list[InstanceRecord]:
    gate = asyncio.Semaphore(concurrency)
    records: list[InstanceRecord] = []

    async def call(method: str, path: str, **kw: Any) -> Any:
        resp = await api.request(method, path, **kw)
        resp.raise_for_status()
        return resp.json()

    async def one(i: int) -> None:
        token = f"tok-{i:07d}-" + os.urandom(8).hex()
        r = InstanceRecord(
            id=f"ins_d{i:07d}", user_id=f"u{i}", sandbox_id=f"sbx_d{i:07d}", status=Status.RUNNING,
            created_at=now, updated_at=now, app_name=f"skd-{i:07d}", region=REGION,
            status_changed_at=now, last_started_at=now, last_snapshot_at=now,
            gateway_token_encrypted=box.encrypt(token))
        app = r.app_name or ""
        async with gate:
            await call("POST", "/v1/apps", json={"app_name": app, "org_slug": settings.fly_org})
            vol = await call("POST", f"/v1/apps/{app}/volumes",
                             json={"name": volume_name(r), "region": REGION, "size_gb": 1})
            cfg = build_machine_config(r, volume_id=vol["id"], secrets={}, gateway_port=settings.gateway_port,
                                       gateway_token=token)
            m = await call("POST", f"/v1/apps/{app}/machines",
                           json={"name": r.id, "region": REGION,
                                 "config": cfg.model_dump(mode="json", exclude_none=True)})
            await call("GET", f"/v1/apps/{app}/machines/{m['id']}/wait", params={"state": "started", "timeout": 60})
        r.volume_id, r.machine_id = vol["id"], m["id"]
        records.append(r)

    await asyncio.gather(*(one(i) for i in range(n)))
    return records


def seed(store: Any, records: list[InstanceRecord], now: datetime, spread: float) -> None:
    for k, r in enumerate(sorted(records, key=lambda r: r.id)):
        r.alarm_at = now + timedelta(seconds=spread * k / max(1, len(records)))
    rows = [sql._instance_row(r) for r in records]
    with store.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(sql.insert(sql.instances), rows[i:i + 1000])


async def main_async(a: argparse.Namespace) -> None:
    configure_logging("warning")
    tmp = Path(tempfile.mkdtemp(prefix="sksimdetect-"))
    host = start_host_process(tmp / "host", extra_args=["--machines", "sim", "--profile", a.profile])
    host_pid = host.proc.popen.pid
    clock = SystemClock()
    key = SecretBox.generate_key()
    box = SecretBox(key)
    kw: dict[str, Any] = {"interval_running": a.interval} if a.interval else {}
    settings = Settings(home=tmp, secrets_key=key, regions=REGION, **kw)
    provider = MachinesClient(host.url, host.token, proxy_url=host.proxy_url, clock=clock,
                              rate_limit=settings.provider_rate_limit, rate_burst=settings.provider_rate_burst,
                              region_concurrency=settings.provider_region_concurrency,
                              breaker_threshold=settings.provider_breaker_threshold,
                              breaker_cooldown=settings.provider_breaker_cooldown,
                              snapshot_retention=settings.snapshot_retention)
    store = open_store(f"sqlite:///{tmp}/sandkeep.db", clock)
    t0 = time.monotonic()
    # bring-up over plain HTTP (as bench/sim_machines.py): not what is measured, so not through the engine's
    # client and its per-region create cap
    limits = httpx.Limits(keepalive_expiry=1.0)  # below the servers' 5 s keep-alive: no reuse race
    async with httpx.AsyncClient(base_url=host.url, headers=host.headers(), timeout=120, limits=limits) as api:
        records = await bring_up(api, settings, box, a.n, a.concurrency, clock.now())
    bring_up_s = time.monotonic() - t0
    print(f"sim_detect: bring-up done in {bring_up_s:.0f} s; the measured part starts", file=sys.stderr, flush=True)
    seed(store, records, clock.now(), min(30.0, settings.interval_running))  # first round: within 30 s
    engine = Engine(settings, store, provider, clock, worker_id="bench")
    swept = asyncio.Event()
    sweep = engine.detector.sweep

    async def timed_sweep() -> int:  # the detector's start-up sweep (it reads no stream meanwhile)
        try:
            return await sweep()
        finally:
            swept.set()

    engine.detector.sweep = timed_sweep  # type: ignore[method-assign]
    base = _passes()
    await engine.start()
    t1 = time.monotonic()
    # settle: one full round of healthy reconciles (every instance's first alarm), at most 90 s
    while _passes() - base < a.n and time.monotonic() - t1 < 90.0:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    if a.after_sweep:  # wait for the detector's start-up sweep (one list per app) to end before crashing
        await asyncio.wait_for(swept.wait(), timeout=3600)
    settle_s = time.monotonic() - t1
    sweep_s = round(time.monotonic() - t1, 1) if swept.is_set() else None
    settled = int(_passes() - base)
    cpu0, hcpu0, w0, p0 = time.process_time(), _cpu_seconds(host_pid), time.monotonic(), _passes()
    profiler = cProfile.Profile(time.process_time) if a.cprofile else None
    if profiler is not None:
        profiler.enable()
    await asyncio.sleep(a.idle)  # sampling steady CPU over a fixed window (a benchmark, not a test)
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, Path(a.cprofile), _passes() - p0)
    wall = time.monotonic() - w0
    steady_cpu, host_cpu = (time.process_time() - cpu0) / wall, (_cpu_seconds(host_pid) - hcpu0) / wall
    steady_rate = (_passes() - p0) / wall
    victims = random.Random(7).sample(records, a.crashes)
    crashed: dict[str, float] = {}
    cpu1, w1 = time.process_time(), time.monotonic()
    async with httpx.AsyncClient(base_url=host.url, headers=host.headers(), timeout=30) as api:
        for r in victims:
            at = time.time()
            resp = await api.post(f"/_local/apps/{r.app_name}/machines/{r.machine_id}/crash")
            resp.raise_for_status()
            crashed[r.id] = at
            await asyncio.sleep(a.crash_every)
    started: dict[str, float] = {}
    deadline = time.monotonic() + a.settle
    while time.monotonic() < deadline and len(started) < len(crashed):
        for i in crashed:
            if i not in started:
                page = store.list_events(instance_id=i, name=EVENT, limit=10)
                if page.items:
                    started[i] = min(e.at for e in page.items).timestamp()
        await asyncio.sleep(0.5)
    crash_cpu = (time.process_time() - cpu1) / (time.monotonic() - w1)
    lat = [started[i] - crashed[i] for i in started]
    statuses: dict[str, int] = {}
    for i in crashed:
        rec = store.get_instance(i)
        s = str(rec.status.value if rec is not None else "gone")
        statuses[s] = statuses.get(s, 0) + 1
    host.proc.stop()  # no clean engine stop: it would wait for the recoveries in flight (a benchmark ends here)
    result = {"n": a.n, "interval_running": settings.interval_running, "profile": a.profile,
            "concurrency": a.concurrency, "bring_up_s": round(bring_up_s, 1),
            "bring_up_per_s": round(a.n / bring_up_s, 1), "settle_s": round(settle_s, 1),
            "after_sweep": a.after_sweep, "sweep_done_by_s": sweep_s,
            "settled_reconciles": settled, "steady_reconciles_per_s": round(steady_rate, 1),
            "steady_cpu_fraction": round(steady_cpu, 3), "host_steady_cpu_fraction": round(host_cpu, 3),
            "crashes": len(crashed), "detected": len(lat),
            "crash_to_recovering_p50": pct(lat, 0.5), "crash_to_recovering_p99": pct(lat, 0.99),
            "crash_to_recovering_max": pct(lat, 1.0), "cpu_fraction_during_crashes": round(crash_cpu, 3),
            "crashed_status_at_end": statuses, "loadavg": os.getloadavg()}
    # printed and exited here: tearing the loop down would wait for the engine's retries against the stopped host
    print(json.dumps(result), flush=True)
    os._exit(0)


GROUPS = (("httpcore", "httpcore"), ("h11", "h11"), ("httpx", "httpx"), ("anyio", "anyio"),
          ("sqlalchemy", "sqlalchemy"), ("structlog", "structlog"), ("sandkeep", "sandkeep"),
          ("asyncio", "asyncio"), ("ssl", "ssl"), ("json", "json"))


def write_profile(profiler: cProfile.Profile, out: Path, passes: float) -> None:
    """The steady window's main-thread profile (CPU time): own time by package, then the top functions."""
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1e-9
    groups: dict[str, float] = {}
    for (path, _line, _fn), v in raw.items():
        name = next((g for key, g in GROUPS if f"/{key}/" in path or path.endswith(f"/{key}.py")), "other")
        groups[name] = groups.get(name, 0.0) + v[2]
    with out.open("w") as fh:
        fh.write(f"steady window: {passes:.0f} healthy passes, {total:.2f} CPU s on the main thread under the "
                 f"profiler ({1000 * total / max(1.0, passes):.1f} ms per pass, inflated by profiling)\n\n")
        fh.write("own time by package:\n")
        for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            fh.write(f"  {100 * t / total:5.1f} %  {name}\n")
        fh.write("\n")
        stats.stream = fh  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--profile", default="realistic", choices=["none", "realistic"])
    p.add_argument("--concurrency", type=int, default=64, help="bring-up requests in flight")
    p.add_argument("--idle", type=float, default=10.0, help="steady-state CPU sample (s)")
    p.add_argument("--interval", type=float, default=0.0,
                   help="SANDKEEP_INTERVAL_RUNNING for this run (0: the default, 30 s)")
    p.add_argument("--after-sweep", action="store_true",
                   help="crash only after the detector's start-up sweep ended (steady state)")
    p.add_argument("--crashes", type=int, default=40)
    p.add_argument("--crash-every", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=60.0, help="how long to wait for the last detections")
    p.add_argument("--cprofile", default="", help="write a CPU-time profile of the steady window to this file")
    a = p.parse_args()
    asyncio.run(main_async(a))  # prints its JSON line and exits


if __name__ == "__main__":
    main()
