"""Benchmark 3: recovery figures with the real ``sandkeep serve`` (API + engine + local host child).

Per instance: provision through the API (POST /v1/instances -> status running), write data through
the API's gateway route, SIGKILL the machine through the host's fault API, then measure

* detection latency: crash -> status ``recovering`` (from the instance's
  ``instance.unexpected_stop_recovery_started`` event time, and from polling the API every 25 ms);
* time to running: crash -> ``running`` again on a new machine (``..._recovery_succeeded`` event time,
  and polling);
* that the data written before the crash reads back identical through the new machine.

The crash moment is the wall-clock time just before the crash request is sent (the host kills the
process group while answering it); events carry the engine's wall-clock times on the same machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.support.procs import HostHandle, Proc, free_port, spawn, start_host_process

from bench.common import BenchError, Deadline, Section, fmt_seconds, mib, payload, poll_until, sha256

HOST_TOKEN = "bench-host-token"
POLL = 0.025  # status polling interval while waiting for a transition (bounds the polled figures' resolution)

DESCRIPTION = ("`sandkeep serve` (API, engine, SQLite store, local host child) with "
               "`SANDKEEP_INTERVAL_RUNNING=30`, `SANDKEEP_DETECT_POLL_INTERVAL=1`, other settings default. "
               "Instances are created through `POST /v1/instances` with an admin token from `sandkeep token`, "
               "data is written through `/v1/instances/{id}/gateway/data/...`, and machines are SIGKILLed with "
               "`POST /_local/apps/{app}/machines/{id}/crash`. Event-based figures use the instance's event times; "
               "polled figures poll `GET /v1/instances/{id}` every 25 ms.")
DESCRIPTION_REALISTIC = ("As section 3, but serve uses a separately started `sandkeep host --profile realistic` "
                         "(`SANDKEEP_HOST_URL`), so every provider step pays Fly-like delays (fork 3 s, machine "
                         "create 0.5 s, first boot 1.5 s, 50 ms per API call).")

_STARTED = "instance.unexpected_stop_recovery_started"
_SUCCEEDED = "instance.unexpected_stop_recovery_succeeded"
_FAILED = "instance.unexpected_stop_recovery_failed"


@dataclass(frozen=True)
class RecoveryConfig:
    instances: int
    data_mib: int
    profile: str  # "none" | "realistic"
    concurrent_round: bool  # after the one-at-a-time round, crash every instance at once
    budget: float
    api_route_requests: int = 100


def serve_ready() -> str | None:
    """None when `sandkeep serve` can run here, else why not."""
    try:
        out = subprocess.run([sys.executable, "-m", "sandkeep", "serve", "--help"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`sandkeep serve --help` did not run: {exc}"
    if out.returncode != 0:
        return f"`sandkeep serve --help` exited {out.returncode}: {(out.stderr or out.stdout)[-300:]}"
    return None


def _parse_at(value: str | None) -> float | None:
    if not value:
        return None
    when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass
class Env:
    api: str
    token: str
    host_url: str
    host_token: str
    serve: Proc
    own_host: HostHandle | None
    startup: float  # seconds from spawning serve to its first /healthz 200


def _start(root: Path, cfg: RecoveryConfig) -> Env:
    data_dir = root / "serve"
    env = {"SANDKEEP_HOME": str(data_dir), "SANDKEEP_INTERVAL_RUNNING": "30", "SANDKEEP_DETECT_POLL_INTERVAL": "1",
           "SANDKEEP_HOST_TOKEN": HOST_TOKEN, "SANDKEEP_LOG_LEVEL": "info"}
    for name in [n for n in os.environ if n.startswith(("SANDKEEP_", "FLY_"))]:
        os.environ.pop(name)  # a setting in the caller's shell must not redirect or retune the benchmark
    own_host: HostHandle | None = None
    host_port, proxy_port = free_port(), free_port()
    if cfg.profile != "none":
        own_host = start_host_process(root / "host", token=HOST_TOKEN,
                                      extra_args=["--profile", cfg.profile, "--log-level", "warning"])
        env["SANDKEEP_HOST_URL"] = own_host.url
        env["SANDKEEP_HOST_PROXY_URL"] = own_host.proxy_url
        host_url = own_host.url
    else:
        host_url = f"http://127.0.0.1:{host_port}"
    try:
        return _start_serve(root, data_dir, env, host_url, host_port, proxy_port, own_host)
    except BaseException:
        if own_host is not None:
            own_host.proc.stop()
        raise


def _start_serve(root: Path, data_dir: Path, env: dict[str, str], host_url: str, host_port: int, proxy_port: int,
                 own_host: HostHandle | None) -> Env:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    serve = spawn(["serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                   "--host-listen", f"127.0.0.1:{host_port}", "--host-proxy-listen", f"127.0.0.1:{proxy_port}",
                   "--no-login-links"], log_path=root / "serve.log", env=env)
    deadline = time.monotonic() + 60
    while True:
        if serve.popen.poll() is not None:
            raise BenchError(f"serve exited with {serve.popen.returncode}: {serve.log()[-1500:]}")
        try:
            if httpx.get(f"{api}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            serve.stop(signal.SIGKILL)
            raise BenchError(f"serve did not answer /healthz within 60s: {serve.log()[-1500:]}")
        time.sleep(0.1)  # start-up poll of a child process (not test synchronisation)
    startup = time.perf_counter() - t0
    full_env = dict(os.environ)
    full_env.update(env)
    out = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "bench", "--role", "admin",
                          "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60, env=full_env)
    if out.returncode != 0 or not out.stdout.strip():
        serve.stop()
        raise BenchError(f"`sandkeep token` failed ({out.returncode}): {out.stderr[-500:]}")
    token = out.stdout.strip().splitlines()[-1].strip()
    return Env(api=api, token=token, host_url=host_url, host_token=HOST_TOKEN, serve=serve, own_host=own_host,
               startup=startup)


class Api:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.http = httpx.AsyncClient(base_url=env.api, headers={"Authorization": f"Bearer {env.token}"},
                                      timeout=60.0)
        self.host = httpx.AsyncClient(base_url=env.host_url, headers={"Authorization": f"Bearer {env.host_token}"},
                                      timeout=30.0)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.host.aclose()

    async def ok(self, resp: httpx.Response, *codes: int) -> Any:
        if resp.status_code not in codes:
            raise BenchError(f"{resp.request.method} {resp.request.url.path} answered {resp.status_code}: "
                             f"{resp.text[:300]}")
        return resp.json() if resp.content and resp.headers.get("content-type", "").startswith(
            "application/json") else resp.content

    async def instance(self, iid: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.ok(await self.http.get(f"/v1/instances/{iid}"), 200)
        return data

    async def events(self, iid: str) -> list[dict[str, Any]]:
        data = await self.ok(await self.http.get(f"/v1/instances/{iid}/events", params={"limit": 200}), 200)
        items: list[dict[str, Any]] = data["items"]
        return items

    async def host_seq(self) -> int:
        data = await self.ok(await self.host.get("/_local/watch", params={"since": 0, "timeout": 0}), 200)
        return int(data["seq"])

    async def host_events(self, since: int) -> list[dict[str, Any]]:
        data = await self.ok(await self.host.get("/_local/watch", params={"since": since, "timeout": 0}), 200)
        events: list[dict[str, Any]] = data["events"]
        return events


async def _wait_status(api: Api, iid: str, want: str, *, timeout: float, avoid: tuple[str, ...] = ("stopped",),
                       machine_not: str | None = None) -> tuple[float, dict[str, Any]]:
    """Poll until the instance has ``want`` (and a machine other than ``machine_not``); (perf time, record)."""

    async def check() -> tuple[float, dict[str, Any]] | None:
        inst = await api.instance(iid)
        if inst["status"] == want and (machine_not is None or inst.get("machine_id") != machine_not):
            return time.perf_counter(), inst
        if inst["status"] in avoid:
            err = (inst.get("recovery") or {}).get("last_error")
            raise BenchError(f"instance {iid} went {inst['status']} while waiting for {want} (error: {err})")
        return None

    return await poll_until(check, timeout=timeout, interval=POLL, what=f"instance {iid} -> {want}")


async def _provision(api: Api, section: Section, n: int, data: bytes, deadline: Deadline) -> list[str]:
    ids: list[str] = []
    for i in range(n):
        deadline.check()
        t0 = time.perf_counter()
        created = await api.ok(await api.http.post("/v1/instances", json={"user_id": f"bench-u{i}"}), 201, 202)
        section.timing("provision: POST /v1/instances (API answer)").add(time.perf_counter() - t0)
        iid = str(created["id"])
        t_run, inst = await _wait_status(api, iid, "running", timeout=min(120.0, deadline.remaining()))
        section.timing("provision: POST -> running (polled)").add(t_run - t0)
        created_at, started_at = _parse_at(inst.get("created_at")), _parse_at(inst.get("last_started_at"))
        if created_at is not None and started_at is not None:
            section.timing("provision: created_at -> last_started_at (server times)").add(started_at - created_at)
        async with section.ameasure(f"PUT {len(data) // mib(1)} MiB via API gateway route"):
            await api.ok(await api.http.put(f"/v1/instances/{iid}/gateway/data/bench-blob", content=data), 200, 201)
        ids.append(iid)
    return ids


async def _api_route(api: Api, section: Section, iid: str, requests: int, deadline: Deadline) -> None:
    body = payload(1024, seed=3)
    await api.ok(await api.http.put(f"/v1/instances/{iid}/gateway/data/small", content=body), 200, 201)
    start = time.perf_counter()
    for _ in range(requests):
        deadline.check()
        t0 = time.perf_counter()
        got = await api.ok(await api.http.get(f"/v1/instances/{iid}/gateway/data/small"), 200)
        section.timing("GET 1 KiB via API gateway route (auth + store + host proxy)").add(time.perf_counter() - t0)
        if got != body:
            raise BenchError("API gateway route returned different bytes")
    section.fact(f"API gateway route, 1 client, {requests} GETs", f"{requests / (time.perf_counter() - start):.0f} "
                 "req/s")


@dataclass
class Crash:
    iid: str
    app: str
    machine_id: str
    region: str
    wall: float  # time.time() just before the crash request
    perf: float
    seq: int


async def _crash(api: Api, iid: str) -> Crash:
    inst = await api.instance(iid)
    if inst["status"] != "running" or not inst.get("machine_id"):
        raise BenchError(f"instance {iid} is {inst['status']} before the crash")
    seq = await api.host_seq()
    wall, perf = time.time(), time.perf_counter()
    await api.ok(await api.host.post(f"/_local/apps/{inst['app_name']}/machines/{inst['machine_id']}/crash"), 200)
    return Crash(iid=iid, app=inst["app_name"], machine_id=inst["machine_id"], region=inst["region"], wall=wall,
                 perf=perf, seq=seq)


async def _follow(api: Api, crash: Crash, section: Section, label: str, deadline: Deadline) -> dict[str, Any]:
    """Poll one crashed instance through recovering to running; record polled figures."""
    saw_recovering: float | None = None

    async def check() -> tuple[float, dict[str, Any]] | None:
        nonlocal saw_recovering
        inst = await api.instance(crash.iid)
        now = time.perf_counter()
        if inst["status"] == "recovering" and saw_recovering is None:
            saw_recovering = now
        if inst["status"] == "running" and inst.get("machine_id") not in (None, crash.machine_id):
            return now, inst
        if inst["status"] == "stopped":
            err = (inst.get("recovery") or {}).get("last_error")
            raise BenchError(f"instance {crash.iid} recovery ended stopped: {err}")
        return None

    t_run, inst = await poll_until(check, timeout=min(180.0, max(1.0, deadline.remaining())), interval=POLL,
                                   what=f"recovery of {crash.iid}")
    if saw_recovering is not None:
        section.timing(f"{label}: crash -> recovering (polled)").add(saw_recovering - crash.perf)
    section.timing(f"{label}: crash -> running (polled)").add(t_run - crash.perf)
    return inst


async def _event_figures(api: Api, crash: Crash, section: Section, label: str) -> None:
    events = await api.events(crash.iid)
    since = [e for e in events if (_parse_at(e.get("at")) or 0) >= crash.wall - 0.001]
    started = next((e for e in reversed(since) if e["event"] == _STARTED), None)
    done = next((e for e in reversed(since) if e["event"] == _SUCCEEDED), None)
    failed = next((e for e in since if e["event"] == _FAILED), None)
    if failed is not None:
        raise BenchError(f"recovery of {crash.iid} failed: {failed.get('error')}")
    if started is None or done is None:
        names = [e["event"] for e in since]
        raise BenchError(f"recovery events missing for {crash.iid}; events since the crash: {names}")
    t_started, t_done = _parse_at(started["at"]), _parse_at(done["at"])
    assert t_started is not None and t_done is not None
    section.timing(f"{label}: detection latency, crash -> recovering (event)").add(t_started - crash.wall)
    section.timing(f"{label}: time to running, crash -> running (event)").add(t_done - crash.wall)
    if done.get("duration_ms") is not None:
        section.timing(f"{label}: recovery duration, recovering -> running (engine)").add(done["duration_ms"] / 1000)
    exits = [e for e in await api.host_events(crash.seq)
             if e.get("machine_id") == crash.machine_id and e.get("type") == "exit"]
    at = _parse_at(exits[0].get("at")) if exits else None
    if at is not None:
        section.timing(f"{label}: crash -> host records the exit").add(at - crash.wall)
    if not any(n.startswith(f"Timeline ({label},") for n in section.notes):
        steps = []
        for e in reversed(since):
            t = _parse_at(e.get("at"))
            extra = e.get("label") or e.get("region") or ""
            steps.append(f"+{(t or crash.wall) - crash.wall:.3f}s {e['event']}" + (f" [{extra}]" if extra else ""))
        section.notes.append(f"Timeline ({label}, first instance, offsets from the crash request): "
                             + "; ".join(steps))


async def _verify(api: Api, crash: Crash, inst: dict[str, Any], data: bytes) -> tuple[bool, bool]:
    got = await api.ok(await api.http.get(f"/v1/instances/{crash.iid}/gateway/data/bench-blob"), 200)
    return sha256(got) == sha256(data), inst.get("region") != crash.region


async def _measure(env: Env, cfg: RecoveryConfig, section: Section) -> None:
    deadline = Deadline(cfg.budget, section.name)
    api = Api(env)
    data = payload(mib(cfg.data_mib), seed=42)
    intact = relocated = total = 0
    try:
        ids = await _provision(api, section, cfg.instances, data, deadline)
        await _api_route(api, section, ids[0], cfg.api_route_requests if cfg.profile == "none" else 20, deadline)
        label = "one at a time"
        for iid in ids:
            deadline.check()
            crash = await _crash(api, iid)
            inst = await _follow(api, crash, section, label, deadline)
            await _event_figures(api, crash, section, label)
            ok, moved = await _verify(api, crash, inst, data)
            total, intact, relocated = total + 1, intact + ok, relocated + moved
        if cfg.concurrent_round and len(ids) > 1:
            label = f"{len(ids)} at once"
            crashes = [await _crash(api, iid) for iid in ids]
            insts = await asyncio.gather(*(_follow(api, c, section, label, deadline) for c in crashes))
            for crash, inst in zip(crashes, insts, strict=True):
                await _event_figures(api, crash, section, label)
                ok, moved = await _verify(api, crash, inst, data)
                total, intact, relocated = total + 1, intact + ok, relocated + moved
    finally:
        await api.aclose()
        section.fact("recoveries measured", str(total))
        section.fact(f"data intact after recovery ({cfg.data_mib} MiB, sha256 via the new machine)",
                     f"{intact}/{total}")
        section.fact("relocated to another region", f"{relocated}/{total}")
    if intact != total:
        raise BenchError(f"data did not survive {total - intact} of {total} recoveries")
    for key in ("one at a time: detection latency, crash -> recovering (event)",
                "one at a time: time to running, crash -> running (event)"):
        t = section.timings.get(key)
        if t and t.samples:
            section.fact(f"{key.split(': ', 1)[1]} median", fmt_seconds(t.stats()["median"]))


def run(cfg: RecoveryConfig, section: Section) -> None:
    why = serve_ready()
    if why:
        section.skipped = why
        return
    root = Path(tempfile.mkdtemp(prefix=f"sandkeep-bench-recovery-{cfg.profile}-"))
    env = _start(root, cfg)
    try:
        section.fact("serve start-up (spawn -> /healthz 200, includes migrations and the host child)",
                     fmt_seconds(env.startup))
        section.fact("instances", f"{cfg.instances} (each crashed once one at a time"
                     + (", then all at once)" if cfg.concurrent_round and cfg.instances > 1 else ")"))
        asyncio.run(_measure(env, cfg, section))
    except BenchError:
        section.notes.append("serve log tail: " + env.serve.log()[-800:].replace("\n", " ⏎ "))
        raise
    finally:
        env.serve.stop()
        if env.own_host is not None:
            env.own_host.proc.stop()
        shutil.rmtree(root, ignore_errors=True)
