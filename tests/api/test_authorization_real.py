"""The authorization matrix (tests/api/test_authorization.py ROUTES) against the real InstanceService on SQLite.

The API holds no access rule of its own: the service decides (sandkeep.engine.access). This runs every route
for every authenticated actor through the real service and checks the refusals are exactly the matrix's
(403/404, nothing changed, no provider call) and every allowed call got past authorization (it may still be
refused for the instance's state, e.g. 409 for a retry with nothing to retry).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from sandkeep.api.app import create_app
from sandkeep.credentials import Credentials
from sandkeep.engine.runtime import Engine
from sandkeep.provider.models import MachineConfig
from sandkeep.runtime import Runtime
from sandkeep.sim.loop import SimClock
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore, open_store
from tests.api.conftest import gateway_echo
from tests.api.test_authorization import ADMIN, OTHER, OWNER, PLATFORM, ROUTES
from tests.dbsupport import sqlite_url
from tests.engine.conftest import engine_settings
from tests.support.model import Model, inline_threads, virtual_clock

SECRET = "real-authz-secret-0123456789abcdefghijklmnop"
USERS = {OWNER: ("alice", "user"), OTHER: ("bob", "user"), ADMIN: ("root", "admin"), PLATFORM: ("backend", "platform")}


@dataclass
class Real:
    client: httpx.AsyncClient
    store: SqlStore
    model: Model
    credentials: Credentials
    clock: SimClock
    upstream: list[httpx.Request]


# one world for the module (as the authorization matrix is long): its store, model, engine and app live on one
# virtual loop; each test starts from a cleared request log
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Real]:
    tmp_path: Path = tmp_path_factory.mktemp("authz-real")
    clock = virtual_clock()
    store = open_store(sqlite_url(tmp_path), clock)
    model = Model(tmp_path / "host", clock)
    settings = engine_settings(tmp_path, max_instances_per_user=0)  # one store for the module: no quota
    engine = Engine(settings, store, model.client, clock, worker_id="authz", prober=model.prober)
    engine.service.wake = lambda _id: None  # nothing runs in the background: the test sees the request alone
    credentials = Credentials(store, SECRET, clock)
    runtime = Runtime(settings=settings, clock=clock, service=engine.service, jwt_secret=SECRET, data_dir=tmp_path,
                      base_url="http://testserver", store=store, provider=model.client, engine=engine,
                      credentials=credentials)
    seen: list[httpx.Request] = []
    app = create_app(runtime, proxy_transport=gateway_echo(seen))
    try:
        with inline_threads():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                         base_url="http://testserver") as client:
                yield Real(client, store, model, credentials, clock, seen)
    finally:
        await engine.stop()
        await model.close()
        store.close()


@pytest_asyncio.fixture(loop_scope="module")
async def real(world: Real) -> Real:
    world.upstream.clear()
    world.model.requests.clear()
    return world


async def _running(real: Real, user_id: str, **fields: Any) -> InstanceRecord:
    """A running instance whose machine and volume exist at the provider."""
    app = f"sk-{user_id}"
    provider = real.model.client
    await provider.ensure_app(app, "personal")
    volume = await provider.create_volume(app, name="data", region="lcl-a")
    machine = await provider.create_machine(app, config=MachineConfig(image="sandkeep/gateway"), region="lcl-a")
    now = real.clock.now()
    n = len(real.store.list_instances(include_destroyed=True, limit=500).items)
    record = InstanceRecord(id=f"ins_real{n:04d}", user_id=user_id, sandbox_id=f"sbx_real{n:04d}",
                            status=Status.RUNNING, created_at=now, updated_at=now, app_name=app,
                            machine_id=machine.id, volume_id=volume.id, region="lcl-a", last_started_at=now,
                            status_changed_at=now, **fields)
    return real.store.insert_instance(record)


@pytest.mark.parametrize("who", [OWNER, OTHER, ADMIN, PLATFORM])
@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
async def test_real_service_authorization(real: Real, route: tuple[str, str, str, Any, dict[str, int], bool],
                                          who: str) -> None:
    name, method, path, body, expected, _ = route
    retained = {"retained_volume_id": "vol_gone", "retained_volume_cleanup_after": real.clock.now() + timedelta(days=7)}
    target = await _running(real, "alice", **retained)
    await _running(real, "bob")
    victim = real.credentials.issue_token("alice", "user", 3600).record
    real.model.requests.clear()
    before = real.store.get_instance(target.id)
    url = path.replace("{id}", target.id).replace("{tok}", victim.jti)
    user, role = USERS[who]
    kwargs: dict[str, Any] = {"headers": {"Authorization": f"Bearer {real.credentials.issue_token(user, role).token}"}}
    if isinstance(body, str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body

    resp = await real.client.request(method, url, **kwargs)

    want = expected[who]
    if want == 401:  # a route that takes no user token at all (the gateway heartbeat): refused, nothing changed
        assert resp.status_code == 401, (name, who, resp.text)
        after = real.store.get_instance(target.id)
        assert after is not None and before is not None and after.version == before.version
        assert real.model.requests == [], (name, who, real.model.requests)
    elif want in (403, 404):
        assert resp.status_code == want, (name, who, resp.text)
        after = real.store.get_instance(target.id)
        assert after is not None and before is not None
        assert after.version == before.version and after.status == before.status, (name, who)
        assert real.model.requests == [], (name, who, real.model.requests)
        assert not real.upstream
        assert real.credentials.get_token(victim.jti).revoked_at is None
    else:
        assert resp.status_code not in (401, 403, 404), (name, who, resp.text)
        assert resp.status_code < 500, (name, who, resp.text)
