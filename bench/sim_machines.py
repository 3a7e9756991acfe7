"""Simulated machines at scale: ``python -m bench.sim_machines [N]`` (default 1000).

Starts ``sandkeep host --machines sim`` and, 32 at a time over real HTTP, creates N apps, each with one volume
and one gateway machine, waits for it to be started and writes one key through the proxy. Prints the rate,
the host's idle CPU afterwards (20 s sample), its resident memory and its number of child processes (0: no OS
process per machine).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tests.support.procs import HostHandle, start_host_process

from sandkeep.gateway import TOKEN_ENV, TOKEN_HEADER

CONCURRENCY = 32
IDLE_SAMPLE = 20.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib_and_children(pid: int) -> tuple[int, int]:
    rss = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
    return rss, len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


async def _run(h: HostHandle, n: int) -> None:
    limits = httpx.Limits(keepalive_expiry=1.0)  # below the servers' 5 s keep-alive: no reuse race
    async with httpx.AsyncClient(base_url=h.url, headers=h.headers(), timeout=60, limits=limits) as api, \
            httpx.AsyncClient(base_url=h.proxy_url, headers={TOKEN_HEADER: "t"}, timeout=60, limits=limits) as proxy:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(app: str) -> None:
            async with gate:
                (await api.post("/v1/apps", json={"app_name": app})).raise_for_status()
                vol = (await api.post(f"/v1/apps/{app}/volumes", json={"name": "data", "region": "lcl-a"})).json()
                m = (await api.post(f"/v1/apps/{app}/machines", json={"config": {
                    "image": "sandkeep/gateway", "env": {TOKEN_ENV: "t"},
                    "mounts": [{"volume": vol["id"], "path": "/data"}]}})).json()
                (await api.get(f"/v1/apps/{app}/machines/{m['id']}/wait",
                               params={"state": "started", "timeout": 60})).raise_for_status()
                put = await proxy.put("/data/k", content=b"v", headers={"fly-force-instance-id": m["id"]})
                assert put.status_code == 201, put.text

        start = time.monotonic()
        await asyncio.gather(*(one(f"sim-{i}") for i in range(n)))
        took = time.monotonic() - start
    pid = h.proc.popen.pid
    before = _cpu_seconds(pid)
    await asyncio.sleep(IDLE_SAMPLE)  # measuring idle CPU over a fixed window (a benchmark, not a test)
    idle = (_cpu_seconds(pid) - before) / IDLE_SAMPLE
    rss_kib, children = _rss_kib_and_children(pid)
    print(f"{n} apps, each a volume + a started simulated gateway machine + one write through the proxy: "
          f"{took:.1f} s ({n / took:.0f}/s)")
    print(f"host afterwards: idle CPU {idle * 100:.1f}% of one core, RSS {rss_kib / 1024:.0f} MiB "
          f"({rss_kib / n:.1f} KiB per machine, base included), child processes {children}")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="sim-machines-") as tmp:
        handle = start_host_process(Path(tmp) / "host", extra_args=["--machines", "sim"])
        try:
            asyncio.run(_run(handle, n))
        finally:
            handle.proc.stop()


if __name__ == "__main__":
    main()
