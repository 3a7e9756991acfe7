"""An in-memory MachineProvider for engine unit tests (Fly-like semantics, scriptable faults)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sandkeep.clock import Clock, FakeClock, utc_iso
from sandkeep.gateway import TOKEN_ENV as GATEWAY_TOKEN_ENV
from sandkeep.provider.errors import (
    CapacityError,
    ConflictError,
    HostUnavailableError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    WaitTimeoutError,
)
from sandkeep.provider.models import App, Guest, Machine, MachineConfig, MachineEvent, Volume, VolumeSnapshot


@dataclass
class FakeMachine:
    id: str
    app: str
    name: str | None
    region: str
    config: MachineConfig
    state: str
    events: list[MachineEvent] = field(default_factory=list)


@dataclass
class FakeVolume:
    id: str
    app: str
    name: str
    region: str
    size_gb: int
    data: dict[str, str] = field(default_factory=dict)
    attached_machine_id: str | None = None
    host_status: str = "ok"
    created_at: str = ""


class FakeProvider:
    """Machines boot according to ``boot``: "instant" (create/start -> started), "slow" (stay 'starting' until
    :meth:`finish_boot`), "fail" (-> failed). ``fail`` maps an operation name to errors raised by its next
    calls. ``no_capacity`` lists regions that refuse volume creation."""

    def __init__(self, clock: Clock | None = None, regions: Sequence[str] = ("lcl-a", "lcl-b", "lcl-c")) -> None:
        self.clock = clock or FakeClock()
        self.regions = list(regions)
        self.apps: set[str] = set()
        self.machines: dict[str, FakeMachine] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.snapshots: dict[str, list[VolumeSnapshot]] = {}
        self.boot = "instant"
        self.fail: dict[str, list[ProviderError]] = {}
        self.no_capacity: set[str] = set()
        self.unreachable: set[str] = set()
        self.calls: list[tuple[str, Any]] = []
        self._ids = itertools.count(1)
        self.is_local = False
        self.supports_watch = False

    # ------------------------------------------------------------------ test helpers

    def _next(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):04d}"

    def _check(self, op: str) -> None:
        self.calls.append((op, None))
        queue = self.fail.get(op)
        if queue:
            raise queue.pop(0)

    def fail_next(self, op: str, *errors: ProviderError) -> None:
        self.fail.setdefault(op, []).extend(errors)

    def _event(self, m: FakeMachine, type_: str, *, requested: bool | None = None, code: int | None = None) -> None:
        request = None
        if type_ == "exit":
            request = {"exit_event": {"exit_code": code, "requested_stop": requested}}
        m.events.insert(0, MachineEvent(type=type_, status=m.state, source="flyd",
                                        timestamp=int(self.clock.now().timestamp() * 1000), request=request))

    def crash(self, machine_id: str) -> None:
        m = self.machines[machine_id]
        m.state = "stopped"
        self._event(m, "exit", requested=False, code=137)

    def set_state(self, machine_id: str, state: str) -> None:
        self.machines[machine_id].state = state

    def finish_boot(self, machine_id: str) -> None:
        self.machines[machine_id].state = "started"

    def started_machines(self, app: str | None = None) -> list[FakeMachine]:
        return [m for m in self.machines.values() if m.state == "started" and (app is None or m.app == app)]

    def live_volumes(self) -> list[FakeVolume]:
        return list(self.volumes.values())

    def _boot(self, m: FakeMachine) -> None:
        m.state = {"instant": "started", "slow": "starting", "fail": "failed"}[self.boot]
        self._event(m, "start")

    # ------------------------------------------------------------------ apps

    async def create_app(self, app_name: str, org_slug: str) -> App:
        self._check("create_app")
        self.apps.add(app_name)
        return App(name=app_name)

    async def get_app(self, app_name: str) -> App:
        self._check("get_app")
        if app_name not in self.apps:
            raise NotFoundError(f"app not found: {app_name}", status=404)
        return App(name=app_name)

    async def ensure_app(self, app_name: str, org_slug: str) -> App:
        self._check("ensure_app")
        self.apps.add(app_name)
        return App(name=app_name)

    def _app(self, app: str) -> None:
        if app not in self.apps:
            raise NotFoundError(f"app not found: {app}", status=404)

    # ------------------------------------------------------------------ machines

    def _view(self, m: FakeMachine) -> Machine:
        return Machine(id=m.id, name=m.name, state=m.state, region=m.region, config=m.config.model_copy(deep=True),
                       events=list(m.events))

    def _machine(self, app: str, machine_id: str) -> FakeMachine:
        self._app(app)
        m = self.machines.get(machine_id)
        if m is None or m.app != app:
            raise NotFoundError(f"machine not found: {machine_id}", status=404)
        return m

    async def create_machine(self, app_name: str, *, config: MachineConfig, name: str | None = None,
                             region: str | None = None, skip_launch: bool = False) -> Machine:
        self._check("create_machine")
        self._app(app_name)
        vol_id = config.mounts[0].volume if config.mounts else None
        if vol_id is not None:
            v = self.volumes.get(vol_id)
            if v is None:
                raise MissingVolumeError(f"volume {vol_id} not found", status=404)
            if v.attached_machine_id and self.machines[v.attached_machine_id].state != "destroyed":
                raise InvalidRequestError(f"volume {vol_id} is already attached", status=422)
            region = v.region
        m = FakeMachine(id=self._next("m"), app=app_name, name=name, region=region or self.regions[0],
                        config=config.model_copy(deep=True), state="created")
        self.machines[m.id] = m
        if vol_id is not None:
            self.volumes[vol_id].attached_machine_id = m.id
        self.calls.append(("created_machine", m.id))
        if not skip_launch:
            self._boot(m)
        return self._view(m)

    async def get_machine(self, app_name: str, machine_id: str) -> Machine:
        self._check("get_machine")
        return self._view(self._machine(app_name, machine_id))

    async def list_machines(self, app_name: str, *, metadata: dict[str, str] | None = None,
                            region: str | None = None, include_deleted: bool = False) -> list[Machine]:
        self._check("list_machines")
        self._app(app_name)
        out = []
        for m in self.machines.values():
            if m.app != app_name or (m.state == "destroyed" and not include_deleted):
                continue
            if any(m.config.metadata.get(k) != v for k, v in (metadata or {}).items()):
                continue
            out.append(self._view(m))
        return out

    async def update_machine(self, app_name: str, machine_id: str, *, config: MachineConfig,
                             skip_launch: bool = False) -> Machine:
        self._check("update_machine")
        m = self._machine(app_name, machine_id)
        for v in self.volumes.values():
            if v.attached_machine_id == m.id:
                v.attached_machine_id = None
        for mount in config.mounts:
            if mount.volume in self.volumes:
                self.volumes[mount.volume].attached_machine_id = m.id
        m.config = config.model_copy(deep=True)
        if not skip_launch and m.state in ("started", "stopped", "created", "failed", "suspended"):
            self._boot(m)  # as on Fly: an update (re)launches the machine unless skip_launch
        return self._view(m)

    async def start_machine(self, app_name: str, machine_id: str) -> None:
        self._check("start_machine")
        m = self._machine(app_name, machine_id)
        if m.state in ("starting", "started"):  # as Fly answers a start of a machine already on its way up
            raise ConflictError(f"unable to start machine from current state: '{m.state}'", status=412)
        if m.state in ("stopped", "created", "failed", "suspended"):
            self._boot(m)

    async def stop_machine(self, app_name: str, machine_id: str) -> None:
        self._check("stop_machine")
        m = self._machine(app_name, machine_id)
        if m.state in ("started", "starting"):
            m.state = "stopped"
            self._event(m, "exit", requested=True, code=0)

    async def restart_machine(self, app_name: str, machine_id: str) -> None:
        self._check("restart_machine")
        m = self._machine(app_name, machine_id)
        self._boot(m)

    async def destroy_machine(self, app_name: str, machine_id: str, *, force: bool = True,
                              missing_ok: bool = True) -> None:
        self._check("destroy_machine")
        try:
            m = self._machine(app_name, machine_id)
        except NotFoundError:
            if missing_ok:
                return
            raise
        m.state = "destroyed"
        for v in self.volumes.values():
            if v.attached_machine_id == m.id:
                v.attached_machine_id = None
        self.calls.append(("destroyed_machine", m.id))

    async def wait_machine(self, app_name: str, machine_id: str, *, state: str = "started", timeout: float = 60,
                           instance_id: str | None = None) -> None:
        self._check("wait_machine")
        m = self._machine(app_name, machine_id)
        if m.state != state:
            raise WaitTimeoutError(f"deadline_exceeded: machine failed to reach desired state, {state}, "
                                   f"currently {m.state}", status=408)

    async def list_machine_events(self, app_name: str, machine_id: str) -> list[MachineEvent]:
        return list(self._machine(app_name, machine_id).events)

    async def get_metadata(self, app_name: str, machine_id: str) -> dict[str, str]:
        return dict(self._machine(app_name, machine_id).config.metadata)

    async def set_metadata(self, app_name: str, machine_id: str, key: str, value: str) -> None:
        self._machine(app_name, machine_id).config.metadata[key] = value

    async def delete_metadata(self, app_name: str, machine_id: str, key: str) -> None:
        self._machine(app_name, machine_id).config.metadata.pop(key, None)

    # ------------------------------------------------------------------ volumes

    def _vview(self, v: FakeVolume) -> Volume:
        return Volume(id=v.id, name=v.name, state="created", region=v.region, size_gb=v.size_gb,
                      attached_machine_id=v.attached_machine_id, host_status=v.host_status, created_at=v.created_at)

    async def create_volume(self, app_name: str, *, name: str, region: str, size_gb: int | None = None,
                            source_volume_id: str | None = None, snapshot_id: str | None = None,
                            compute: Guest | None = None) -> Volume:
        self._check("create_volume")
        self._app(app_name)
        data: dict[str, str] = {}
        if source_volume_id:
            src = self.volumes.get(source_volume_id)
            if src is None:
                raise NotFoundError(f"source volume not found: {source_volume_id}", status=404)
            if src.host_status == "unreachable" or src.region in self.unreachable:
                raise HostUnavailableError(f"failed_precondition: cannot fork volume {src.id}: its host in region "
                                           f"{src.region} is unreachable (host_status: unreachable)", status=412)
            data = dict(src.data)
        if snapshot_id:
            snap = next((s for snaps in self.snapshots.values() for s in snaps if s.id == snapshot_id), None)
            if snap is None:
                raise NotFoundError(f"snapshot not found: {snapshot_id}", status=404)
            data = dict(getattr(snap, "data", {}) or {})
        if region in self.no_capacity:
            raise CapacityError(f"insufficient resources to create new volume in region {region}", status=412)
        v = FakeVolume(id=self._next("vol_"), app=app_name, name=name, region=region, size_gb=size_gb or 1,
                       data=data, created_at=utc_iso(self.clock.now()) or "")
        self.volumes[v.id] = v
        self.calls.append(("created_volume", (v.id, region, source_volume_id, snapshot_id)))
        return self._vview(v)

    async def create_volume_with_fallback(self, app_name: str, *, regions: Sequence[str], name: str,
                                          size_gb: int | None = None, source_volume_id: str | None = None,
                                          snapshot_id: str | None = None, compute: Guest | None = None) -> Volume:
        last: CapacityError | None = None
        for region in regions:
            try:
                return await self.create_volume(app_name, name=name, region=region, size_gb=size_gb,
                                                source_volume_id=source_volume_id, snapshot_id=snapshot_id,
                                                compute=compute)
            except CapacityError as exc:
                last = exc
        assert last is not None
        raise last

    async def get_volume(self, app_name: str, volume_id: str) -> Volume:
        self._check("get_volume")
        self._app(app_name)
        v = self.volumes.get(volume_id)
        if v is None or v.app != app_name:
            raise NotFoundError(f"volume not found: {volume_id}", status=404)
        return self._vview(v)

    async def list_volumes(self, app_name: str) -> list[Volume]:
        self._check("list_volumes")
        self._app(app_name)
        return [self._vview(v) for v in self.volumes.values() if v.app == app_name]

    async def delete_volume(self, app_name: str, volume_id: str, *, missing_ok: bool = True) -> None:
        self._check("delete_volume")
        v = self.volumes.get(volume_id)
        if v is None:
            if missing_ok:
                return
            raise NotFoundError(f"volume not found: {volume_id}", status=404)
        if v.attached_machine_id and self.machines[v.attached_machine_id].state != "destroyed":
            raise ConflictError(f"failed_precondition: volume is currently bound to machine: "
                                f"{v.attached_machine_id}", status=412)
        del self.volumes[volume_id]
        self.calls.append(("deleted_volume", volume_id))

    async def list_snapshots(self, app_name: str, volume_id: str) -> list[VolumeSnapshot]:
        self._check("list_snapshots")
        if volume_id not in self.volumes:
            raise NotFoundError(f"volume not found: {volume_id}", status=404)
        return list(self.snapshots.get(volume_id, []))

    async def create_snapshot(self, app_name: str, volume_id: str) -> VolumeSnapshot | None:
        v = self.volumes[volume_id]
        snap = VolumeSnapshot(id=self._next("vs_"), created_at=utc_iso(self.clock.now()), status="created",
                              data=dict(v.data))
        self.snapshots.setdefault(volume_id, []).append(snap)
        return snap

    # ------------------------------------------------------------------ traffic

    def proxy_target(self, app_name: str, machine_id: str) -> tuple[str, dict[str, str]]:
        return "http://fake-proxy.invalid", {"fly-force-instance-id": machine_id}

    async def aclose(self) -> None:
        return None


class FakeProber:
    """Healthy when the machine is started in the fake provider, unless listed in ``unhealthy``."""

    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        self.unhealthy: set[str] = set()
        self.probes = 0

    async def probe(self, app_name: str, machine_id: str, gateway_token: str | None = None) -> bool:
        self.probes += 1
        m = self.provider.machines.get(machine_id)
        if m is None or m.state != "started" or machine_id in self.unhealthy:
            return False
        # like the real gateway: a machine that was given a token answers only requests that carry it
        expected = (m.config.env or {}).get(GATEWAY_TOKEN_ENV)
        return expected is None or expected == gateway_token

    async def aclose(self) -> None:
        return None
