"""Benchmark: time from host death to running elsewhere (SPEC §15), on a ``--profile realistic`` local host.

A real ``sandkeep host --profile realistic`` process, the engine in process (real MachinesClient, SQLite store,
system clock) with ``SANDKEEP_DEAD_HOST_GRACE=--grace`` (default 0) and the default intervals
(``SANDKEEP_INTERVAL_RUNNING=30``; the host's ``host_status`` watch event wakes the instance at once). Per
sample: provision, write data, take a snapshot, kill the volume's host (``/_local/hosts/{zone}/die``), then
measure

* detection: host death -> ``instance.host_unreachable`` (event time);
* time to running: host death -> ``running`` on a new machine (polled every 25 ms);
* relocation: ``instance.host_unreachable`` -> running (includes the grace);

and that the data written before the snapshot reads back. ``--grace 300`` (the default
``SANDKEEP_DEAD_HOST_GRACE``) waits the real five minutes per sample: the engine's clock is the system clock
here (a faster clock would also speed up the lease, probe and machine-wait timeouts the figure depends on).

    .venv/bin/python -m bench.deadhost [--samples 3] [--interval-running 30] [--grace 0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.engine.hostsupport import rig
from tests.support.procs import running_host

from sandkeep.engine.service import Actor

PLATFORM = Actor("backend", "platform")
POLL = 0.025


async def _sample(r: Any, n: int, grace: float) -> dict[str, float | bool]:
    created = await r.service.create_instance(PLATFORM, user_id=f"bench-dead-{n}-{time.time_ns()}")
    rec = await r.wait_status(created.id, "running", timeout=120)
    assert (await r.gateway(rec, "PUT", "/data/kept", b"before the snapshot")).status_code == 201
    await r.local("POST", f"/v1/apps/{rec.app_name}/volumes/{rec.volume_id}/snapshots")
    zone = {v["id"]: v for v in await r.volumes(rec.app_name)}[rec.volume_id]["zone"]
    died = time.time()
    await r.local("POST", f"/_local/hosts/{zone}/die")
    try:
        while True:
            cur = r.get(rec.id)
            if cur.status == "running" and cur.machine_id != rec.machine_id:
                running_at = time.time()
                break
            if time.time() - died > grace + 300:
                raise RuntimeError(f"not relocated after grace + 300 s: {r.events(rec.id)}")
            await asyncio.sleep(POLL)
        suspect = r.event(rec.id, "instance.host_unreachable").at.timestamp()
        got = await r.gateway(cur, "GET", "/data/kept")
        intact = got.status_code == 200 and got.content == b"before the snapshot"
    finally:
        await r.local("POST", f"/_local/hosts/{zone}/return")
    return {"detection": suspect - died, "to_running": running_at - died, "relocation": running_at - suspect,
            "intact": intact}


def _fmt(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    return f"{statistics.median(ordered):.2f} s | {p90:.2f} s | {ordered[-1]:.2f} s"


async def main_async(samples: int, interval_running: float, grace: float) -> None:
    with tempfile.TemporaryDirectory(prefix="sk-bench-dead-") as tmp:
        root = Path(tmp)
        with running_host(root / "host", extra_args=["--profile", "realistic"]) as host:
            async with rig(root, host, interval_running=interval_running, interval_busy=5.0,
                           machine_wait_timeout=60.0, health_probe_timeout=60.0, health_probe_interval=1.0,
                           detect_poll_interval=2.0, alarm_poll_interval=1.0, jitter_fraction=0.1,
                           lease_ttl=30.0, dead_host_grace=grace) as r:
                rows = [await _sample(r, n, grace) for n in range(samples)]
    n = len(rows)
    print(f"| figure (n={n}) | median | p90 | max |")
    print("|---|---:|---:|---:|")
    for key, label in (("detection", "host death -> instance.host_unreachable"),
                       ("relocation", f"instance.host_unreachable -> running elsewhere (grace {grace:g} s + restore)"),
                       ("to_running", f"host death -> running elsewhere, grace {grace:g} s")):
        print(f"| {label} | {_fmt([float(x[key]) for x in rows])} |")
    print(f"\ndata written before the snapshot intact: {sum(1 for x in rows if x['intact'])}/{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--interval-running", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=0.0, help="SANDKEEP_DEAD_HOST_GRACE (real seconds)")
    args = parser.parse_args()
    asyncio.run(main_async(args.samples, args.interval_running, args.grace))


if __name__ == "__main__":
    main()
