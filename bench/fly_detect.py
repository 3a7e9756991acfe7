"""Detection on Fly at fleet scale: ``python -m bench.fly_detect --n 2000 [--mode beat|list]``.

Two processes on loopback:

* **sandkeep** (this process, the one measured): the real API app (uvicorn) and the real Engine on SQLite,
  seeded with N running instances (one app each, gateway tokens set), its Machines API client pointed at
  the machines process with the client's token bucket at ``--rate`` requests/s;
* **machines** (a child, ``--machines``): N machines and a fake Fly Machines API. Every API answer takes
  ``LATENCY`` (50 ms, a nearby region's round trip to api.machines.dev). In ``beat`` mode each machine holds a
  heartbeat stream to sandkeep (the gateway's contract, :mod:`sandkeep.gatewaybeat`; connections opened over
  the first seconds) and beats every ``--interval`` s.

After a warm-up the child kills ``--crashes`` machines one by one: alternately a **crash** (the machine is
``stopped`` with an unexpected exit event and its connection drops, like a killed process) and a **freeze**
(its host dies: the machine still reads ``started`` with ``host_status: unreachable``, its connection stays
open and silent). Measured in sandkeep:

* crash -> ``recovering`` (``recovery_started_at`` written by the pass the detection woke), for crashes;
* crash -> wake-up (the engine decides to reconcile the instance), for both kinds (a frozen machine's
  instance then follows the dead-host policy, which waits ``SANDKEEP_DEAD_HOST_GRACE`` before recovering);
* sandkeep's CPU (this process, all threads) while N machines beat and nothing fails, and provider calls.

``--mode list`` is today's detection: no beats; the detector lists every app each cycle. Alarms are set a
day ahead so routine reconciles do not compete with detection. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

LATENCY = 0.05
REGION = "iad"


# ---------------------------------------------------------------------------------------------- machines side


class Fleet:
    def __init__(self, machines: list[dict[str, str]]) -> None:
        self.by_id = {m["machine_id"]: m for m in machines}
        self.by_app = {m["app"]: m for m in machines}
        self.state: dict[str, str] = {m["machine_id"]: "started" for m in machines}
        self.host: dict[str, str] = {m["machine_id"]: "ok" for m in machines}
        self.calls = 0

    def machine(self, mid: str) -> dict[str, Any]:
        m = self.by_id[mid]
        return {"id": mid, "name": "m", "state": self.state[mid], "region": REGION, "instance_id": "x",
                "host_status": self.host[mid], "created_at": "2026-11-30T00:00:00Z",
                "config": {"image": "sandkeep/gateway", "env": {},
                           "mounts": [{"volume": m["volume_id"], "path": "/data", "name": "data"}],
                           "metadata": {}}}


def fake_fly(fleet: Fleet) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def answer(body: Any, status: int = 200) -> JSONResponse:
        fleet.calls += 1
        await asyncio.sleep(LATENCY)
        return JSONResponse(body, status_code=status)

    async def get_machine(request: Request) -> JSONResponse:
        mid = request.path_params["mid"]
        if mid not in fleet.by_id:
            return await answer({"error": "machine not found"}, 404)
        return await answer(fleet.machine(mid))

    async def list_machines(request: Request) -> JSONResponse:
        m = fleet.by_app.get(request.path_params["app"])
        return await answer([fleet.machine(m["machine_id"])] if m else [])

    async def events(request: Request) -> JSONResponse:
        mid = request.path_params["mid"]
        if fleet.state.get(mid) != "stopped":
            return await answer([])
        return await answer([{"id": "e1", "type": "exit", "status": "stopped", "source": "flyd",
                              "timestamp": int(time.time() * 1000),
                              "request": {"exit_event": {"requested_stop": False, "exit_code": 137}}}])

    async def volume(request: Request) -> JSONResponse:
        vid = request.path_params["vid"]
        owner = next((m for m in fleet.by_app.values() if m["volume_id"] == vid), None)
        return await answer({"id": vid, "name": "data", "state": "created", "region": REGION, "size_gb": 1,
                             "attached_machine_id": owner["machine_id"] if owner else None,
                             "host_status": "ok", "zone": "z1"})

    async def other(request: Request) -> JSONResponse:  # recovery steps: not part of detection
        return await answer({"error": "bench stub: not implemented"}, 501)

    return Starlette(routes=[
        Route("/v1/apps/{app}/machines/{mid}/events", events),
        Route("/v1/apps/{app}/machines/{mid}", get_machine),
        Route("/v1/apps/{app}/machines", list_machines),
        Route("/v1/apps/{app}/volumes/{vid}", volume),
        Route("/{path:path}", other, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ])


class Beater:
    """One machine's heartbeat stream (the gateway's contract over asyncio)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.silent = False
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self, delay: float) -> None:
        from sandkeep.gatewaybeat import BEAT_CHUNK

        await asyncio.sleep(delay)
        t = self.target
        while True:
            try:
                reader, writer = await asyncio.open_connection(t.host, t.port)
                self.writer = writer
                writer.write(t.request_head() + BEAT_CHUNK)
                await asyncio.sleep(random.uniform(0, t.interval))
                while True:
                    if not self.silent:
                        writer.write(BEAT_CHUNK)
                    await asyncio.sleep(t.interval)
                    if reader.at_eof():
                        break
            except OSError:
                await asyncio.sleep(t.interval)

    async def run_posts(self, delay: float) -> None:
        """The alternative: one plain POST per beat on a keep-alive connection (no stream)."""
        await asyncio.sleep(delay)
        t = self.target
        head = t.request_head().replace(b"?stream=true", b"").replace(b"Transfer-Encoding: chunked",
                                                                      b"Content-Length: 0")
        while True:
            try:
                reader, writer = await asyncio.open_connection(t.host, t.port)
                self.writer = writer
                await asyncio.sleep(random.uniform(0, t.interval))
                while True:
                    if not self.silent:
                        writer.write(head)
                        await reader.readuntil(b"\r\n\r\n")
                    await asyncio.sleep(t.interval)
            except (OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(t.interval)

    def crash(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.transport.abort()


async def machines_main(a: argparse.Namespace) -> None:
    import uvicorn

    from sandkeep.gatewaybeat import BeatTarget

    spec = a.spec_data
    fleet = Fleet(spec["machines"])
    server = uvicorn.Server(uvicorn.Config(fake_fly(fleet), host="127.0.0.1", port=a.fly_port, log_level="warning",
                                           lifespan="off", backlog=4096))
    serving = asyncio.create_task(server.serve())
    beaters: dict[str, Beater] = {}
    if a.mode == "beat":
        for i, m in enumerate(spec["machines"]):
            target = BeatTarget.from_env({"SANDKEEP_HEARTBEAT_URL": spec["beat_url"],
                                          "SANDKEEP_HEARTBEAT_INTERVAL": str(a.interval),
                                          "SANDKEEP_INSTANCE_ID": m["instance_id"],
                                          "SANDKEEP_GATEWAY_TOKEN": m["token"]})
            assert target is not None
            b = Beater(target)
            delay = a.ramp * i / max(1, len(spec["machines"]))
            b.task = asyncio.create_task(b.run_posts(delay) if a.transport == "post" else b.run(delay))
            beaters[m["machine_id"]] = b
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.sleep(a.warmup)
    rng = random.Random(7)
    victims = rng.sample(list(fleet.by_id), a.crashes)
    log = []
    for k, mid in enumerate(victims):
        kind = "crash" if k % 2 == 0 or a.mode == "list" else "freeze"
        if kind == "crash":
            fleet.state[mid] = "stopped"
            if mid in beaters:
                beaters[mid].crash()
        else:
            fleet.host[mid] = "unreachable"
            if mid in beaters:
                beaters[mid].silent = True
        log.append({"instance_id": fleet.by_id[mid]["instance_id"], "kind": kind, "at": time.time()})
        await asyncio.sleep(a.crash_every)
    print(json.dumps({"crashes": log, "api_calls": fleet.calls}), flush=True)
    await asyncio.sleep(3600)
    serving.cancel()


# ---------------------------------------------------------------------------------------------- sandkeep side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(store: Any, box: Any, n: int, now: datetime) -> list[dict[str, str]]:
    from sandkeep.store import sql
    from sandkeep.store.records import InstanceRecord, Status

    machines = []
    rows = []
    day = now + timedelta(days=1)
    for i in range(n):
        token = f"tok-{i:07d}-" + os.urandom(8).hex()
        r = InstanceRecord(
            id=f"ins_f{i:07d}", user_id=f"u{i}", sandbox_id=f"sbx_f{i:07d}", status=Status.RUNNING,
            created_at=now, updated_at=now, app_name=f"sk-app{i:07d}", machine_id=f"m{i:07d}",
            volume_id=f"vol_{i:07d}", region=REGION, status_changed_at=now - timedelta(hours=1),
            last_started_at=now - timedelta(hours=1), alarm_at=day, gateway_token_encrypted=box.encrypt(token))
        rows.append(sql._instance_row(r))
        machines.append({"instance_id": r.id, "app": r.app_name, "machine_id": r.machine_id or "",
                         "volume_id": r.volume_id or "", "token": token})
    with store.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(sql.insert(sql.instances), rows[i:i + 1000])
    return machines


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def sandkeep_main(a: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    from sandkeep.api.app import create_app
    from sandkeep.clock import SystemClock
    from sandkeep.config import Settings
    from sandkeep.credentials import Credentials
    from sandkeep.engine.runtime import Engine
    from sandkeep.logs import configure_logging
    from sandkeep.provider.client import MachinesClient
    from sandkeep.runtime import Runtime
    from sandkeep.secrets import SecretBox
    from sandkeep.store.sql import open_store

    configure_logging("warning")
    tmp = Path(tempfile.mkdtemp(prefix="skfly-"))
    clock = SystemClock()
    store = open_store(f"sqlite:///{tmp}/bench.db", clock)
    key = SecretBox.generate_key()
    api_port, fly_port = free_port(), free_port()
    machines = seed(store, SecretBox(key), a.n, clock.now())
    beat_url = f"http://127.0.0.1:{api_port}" if a.mode == "beat" else "off"
    (tmp / "spec.json").write_text(json.dumps({"machines": machines,
                                               "beat_url": beat_url + "/v1/gateway/heartbeat"}))
    settings = Settings(home=tmp, secrets_key=key, provider="fly", fly_regions=REGION, heartbeat_url=beat_url,
                        heartbeat_interval=a.interval, heartbeat_timeout=a.timeout, provider_rate_limit=a.rate,
                        detect_poll_interval=2.0, interval_running=86400.0, inventory_interval=0.0,
                        snapshot_interval=0.0)

    class Prober:
        async def probe(self, *args: Any, **kw: Any) -> bool:
            return True

        async def aclose(self) -> None:
            return None

    provider = MachinesClient(f"http://127.0.0.1:{fly_port}", "bench", clock=clock, rate_limit=a.rate,
                              max_attempts=2, backoff_max=1.0)
    engine = Engine(settings, store, provider, clock, worker_id="bench", prober=Prober())
    woke: dict[str, float] = {}
    inner = engine.wake

    def wake(instance_id: str) -> None:
        woke.setdefault(instance_id, time.time())
        inner(instance_id)

    engine.detector.wake = wake
    if engine.monitor is not None:
        engine.monitor.wake = wake
    runtime = Runtime(settings=settings, clock=clock, service=engine.service, jwt_secret="x" * 40, data_dir=tmp,
                      base_url=beat_url, store=store, provider=provider, engine=engine,
                      credentials=Credentials(store, "x" * 40, clock))
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=api_port,
                                           log_level="warning", lifespan="off", backlog=4096,
                                           timeout_keep_alive=3600))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
        await asyncio.sleep(0.05)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fly_detect", "--machines", "--spec", str(tmp / "spec.json"),
        "--fly-port", str(fly_port), "--mode", a.mode, "--interval", str(a.interval),
        "--warmup", str(a.warmup), "--crashes", str(a.crashes), "--crash-every", str(a.crash_every),
        "--ramp", str(a.ramp), "--transport", a.transport, stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    await child.stdout.readline()  # ready
    await engine.start()
    t0 = time.monotonic()
    # steady state: every machine beating (after the ramp), nothing failing
    await asyncio.sleep(min(a.warmup - 2, a.ramp + 10.0))
    calls0 = _provider_calls()
    cpu0, w0, flush0 = time.process_time(), time.monotonic(), engine.heartbeats.flush_cpu
    window = max(5.0, a.warmup - (time.monotonic() - t0) - 1.0)
    profile = None
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    await asyncio.sleep(window)
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["BENCH_PROFILE"])
    steady_cpu = (time.process_time() - cpu0) / (time.monotonic() - w0)
    flush_cpu = (engine.heartbeats.flush_cpu - flush0) / (time.monotonic() - w0)
    steady_calls = (_provider_calls() - calls0) / (time.monotonic() - w0)
    line = await asyncio.wait_for(child.stdout.readline(), timeout=a.crashes * a.crash_every + a.warmup + 60)
    crashes = json.loads(line)["crashes"]
    deadline = time.monotonic() + a.settle
    ids = [c["instance_id"] for c in crashes]
    while time.monotonic() < deadline and not all(i in woke for i in ids):  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # the woken passes write recovering
    started: dict[str, datetime] = {}
    for i in ids:  # when the woken pass decided to recover (its event; the recovery itself fails on this stub)
        page = store.list_events(instance_id=i, name="instance.unexpected_stop_recovery_started", limit=10)
        if page.items:
            started[i] = min(e.at for e in page.items)
    to_wake = {"crash": [], "freeze": []}  # type: dict[str, list[float]]
    to_recovering: list[float] = []
    missed = 0
    for c in crashes:
        if c["instance_id"] not in woke:
            missed += 1
            continue
        to_wake[c["kind"]].append(woke[c["instance_id"]] - c["at"])
        rs = started.get(c["instance_id"])
        if c["kind"] == "crash" and rs is not None:
            to_recovering.append(rs.timestamp() - c["at"])
    beats = engine.heartbeats.written
    beat_results = _samples("sandkeep_gateway_heartbeats", "result")
    http_status = _samples("sandkeep_http_requests", "status")
    child.kill()
    await child.wait()
    server.should_exit = True
    await engine.stop()
    await serving
    await provider.aclose()
    store.close()
    return {"mode": a.mode, "transport": a.transport if a.mode == "beat" else None, "n": a.n,
            "interval": a.interval, "timeout": a.timeout, "rate_limit": a.rate,
            "latency": LATENCY, "crashes": len(crashes), "not_detected": missed,
            "crash_to_recovering_p50": pct(to_recovering, 0.5), "crash_to_recovering_p99": pct(to_recovering, 0.99),
            "crash_to_wake_p99": pct(to_wake["crash"], 0.99), "freeze_to_wake_p50": pct(to_wake["freeze"], 0.5),
            "freeze_to_wake_p99": pct(to_wake["freeze"], 0.99), "freeze_to_wake_max": pct(to_wake["freeze"], 1.0),
            "steady_cpu_fraction": round(steady_cpu, 3), "flush_cpu_fraction": round(flush_cpu, 3),
            "steady_provider_calls_per_s": round(steady_calls, 2),
            "beats_written": beats, "beat_results": beat_results, "http_status": http_status}


def _samples(name: str, label: str) -> dict[str, float]:
    from sandkeep import metrics

    out: dict[str, float] = {}
    for family in metrics.REGISTRY.collect():
        if family.name == name:
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels.get(label, "")] = out.get(s.labels.get(label, ""), 0) + s.value
    return out


def _provider_calls() -> float:
    from sandkeep import metrics

    total = 0.0
    for family in metrics.REGISTRY.collect():
        if family.name == "sandkeep_provider_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--machines", action="store_true", help="(internal) run the machines side")
    p.add_argument("--spec", default="")
    p.add_argument("--fly-port", type=int, default=0)
    p.add_argument("--mode", default="beat", choices=["beat", "list"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--transport", default="stream", choices=["stream", "post"],
                   help="beats on one stream per machine, or one plain POST per beat")
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=25.0)
    p.add_argument("--rate", type=float, default=20.0, help="the client's Machines API token bucket (req/s)")
    p.add_argument("--warmup", type=float, default=40.0)
    p.add_argument("--ramp", type=float, default=15.0, help="seconds over which machines open their streams")
    p.add_argument("--crashes", type=int, default=40)
    p.add_argument("--crash-every", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=60.0, help="how long to wait for the last detections")
    a = p.parse_args()
    if a.machines:
        a.spec_data = json.loads(Path(a.spec).read_text())
        asyncio.run(machines_main(a))
        return
    print(json.dumps(asyncio.run(sandkeep_main(a))))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
