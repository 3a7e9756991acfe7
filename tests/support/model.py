"""The one provider model for engine and API tests (issue 10): the local host's Fly model with simulated machines,
served in process to sandkeep's real :class:`~sandkeep.provider.client.MachinesClient`, on the simulation's
virtual clock.

A test that uses a :class:`Model` runs on a :class:`~sandkeep.sim.loop.VirtualLoop` (see
:func:`loop_factories`, wired into the conftest of each folder that uses it): time moves only when every task
waits, straight to the next timer, so a 600 s boot delay or a 7-day retention costs no wall time, and
``await model.clock.sleep(s)`` lets exactly ``s`` simulated seconds pass with the host's own timers firing in
order. Faults are the host's fault rules (:class:`~sandkeep.host.faults.Faults`: 5xx, 429, 408, latency);
provider-side events (a crash, a machine destroyed or a volume lost behind sandkeep's back, a boot that fails)
go through the model, never through a second hand-written provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest

from sandkeep.engine.health import GatewayProber
from sandkeep.host.api import HostAPI, ProxyApp
from sandkeep.host.core import Host, HostOptions
from sandkeep.host.faults import Faults
from sandkeep.host.images import resolve
from sandkeep.host.inprocess import API_URL, PROXY_URL
from sandkeep.host.sim import SimRun
from sandkeep.provider.client import MachinesClient
from sandkeep.sim.loop import SimClock, VirtualLoop

JSON = dict[str, Any]
REGIONS = ("lcl-a", "lcl-b", "lcl-c")
#: the fixture names that put a test on the virtual loop (see :func:`loop_factories`)
MODEL_FIXTURES = frozenset({"model", "make_harness", "h", "real", "world", "sim_clock"})


class ModelLoop(VirtualLoop):
    """A :class:`VirtualLoop` that pytest-asyncio can close: its executor runs inline, so shutting it down
    needs no helper thread (the loop would see a wait with no timer as a deadlock)."""

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        executor = self._default_executor  # type: ignore[attr-defined]
        if executor is not None:
            executor.shutdown(wait=False)


def loop_factories(item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """For ``pytest_asyncio_loop_factories``: a test that uses the model runs on a :class:`ModelLoop`, any
    other on an ordinary event loop (real processes, sockets and sleeps need real time)."""
    names = set(getattr(item, "fixturenames", ()))
    if names & MODEL_FIXTURES:
        return {"virtual": ModelLoop}
    return {"asyncio": asyncio.new_event_loop}


@contextlib.contextmanager
def inline_threads() -> Iterator[None]:
    """Work the web framework hands to worker threads (``anyio.to_thread``: FastAPI's sync routes and
    dependencies) runs inline, as the virtual loop's own executor does: a real thread answering later would
    look like a deadlock (nothing ready, no timer) to a loop whose waits are virtual."""
    original = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, abandon_on_cancel: bool = False,
                       cancellable: bool | None = None, limiter: Any = None) -> Any:
        return func(*args)

    anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = original


_PROXY: list[ProxyApp] = []


def _sim_proxy(host: Host) -> httpx.ASGITransport:
    """The host's proxy (gateway traffic in process). Each :class:`ProxyApp` keeps an HTTP client for process
    machines, whose SSL context costs ~0.1 s to build; simulated machines never use it, so the models of a test
    process share one (a copy of one proxy app per host)."""
    if not _PROXY:
        _PROXY.append(ProxyApp(host))
    proxy = copy.copy(_PROXY[0])
    proxy.host = host
    return httpx.ASGITransport(app=proxy)


def virtual_clock() -> SimClock:
    """The :class:`SimClock` of the running :class:`ModelLoop` (call it inside a test or async fixture)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, ModelLoop), "a model test must run on the virtual loop (see loop_factories)"
    return SimClock(loop)


class Recorder:
    """ASGI middleware in front of the host's API: records every provider request as ``(method, path)``, and
    answers the refusals a test asked for (:meth:`Model.refuse`: a 4xx the host's fault rules do not inject,
    which only take 429, 408 and 5xx) instead of passing the request on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []
        self.refusals: list[list[Any]] = []  # [method, path suffix, status, message, count left]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            self.requests.append((method, path))
            for rule in self.refusals:
                if rule[4] > 0 and method == rule[0] and path.endswith(rule[1]):
                    rule[4] -= 1
                    body = json.dumps({"error": rule[3]}).encode()
                    await send({"type": "http.response.start", "status": rule[2],
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    def mutations(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]


class FlyClient(MachinesClient):
    """The real client as it is on Fly: no change stream (the local host's ``/_local/watch`` is not used), so an
    engine detects stops as it does on Fly (the per-app listing; with heartbeats, the paced backstop)."""

    @property
    def supports_watch(self) -> bool:
        return False


class Model:
    """The host model, its fault rules, a real client and a real gateway prober, on ``clock``.

    ``watch=False`` gives the client Fly's capabilities (:class:`FlyClient`: no change stream).

    ``boot`` decides how the machines launched from now on behave (the image's own behaviour on a simulated
    machine): ``"ok"``; ``"fail"`` (the process exits before it is ready: the machine ends ``failed``, as
    ``sandkeep/crashy`` does); ``"sick"`` (it boots, but its gateway answers ``/health`` with 503)."""

    def __init__(self, data_dir: Path, clock: SimClock, *, regions: tuple[str, ...] = REGIONS,
                 seed: int = 10, watch: bool = True) -> None:
        self.clock = clock
        self.host = Host(HostOptions(data_dir=data_dir, regions=list(regions), machines="sim", seed=seed,
                                     destroyed_retention=0.0, hosts_per_region=2), clock)
        self.host.load()
        self.faults = Faults(seed=seed)
        self.recorder = Recorder(HostAPI(self.host, "model-token", self.faults).app())
        client_class = MachinesClient if watch else FlyClient
        self.client = client_class(API_URL, "model-token", proxy_url=PROXY_URL, clock=clock,
                                   transport=httpx.ASGITransport(app=self.recorder),  # type: ignore[arg-type]
                                   rng=random.Random(f"client-{seed}"))
        proxy = _sim_proxy(self.host)
        self.prober = GatewayProber(self.client, transport=proxy)
        self.gateway = httpx.AsyncClient(base_url=PROXY_URL, transport=proxy)
        self.boot = "ok"
        launch = self.host.runner.launch

        async def launch_as_told(m: JSON, image: Any, env: dict[str, str], volume_dir: Path | None) -> Any:
            if self.boot == "fail":
                image = resolve("sandkeep/crashy")
            run = await launch(m, image, env, volume_dir)
            if self.boot == "sick" and isinstance(run, SimRun) and run.gateway is not None:
                async def sick(*_args: Any) -> tuple[int, str, bytes]:
                    return 503, "application/json", b'{"status": "unhealthy"}'
                run.gateway.handle = sick  # type: ignore[method-assign]
            return run

        self.host.runner.launch = launch_as_told  # type: ignore[method-assign]

    async def close(self) -> None:
        await self.gateway.aclose()
        await self.prober.aclose()
        await self.client.aclose()
        await self.host.shutdown()

    # ------------------------------------------------------------------ reading the model

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.recorder.requests

    def machine(self, machine_id: str | None) -> JSON:
        assert machine_id is not None
        return self.host.machines[machine_id]

    def state(self, machine_id: str | None) -> str:
        assert machine_id is not None
        m = self.host.machines.get(machine_id)
        return "gone" if m is None else str(m["state"])

    def config(self, machine_id: str | None) -> JSON:
        return dict(self.machine(machine_id)["config"])

    def mounted(self, machine_id: str | None) -> str | None:
        mounts = self.config(machine_id).get("mounts") or []
        return str(mounts[0]["volume"]) if mounts else None

    def machines(self, app: str | None = None) -> list[str]:
        """Machines that are not destroyed."""
        return [m["id"] for m in self.host.machines.values()
                if (app is None or m["app"] == app) and m["state"] not in ("destroyed", "destroying")]

    def started(self, app: str | None = None) -> list[str]:
        return [m["id"] for m in self.host.machines.values()
                if (app is None or m["app"] == app) and m["state"] == "started"]

    def volumes(self, app: str | None = None) -> set[str]:
        return {v["id"] for v in self.host.volumes.values() if app is None or v["app"] == app}

    def snapshots(self, volume_id: str | None) -> list[str]:
        return [s["id"] for s in self.host.snapshots.values() if s["volume_id"] == volume_id]

    def data(self, volume_id: str | None) -> dict[str, bytes]:
        """What the volume's gateway stored (``<volume>/data/<key>``)."""
        assert volume_id is not None
        root = self.host.volume_dir(self.host.volumes[volume_id]) / "data"
        return {p.name: p.read_bytes() for p in sorted(root.iterdir())} if root.is_dir() else {}

    def created(self, kind: str) -> int:
        """How many ``machines`` or ``volumes`` creates the client asked for."""
        return sum(1 for method, path in self.requests if method == "POST" and path.endswith(f"/{kind}"))

    # ------------------------------------------------------------------ provider-side events

    async def settle(self, machine_id: str | None, *states: str, within: float = 600.0) -> None:
        """Let simulated time pass until the machine is in one of ``states``."""
        deadline = self.clock.monotonic() + within
        while self.state(machine_id) not in states:
            assert self.clock.monotonic() < deadline, f"{machine_id} never reached {states}: {self.state(machine_id)}"
            await self.clock.sleep(0.05)

    async def crash(self, machine_id: str | None) -> None:
        """The machine's process dies (exit 137, not requested); returns once the host reports it stopped."""
        m = self.machine(machine_id)
        await self.host.crash_machine(m["app"], m["id"])
        await self.settle(m["id"], "stopped")

    async def fail(self, machine_id: str | None) -> None:
        """The machine crashes and its next boot fails: the host reports it ``failed``."""
        m = self.machine(machine_id)
        await self.crash(m["id"])
        boot, self.boot = self.boot, "fail"
        try:
            await self.host.start_machine(m["app"], m["id"])
            await self.settle(m["id"], "failed")
        finally:
            self.boot = boot

    async def start(self, machine_id: str | None) -> None:
        """Someone started the machine behind sandkeep's back."""
        m = self.machine(machine_id)
        await self.host.start_machine(m["app"], m["id"])
        await self.settle(m["id"], "started")

    async def stop(self, machine_id: str | None) -> None:
        m = self.machine(machine_id)
        await self.host.stop_machine(m["app"], m["id"])
        await self.settle(m["id"], "stopped")

    async def destroy(self, machine_id: str | None) -> None:
        """The machine is destroyed behind sandkeep's back (it answers 404 from now on)."""
        m = self.machine(machine_id)
        await self.host.destroy_machine(m["app"], m["id"], force=True)

    async def lose_volume(self, volume_id: str | None) -> None:
        """The provider loses the volume (its host's disk is gone): it answers 404 from now on."""
        assert volume_id is not None
        await self.host._remove_volume(self.host.volumes[volume_id])

    async def snapshot(self, volume_id: str | None) -> str:
        assert volume_id is not None
        v = self.host.volumes[volume_id]
        return str((await self.host.create_snapshot(v["app"], volume_id))["id"])

    def fail_next(self, operation: str, status: int = 503, *, count: int | None = None, **rule: Any) -> None:
        """Every matching request fails ``count`` times (by default as many as the client tries one call: the
        call fails) -- a host fault rule (:mod:`sandkeep.host.faults`)."""
        self.faults.configure({"operation": operation, "status": status,
                               "count": self.client.policy.max_attempts if count is None else count, **rule})

    def refuse(self, method: str, path_suffix: str, status: int, message: str, *, count: int = 1) -> None:
        """The next ``count`` ``method`` requests whose path ends with ``path_suffix`` are refused with ``status``
        (a Fly-shaped ``{"error": message}``) without reaching the host."""
        self.recorder.refusals.append([method, path_suffix, status, message, count])

    def no_capacity(self, *regions: str) -> None:
        for region in regions:
            self.host.set_capacity(region, False)

    def capacity_back(self) -> None:
        for region in self.host.regions:
            self.host.set_capacity(region, True)

    def unreachable(self, volume_id: str | None) -> None:
        """The host holding the volume dies (its machines freeze; forks of its volumes are refused)."""
        assert volume_id is not None
        self.host.kill_host(self.host.volumes[volume_id]["host"])

