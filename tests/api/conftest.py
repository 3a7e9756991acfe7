"""Pure-API fixtures: the real FastAPI app over an in-memory fake service, through httpx's ASGI transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sandkeep.api.app import create_app
from sandkeep.clock import FakeClock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials, memory_credentials
from sandkeep.logs import configure_logging
from sandkeep.runtime import Runtime
from tests.support.fake_service import FakeService
from tests.support.model import loop_factories

SECRET = "api-test-secret-0123456789abcdefghijklmnop"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests over the provider model (the ``real`` fixtures) run on the virtual loop (tests/support/model.py)."""
    return loop_factories(item)


@dataclass
class Api:
    client: httpx.AsyncClient
    service: FakeService
    credentials: Credentials
    upstream: list[httpx.Request] = field(default_factory=list)

    def token(self, user_id: str = "alice", role: str = "user", ttl: float | None = None) -> str:
        """A token recorded in the app's registry (as `sandkeep token` makes them)."""
        return self.credentials.issue_token(user_id, role, ttl).token

    def auth(self, user_id: str = "alice", role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id, role)}"}


def gateway_echo(seen: list[httpx.Request]) -> httpx.MockTransport:
    """Stands in for the provider's proxy: echoes what reached it."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"method": request.method, "url": str(request.url), "body": request.content.decode(errors="replace"),
                "headers": {k.lower(): v for k, v in request.headers.items()}}
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps(body).encode()),
                              headers={"content-type": "application/json", "x-gateway": "yes"})

    return httpx.MockTransport(handler)


def refusing_gateway_client(tmp_path: Path) -> tuple[httpx.AsyncClient, str]:
    """A client of an app whose gateway proxy cannot connect, and the id of alice's running instance."""
    service = FakeService()
    record = service.add("alice")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    runtime = make_runtime(service, tmp_path)
    app = create_app(runtime, proxy_transport=httpx.MockTransport(refuse))
    token = runtime.credentials.issue_token("alice").token
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                               base_url="http://t", headers={"Authorization": f"Bearer {token}"})
    return client, record.id


def make_runtime(service: FakeService, tmp_path: Path) -> Runtime:
    return Runtime(settings=Settings(home=tmp_path), clock=service.clock, service=service, jwt_secret=SECRET,
                   data_dir=tmp_path, base_url="http://testserver",
                   credentials=memory_credentials(SECRET, service.clock))


@pytest.fixture(scope="session", autouse=True)
def _json_logging() -> None:
    configure_logging("warning")  # plain JSON lines, as under serve (the default console renderer is slow)


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[FastAPI, FakeService, list[httpx.Request]]:
    """One app per module (building one costs ~50 ms); its fake service is reset for every test."""
    service = FakeService(FakeClock())
    seen: list[httpx.Request] = []
    app = create_app(make_runtime(service, tmp_path_factory.mktemp("api")), proxy_transport=gateway_echo(seen))
    return app, service, seen


@pytest.fixture()
async def api(shared_app: tuple[FastAPI, FakeService, list[httpx.Request]]) -> AsyncIterator[Api]:
    app, service, seen = shared_app
    service.reset(FakeClock())
    seen.clear()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Api(client=client, service=service, credentials=app.state.credentials, upstream=seen)


from tests.api.test_real_service import real  # noqa: E402,F401  (the real-service fixture, for test_labels.py too)
