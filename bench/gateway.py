"""Benchmark 2: PUT/GET /data through the local host's proxy (the path all instance traffic takes).

One machine, one keep-alive HTTP client per worker, loopback only. Bounded loops: a fixed number of
requests, and a time budget that aborts the section if it is spent.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tests.support.procs import free_port, spawn, start_host_process

from bench.common import BenchError, Deadline, Section, mib, payload
from bench.host_ops import APP, GATEWAY_HEADERS, GATEWAY_TOKEN, machine_config
from sandkeep.gateway import TOKEN_ENV
from sandkeep.provider.client import MachinesClient


@dataclass(frozen=True)
class GatewayConfig:
    requests: int  # per sequential loop (PUT, GET)
    concurrent_requests: int  # total in the concurrent GET loop
    concurrency: int
    body_bytes: int
    large_reps: int  # 1 MiB PUT+GET round trips
    budget: float
    direct_requests: int = 100  # GETs straight to a gateway process (no proxy), the baseline


def _check(resp: httpx.Response, want: tuple[int, ...], what: str) -> None:
    if resp.status_code not in want:
        raise BenchError(f"{what} answered {resp.status_code}: {resp.text[:200]}")


async def _sequential(http: httpx.AsyncClient, base: str, section: Section, cfg: GatewayConfig,
                      deadline: Deadline) -> None:
    body = payload(cfg.body_bytes, seed=7)
    keys = [f"k{i % 50}" for i in range(cfg.requests)]
    start = time.perf_counter()
    for key in keys:
        deadline.check()
        t0 = time.perf_counter()
        resp = await http.put(f"{base}/data/{key}", content=body)
        section.timing(f"PUT /data ({cfg.body_bytes} B, fsync), sequential").add(time.perf_counter() - t0)
        _check(resp, (200, 201), "PUT /data")
    put_total = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        deadline.check()
        t0 = time.perf_counter()
        resp = await http.get(f"{base}/data/{key}")
        section.timing(f"GET /data ({cfg.body_bytes} B), sequential").add(time.perf_counter() - t0)
        _check(resp, (200,), "GET /data")
        if resp.content != body:
            raise BenchError(f"GET /data/{key} returned different bytes")
    get_total = time.perf_counter() - start
    section.fact(f"PUT throughput, 1 client, {cfg.requests} requests", f"{cfg.requests / put_total:.0f} req/s")
    section.fact(f"GET throughput, 1 client, {cfg.requests} requests", f"{cfg.requests / get_total:.0f} req/s")


async def _concurrent(proxy: str, machine_id: str, section: Section, cfg: GatewayConfig, deadline: Deadline) -> None:
    remaining = [cfg.concurrent_requests]
    name = f"GET /data ({cfg.body_bytes} B), {cfg.concurrency} concurrent clients"

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=proxy, headers={"fly-force-instance-id": machine_id, **GATEWAY_HEADERS},
                                     timeout=30.0) as http:
            while remaining[0] > 0:
                remaining[0] -= 1
                deadline.check()
                t0 = time.perf_counter()
                resp = await http.get("/data/k0")
                section.timing(name).add(time.perf_counter() - t0)
                _check(resp, (200,), "GET /data")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    total = time.perf_counter() - start
    section.fact(f"GET throughput, {cfg.concurrency} concurrent clients, {cfg.concurrent_requests} requests",
                 f"{cfg.concurrent_requests / total:.0f} req/s")


async def _large(http: httpx.AsyncClient, section: Section, cfg: GatewayConfig, deadline: Deadline) -> None:
    body = payload(mib(1), seed=11)
    for i in range(cfg.large_reps):
        deadline.check()
        async with section.ameasure("PUT /data (1 MiB, fsync)"):
            resp = await http.put(f"/data/big{i}", content=body)
        _check(resp, (200, 201), "PUT /data (1 MiB)")
        async with section.ameasure("GET /data (1 MiB)"):
            resp = await http.get(f"/data/big{i}")
        _check(resp, (200,), "GET /data (1 MiB)")
        if resp.content != body:
            raise BenchError("1 MiB GET returned different bytes")


async def _measure(url: str, token: str, proxy: str, cfg: GatewayConfig, section: Section) -> None:
    deadline = Deadline(cfg.budget, section.name)
    async with MachinesClient(url, token, proxy_url=proxy) as client:
        await client.ensure_app(APP, "personal")
        vol = await client.create_volume(APP, name="bench_gw", region="lcl-a", size_gb=1)
        machine = await client.create_machine(APP, config=machine_config(vol.id, "gateway"), name="bench-gw",
                                              region="lcl-a")
        await client.wait_machine(APP, machine.id, state="started", timeout=60)
        async with httpx.AsyncClient(base_url=proxy, headers={"fly-force-instance-id": machine.id, **GATEWAY_HEADERS},
                                     timeout=30.0) as http:
            await _sequential(http, "", section, cfg, deadline)
            await _concurrent(proxy, machine.id, section, cfg, deadline)
            await _large(http, section, cfg, deadline)
        await client.destroy_machine(APP, machine.id, force=True)


async def _direct(base: str, section: Section, cfg: GatewayConfig, deadline: Deadline) -> None:
    """Baseline without the proxy: the same gateway program started by hand, hit on its own port."""
    body = payload(cfg.body_bytes, seed=7)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, headers=GATEWAY_HEADERS) as http:
        ready = False
        for _ in range(200):  # bounded start-up poll (at most ~10 s)
            try:
                ready = (await http.get("/health")).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            deadline.check()
            await asyncio.sleep(0.05)
        if not ready:
            raise BenchError("the directly started gateway did not answer /health")
        _check(await http.put("/data/k0", content=body), (200, 201), "PUT /data (direct)")
        for _ in range(cfg.direct_requests):
            deadline.check()
            async with section.ameasure(f"GET /data ({cfg.body_bytes} B), direct to the gateway (no proxy)"):
                resp = await http.get("/data/k0")
            _check(resp, (200,), "GET /data (direct)")


def run(cfg: GatewayConfig, section: Section) -> None:
    root = Path(tempfile.mkdtemp(prefix="sandkeep-bench-gateway-"))
    host = start_host_process(root / "host", extra_args=["--log-level", "warning"])
    port = free_port()
    (root / "direct-volume").mkdir()
    direct = spawn(["gateway", "--port", str(port)], log_path=root / "direct-gateway.log",
                   env={"SANDKEEP_VOLUME_PATH": str(root / "direct-volume"), "PORT": str(port),
                        TOKEN_ENV: GATEWAY_TOKEN})
    try:
        section.fact("path", "client -> host proxy (127.0.0.1, `fly-force-instance-id`) -> machine's gateway; "
                     "baseline: `sandkeep gateway` started directly, no proxy")
        asyncio.run(_measure(host.url, host.token, host.proxy_url, cfg, section))
        asyncio.run(_direct(f"http://127.0.0.1:{port}", section, cfg, Deadline(30, "direct gateway")))
    finally:
        direct.stop()
        host.proc.stop()
        shutil.rmtree(root, ignore_errors=True)
