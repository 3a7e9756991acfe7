"""The local machine host's model: Fly semantics without HTTP and without OS processes.

:class:`Host` models apps, machines, volumes, hosts (a volume's ``zone``), regions, snapshots, waits, the
event stream and faults. :mod:`sandkeep.host.api` serves it over HTTP (Fly API, ``/_local`` faults, proxy);
what runs a machine is a :class:`~sandkeep.host.runner.MachineRunner` (real processes or simulated machines).
Every delay and timeout goes through the injected :class:`~sandkeep.clock.Clock` and every random choice (ids,
names, placement) through the injected ``random.Random``, so the model runs in process on a virtual clock.

Records (apps, machines, volumes, snapshots, regions, hosts, the watch sequence) live in SQLite in the data
dir and survive a restart; machines whose processes are gone come back ``stopped``. Volumes are directories
under ``DATA/regions/<region>/volumes/<id>/``; snapshots are copies under ``DATA/regions/<region>/snapshots/``.

Each region has ``hosts_per_region`` hosts named ``<region>-z<n>`` (Fly's volume ``zone``); a volume lives on
one host and a machine on its volume's host. A host can die (its machines freeze in their last state and report
``host_status: unreachable``; its volumes cannot be forked, attached or snapshotted; actions on its machines
fail with 412), reboot (its machines stop, exit 137) and come back (frozen machines resume as they were).
A region outage takes every host of the region down and stops its machines (a power loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from sandkeep.clock import Clock, utc_iso
from sandkeep.gateway import LIMIT_ENV
from sandkeep.host import ids
from sandkeep.host.db import HostDB
from sandkeep.host.errors import HostError, bad, capacity_error, host_unreachable, memory_error
from sandkeep.host.images import CATALOGUE, resolve
from sandkeep.host.runner import Gateway, LaunchError, MachineRunner, Run, make_runner
from sandkeep.secrets import SecretBox, SecretsError

__all__ = ["GIB", "RUNNING", "WAIT_STATES", "Host", "HostError", "HostOptions", "bad"]

log = structlog.get_logger("sandkeep.host")  # lazy: configured by the command

JSON = dict[str, Any]
RUNNING = ("starting", "started", "stopping")
WAIT_STATES = ("started", "stopped", "destroyed", "failed", "suspended")
_APP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,30}$")
_MACHINE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_EVENTS_KEPT = 50
MAX_METADATA_VALUE = 64 * 1024  # characters; metadata holds ids and labels, not data
GIB = 1024 ** 3
IP_TYPES = ("v4", "v6", "shared_v4", "private_v6")  # Fly's ip_assignments types the host records
SHARED_V4 = "203.0.113.1"  # documentation range (RFC 5737): one shared address for every app, as on Fly
_ADJ = ("quiet", "bold", "calm", "brave", "lively", "misty", "proud", "snowy", "sunny", "young")
_NOUN = ("river", "forest", "meadow", "sun", "moon", "field", "harbor", "cloud", "stone", "wave")


@dataclass
class HostOptions:
    data_dir: Path
    regions: list[str]
    org_slug: str = "personal"
    stop_timeout: float = 10.0  # grace between SIGTERM and SIGKILL on stop
    boot_timeout: float = 30.0  # a "tcp" image must listen on $PORT within this
    destroyed_retention: float = 30.0  # GET answers state "destroyed" this long after destroy, then 404
    snapshot_interval: float = 86400.0  # scheduled snapshot of every volume (daily)
    snapshot_retention: float = 5 * 86400.0  # snapshots older than this are pruned (5 days)
    scheduler_tick: float = 60.0  # how often the scheduler looks for due snapshots
    delays: dict[str, float] = field(default_factory=dict)  # see faults.REALISTIC_PROFILE
    # the unprivileged user machine processes run as when the host runs as root (name or UID[:GID])
    machine_user: str = "nobody"
    bytes_per_gb: int = 1024 ** 3  # a volume's limit = size_gb * bytes_per_gb (tests shrink it)
    secrets_key: str | None = None  # encrypts machine env in host.db; None = a key generated per host object
    machines: str = "process"  # the machine runner: "process" (real processes) or "sim" (simulated machines)
    hosts_per_region: int = 3  # hosts (Fly zones) in each region
    seed: int | None = None  # seeds ids, names and placement (None: the operating system's randomness)


@dataclass
class MachineRuntime:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    run: Run | None = None  # the running incarnation (a process or a simulated machine)
    launch_task: asyncio.Task[None] | None = None
    kill_task: asyncio.Task[None] | None = None
    bg_task: asyncio.Task[None] | None = None
    stop_requested: bool = False
    unexpected: bool = False  # killed by the host (crash, outage): an unexpected exit even while booting
    in_delay: bool = False


def _now_ms(clock: Clock) -> int:
    return int(clock.now().timestamp() * 1000)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _dir_size_and_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():  # a machine may plant symlinks: never follow them as root
            data = p.read_bytes()
            size += len(data)
            digest.update(str(p.relative_to(path)).encode() + b"\0")
            digest.update(hashlib.sha256(data).digest())
    return size, "sha256:" + digest.hexdigest()


def _copy_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp, symlinks=True)
    else:
        tmp.mkdir(parents=True)
    tmp.rename(dst)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be an object of string values")
    for k, v in value.items():
        if not isinstance(v, str):
            raise bad(f"{what}.{k} must be a string, got {type(v).__name__}")
    return dict(value)


def _opt_bool(body: JSON, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be a boolean")
    return value


class Host:
    def __init__(self, options: HostOptions, clock: Clock, *, runner: MachineRunner | None = None,
                 rng: random.Random | None = None) -> None:
        self.opt = options
        self.clock = clock
        self.data_dir = options.data_dir
        self.rng = rng or (random.Random(options.seed) if options.seed is not None else ids.SYSTEM_RANDOM)
        if runner is None:
            owner = None
            if options.machines == "process":
                from sandkeep.host.process import resolve_machine_user

                owner = resolve_machine_user(options.machine_user)
            runner = make_runner(options.machines, clock=clock, data_dir=self.data_dir,
                                 boot_timeout=options.boot_timeout, machine_owner=owner)
        self.runner = runner
        self.box = SecretBox(options.secrets_key or SecretBox.generate_key())
        self.db = HostDB(self.data_dir / "host.db")
        self.apps: dict[str, JSON] = {}
        self.machines: dict[str, JSON] = {}
        self.volumes: dict[str, JSON] = {}
        self.snapshots: dict[str, JSON] = {}
        self.regions: dict[str, JSON] = {}
        self.hosts: dict[str, JSON] = {}  # name (the zone) -> {"name", "region", "dead"}
        self.seq = 0
        self._rt: dict[str, MachineRuntime] = {}
        self._waiters: list[asyncio.Event] = []
        self.closing = False  # set on SIGTERM/SIGINT: long polls answer now instead of holding shutdown up
        self._bg: set[asyncio.Task[Any]] = set()
        self.shutting_down = False

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> list[str]:
        """Read the records back after a (re)start; machines whose processes are gone come back stopped."""
        for a in self.db.load("app"):
            self.apps[a["name"]] = a
        for v in self.db.load("volume"):
            self.volumes[v["id"]] = v
        for s in self.db.load("snapshot"):
            self.snapshots[s["id"]] = s
        for r in self.db.load("region"):
            self.regions[r["name"]] = r
        for name in self.opt.regions:
            if name not in self.regions:
                self.regions[name] = {"name": name, "down": False, "available": True}
                self.db.put("region", name, self.regions[name])
        for h in self.db.load("host"):
            self.hosts[h["name"]] = h
        for name in self.opt.regions:
            for n in range(1, max(1, self.opt.hosts_per_region) + 1):
                zone = f"{name}-z{n}"
                if zone not in self.hosts:
                    self.hosts[zone] = {"name": zone, "region": name, "dead": False}
                    self.db.put("host", zone, self.hosts[zone])
        for v in self.volumes.values():  # records of versions before hosts: their volumes were on host 1
            if not v.get("host"):
                v["host"] = f"{v['region']}-z1"
                self.db.put("volume", v["id"], v)
        self.seq = int(self.db.get_meta("seq") or "0")
        recovered: list[str] = []
        plaintext = False
        for m in self.db.load("machine"):
            plaintext = plaintext or "env_encrypted" not in (m.get("config") or {})
            m["config"] = self._opened_config(m)
            self.machines[m["id"]] = m
            if not m.get("host"):
                vol = self._mounted_volume(m)
                m["host"] = vol["host"] if vol is not None else f"{m.get('region', '')}-z1"
            self.runner.reap(m)  # a process left from the host's previous life is killed
            m["pid"] = None
            m["pid_start"] = None
            if m["state"] in RUNNING:
                self._set_state(m, "stopped", "exit", source="flyd",
                                request=self._exit_request(137, requested=False, error="host restarted"),
                                exit_code=137, requested_stop=False)
                recovered.append(m["id"])
            elif m["state"] == "destroying":
                self._mark_destroyed(m)
            else:
                self._save_machine(m)
        if plaintext:  # records written before env was encrypted: now re-saved encrypted; drop the old pages
            self.db.compact()
        return recovered

    def start_background(self) -> None:
        self._spawn_bg(self._scheduler_loop())

    def _spawn_bg(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def shutdown(self) -> None:
        """Kill every machine process (like a host going down); records keep their state for ``load``."""
        self.shutting_down = True
        for rt in self._rt.values():
            if rt.run is not None and not rt.run.exited:
                rt.run.signal(signal.SIGKILL)
        for rt in self._rt.values():
            if rt.run is not None:
                with contextlib.suppress(Exception):
                    await rt.run.wait()
        tasks = [t for t in self._bg if not t.done()]
        for rt in self._rt.values():
            for t in (rt.launch_task, rt.kill_task, rt.bg_task):
                if t is not None and not t.done():
                    tasks.append(t)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self.db.close()

    # ------------------------------------------------------------------ helpers
    def runtime(self, machine_id: str) -> MachineRuntime:
        rt = self._rt.get(machine_id)
        if rt is None:
            rt = self._rt[machine_id] = MachineRuntime()
        return rt

    def now_iso(self) -> str:
        return utc_iso(self.clock.now()) or ""

    async def delay(self, name: str) -> None:
        seconds = self.opt.delays.get(name, 0.0)
        if seconds > 0:
            await self.clock.sleep(seconds)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.set()

    def begin_shutdown(self) -> None:
        """Answer every long poll now (watch returns, wait says 503) so the servers can stop at once."""
        self.closing = True
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.set()

    async def wait_change(self, timeout: float) -> None:
        """Return on the next state change or after ``timeout`` seconds on the host's clock."""
        ev = asyncio.Event()
        self._waiters.append(ev)
        waiter = asyncio.ensure_future(ev.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(max(0.0, timeout)))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
            if ev in self._waiters:
                self._waiters.remove(ev)

    def region_ok(self, region: str) -> JSON:
        r = self.regions.get(region)
        if r is None or region not in self.opt.regions:
            raise HostError(422, f"unknown region '{region}'; this host has regions: {', '.join(self.opt.regions)}")
        return r

    def _check_create_capacity(self, region: str, what: str) -> None:
        r = self.region_ok(region)
        if r["down"] or not r["available"] or not self._live_hosts(region):
            raise capacity_error(region, what)

    # ------------------------------------------------------------------ hosts
    def _live_hosts(self, region: str) -> list[str]:
        return sorted(h["name"] for h in self.hosts.values() if h["region"] == region and not h["dead"])

    def _place(self, region: str, avoid: str | None = None) -> str:
        """A reachable host of ``region`` for a new volume or machine (another than ``avoid`` when possible)."""
        live = self._live_hosts(region)
        others = [h for h in live if h != avoid]
        return self.rng.choice(others or live)

    def host_reachable(self, host: str | None, region: str) -> bool:
        h = self.hosts.get(host or "")
        return not self.regions.get(region, {}).get("down") and not (h is not None and h["dead"])

    def host_status(self, rec: JSON) -> str:
        """Fly's ``host_status`` of a machine or volume record: ``ok``, ``unreachable`` (region down, host dead) or
        ``unknown`` (a dead host told to report so: Fly's answer when it cannot tell)."""
        if self.regions.get(str(rec.get("region", "")), {}).get("down"):
            return "unreachable"
        h = self.hosts.get(rec.get("host") or "")
        if h is not None and h["dead"]:
            return str(h.get("dead_status") or "unreachable")
        return "ok"

    def _check_host(self, rec: JSON, what: str) -> None:
        """412 (the client's HostUnavailableError) when the host of ``rec`` is dead or its region is down."""
        if not self.host_reachable(rec.get("host"), rec["region"]):
            raise host_unreachable(what, rec["region"], rec.get("host"))

    def _check_host_alive(self, m: JSON) -> None:
        """Actions on a machine of a dead host fail as Fly's do (412); a region outage only refuses starts."""
        h = self.hosts.get(m.get("host") or "")
        if h is not None and h["dead"]:
            raise host_unreachable(f"machine {m['id']}", m["region"], h["name"])

    def host_json(self, h: JSON) -> JSON:
        return {"name": h["name"], "region": h["region"], "dead": h["dead"],
                "host_status": self.host_status({"host": h["name"], "region": h["region"]}),
                "machines": sorted(m["id"] for m in self.machines.values()
                                   if m.get("host") == h["name"] and m["state"] != "destroyed"),
                "volumes": sorted(v["id"] for v in self.volumes.values() if v.get("host") == h["name"])}

    def host_record(self, name: str) -> JSON:
        h = self.hosts.get(name)
        if h is None:
            raise HostError(404, f"unknown host '{name}'; hosts are named <region>-z<n>, see GET /_local/hosts")
        return h

    def _kill_unexpected(self, m: JSON) -> None:
        """The machine's host lost power (reboot, region outage): it stops with exit 137, not requested."""
        rt = self.runtime(m["id"])
        rt.unexpected = True
        if rt.run is not None:
            rt.run.signal(signal.SIGKILL)
        elif rt.in_delay and rt.launch_task is not None:
            rt.launch_task.cancel()
            self._set_state(m, "stopped", "exit", request=self._exit_request(137, requested=False),
                            exit_code=137, requested_stop=False)

    def kill_host(self, name: str, status: str = "unreachable") -> JSON:
        """The host dies (or is partitioned): its machines freeze in their last state, ``host_status`` ``status``
        (``unreachable``, or ``unknown``)."""
        if status not in ("unreachable", "unknown"):
            raise bad(f"host_status must be 'unreachable' or 'unknown', got {status!r}")
        self.host_record(name)["dead_status"] = status
        return self._set_host_dead(name, True)

    def revive_host(self, name: str) -> JSON:
        """A dead host comes back: its machines resume in the state they had (a started one runs again)."""
        return self._set_host_dead(name, False)

    def _set_host_dead(self, name: str, dead: bool) -> JSON:
        h = self.host_record(name)
        if h["dead"] != dead:
            h["dead"] = dead
            self.db.put("host", name, h)
            for m in self.machines.values():
                rt = self._rt.get(m["id"])
                if m.get("host") == name and rt is not None and rt.run is not None:
                    rt.run.freeze(dead)  # a process is stopped (SIGSTOP) and continued (SIGCONT)
            for m in sorted(self.machines.values(), key=lambda m: str(m["id"])):
                if m.get("host") == name and m["state"] != "destroyed":
                    self._host_status_changed(m)
            log.info("host.died" if dead else "host.back", host=name)
            self._notify()
        return self.host_json(h)

    def _host_status_changed(self, m: JSON) -> None:
        """A watch event for a machine whose ``host_status`` changed (its host died or came back): its ``state``
        stays what it was, so without this event a watcher would learn of a dead host only by polling."""
        self.seq += 1
        self.db.add_watch(self.seq, {"seq": self.seq, "app_name": m["app"], "machine_id": m["id"],
                                     "type": "host_status", "state": m["state"], "host_status": self.host_status(m),
                                     "exit_code": None, "requested_stop": None, "at": self.now_iso()})

    def reboot_host(self, name: str) -> JSON:
        """The host reboots: its machines stop (exit 137, not requested), its volumes stay; it is up after."""
        h = self.host_record(name)
        for m in self.machines.values():
            if m.get("host") == name and m["state"] in RUNNING:
                self._kill_unexpected(m)
        self.revive_host(name)
        log.info("host.rebooted", host=name)
        return self.host_json(h)

    # ------------------------------------------------------------------ apps
    def app(self, name: str) -> JSON:
        a = self.apps.get(name)
        if a is None:
            raise HostError(404, f"app not found: {name}")
        return a

    def app_json(self, a: JSON) -> JSON:
        return {"id": a["id"], "name": a["name"], "status": "deployed",
                "organization": {"name": a["org_slug"], "slug": a["org_slug"]}}

    def create_app(self, body: JSON) -> JSON:
        name = body.get("app_name")
        if not isinstance(name, str) or not _APP_RE.match(name):
            raise bad("app_name is required: 1-63 lowercase letters, digits and dashes, starting with a letter "
                      "or digit", 422)
        org = body.get("org_slug", self.opt.org_slug)
        if org is None:
            org = self.opt.org_slug
        if not isinstance(org, str) or not org:
            raise bad("org_slug must be a non-empty string", 422)
        if "network" in body and body["network"] is not None and not isinstance(body["network"], str):
            raise bad("network must be a string", 422)
        if name in self.apps:
            raise HostError(409, f"app already exists: {name}")
        a = {"id": ids.app_id(self.rng), "name": name, "org_slug": org, "created_at": self.now_iso()}
        self.apps[name] = a
        self.db.put("app", name, a)
        return a

    def list_apps(self, org_slug: str | None) -> JSON:
        apps = [a for a in self.apps.values() if org_slug in (None, "", a["org_slug"])]
        return {"total_apps": len(apps), "apps": [
            {"id": a["id"], "name": a["name"], "machine_count": sum(
                1 for m in self.machines.values() if m["app"] == a["name"] and m["state"] != "destroyed"),
             "network": "default"} for a in apps]}

    # Fly's app-level IP assignments (``/v1/apps/{app}/ip_assignments``, what fly-go's flaps client calls): the
    # host only records them, so an app setup that allocates its public IPs works; nothing routes to them.
    def list_ips(self, app: str) -> JSON:
        return {"ips": [dict(ip) for ip in self.app(app).get("ips", [])]}

    def assign_ip(self, app: str, body: JSON) -> JSON:
        a = self.app(app)
        kind = body.get("type")
        if kind not in IP_TYPES:
            raise bad(f"type must be one of {', '.join(IP_TYPES)}, got {kind!r}")
        for key in ("region", "org_slug", "network", "service_name"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise bad(f"'{key}' must be a string")
        ips: list[JSON] = a.setdefault("ips", [])
        if kind == "shared_v4":
            for ip in ips:
                if ip["type"] == "shared_v4":
                    return dict(ip)  # one shared address per app: asking again is no new allocation
        taken = {ip["ip"] for other in self.apps.values() for ip in other.get("ips", [])}
        address = SHARED_V4
        while kind != "shared_v4" and address in taken | {SHARED_V4}:
            n = self.rng.randrange(2 ** 17 - 2) + 1  # documentation/benchmark ranges: never a real address
            address = {"v4": f"198.{18 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", "v6": f"2001:db8::{n:x}",
                       "private_v6": f"fdaa:0:{n:x}::3"}[str(kind)]
        record = {"ip": address, "region": body.get("region") or "global",
                  "service_name": body.get("service_name") or "", "shared": kind == "shared_v4",
                  "created_at": self.now_iso(), "type": kind}
        ips.append(record)
        self.db.put("app", a["name"], a)
        return dict(record)

    def release_ip(self, app: str, address: str) -> None:
        a = self.app(app)
        ips = a.get("ips", [])
        kept = [ip for ip in ips if ip["ip"] != address]
        if len(kept) == len(ips):
            raise HostError(404, f"ip assignment not found: {address}")
        a["ips"] = kept
        self.db.put("app", a["name"], a)

    async def delete_app(self, name: str) -> None:
        self.app(name)
        for m in list(self.machines.values()):
            if m["app"] == name and m["state"] != "destroyed":
                await self.destroy_machine(name, m["id"], force=True, app_deleted=True)
        for v in list(self.volumes.values()):
            if v["app"] == name:
                await self._remove_volume(v)
        for m in list(self.machines.values()):
            if m["app"] == name:
                self._purge_machine(m)
        del self.apps[name]
        self.db.delete("app", name)

    # ------------------------------------------------------------------ machine records
    def _save_machine(self, m: JSON) -> None:
        """Persist a machine; its env (secret values, the gateway token) is stored encrypted, never in plaintext."""
        cfg = dict(m["config"])
        env = cfg.pop("env", None) or {}
        cfg["env_encrypted"] = self.box.encrypt(json.dumps(env)) if env else ""
        self.db.put("machine", m["id"], {**m, "config": cfg})

    def _opened_config(self, m: JSON) -> JSON:
        cfg = dict(m.get("config") or {})
        if "env_encrypted" not in cfg:  # written before env was encrypted: re-saved encrypted by load()
            return cfg
        blob = cfg.pop("env_encrypted")
        try:
            cfg["env"] = json.loads(self.box.decrypt(blob)) if blob else {}
        except (SecretsError, ValueError):
            log.error("machine.env_unreadable", machine_id=m.get("id"),
                      error="cannot decrypt the machine's env: was the host given another secrets key?")
            cfg["env"] = {}
        return cfg

    def _exit_request(self, exit_code: int | None, *, requested: bool, error: str = "") -> JSON:
        exit_event = {"exit_code": exit_code, "requested_stop": requested, "restarting": False,
                      "oom_killed": False, "signal": (exit_code - 128) if exit_code and exit_code > 128 else -1,
                      "error": error, "exited_at": self.now_iso()}
        return {"exit_event": exit_event, "exit_code": exit_code, "requested_stop": requested,
                "restart_count": 0}

    def _set_state(self, m: JSON, state: str, event_type: str | None, *, source: str = "flyd",
                   request: JSON | None = None, exit_code: int | None = None,
                   requested_stop: bool | None = None) -> None:
        m["state"] = state
        m["updated_at"] = self.now_iso()
        if event_type is not None:
            ev: JSON = {"id": ids.instance_id(self.rng, ms=_now_ms(self.clock)), "type": event_type, "status": state,
                        "source": source,
                        "timestamp": _now_ms(self.clock)}
            if request is not None:
                ev["request"] = request
            m["events"] = [ev, *m.get("events", [])][:_EVENTS_KEPT]
        self._save_machine(m)
        self.seq += 1
        self.db.add_watch(self.seq, {"seq": self.seq, "app_name": m["app"], "machine_id": m["id"],
                                     "type": event_type or "state", "state": state, "exit_code": exit_code,
                                     "requested_stop": requested_stop, "at": m["updated_at"]})
        log.info("machine.state", machine_id=m["id"], app=m["app"], state=state, event_type=event_type,
                 exit_code=exit_code)
        self._notify()

    def _expired(self, m: JSON) -> bool:
        if m["state"] != "destroyed":
            return False
        at = _parse_time(m.get("destroyed_at"))
        return at is None or self.clock.now() - at > timedelta(seconds=self.opt.destroyed_retention)

    def _purge_machine(self, m: JSON) -> None:
        self.machines.pop(m["id"], None)
        self._rt.pop(m["id"], None)
        self.db.delete("machine", m["id"])
        shutil.rmtree(self.data_dir / "machines" / m["id"], ignore_errors=True)

    def purge_expired(self) -> None:
        for m in list(self.machines.values()):
            if self._expired(m):
                self._purge_machine(m)

    def machine(self, app: str, machine_id: str, *, live: bool = False) -> JSON:
        self.app(app)
        m = self.machines.get(machine_id)
        if m is None or m["app"] != app or self._expired(m):
            if m is not None and self._expired(m):
                self._purge_machine(m)
            raise HostError(404, f"machine not found: {machine_id}")
        if live and m["state"] == "destroyed":
            raise HostError(404, f"machine not found: {machine_id} (destroyed)")
        return m

    def machine_json(self, m: JSON) -> JSON:
        image = m["config"].get("image", "")
        return {"id": m["id"], "name": m["name"], "state": m["state"], "region": m["region"],
                "instance_id": m["instance_id"], "private_ip": m["private_ip"], "config": m["config"],
                "image_ref": {"registry": "local", "repository": image.split(":")[0], "tag": "latest",
                              "digest": "sha256:" + hashlib.sha256(image.encode()).hexdigest(), "labels": {}},
                "created_at": m["created_at"], "updated_at": m["updated_at"], "events": m.get("events", []),
                "host_status": self.host_status(m)}

    def list_machines(self, app: str, *, metadata: dict[str, str], region: str | None,
                      include_deleted: bool) -> list[JSON]:
        self.app(app)
        self.purge_expired()
        out = []
        for m in self.machines.values():
            if m["app"] != app:
                continue
            if m["state"] == "destroyed" and not include_deleted:
                continue
            if region and m["region"] != region:
                continue
            md = m["config"].get("metadata") or {}
            if any(md.get(k) != v for k, v in metadata.items()):
                continue
            out.append(m)
        out.sort(key=lambda x: (x["created_at"], x["id"]))
        return out

    # ------------------------------------------------------------------ machine config validation
    def _validate_config(self, app: str, config: Any, *, region: str | None, machine_id: str | None,
                         missing_volume: str = "volume not found") -> tuple[JSON, str, JSON | None]:
        """Check a machine config; return (config, region, volume or None).

        A mount of a volume that does not exist is a 400 with Fly's ``missing_volume`` message (never a 404,
        which a client would read as "the machine is gone")."""
        if not isinstance(config, dict):
            raise bad("config is required and must be an object", 422 if config is None else 400)
        image = config.get("image")
        if not isinstance(image, str) or not image.strip():
            raise bad("config.image is required (a string)", 422)
        if resolve(image) is None:
            raise HostError(422, f"unknown image '{image}': the local host can run only "
                                 f"{', '.join(sorted(CATALOGUE))}")
        cfg = dict(config)
        cfg["env"] = _str_map(config.get("env"), "config.env")
        cfg["metadata"] = _str_map(config.get("metadata"), "config.metadata")
        for key, value in cfg["metadata"].items():
            self.check_metadata(key, value)
        guest = config.get("guest")
        if guest is None:
            guest = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
        if not isinstance(guest, dict):
            raise bad("config.guest must be an object")
        for key in ("cpus", "memory_mb", "gpus"):
            if key in guest and (isinstance(guest[key], bool) or not isinstance(guest[key], int)
                                 or guest[key] < 0):
                raise bad(f"config.guest.{key} must be a whole number")
        if "cpu_kind" in guest and not isinstance(guest["cpu_kind"], str):
            raise bad("config.guest.cpu_kind must be a string")
        cfg["guest"] = guest
        services = config.get("services")
        if services is not None and (not isinstance(services, list)
                                     or not all(isinstance(s, dict) for s in services)):
            raise bad("config.services must be a list of objects")
        for key in ("auto_destroy",):
            if key in config and config[key] is not None and not isinstance(config[key], bool):
                raise bad(f"config.{key} must be a boolean")
        for key in ("restart", "init", "dns", "stop_config"):
            if key in config and config[key] is not None and not isinstance(config[key], dict):
                raise bad(f"config.{key} must be an object")
        mounts = config.get("mounts")
        if mounts is None:
            mounts = []
        if not isinstance(mounts, list) or not all(isinstance(x, dict) for x in mounts):
            raise bad("config.mounts must be a list of objects")
        if len(mounts) > 1:
            raise bad("the local host supports at most one volume per machine", 422)
        volume: JSON | None = None
        if region is not None and not isinstance(region, str):
            raise bad("region must be a string")
        if mounts:
            mount = dict(mounts[0])
            vid = mount.get("volume")
            if not isinstance(vid, str) or not vid:
                raise bad("config.mounts[0].volume is required (a volume id)", 422)
            path = mount.get("path", "/data")
            if not isinstance(path, str) or not path.startswith("/"):
                raise bad("config.mounts[0].path must be an absolute path", 422)
            mount["path"] = path
            volume = self.volumes.get(vid)
            if volume is None or volume["app"] != app:
                raise HostError(400, f"{missing_volume}: {vid} (app {app})")
            if region and region != volume["region"]:
                raise HostError(422, f"volume {vid} is in region {volume['region']} but the machine was requested "
                                     f"in region {region}: a machine and its volume must be in the same region")
            region = volume["region"]
            holder = volume.get("attached_machine_id")
            if holder and holder != machine_id:
                hm = self.machines.get(holder)
                if hm is not None and hm["state"] != "destroyed":
                    raise HostError(422, f"volume {vid} is already attached to machine {holder}")
            vh = self.hosts.get(volume.get("host") or "")
            if vh is not None and vh["dead"]:
                raise host_unreachable(f"cannot attach volume {vid}", volume["region"], vh["name"])
            mount.setdefault("name", volume["name"])
            cfg["mounts"] = [mount]
        else:
            cfg["mounts"] = []
        if region is None:
            region = self.opt.regions[0]
        self.region_ok(region)
        return cfg, region, volume

    # ------------------------------------------------------------------ machines
    async def create_machine(self, app: str, body: JSON) -> tuple[JSON, JSON]:
        """Create (and unless ``skip_launch``, start) a machine: its record and the create's answer.

        Like Fly, the answer shows the machine as it was created (state ``created``); the start that follows
        (``starting`` -> ``started``) is visible through get, wait, events and the watch.
        """
        self.app(app)
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not _MACHINE_NAME_RE.match(name)):
            raise bad("name must be 1-63 letters, digits, '.', '_' or '-'", 422)
        skip_launch = _opt_bool(body, "skip_launch")
        cfg, region, volume = self._validate_config(app, body.get("config"), region=body.get("region"),
                                                    machine_id=None)
        if name is None:
            name = f"{self.rng.choice(_ADJ)}-{self.rng.choice(_NOUN)}-{self.rng.randrange(9000) + 1000}"
        for other in self.machines.values():
            if other["app"] == app and other["name"] == name and other["state"] != "destroyed":
                raise HostError(409, f"already_exists: a machine named '{name}' already exists in app {app} "
                                     f"({other['id']})")
        self._check_create_capacity(region, "machine")
        await self.delay("machine.create")
        self.app(app)
        if volume is not None:  # re-check after the delay: another create may have taken it
            cfg, region, volume = self._validate_config(app, cfg, region=region, machine_id=None)
        now = self.now_iso()
        host = volume["host"] if volume is not None else self._place(region)
        m: JSON = {"id": ids.machine_id(self.rng), "app": app, "name": name, "region": region, "state": "created",
                   "host": host, "config": cfg, "instance_id": ids.instance_id(self.rng, ms=_now_ms(self.clock)),
                   "private_ip": ids.private_ip(self.rng),
                   "created_at": now, "updated_at": now, "events": [], "destroyed_at": None,
                   "booted_once": False, "pid": None, "pid_start": None, "port": None}
        self.machines[m["id"]] = m
        if volume is not None:
            self._attach(volume, m)
        self._set_state(m, "created", "launch", source="user")
        answer = copy.deepcopy(self.machine_json(m))
        if not skip_launch:
            self._begin_start(m)
        return m, answer

    def _attach(self, volume: JSON, m: JSON) -> None:
        volume["attached_machine_id"] = m["id"]
        volume["attached_alloc_id"] = m["instance_id"]
        self.db.put("volume", volume["id"], volume)

    def _detach_all(self, m: JSON, keep: str | None = None) -> None:
        for v in self.volumes.values():
            if v.get("attached_machine_id") == m["id"] and v["id"] != keep:
                v["attached_machine_id"] = None
                v["attached_alloc_id"] = None
                self.db.put("volume", v["id"], v)

    def _begin_start(self, m: JSON) -> None:
        rt = self.runtime(m["id"])
        rt.stop_requested = False
        rt.unexpected = False
        rt.kill_task = None
        first = not m.get("booted_once")
        self._set_state(m, "starting", "start", source="user")
        rt.launch_task = asyncio.ensure_future(self._launch(m, rt, first=first))

    def _mounted_volume(self, m: JSON) -> JSON | None:
        mounts = m["config"].get("mounts") or []
        return self.volumes.get(mounts[0]["volume"]) if mounts else None

    def _machine_env(self, m: JSON, volume: JSON | None) -> dict[str, str]:
        """A minimal environment: the machine's config env, then the host's own variables on top (a config
        cannot override them; the runner adds ``PORT`` and its own). No host path is given: the machine starts
        in its volume's directory (``SANDKEEP_VOLUME_PATH`` is ``.``)."""
        env = dict(m["config"].get("env") or {})
        env.update({"SANDKEEP_VOLUME_PATH": "." if volume is not None else "",
                    "FLY_MACHINE_ID": m["id"], "FLY_APP_NAME": m["app"], "FLY_REGION": m["region"],
                    "FLY_ALLOC_ID": m["id"], "FLY_IMAGE_REF": m["config"]["image"],
                    "FLY_PRIVATE_IP": m["private_ip"], "FLY_MACHINE_VERSION": m["instance_id"]})
        env.pop(LIMIT_ENV, None)
        if volume is not None:
            env[LIMIT_ENV] = str(int(volume["size_gb"]) * self.opt.bytes_per_gb)
        return env

    async def _launch(self, m: JSON, rt: MachineRuntime, *, first: bool) -> None:
        rt.in_delay = True
        try:
            await self.delay("machine.boot.first" if first else "machine.boot")
            while not self.host_reachable(m.get("host"), m["region"]) and m["state"] == "starting" \
                    and not self.regions[m["region"]]["down"] and not (rt.stop_requested or rt.unexpected):
                await self.wait_change(60.0)  # its host died while it booted: it boots when the host is back
        finally:
            rt.in_delay = False
        if m["state"] != "starting":
            return
        if rt.stop_requested or rt.unexpected:
            self._set_state(m, "stopped", "exit", request=self._exit_request(
                0 if rt.stop_requested else 137, requested=rt.stop_requested),
                exit_code=0 if rt.stop_requested else 137, requested_stop=rt.stop_requested)
            return
        image = resolve(m["config"]["image"])
        if image is None:
            self._set_state(m, "failed", "start", request={"error": f"unknown image {m['config']['image']}"})
            return
        volume = self._mounted_volume(m)
        try:
            run = await self.runner.launch(m, image, self._machine_env(m, volume),
                                           self.volume_dir(volume) if volume is not None else None)
        except LaunchError as exc:
            self._set_state(m, "failed", "start", request={"error": str(exc)})
            return
        rt.run = run
        m["pid"], m["pid_start"], m["port"] = run.pid, run.pid_start, run.port
        m["booted_once"] = True
        self._save_machine(m)
        waiter = asyncio.ensure_future(run.wait())
        try:
            ready = True
            if image.ready == "tcp":
                ready = await run.ready(waiter, lambda: m["state"] == "starting")
            if m["state"] == "starting" and not rt.stop_requested and not rt.unexpected:
                if ready:
                    self._set_state(m, "started", "start", source="flyd")
                elif not waiter.done():
                    run.signal(signal.SIGKILL)
                    await waiter
                    rt.run = None
                    m["pid"] = m["pid_start"] = m["port"] = None
                    self._set_state(m, "failed", "start", request={
                        "error": f"machine did not listen on its port within {self.opt.boot_timeout:g}s"})
                    return
            elif m["state"] in ("destroying", "destroyed") or rt.unexpected:
                run.signal(signal.SIGKILL)  # arrived while the machine was being spawned
            elif rt.stop_requested:
                self._signal(m, rt, signal.SIGTERM, self.opt.stop_timeout)
            booted = ready and m["state"] in ("started", "stopping")
            rc = await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
        await self._on_exit(m, rt, rc, booted=booted)

    async def _on_exit(self, m: JSON, rt: MachineRuntime, rc: int, *, booted: bool) -> None:
        rt.run = None
        if rt.kill_task is not None and not rt.kill_task.done():
            rt.kill_task.cancel()
        m["pid"] = m["pid_start"] = m["port"] = None
        if self.shutting_down:
            return
        exit_code = rc if rc >= 0 else 128 - rc
        if m["state"] in ("destroying", "destroyed"):
            self._save_machine(m)
            return
        requested = rt.stop_requested
        if not booted and not requested and not rt.unexpected:
            self._set_state(m, "failed", "start", request={
                "error": f"process exited with code {exit_code} before it was ready",
                **self._exit_request(exit_code, requested=False)}, exit_code=exit_code, requested_stop=False)
        else:
            if requested:
                await self.delay("machine.stop")
            self._set_state(m, "stopped", "exit", request=self._exit_request(exit_code, requested=requested),
                            exit_code=exit_code, requested_stop=requested)
        rt.stop_requested = False
        rt.unexpected = False
        if m["config"].get("auto_destroy") and m["state"] in ("stopped", "failed"):
            self._mark_destroyed(m)

    def _mark_destroyed(self, m: JSON) -> None:
        m["destroyed_at"] = self.now_iso()
        self._detach_all(m)
        self._set_state(m, "destroyed", "destroy", source="user")

    def _signal(self, m: JSON, rt: MachineRuntime, sig: int, grace: float) -> None:
        run = rt.run
        if run is None or run.exited:
            return
        run.signal(sig)
        if sig != signal.SIGKILL:
            async def escalate() -> None:
                await self.clock.sleep(grace)
                if rt.run is run and not run.exited:
                    log.info("machine.stop_escalated", machine_id=m["id"])
                    run.signal(signal.SIGKILL)
            rt.kill_task = asyncio.ensure_future(escalate())

    async def start_machine(self, app: str, machine_id: str) -> JSON:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        async with rt.lock:
            prev = m["state"]
            self._check_host_alive(m)
            if prev in ("started", "starting"):
                return {"previous_state": prev, "migrated": False, "new_host": ""}
            if prev in ("stopping", "destroying"):
                raise HostError(412, f"failed_precondition: machine {machine_id} is {prev}; wait for it to stop "
                                     f"first")
            self._check_region_up(m)
            self._check_machine_capacity(m)
            self._begin_start(m)
            return {"previous_state": prev, "migrated": False, "new_host": ""}

    def _check_region_up(self, m: JSON) -> None:
        r = self.regions.get(m["region"])
        if r is not None and r["down"]:
            raise host_unreachable(f"machine {m['id']}", m["region"])

    def _check_machine_capacity(self, m: JSON) -> None:
        """Starting or updating an existing machine re-reserves its resources: refused in a capacity-off region."""
        r = self.regions.get(m["region"])
        if r is not None and not r["available"]:
            raise memory_error(m)

    def _request_stop(self, m: JSON, rt: MachineRuntime, sig: int, grace: float) -> None:
        rt.stop_requested = True
        self._set_state(m, "stopping", "stop", source="user")
        if rt.run is not None:
            self._signal(m, rt, sig, grace)
        elif rt.in_delay and rt.launch_task is not None:
            rt.launch_task.cancel()
            self._set_state(m, "stopped", "exit", request=self._exit_request(0, requested=True), exit_code=0,
                            requested_stop=True)
            rt.stop_requested = False
        # else: the launch task is spawning; it sees stop_requested and finishes the stop

    async def stop_machine(self, app: str, machine_id: str, *, sig: int = signal.SIGTERM,
                           timeout: float | None = None) -> None:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        async with rt.lock:
            self._check_host_alive(m)
            if m["state"] in ("starting", "started"):
                self._request_stop(m, rt, sig, self.opt.stop_timeout if timeout is None else timeout)

    async def restart_machine(self, app: str, machine_id: str) -> None:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        async with rt.lock:
            self._check_host_alive(m)
            self._check_region_up(m)
            if m["state"] == "destroying":
                raise HostError(412, f"failed_precondition: machine {machine_id} is being destroyed")
            self._check_machine_capacity(m)
            self._restart_locked(m, rt)

    def _restart_locked(self, m: JSON, rt: MachineRuntime) -> None:
        if m["state"] in ("starting", "started"):
            self._request_stop(m, rt, signal.SIGTERM, self.opt.stop_timeout)
        launch = rt.launch_task

        async def finish() -> None:
            if launch is not None and not launch.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await launch
            async with rt.lock:
                if m["state"] in ("stopped", "created", "failed") and self.host_reachable(m.get("host"), m["region"]):
                    self._begin_start(m)
        rt.bg_task = self._spawn_bg(finish())

    async def update_machine(self, app: str, machine_id: str, body: JSON) -> JSON:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        async with rt.lock:
            self._check_host_alive(m)
            region = body.get("region")
            if region is not None and region != m["region"]:
                raise bad(f"cannot move machine {machine_id} from region {m['region']} to {region} by update", 422)
            skip_launch = _opt_bool(body, "skip_launch")
            name = body.get("name")
            if name is not None and (not isinstance(name, str) or not _MACHINE_NAME_RE.match(name)):
                raise bad("name must be 1-63 letters, digits, '.', '_' or '-'", 422)
            cfg, _region, volume = self._validate_config(app, body.get("config"), region=m["region"],
                                                         machine_id=machine_id,
                                                         missing_volume="invalid_argument: volume does not exist")
            self._check_region_up(m)
            self._check_machine_capacity(m)
            m["config"] = cfg
            m["instance_id"] = ids.instance_id(self.rng, ms=_now_ms(self.clock))
            if name:
                m["name"] = name
            self._detach_all(m, keep=volume["id"] if volume else None)
            if volume is not None:
                self._attach(volume, m)
            self._set_state(m, m["state"], "update", source="user")
            if not skip_launch:  # as on Fly: an update (re)launches the machine unless skip_launch
                if m["state"] in ("starting", "started"):
                    self._restart_locked(m, rt)
                elif m["state"] in ("stopped", "created", "failed", "suspended"):
                    self._begin_start(m)
            return m

    async def destroy_machine(self, app: str, machine_id: str, *, force: bool, app_deleted: bool = False) -> None:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        async with rt.lock:
            if not app_deleted:  # deleting the whole app takes its machines even from a dead host
                self._check_host_alive(m)
            if m["state"] not in ("stopped", "created", "failed") and not force:
                raise HostError(412, f"failed_precondition: unable to destroy machine {machine_id}, not currently "
                                     f"stopped (state {m['state']}); use force=true")
            self._set_state(m, "destroying", None)
            launch = rt.launch_task
            if rt.run is not None:
                rt.run.signal(signal.SIGKILL)
            elif launch is not None and rt.in_delay:
                launch.cancel()
            if launch is not None and not launch.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await launch
            if rt.bg_task is not None and not rt.bg_task.done():
                rt.bg_task.cancel()
            self._mark_destroyed(m)

    async def crash_machine(self, app: str, machine_id: str) -> None:
        m = self.machine(app, machine_id, live=True)
        rt = self.runtime(machine_id)
        self._check_host_alive(m)
        if rt.run is None or m["state"] not in RUNNING:
            raise HostError(412, f"failed_precondition: machine {machine_id} has no running process "
                                 f"(state {m['state']})")
        rt.unexpected = True
        rt.stop_requested = False
        rt.run.signal(signal.SIGKILL)

    async def wait_machine(self, app: str, machine_id: str, *, state: str, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        while True:
            try:
                m = self.machine(app, machine_id)
                current = m["state"]
            except HostError:
                if state == "destroyed" and self.apps.get(app) is not None:
                    return
                raise
            if current == state:
                return
            self._check_host_alive(m)  # a dead host's machine does not change: Fly cannot wait on it either
            if self.closing:
                raise HostError(503, "the host is shutting down; try again")
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise HostError(408, f"deadline_exceeded: machine failed to reach desired state, {state}, "
                                     f"currently {current}")
            await self.wait_change(remaining)

    def set_metadata(self, app: str, machine_id: str, key: str, value: str) -> None:
        m = self.machine(app, machine_id, live=True)
        self._check_host_alive(m)
        m["config"].setdefault("metadata", {})[key] = value
        self._save_machine(m)

    def delete_metadata(self, app: str, machine_id: str, key: str) -> None:
        m = self.machine(app, machine_id, live=True)
        self._check_host_alive(m)
        (m["config"].get("metadata") or {}).pop(key, None)
        self._save_machine(m)

    @staticmethod
    def valid_metadata_key(key: str) -> bool:
        return bool(_METADATA_KEY_RE.match(key))

    @classmethod
    def check_metadata(cls, key: str, value: str) -> None:
        if not cls.valid_metadata_key(key):
            raise bad(f"invalid metadata key {key[:200]!r}: 1-128 letters, digits, '.', '_', '-' or '/'")
        if len(value) > MAX_METADATA_VALUE:
            raise bad(f"metadata value for {key!r} is too long: {len(value)} characters, at most "
                      f"{MAX_METADATA_VALUE}")

    # ------------------------------------------------------------------ volumes
    def volume_dir(self, v: JSON) -> Path:
        return self.data_dir / "regions" / str(v["region"]) / "volumes" / str(v["id"])

    def snapshot_dir(self, s: JSON) -> Path:
        return self.data_dir / "regions" / str(s["region"]) / "snapshots" / str(s["id"])

    def volume(self, app: str, volume_id: str) -> JSON:
        self.app(app)
        v = self.volumes.get(volume_id)
        if v is None or v["app"] != app:
            raise HostError(404, f"volume not found: {volume_id}")
        return v

    def _retention_days(self, v: JSON) -> int:
        if v.get("snapshot_retention"):
            return int(v["snapshot_retention"])
        return max(1, round(self.opt.snapshot_retention / 86400))

    def volume_json(self, v: JSON) -> JSON:
        holder = v.get("attached_machine_id")
        size_blocks = v["size_gb"] * 262144
        return {"id": v["id"], "name": v["name"], "state": v["state"], "size_gb": v["size_gb"],
                "region": v["region"], "zone": v["host"], "encrypted": v["encrypted"],
                "attached_machine_id": holder, "attached_alloc_id": v.get("attached_alloc_id") if holder else None,
                "created_at": v["created_at"], "host_status": self.host_status(v),
                "fstype": "ext4", "block_size": 4096, "blocks": size_blocks, "blocks_free": size_blocks,
                "blocks_avail": size_blocks, "snapshot_retention": self._retention_days(v),
                "auto_backup_enabled": v.get("auto_backup_enabled", True)}

    async def create_volume(self, app: str, body: JSON) -> JSON:
        self.app(app)
        name = body.get("name")
        if not isinstance(name, str) or not _VOLUME_NAME_RE.match(name):
            raise bad("name is required: 1-30 letters, digits and underscores", 422)
        region = body.get("region")
        if not isinstance(region, str) or not region:
            raise bad("region is required (a string)", 422)
        size = body.get("size_gb")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 500):
            raise bad("size_gb must be a whole number between 1 and 500", 422)
        retention = body.get("snapshot_retention")
        if retention is not None and (isinstance(retention, bool) or not isinstance(retention, int)
                                      or not 1 <= retention <= 60):
            raise bad("snapshot_retention must be a whole number of days between 1 and 60", 422)
        for key in ("encrypted", "require_unique_zone", "machines_only", "auto_backup_enabled"):
            if body.get(key) is not None and not isinstance(body[key], bool):
                raise bad(f"'{key}' must be a boolean", 422)
        if body.get("compute") is not None and not isinstance(body["compute"], dict):
            raise bad("'compute' must be an object", 422)
        source_id, snap_id = body.get("source_volume_id"), body.get("snapshot_id")
        if source_id is not None and (not isinstance(source_id, str) or not source_id):
            raise bad("source_volume_id must be a volume id string", 422)
        if snap_id is not None and (not isinstance(snap_id, str) or not snap_id):
            raise bad("snapshot_id must be a snapshot id string", 422)
        if source_id and snap_id:
            raise bad("give either source_volume_id (fork) or snapshot_id (restore), not both", 422)
        self.region_ok(region)
        source_dir: Path | None = None
        source_host: str | None = None
        delay = "volume.create"
        if source_id:
            src = self.volumes.get(source_id)
            if src is None or src["app"] != app:
                raise HostError(404, f"source volume not found: {source_id}")
            self._check_host(src, f"cannot fork volume {source_id}")
            size = max(size or 0, src["size_gb"])
            source_dir, delay, source_host = self.volume_dir(src), "volume.fork", src["host"]
        elif snap_id:
            snap = self.snapshots.get(snap_id)
            if snap is None or snap["app"] != app:
                raise HostError(404, f"snapshot not found: {snap_id}")
            if size is not None and size < snap["size_gb"]:  # as Fly: never smaller than the snapshot's source
                raise bad(f"invalid_argument: size_gb {size} is smaller than the volume snapshot {snap_id} was "
                          f"taken of ({snap['size_gb']} GB); a restore needs at least that size")
            size = max(size or 0, snap["size_gb"])
            source_dir, delay = self.snapshot_dir(snap), "volume.restore"
        self._check_create_capacity(region, "volume")
        await self.delay(delay)
        self.app(app)
        self._check_create_capacity(region, "volume")  # hosts may have died during the delay
        vid = ids.volume_id(self.rng)
        v: JSON = {"id": vid, "app": app, "name": name, "state": "created", "size_gb": size or 1,
                   "region": region, "host": self._place(region, avoid=source_host),
                   "encrypted": body.get("encrypted", True) is not False,
                   "attached_machine_id": None, "attached_alloc_id": None, "created_at": self.now_iso(),
                   "snapshot_retention": retention, "auto_backup_enabled": body.get("auto_backup_enabled", True)
                   is not False, "source_volume_id": source_id, "snapshot_id": snap_id,
                   "last_scheduled_snapshot_at": None}
        target = self.volume_dir(v)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source_dir is not None:
            await asyncio.to_thread(_copy_dir, source_dir, target)
        else:
            target.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.runner.prepare_dir, target)
        self.volumes[vid] = v
        self.db.put("volume", vid, v)
        log.info("volume.created", volume_id=vid, app=app, region=region, source_volume_id=source_id,
                 snapshot_id=snap_id)
        return v

    async def extend_volume(self, app: str, volume_id: str, body: JSON) -> tuple[JSON, bool]:
        """Fly's extend: grow ``size_gb`` (never shrink). A machine that holds the volume keeps enforcing the size
        it was started with until it restarts (``needs_restart``)."""
        v = self.volume(app, volume_id)
        size = body.get("size_gb")
        if isinstance(size, bool) or not isinstance(size, int):
            raise bad("size_gb is required: the new size in GB, a whole number")
        if size <= v["size_gb"]:
            raise bad(f"size_gb must be larger than the volume's current size ({v['size_gb']} GB): a volume can "
                      f"only be extended")
        if size > 500:
            raise bad("size_gb must be at most 500")
        self._check_host(v, f"cannot extend volume {volume_id}")
        v["size_gb"] = size
        self.db.put("volume", v["id"], v)
        log.info("volume.extended", volume_id=v["id"], app=app, size_gb=size)
        holder = self._holder(v)
        return v, holder is not None and self.machines[holder]["state"] in RUNNING

    def list_volumes(self, app: str) -> list[JSON]:
        self.app(app)
        return sorted((v for v in self.volumes.values() if v["app"] == app), key=lambda v: (v["created_at"], v["id"]))

    def _holder(self, v: JSON) -> str | None:
        holder = v.get("attached_machine_id")
        if holder:
            m = self.machines.get(holder)
            if m is not None and m["state"] != "destroyed":
                return str(holder)
        return None

    async def delete_volume(self, app: str, volume_id: str) -> JSON:
        v = self.volume(app, volume_id)
        holder = self._holder(v)
        if holder:
            raise HostError(412, f"failed_precondition: volume is currently bound to machine: {holder}")
        out = self.volume_json(v)
        await self._remove_volume(v)
        out["state"] = "destroyed"
        out["attached_machine_id"] = None
        return out

    async def _remove_volume(self, v: JSON) -> None:
        self.volumes.pop(v["id"], None)
        self.db.delete("volume", v["id"])
        for s in [s for s in self.snapshots.values() if s["volume_id"] == v["id"]]:
            await self._remove_snapshot(s)
        await asyncio.to_thread(shutil.rmtree, self.volume_dir(v), True)

    async def _remove_snapshot(self, s: JSON) -> None:
        self.snapshots.pop(s["id"], None)
        self.db.delete("snapshot", s["id"])
        await asyncio.to_thread(shutil.rmtree, self.snapshot_dir(s), True)

    # ------------------------------------------------------------------ snapshots
    def snapshot_json(self, s: JSON) -> JSON:
        return {"id": s["id"], "created_at": s["created_at"], "digest": s["digest"], "size": s["size"],
                "status": s["status"], "retention_days": s["retention_days"],
                "volume_size": int(s["size_gb"]) * GIB}

    def list_snapshots(self, app: str, volume_id: str) -> list[JSON]:
        self.volume(app, volume_id)
        return sorted((s for s in self.snapshots.values() if s["volume_id"] == volume_id),
                      key=lambda s: (s["created_at"], s["id"]))

    async def create_snapshot(self, app: str, volume_id: str, *, kind: str = "user") -> JSON:
        v = self.volume(app, volume_id)
        self._check_host(v, f"cannot snapshot volume {volume_id}")
        if kind == "user":
            await self.delay("volume.snapshot")
        return await self._take_snapshot(v, kind)

    async def _take_snapshot(self, v: JSON, kind: str) -> JSON:
        s: JSON = {"id": ids.snapshot_id(self.rng), "app": v["app"], "volume_id": v["id"], "region": v["region"],
                   "created_at": self.now_iso(), "status": "created", "kind": kind, "size_gb": v["size_gb"],
                   "retention_days": self._retention_days(v), "size": 0, "digest": ""}
        target = self.snapshot_dir(s)
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_copy_dir, self.volume_dir(v), target)
        s["size"], s["digest"] = await asyncio.to_thread(_dir_size_and_digest, target)
        self.snapshots[s["id"]] = s
        self.db.put("snapshot", s["id"], s)
        log.info("volume.snapshot", volume_id=v["id"], snapshot_id=s["id"], kind=kind)
        return s

    async def scheduled_pass(self) -> JSON:
        """Take due scheduled snapshots, prune expired ones, purge long-destroyed machines."""
        now = self.clock.now()
        taken, pruned = [], []
        for v in list(self.volumes.values()):
            if not self.host_reachable(v.get("host"), v["region"]) or not v.get("auto_backup_enabled", True):
                continue
            last = _parse_time(v.get("last_scheduled_snapshot_at")) or _parse_time(v["created_at"])
            if last is None or (now - last).total_seconds() >= self.opt.snapshot_interval:
                s = await self._take_snapshot(v, "scheduled")
                taken.append(s["id"])
                v["last_scheduled_snapshot_at"] = utc_iso(now)
                self.db.put("volume", v["id"], v)
        for s in list(self.snapshots.values()):
            owner = self.volumes.get(s["volume_id"])
            if owner is not None and not owner.get("snapshot_retention"):
                retention = self.opt.snapshot_retention
            else:
                days = self._retention_days(owner) if owner is not None else s["retention_days"]
                retention = float(days) * 86400.0
            created = _parse_time(s["created_at"])
            if created is not None and (now - created).total_seconds() > retention:
                await self._remove_snapshot(s)
                pruned.append(s["id"])
        self.purge_expired()
        return {"taken": taken, "pruned": pruned}

    async def _scheduler_loop(self) -> None:
        tick = max(0.01, min(self.opt.scheduler_tick, self.opt.snapshot_interval))
        while True:
            await self.clock.sleep(tick)
            try:
                await self.scheduled_pass()
            except Exception:
                log.exception("snapshot.scheduler_failed")

    # ------------------------------------------------------------------ regions (fault injection)
    def region_json(self, r: JSON) -> JSON:
        return {"name": r["name"], "down": r["down"], "available": r["available"]}

    def set_outage(self, region: str, down: bool) -> JSON:
        r = self.regions.get(region)
        if r is None or region not in self.opt.regions:
            raise HostError(404, f"unknown region '{region}'")
        r["down"] = down
        self.db.put("region", region, r)
        if down:
            for m in self.machines.values():  # every host of the region goes down: its machines stop
                if m["region"] == region and m["state"] in RUNNING:
                    self._kill_unexpected(m)
        log.info("region.outage", region=region, down=down)
        self._notify()
        return self.region_json(r)

    def set_capacity(self, region: str, available: bool) -> JSON:
        r = self.regions.get(region)
        if r is None or region not in self.opt.regions:
            raise HostError(404, f"unknown region '{region}'")
        r["available"] = available
        self.db.put("region", region, r)
        return self.region_json(r)

    # ------------------------------------------------------------------ watch
    async def watch(self, since: int, timeout: float) -> JSON:
        deadline = self.clock.monotonic() + timeout
        while self.seq <= since and not self.closing:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            await self.wait_change(remaining)
        return {"seq": self.seq, "events": self.db.watch_since(since)}

    def proxy_target(self, machine_id: str) -> tuple[JSON | None, int | Gateway | None]:
        """The machine and where the proxy reaches its gateway: a loopback port (a process), the simulated
        gateway itself, or None (not started, or its host is unreachable: see :meth:`proxy_refusal`)."""
        m = self.machines.get(machine_id)
        if m is None or self._expired(m):
            return None, None
        if m["state"] != "started" or not self.host_reachable(m.get("host"), m["region"]):
            return m, None
        rt = self._rt.get(machine_id)
        if rt is not None and rt.run is not None and rt.run.gateway is not None:
            return m, rt.run.gateway
        port = m.get("port")
        return m, int(port) if port else None

    def proxy_refusal(self, m: JSON) -> str:
        """Why the proxy cannot reach machine ``m``'s gateway."""
        if m["state"] == "started" and not self.host_reachable(m.get("host"), m["region"]):
            return f"machine {m['id']} is unreachable: its host {m.get('host')} does not answer"
        return f"machine {m['id']} is not started (state {m['state']})"

