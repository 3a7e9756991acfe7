"""Benchmark 1: lifecycle operations of the local host, driven through sandkeep's Machines client.

Everything is timed from the client's side (``MachinesClient``, the same code the engine uses), so a
figure includes the client's own look-ups: ``create_volume`` lists the app's volumes first (to adopt
the result of an ambiguous create), ``create_machine`` with a name lists the app's machines first.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tests.support.procs import HostHandle, start_host_process

from bench.common import BenchError, Deadline, Section, fmt_seconds, mib, payload, sha256
from sandkeep.gateway import TOKEN_ENV, TOKEN_HEADER
from sandkeep.provider.client import MachinesClient
from sandkeep.provider.models import Guest, MachineConfig, Mount

APP = "bench-host"
IMAGE = "sandkeep/gateway"


@dataclass(frozen=True)
class HostOpsConfig:
    reps: int  # repetitions of the create/boot/stop/start/snapshot/destroy cycle
    fork_reps: int  # forks per data size
    fork_sizes_mib: tuple[int, ...]
    profile: str  # "none" | "realistic"
    budget: float  # seconds for the whole section


#: the gateway token of every bench machine (the gateway answers 401 without it)
GATEWAY_TOKEN = "bench-gateway-token"
GATEWAY_HEADERS = {TOKEN_HEADER: GATEWAY_TOKEN}


def machine_config(volume_id: str, instance: str) -> MachineConfig:
    return MachineConfig(image=IMAGE, guest=Guest(), mounts=[Mount(volume=volume_id, path="/data")],
                         metadata={"bench": "1", "bench_instance": instance}, env={TOKEN_ENV: GATEWAY_TOKEN})


async def put_data(proxy_url: str, machine_id: str, key: str, body: bytes) -> None:
    async with httpx.AsyncClient(timeout=60.0) as http:
        resp = await http.put(f"{proxy_url}/data/{key}", content=body,
                              headers={"fly-force-instance-id": machine_id, **GATEWAY_HEADERS})
        if resp.status_code not in (200, 201):
            raise BenchError(f"PUT /data/{key} via the proxy answered {resp.status_code}: {resp.text[:200]}")


async def get_data(proxy_url: str, machine_id: str, key: str) -> bytes:
    async with httpx.AsyncClient(timeout=60.0) as http:
        resp = await http.get(f"{proxy_url}/data/{key}",
                              headers={"fly-force-instance-id": machine_id, **GATEWAY_HEADERS})
        if resp.status_code != 200:
            raise BenchError(f"GET /data/{key} via the proxy answered {resp.status_code}: {resp.text[:200]}")
        return resp.content


async def _cycle(client: MachinesClient, section: Section, i: int, deadline: Deadline) -> None:
    deadline.check()
    async with section.ameasure("volume create (empty, 1 GB)"):
        vol = await client.create_volume(APP, name=f"bench_v{i}", region="lcl-a", size_gb=1)
    cfg = machine_config(vol.id, f"cycle-{i}")
    start = time.perf_counter()
    async with section.ameasure("machine create (API answer)"):
        machine = await client.create_machine(APP, config=cfg, name=f"bench-m{i}", region="lcl-a")
    await client.wait_machine(APP, machine.id, state="started", timeout=60)
    section.timing("boot: machine create + wait started").add(time.perf_counter() - start)
    async with section.ameasure("stop + wait stopped"):
        await client.stop_machine(APP, machine.id)
        await client.wait_machine(APP, machine.id, state="stopped", timeout=60)
    async with section.ameasure("start existing + wait started"):
        await client.start_machine(APP, machine.id)
        await client.wait_machine(APP, machine.id, state="started", timeout=60)
    async with section.ameasure("snapshot create (near-empty volume)"):
        await client.create_snapshot(APP, vol.id)
    async with section.ameasure("machine destroy (force) + wait destroyed"):
        await client.destroy_machine(APP, machine.id, force=True)
        await client.wait_machine(APP, machine.id, state="destroyed", timeout=60)
    async with section.ameasure("volume delete"):
        await client.delete_volume(APP, vol.id)


async def _forks(client: MachinesClient, host: HostHandle, section: Section, size_mib: int, reps: int,
                 deadline: Deadline) -> None:
    label = f"{size_mib} MiB"
    data = payload(mib(size_mib), seed=size_mib)
    src = await client.create_volume(APP, name=f"bench_src_{size_mib}", region="lcl-a", size_gb=1)
    writer = await client.create_machine(APP, config=machine_config(src.id, f"src-{size_mib}"),
                                         name=f"bench-src-{size_mib}", region="lcl-a")
    await client.wait_machine(APP, writer.id, state="started", timeout=60)
    async with section.ameasure(f"write {label} through the proxy (PUT /data, fsync)"):
        await put_data(host.proxy_url, writer.id, "blob", data)
    # like a recovery: the source machine is gone (stopped) when its volume is forked
    await client.stop_machine(APP, writer.id)
    await client.wait_machine(APP, writer.id, state="stopped", timeout=60)
    last_fork: str | None = None
    for r in range(reps):
        deadline.check()
        async with section.ameasure(f"fork lcl-a -> lcl-b ({label})"):
            fork = await client.create_volume(APP, name=f"bench_src_{size_mib}", region="lcl-b",
                                              source_volume_id=src.id)
        if fork.region != "lcl-b":
            raise BenchError(f"fork landed in {fork.region}, wanted lcl-b")
        if r < reps - 1:
            await client.delete_volume(APP, fork.id)
        else:
            last_fork = fork.id
    for _ in range(max(1, reps // 2)):
        deadline.check()
        async with section.ameasure(f"snapshot create ({label})"):
            await client.create_snapshot(APP, src.id)
    # the last fork must hold the data: boot a machine on it and read it back
    assert last_fork is not None
    reader = await client.create_machine(APP, config=machine_config(last_fork, f"fork-{size_mib}"),
                                         name=f"bench-fork-{size_mib}", region="lcl-b")
    await client.wait_machine(APP, reader.id, state="started", timeout=60)
    async with section.ameasure(f"read {label} through the proxy (GET /data)"):
        back = await get_data(host.proxy_url, reader.id, "blob")
    intact = sha256(back) == sha256(data)
    section.fact(f"fork of {label}: data intact in lcl-b (sha256 compared)", "yes" if intact else "NO")
    if not intact:
        raise BenchError(f"fork of {label}: data differs ({len(back)} bytes read, {len(data)} written)")
    for m in (reader.id, writer.id):
        await client.destroy_machine(APP, m, force=True)
        await client.wait_machine(APP, m, state="destroyed", timeout=60)
    for v in (last_fork, src.id):
        await client.delete_volume(APP, v)


async def _measure(host: HostHandle, cfg: HostOpsConfig, section: Section) -> None:
    deadline = Deadline(cfg.budget, section.name)
    async with MachinesClient(host.url, host.token, proxy_url=host.proxy_url, timeout=90.0) as client:
        await client.ensure_app(APP, "personal")
        for i in range(cfg.reps):
            await _cycle(client, section, i, deadline)
        for size in cfg.fork_sizes_mib:
            await _forks(client, host, section, size, cfg.fork_reps, deadline)


def run(cfg: HostOpsConfig, section: Section) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"sandkeep-bench-host-{cfg.profile}-"))
    extra = ["--profile", cfg.profile, "--log-level", "warning"]
    host = start_host_process(root / "host", extra_args=extra)
    try:
        section.fact("host", f"`sandkeep host {' '.join(extra)}` (regions lcl-a,lcl-b,lcl-c)")
        section.fact("repetitions", f"{cfg.reps} lifecycle cycles; {cfg.fork_reps} forks per size")
        asyncio.run(_measure(host, cfg, section))
        boot = section.timings.get("boot: machine create + wait started")
        if boot and boot.samples:
            section.fact("boot median", fmt_seconds(boot.stats()["median"]))
    finally:
        code = host.proc.stop()
        if code not in (0, -15):
            section.notes.append(f"host exited with code {code}; log tail: {host.proc.log()[-500:]}")
        shutil.rmtree(root, ignore_errors=True)
