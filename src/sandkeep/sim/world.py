"""The simulated world of one seed: the host model, the real provider client over in-process ASGI, the SQL
store and one or two real engines, all on one :class:`~sandkeep.sim.loop.SimClock`.

Everything random comes from the seed: the host's ids and placement, the fault draws, the client's and the
engine's jitter, the ids the engine mints (``secrets`` is seeded for the run) and the workload. The world
also watches: a recorder in front of the host's HTTP app sees every provider request and answer, hooks on the
model see every destroy and create, and a store wrapper per controller checks every fenced write.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from sandkeep.config import Settings
from sandkeep.engine.naming import METADATA_SANDBOX
from sandkeep.engine.policy import recovery_regions
from sandkeep.engine.runtime import Engine
from sandkeep.host.api import HostAPI
from sandkeep.host.core import Host, HostOptions
from sandkeep.host.faults import Faults
from sandkeep.host.inprocess import API_URL, PROXY_URL, proxy_transport
from sandkeep.provider.client import MachinesClient
from sandkeep.secrets import SecretBox
from sandkeep.sim.loop import SimClock
from sandkeep.store.base import Store, StoreError
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore, open_store

FOREIGN_PREFIX = "sbx_foreign"
_TEMPLATE_DB: dict[str, Path] = {}


def _scratch() -> str | None:
    """Memory-backed scratch space when there is some (the databases commit often; fsync is not the point)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class Violation:
    invariant: str
    at: float
    detail: str

    def line(self) -> str:
        return f"[{self.at:12.3f}] VIOLATION {self.invariant}: {self.detail}"


# ---------------------------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed what the engine mints with ``secrets`` (for one run). Time needs nothing here: every engine module
    paces itself on the injected clock (the world's :class:`SimClock`) and the event loop (virtual)."""
    rng = random.Random(f"secrets-{seed}")
    saved = {name: getattr(secrets, name) for name in ("token_hex", "token_urlsafe", "token_bytes")}
    secrets.token_bytes = lambda n=32: rng.randbytes(32 if n is None else n)  # type: ignore[assignment]
    secrets.token_hex = lambda n=32: rng.randbytes(32 if n is None else n).hex()  # type: ignore[assignment]
    secrets.token_urlsafe = lambda n=32: rng.randbytes(32 if n is None else n).hex()  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(secrets, name, fn)


# ---------------------------------------------------------------------------------------------- the store


class ControllerDown(StoreError):
    """The controller this store handle belongs to has crashed: nothing it does reaches the database."""


class SimStore:
    """One controller's handle on the shared store: dies with its controller, injects write failures, and
    checks the fence of every write that commits (SPEC §5: conditional on the lease owner and version read)."""

    WRITES = frozenset({"insert_instance", "claim", "claim_due", "renew", "update", "release", "add_event",
                        "add_audit"})

    def __init__(self, world: World, store: SqlStore, name: str) -> None:
        self._world = world
        self._store = store
        self.name = name
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target
        world = self._world

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise ControllerDown(f"controller {self.name} is down")
            if name in self.WRITES and world.db_fail_rate and world.rng_db.random() < world.db_fail_rate:
                world.note(f"db: {name} by {self.name} fails (injected)")
                raise StoreError(f"database write failed (injected by the simulation): {name}")
            if name in ("update", "renew"):
                record, owner = cast(InstanceRecord, args[0]), cast(str, args[1])
                before = self._store.get_instance(record.id)
                result = target(*args, **kwargs)
                if before is not None and (before.lease_owner != owner or before.version != record.version):
                    world.violate("fenced_write", f"{name} of {record.id} by {owner} at version {record.version} "
                                                  f"committed over lease {before.lease_owner!r} at version "
                                                  f"{before.version}")
                return result
            return target(*args, **kwargs)

        return call


# ---------------------------------------------------------------------------------------------- traffic


@dataclass
class Exchange:
    at: float
    method: str
    path: str
    body: Any
    status: int
    answer: str


#: for a machine create being executed: was its sandbox's instance already being destroyed (or destroyed) when the
#: request *arrived*? (A create asked before the destroy may execute after it: the provider took the request and
#: answered late -- the caller had given up on it. The engine did not re-create anything then.)
_CREATE_ASKED_DURING_DESTROY: ContextVar[bool | None] = ContextVar("sim_create_asked_during_destroy", default=None)


class Recorder:
    """ASGI middleware in front of the host's HTTP app: records what the provider client asked and got, and
    runs each request in a task of its own, so a controller cancelled mid-request (a crash) does not cancel the
    host's half of it -- like a real provider, the action goes on after the caller is gone."""

    def __init__(self, world: World, app: Any) -> None:
        self.world = world
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        out: dict[str, Any] = {"status": 0, "body": b""}
        early: list[dict[str, Any]] = []
        asked_during_destroy: bool | None = None
        if scope["method"] == "POST" and str(scope["path"]).endswith("/machines"):  # a machine create: read its
            while True:  # body now, to know whose it is when it arrives (replayed to the app below)
                msg = await receive()
                early.append(msg)
                if msg.get("type") != "http.request" or not msg.get("more_body", False):
                    break
            raw = b"".join(m.get("body", b"") for m in early if m.get("type") == "http.request")
            asked_during_destroy = self.world.destroying_now(raw)

        async def rcv() -> Any:
            msg = early.pop(0) if early else await receive()
            if msg.get("type") == "http.request":
                chunks.append(msg.get("body", b""))
            return msg

        async def snd(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                out["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                out["body"] += msg.get("body", b"")
            with contextlib.suppress(Exception):
                await send(msg)

        async def run() -> None:
            await self.app(scope, rcv, snd)
            raw = b"".join(chunks)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            self.world.observe(Exchange(self.world.t(), scope["method"], scope["path"], body, out["status"],
                                        out["body"][:300].decode("utf-8", "replace")))

        token = _CREATE_ASKED_DURING_DESTROY.set(asked_during_destroy)  # the request's task sees it, nothing else
        try:
            task = asyncio.get_running_loop().create_task(run())
        finally:
            _CREATE_ASKED_DURING_DESTROY.reset(token)
        await asyncio.shield(task)


class _WatchedProxy(httpx.AsyncBaseTransport):
    """The gateway transport the workload's traffic takes, watched: which machine does each request reach?"""

    def __init__(self, world: World, inner: httpx.AsyncBaseTransport) -> None:
        self.world = world
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        machine_id = request.headers.get("fly-force-instance-id")
        if machine_id:
            self.world.check_traffic(machine_id)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# ---------------------------------------------------------------------------------------------- controllers


@dataclass
class Controller:
    name: str
    engine: Engine
    store: SimStore
    started_at: float
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------- the world


class World:
    def __init__(self, seed: int, loop: asyncio.AbstractEventLoop, settings_changes: dict[str, Any],
                 *, regions: list[str], hosts_per_region: int = 2, snapshot_interval: float = 6 * 3600.0,
                 trace: bool = False) -> None:
        self.seed = seed
        self.loop = loop
        self.clock = SimClock(loop)
        self.rng_db = random.Random(f"db-{seed}")
        self.db_fail_rate = 0.0
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sandkeep-sim-{seed}-", dir=_scratch()))
        self.regions = regions
        self.trace: list[str] = []
        self.echo = trace
        self.violations: list[Violation] = []
        self.reported: set[tuple[str, str]] = set()
        key = SecretBox.generate_key()
        self.settings = Settings(**{"home": self.tmp / "home", "secrets_key": key, "regions": ",".join(regions),
                                    **settings_changes})
        self.host = Host(HostOptions(data_dir=self.tmp / "host", regions=regions, machines="sim", seed=seed,
                                     hosts_per_region=hosts_per_region, snapshot_interval=snapshot_interval,
                                     scheduler_tick=600.0, secrets_key=key,
                                     delays={"machine.create": 0.5, "machine.boot.first": 1.5, "machine.boot": 0.4,
                                             "machine.stop": 0.3, "volume.create": 1.0, "volume.fork": 3.0,
                                             "volume.restore": 3.0, "volume.snapshot": 0.5, "api": 0.05}),
                         self.clock)
        self.faults = Faults(seed=seed)
        self.api = HostAPI(self.host, "sim-token", self.faults)
        self.recorder = Recorder(self, self.api.app())
        self.client = MachinesClient(API_URL, "sim-token", proxy_url=PROXY_URL, clock=self.clock,
                                     transport=httpx.ASGITransport(app=self.recorder),  # type: ignore[arg-type]
                                     rng=random.Random(f"client-{seed}"))
        self.gateway = httpx.AsyncClient(base_url=PROXY_URL, transport=_WatchedProxy(self, proxy_transport(self.host)))
        self.sql = self._open_db()
        self.controllers: list[Controller] = []
        self.crashes: list[float] = []  # when a controller died (its leases outlive it by up to lease_ttl)
        self.no_controller_since: float | None = 0.0
        self.downtime = 0.0
        self.foreign: dict[str, str] = {}  # machine id -> the foreign sandbox it names (squatters)
        self.squatted: set[str] = set()  # volumes a squatter holds
        self.zombies: set[str] = set()  # machines frozen on a dead host while started
        self.destroyed_instances: dict[str, str] = {}  # sandbox id -> instance id, once finalized
        self.late_creates: dict[str, str] = {}  # machine id -> destroyed instance: a create asked before the destroy
        # (app, volume name) -> region -> capacity answers from it that no later step of a walk has used yet
        self.walks: dict[tuple[str, str], dict[str, int]] = {}
        # a deleted volume's lineage, kept after the provider forgot it: volume id -> (snapshot id, source volume id),
        # and snapshot id -> the volume it was taken of (recorded at a restore and when the volume is deleted)
        self.lineage: dict[str, tuple[str | None, str | None]] = {}
        self.snapshot_of: dict[str, str] = {}
        self.deleted_volumes: set[str] = set()  # every volume the provider deleted
        self.flagged_ever: dict[str, str] = {}  # volume id -> the instance that flagged it (SPEC 12.9)
        self.fenced_ever: dict[str, str] = {}  # machine id -> the instance that fenced it (SPEC 15)
        self._controller_seq = 0
        self._hook_model()

    # ------------------------------------------------------------------ set-up

    def _open_db(self) -> SqlStore:
        """An in-memory database, filled from a migrated template (migrating once per process, not once per
        seed): nothing of a seed's store touches a file, and the template copy is one sqlite3 backup."""
        template = _TEMPLATE_DB.get("sqlite")
        if template is None or not template.exists():
            template = Path(tempfile.mkdtemp(prefix="sandkeep-sim-template-", dir=_scratch())) / "template.db"
            open_store(f"sqlite:///{template}", self.clock).close()
            _TEMPLATE_DB["sqlite"] = template
        store = SqlStore("sqlite://", clock=self.clock)
        raw = store.engine.raw_connection()
        try:
            source = sqlite3.connect(template)
            try:
                source.backup(cast(sqlite3.Connection, raw.driver_connection))
            finally:
                source.close()
        finally:
            raw.close()
        return store

    def _hook_model(self) -> None:
        host = self.host
        destroy_machine, create_machine = host.destroy_machine, host.create_machine
        delete_volume, begin_start = host.delete_volume, host._begin_start

        async def destroy_hook(app: str, machine_id: str, *, force: bool, app_deleted: bool = False) -> None:
            m = host.machines.get(machine_id)
            owner = ((m or {}).get("config") or {}).get("metadata", {}).get(METADATA_SANDBOX) if m else None
            if machine_id in self.foreign and m is not None and m.get("state") != "destroyed":
                self.violate("foreign_destroy", f"machine {machine_id} whose metadata names sandbox {owner} "
                                                f"(not an instance of this app's) was destroyed")
            await destroy_machine(app, machine_id, force=force, app_deleted=app_deleted)

        async def create_hook(app: str, body: Any) -> Any:
            meta = ((body or {}).get("config") or {}).get("metadata") or {}
            sbx = meta.get(METADATA_SANDBOX)
            instance = self.destroyed_instances.get(sbx) if sbx else None
            if instance is None and sbx:
                rec = self._record_of(sbx)
                if rec is not None and rec.status == Status.DESTROYED:
                    instance = rec.id
            if instance is not None:
                if _CREATE_ASKED_DURING_DESTROY.get() is False:  # asked before the destroy began: late, not a bug
                    self.note(f"a create for {instance}, asked before its destroy, reaches the provider after it")
                    out = await create_machine(app, body)
                    mid = out.get("id") if isinstance(out, dict) else None
                    if mid:
                        self.late_creates[str(mid)] = instance
                    return out
                self.violate("recreated_after_destroy", f"machine created for sandbox {sbx} of destroyed instance "
                                                        f"{instance}")
            return await create_machine(app, body)

        async def delete_volume_hook(app: str, volume_id: str) -> Any:
            verdicts = self._volume_delete_verdicts(volume_id)
            self._remember_lineage(volume_id)
            out = await delete_volume(app, volume_id)
            self.deleted_volumes.add(volume_id)
            for name, detail in verdicts:
                self.violate(name, detail)
            return out

        def begin_start_hook(m: dict[str, Any]) -> None:
            self._check_start_volume(m)
            begin_start(m)

        host.destroy_machine = destroy_hook  # type: ignore[method-assign]
        host.create_machine = create_hook  # type: ignore[method-assign]
        host.delete_volume = delete_volume_hook  # type: ignore[method-assign]
        host._begin_start = begin_start_hook  # type: ignore[method-assign]

    # ------------------------------------------------------------------ volume and machine watches

    def note_records(self, recs: list[InstanceRecord]) -> None:
        """Remember every volume ever flagged and every machine ever fenced (the record may forget them)."""
        for rec in recs:
            for vid in rec.flagged_volume_ids:
                self.flagged_ever.setdefault(vid, rec.id)
            if rec.fenced_machine_id:
                self.fenced_ever.setdefault(rec.fenced_machine_id, rec.id)

    def _volume_delete_verdicts(self, volume_id: str) -> list[tuple[str, str]]:
        """SPEC 12.7 and 12.9 at the moment a volume is deleted: the current volume of an instance that is not
        recovering (a failed recovery's original) or destroyed, or a flagged old volume without an admin."""
        recs = self.records()
        self.note_records(recs)
        out: list[tuple[str, str]] = []
        for rec in recs:
            if rec.status in (Status.DESTROYING, Status.DESTROYED):
                continue
            if rec.volume_id == volume_id and rec.status != Status.RECOVERING:
                out.append(("original_volume_kept", f"volume {volume_id}, the current volume of {rec.id} "
                                                    f"({rec.status.value}, last recovery error "
                                                    f"{(rec.last_recovery_error or '')[:80]!r}), was deleted"))
            if self.flagged_ever.get(volume_id) == rec.id:
                out.append(("flagged_kept", f"flagged old volume {volume_id} of {rec.id} ({rec.status.value}) was "
                                            f"deleted without an admin's decision"))
        return out

    def _volume_has_data(self, v: dict[str, Any]) -> bool:
        data = self.host.volume_dir(v) / "data"
        return data.is_dir() and any(data.iterdir())

    def _check_start_volume(self, m: dict[str, Any]) -> None:
        """SPEC 12.10: a machine of an instance starts on an empty volume only when no volume of its own holds
        data (its current, retained, flagged and pending recovery volumes). A volume restored from a snapshot of
        one of those volumes (or a fork of such a restore) is not an empty volume in that sense even when the
        snapshot held nothing: it is the instance's data at its recovery point (SPEC 7.2.3 "beyond the origin", 15;
        the loss is recorded and the old volume is flagged, invariant 9)."""
        sbx = ((m.get("config") or {}).get("metadata") or {}).get(METADATA_SANDBOX)
        mounted = self.host._mounted_volume(m)
        if not sbx or mounted is None or sbx.startswith(FOREIGN_PREFIX) or self._volume_has_data(mounted):
            return
        restored_from = self._restored_from(mounted)
        for rec in self.records():
            if rec.sandbox_id != sbx:
                continue
            own = (rec.volume_id, rec.retained_volume_id, rec.pending_recovery_volume_id, *rec.flagged_volume_ids)
            if restored_from is not None and restored_from in own:
                return  # a restore of its own snapshot: the recovery point, not a blank volume
            for vid in own:
                v = self.host.volumes.get(vid) if vid else None
                if v is not None and vid != mounted["id"] and self._volume_has_data(v):
                    self.violate("empty_volume_start", f"machine {m['id']} of {rec.id} starts on empty volume "
                                                       f"{mounted['id']} while its volume {vid} holds data")
                    return

    def _remember_lineage(self, volume_id: str) -> None:
        """Keep what a volume about to be deleted came from, and what its snapshots were taken of: a fork of a
        fork of a restore may start after the volumes between it and the restore are gone (seed 8600)."""
        v = self.host.volumes.get(volume_id)
        if v is not None:
            self.lineage[volume_id] = (v.get("snapshot_id"), v.get("source_volume_id"))
        for s in self.host.snapshots.values():
            if s.get("volume_id") == volume_id:
                self.snapshot_of[str(s["id"])] = volume_id

    def _restored_from(self, v: dict[str, Any]) -> str | None:
        """The volume whose snapshot ``v`` was restored from, directly or through forks of forks of the restore
        (seed 3014: a recovery forked the volume an earlier dead-host recovery had restored from the instance's own
        snapshot; the fork is that same recovery point), also when the volumes between are deleted (seed 8600)."""
        seen: set[str] = set()
        vid: str | None = str(v["id"])
        while vid and vid not in seen:
            seen.add(vid)
            live = self.host.volumes.get(vid)
            snap_id, source = ((live.get("snapshot_id"), live.get("source_volume_id")) if live is not None
                               else self.lineage.get(vid, (None, None)))
            if snap_id:
                snapshot = self.host.snapshots.get(str(snap_id))
                return str(snapshot["volume_id"]) if snapshot is not None else self.snapshot_of.get(str(snap_id))
            vid = str(source) if source else None
        return None

    def check_traffic(self, machine_id: str) -> None:
        """SPEC 15: a fenced old machine never receives traffic."""
        recs = self.records()
        self.note_records(recs)
        for rec in recs:
            if rec.fenced_machine_id == machine_id:
                self.violate("fenced_traffic", f"gateway traffic for {rec.id} went to its fenced old machine "
                                               f"{machine_id}")

    async def start(self) -> None:
        self.host.load()
        self.host.start_background()

    async def close(self) -> None:
        for c in list(self.controllers):
            await self.crash(c, quiet=True)
        await self.gateway.aclose()
        await self.client.aclose()
        await self.host.shutdown()
        self.sql.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ trace and verdicts

    def t(self) -> float:
        return self.loop.time()

    def note(self, line: str) -> None:
        text = f"[{self.t():12.3f}] {line}"
        self.trace.append(text)
        if self.echo:
            print(text, flush=True)

    def violate(self, invariant: str, detail: str) -> None:
        key = (invariant, detail)
        if key in self.reported:
            return
        self.reported.add(key)
        v = Violation(invariant, self.t(), detail)
        self.violations.append(v)
        self.trace.append(v.line())
        if self.echo:
            print(v.line(), flush=True)

    # ------------------------------------------------------------------ provider traffic

    def observe(self, ex: Exchange) -> None:
        """The region walk of volume creates (SPEC §7.2.3 and §10): a fork or restore goes to the first region
        of the recovery order, and on to the next one only after a capacity answer from the one before.

        Two passes of one instance may walk at once (a pass whose lease lapsed under a wall-clock jump runs on
        until its next write is fenced): their steps interleave under one volume name (seeds 6672, 7927). So each
        capacity answer from a region is one credit for that name, and a step into the next region of the order
        uses one up: n walks that each met "no capacity" in r1 may go on to r2 n times, no more."""
        parts = ex.path.strip("/").split("/")
        if ex.method != "POST" or len(parts) != 4 or parts[0] != "v1" or parts[3] != "volumes":
            return
        body = ex.body if isinstance(ex.body, dict) else {}
        app, name, region = parts[2], body.get("name"), body.get("region")
        source = body.get("source_volume_id")
        snap_id = body.get("snapshot_id")
        if snap_id and str(snap_id) in self.host.snapshots:  # what a restore came from outlives the snapshot
            self.snapshot_of.setdefault(str(snap_id), str(self.host.snapshots[str(snap_id)]["volume_id"]))
        capacity = "capacity" in ex.answer.lower()
        credits = self.walks.setdefault((app, str(name)), {})
        if source and region:
            src = self.host.volumes.get(source)
            if src is not None:
                order = recovery_regions(self.settings.region_list, src.get("region"))
                if region not in order:
                    self.violate("region_walk", f"fork {name} of {source} (region {src.get('region')}) into "
                                                f"{region}, not one of {list(order)}")
                elif region != order[0]:
                    before = order[order.index(region) - 1]
                    if credits.get(before, 0) <= 0:
                        self.violate("region_walk", f"fork {name} into {region} (walk {list(order)}) without a "
                                                    f"capacity answer from {before} first (unused answers: "
                                                    f"{credits})")
                    else:
                        credits[before] -= 1
        if capacity:
            credits[str(region)] = credits.get(str(region), 0) + 1

    # ------------------------------------------------------------------ controllers

    def live(self) -> list[Controller]:
        return list(self.controllers)

    async def boot_controller(self, *, start: bool = True) -> Controller:
        self._controller_seq += 1
        name = f"ctl{self._controller_seq}"
        handle = SimStore(self, self.sql, name)
        from sandkeep.engine.health import GatewayProber

        engine = Engine(self.settings, cast(Store, handle), self.client, self.clock, worker_id=name,
                        prober=GatewayProber(self.client, transport=proxy_transport(self.host)),
                        rng=random.Random(f"{name}-{self.seed}"))
        c = Controller(name, engine, handle, self.t())
        self.controllers.append(c)
        if self.no_controller_since is not None:
            self.downtime += self.t() - self.no_controller_since
            self.no_controller_since = None
        if start:
            await engine.start()
        self.note(f"controller {name} up")
        return c

    async def crash(self, c: Controller, *, quiet: bool = False) -> None:
        """kill -9: the controller's database handle dies first (nothing more reaches the store, its leases
        stay until they expire), then every task it runs stops wherever it is."""
        c.store.dead = True
        self.controllers.remove(c)
        for task in list(c.tasks):
            task.cancel()
        await c.engine.stop()
        for task in list(c.tasks):
            with contextlib.suppress(BaseException):
                await task
        self.crashes.append(self.t())
        if not self.controllers:
            self.no_controller_since = self.t()
        if not quiet:
            self.note(f"controller {c.name} crashed")

    def spawn(self, c: Controller, what: str, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.note(f"{what} by {c.name}: {type(exc).__name__}: {str(exc)[:160]}")

        task = self.loop.create_task(run())
        c.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            c.tasks.discard(t)
            if t.cancelled() and inspect.iscoroutine(coro):
                coro.close()  # cancelled before it began (its controller crashed): not an unawaited coroutine

        task.add_done_callback(done)

    # ------------------------------------------------------------------ reading the world

    def destroying_now(self, body: bytes) -> bool | None:
        """Whether the instance a machine create's body names (by sandbox) is destroying or destroyed now (None:
        the body names none)."""
        try:
            meta = ((json.loads(body) if body else {}).get("config") or {}).get("metadata") or {}
        except (ValueError, AttributeError):
            return None
        sbx = meta.get(METADATA_SANDBOX)
        if not sbx:
            return None
        if sbx in self.destroyed_instances:
            return True
        rec = self._record_of(sbx)
        return rec is not None and rec.status in (Status.DESTROYING, Status.DESTROYED)

    def _record_of(self, sandbox_id: str) -> InstanceRecord | None:
        return next((r for r in self.records() if r.sandbox_id == sandbox_id), None)

    def records(self) -> list[InstanceRecord]:
        out: list[InstanceRecord] = []
        cursor: str | None = None
        while True:
            page = self.sql.list_instances(limit=1000, cursor=cursor, include_destroyed=True)
            out.extend(page.items)
            cursor = page.next_cursor
            if not cursor:
                return out

    def events_of(self, instance_id: str) -> list[Any]:
        return list(reversed(self.sql.list_events(instance_id=instance_id, limit=1000).items))

