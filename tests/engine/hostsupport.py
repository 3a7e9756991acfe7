"""Helpers for engine tests against a real local host process (real HTTP, real processes, real volumes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sandkeep.clock import Clock, SystemClock
from sandkeep.config import Settings
from sandkeep.engine.runtime import Engine
from sandkeep.gateway import TOKEN_HEADER as GATEWAY_TOKEN_HEADER
from sandkeep.provider.client import MachinesClient
from sandkeep.secrets import SecretBox
from sandkeep.store.records import InstanceRecord
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import sqlite_url
from tests.support.procs import HostHandle
from tests.support.wait import async_wait_until

FAST: dict[str, Any] = {
    "interval_running": 1.0, "interval_busy": 0.3, "interval_idle": 5.0, "lease_ttl": 10.0,
    "machine_wait_timeout": 10.0, "health_probe_timeout": 10.0, "health_probe_interval": 0.1,
    "alarm_poll_interval": 0.05, "claim_wait": 5.0, "detect_poll_interval": 0.5, "jitter_fraction": 0.0,
}


def host_settings(tmp_path: Path, host: HostHandle, key: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {"home": tmp_path / "home", "secrets_key": key, "regions": ",".join(host.regions),
                              **FAST}
    values.update(changes)
    return Settings(**values)


@dataclass
class Rig:
    host: HostHandle
    store: SqlStore
    provider: MachinesClient
    engine: Engine
    clock: Clock
    http: httpx.AsyncClient

    @property
    def service(self) -> Any:
        return self.engine.service

    def get(self, instance_id: str) -> InstanceRecord:
        record = self.store.get_instance(instance_id)
        assert record is not None
        return record

    def events(self, instance_id: str) -> list[str]:
        return [e.event for e in reversed(self.store.list_events(instance_id=instance_id, limit=1000).items)]

    async def event(self, instance_id: str, name: str, timeout: float = 30.0) -> Any:
        """The newest ``name`` event of the instance, waited for: the engine writes events on its store thread,
        after the record write a test may already have seen."""
        async def check() -> Any:
            items = self.store.list_events(instance_id=instance_id, name=name, limit=5).items
            return items[0] if items else None

        return await async_wait_until(check, timeout=timeout,
                                      message=f"a {name} event (events: {self.events(instance_id)})")

    async def wait_status(self, instance_id: str, *statuses: str, timeout: float = 60.0) -> InstanceRecord:
        async def check() -> InstanceRecord | None:
            record = self.get(instance_id)
            return record if record.status in statuses else None

        return await async_wait_until(check, timeout=timeout,
                                      message=f"{instance_id} in {statuses} (events: {self.events(instance_id)})")

    async def wait_for(self, instance_id: str, predicate: Any, what: str, timeout: float = 60.0) -> InstanceRecord:
        async def check() -> InstanceRecord | None:
            record = self.get(instance_id)
            return record if predicate(record) else None

        return await async_wait_until(check, timeout=timeout,
                                      message=f"{instance_id}: {what} (events: {self.events(instance_id)})")

    async def wait_recovered(self, old: InstanceRecord, timeout: float = 60.0) -> InstanceRecord:
        return await self.wait_for(old.id, lambda r: r.status == "running" and r.machine_id != old.machine_id,
                                   "running on a replacement machine", timeout)

    async def gateway(self, record: InstanceRecord, method: str, path: str, content: bytes | None = None
                      ) -> httpx.Response:
        assert record.machine_id
        base, headers = self.provider.proxy_target(record.app_name, record.machine_id)
        current = self.store.get_instance(record.id) or record  # the token as the engine stores it now
        token = self.engine.ctx.gateway_token(current)
        if token:
            headers = {**headers, GATEWAY_TOKEN_HEADER: token}
        return await self.http.request(method, f"{base}{path}", headers=headers, content=content)

    async def local(self, method: str, path: str, json: Any = None) -> httpx.Response:
        resp = await self.http.request(method, f"{self.host.url}{path}", headers=self.host.headers(), json=json)
        assert resp.status_code < 300, resp.text
        return resp

    async def crash(self, record: InstanceRecord) -> None:
        """SIGKILL the machine and wait until the host reports it ``stopped`` (the exit is noticed
        asynchronously: a reconcile right after the POST could still see ``started``)."""
        path = f"/v1/apps/{record.app_name}/machines/{record.machine_id}"
        await self.local("POST", f"/_local/apps/{record.app_name}/machines/{record.machine_id}/crash")

        async def stopped() -> bool:  # (a running engine may already have destroyed it: that counts too)
            resp = await self.http.get(f"{self.host.url}{path}", headers=self.host.headers())
            return resp.status_code == 404 or resp.json().get("state") not in ("started", "starting")

        await async_wait_until(stopped, timeout=30, message=f"machine {record.machine_id} to stop after the crash")

    async def machines(self, app: str) -> list[dict[str, Any]]:
        resp = await self.local("GET", f"/v1/apps/{app}/machines")
        result: list[dict[str, Any]] = resp.json()
        return result

    async def volumes(self, app: str) -> list[dict[str, Any]]:
        resp = await self.local("GET", f"/v1/apps/{app}/volumes")
        result: list[dict[str, Any]] = resp.json()
        return result


@asynccontextmanager
async def rig(tmp_path: Path, host: HostHandle, *, clock: Clock | None = None, start: bool = True,
              db: str | None = None, worker_id: str = "w1", key: str | None = None,
              trace: Any = None, **settings: Any) -> AsyncIterator[Rig]:
    clock = clock or SystemClock()
    store = open_store(db or sqlite_url(tmp_path), clock)
    provider = MachinesClient(host.url, host.token, proxy_url=host.proxy_url, clock=SystemClock(), timeout=30.0,
                              max_attempts=3, backoff_base=0.05, backoff_max=0.5)
    key = key or SecretBox.generate_key()
    engine = Engine(host_settings(tmp_path, host, key, **settings), store, provider, clock, worker_id=worker_id,
                    trace=trace)
    http = httpx.AsyncClient(timeout=30.0)
    try:
        if start:
            await engine.start()
        yield Rig(host=host, store=store, provider=provider, engine=engine, clock=clock, http=http)
    finally:
        await engine.stop()
        await http.aclose()
        await provider.aclose()
        store.close()
