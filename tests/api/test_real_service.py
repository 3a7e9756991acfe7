"""The API over the real InstanceService and SqlStore (the one provider model): the issue 3 §4 contract end to end —
instance JSON, busy gating, admin-only fleet events with name filter and cursor pagination, instance listing
filters and cursors, the audit log."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandkeep.api.app import create_app
from sandkeep.credentials import Credentials
from sandkeep.engine.runtime import Engine
from sandkeep.runtime import Runtime
from sandkeep.store.records import Status
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import sqlite_url
from tests.engine.conftest import engine_settings
from tests.support.model import Model, inline_threads, virtual_clock

SECRET = "real-service-secret-0123456789abcdefghijklmnop"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


class Real:
    def __init__(self, client: httpx.AsyncClient, engine: Engine, store: SqlStore, model: Model,
                 credentials: Credentials) -> None:
        self.client, self.engine, self.store, self.model = client, engine, store, model
        self.credentials = credentials

    def auth(self, user: str, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials.issue_token(user, role, 3600).token}"}

    async def running(self, user: str) -> dict[str, Any]:
        resp = await self.client.post("/v1/instances", json={}, headers=self.auth(user))
        assert resp.status_code == 201, resp.text
        iid = resp.json()["id"]
        await self.engine.reconcile_now(iid)
        body: dict[str, Any] = (await self.client.get(f"/v1/instances/{iid}", headers=self.auth(user))).json()
        assert body["status"] == "running", body
        return body


@pytest.fixture()
async def real(tmp_path: Path) -> AsyncIterator[Real]:
    clock = virtual_clock()
    store = open_store(sqlite_url(tmp_path), clock)
    model = Model(tmp_path / "host", clock)
    settings = engine_settings(tmp_path)
    engine = Engine(settings, store, model.client, clock, worker_id="api", prober=model.prober)
    engine.service.wake = lambda _id: None  # the test drives reconciles itself
    credentials = Credentials(store, SECRET, clock)
    runtime = Runtime(settings=settings, clock=clock, service=engine.service, jwt_secret=SECRET, data_dir=tmp_path,
                      base_url="http://testserver", store=store, provider=model.client, engine=engine,
                      credentials=credentials)
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    with inline_threads():
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Real(client, engine, store, model, credentials)
    await engine.stop()
    await model.close()
    store.close()


async def _walk(real: Real, path: str, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = await real.client.get(path, params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("pagination never ended")


async def test_instance_json_fields_and_iso_utc_times(real: Real) -> None:
    inst = await real.running("alice")
    for name in ("id", "user_id", "sandbox_id", "status", "busy", "region", "machine_id", "volume_id", "app_name",
                 "created_at", "last_started_at", "last_stopped_at", "recovery"):
        assert name in inst, name
    assert set(inst["recovery"]) >= {"started_at", "pending_volume_id", "retained_volume_id",
                                     "retained_volume_cleanup_after", "last_error", "last_error_at"}
    assert inst["busy"] is False and inst["id"].startswith("ins_") and inst["sandbox_id"].startswith("sbx_")
    assert ISO_UTC.match(inst["created_at"]) and ISO_UTC.match(inst["last_started_at"])
    await real.model.crash(inst["machine_id"])
    await real.model.snapshot(inst["volume_id"])
    await real.engine.reconcile_now(inst["id"])
    after = (await real.client.get(f"/v1/instances/{inst['id']}", headers=real.auth("alice"))).json()
    assert after["recovery"]["retained_volume_id"] == inst["volume_id"]
    assert ISO_UTC.match(after["recovery"]["retained_volume_cleanup_after"])


async def test_fleet_events_are_admin_only_filtered_by_name_and_paginated(real: Real) -> None:
    a = await real.running("alice")
    b = await real.running("bob")
    for who in (("alice", "user"), ("svc", "platform")):
        denied = await real.client.get("/v1/events", headers=real.auth(*who))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    admin = real.auth("root", "admin")
    everything = await _walk(real, "/v1/events", admin, limit="2")
    assert {e["instance_id"] for e in everything} == {a["id"], b["id"]}
    ids = [e["id"] for e in everything]
    assert len(ids) == len(set(ids)) and ids == sorted(ids, reverse=True)  # newest first, each once
    started = await _walk(real, "/v1/events", admin, name="instance.started", limit="1")
    assert [e["event"] for e in started] == ["instance.started", "instance.started"]
    assert {e["instance_id"] for e in started} == {a["id"], b["id"]}
    for e in started:
        assert ISO_UTC.match(e["at"]) and e["user_id"] and e["sandbox_id"] and e["status"] == "running"
    bad = await real.client.get("/v1/events", params={"cursor": "not-a-cursor"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["status"] == 400


async def test_instance_listing_filters_and_cursor_pagination(real: Real) -> None:
    mine = [await real.running("alice") for _ in range(3)]
    theirs = await real.running("bob")
    stop = await real.client.post(f"/v1/instances/{mine[0]['id']}/stop", headers=real.auth("alice"))
    assert stop.status_code == 202
    await real.engine.reconcile_now(mine[0]["id"])
    admin = real.auth("root", "admin")
    every = await _walk(real, "/v1/instances", admin, limit="1")
    assert sorted(i["id"] for i in every) == sorted([m["id"] for m in mine] + [theirs["id"]])
    by_user = await _walk(real, "/v1/instances", admin, user_id="alice", limit="2")
    assert sorted(i["id"] for i in by_user) == sorted(m["id"] for m in mine)
    stopped = await _walk(real, "/v1/instances", admin, status="stopped")
    assert [i["id"] for i in stopped] == [mine[0]["id"]]
    own = await _walk(real, "/v1/instances", real.auth("bob"), limit="1")
    assert [i["id"] for i in own] == [theirs["id"]]


async def test_busy_gating_is_409_instance_busy_on_every_user_action(real: Real) -> None:
    inst = await real.running("alice")
    real.model.host.opt.delays["machine.boot.first"] = 3600.0  # the replacement boots slowly: the wait hands off
    await real.model.crash(inst["machine_id"])
    await real.engine.reconcile_now(inst["id"])
    assert real.store.get_instance(inst["id"]).status == Status.RECOVERING
    for action in ("start", "stop", "restart"):
        resp = await real.client.post(f"/v1/instances/{inst['id']}/{action}", headers=real.auth("alice"))
        assert resp.status_code == 409, resp.text
        err = resp.json()["error"]
        assert err == {**err, "code": "instance_busy", "status": 409} and err["message"]
    refused = await real.client.delete(f"/v1/instances/{inst['id']}", headers=real.auth("alice"))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "instance_recovering"
    cleanup = await real.client.post(f"/v1/instances/{inst['id']}/retained-volume/cleanup",
                                     headers=real.auth("root", "admin"))
    assert cleanup.status_code == 409
    forced = await real.client.delete(f"/v1/instances/{inst['id']}?force=true", headers=real.auth("root", "admin"))
    assert forced.status_code == 202 and forced.json()["status"] == "destroying" and forced.json()["busy"] is True
    audit = (await real.client.get("/v1/audit", headers=real.auth("root", "admin"))).json()["items"]
    assert [(a["action"], a["outcome"]) for a in reversed(audit)] == [
        ("retained_volume_cleanup", "refused"), ("force_destroy", "ok")]
