"""Fixtures for driving a real ``sandkeep host`` process through MachinesClient."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sandkeep.gateway import TOKEN_HEADER
from sandkeep.provider.client import MachinesClient
from tests.host.conftest import GATEWAY_TOKEN
from tests.host.specvalidate import validate
from tests.provider.fakeapi import RecordingClock
from tests.provider.speccheck import check_request
from tests.support.procs import HostHandle

_counter = itertools.count(1)


class Local:
    """The local host's non-Fly endpoints (/_local/...), the proxy, and a MachinesClient on the host."""

    def __init__(self, handle: HostHandle, client: MachinesClient, clock: RecordingClock) -> None:
        self.handle = handle
        self.client = client
        self.clock = clock
        self.http = httpx.AsyncClient(base_url=handle.url, headers=handle.headers(), timeout=30.0)
        self.proxy = httpx.AsyncClient(base_url=handle.proxy_url, timeout=30.0)

    async def post(self, path: str, payload: Any = None) -> httpx.Response:
        resp = await self.http.post(path, json=payload)
        assert resp.status_code < 300, f"POST {path} -> {resp.status_code} {resp.text}"
        return resp

    async def outage(self, region: str, down: bool) -> None:
        await self.post(f"/_local/regions/{region}/outage", {"down": down})

    async def capacity(self, region: str, available: bool) -> None:
        await self.post(f"/_local/regions/{region}/capacity", {"available": available})

    async def fault(self, **rule: Any) -> None:
        await self.post("/_local/faults", rule)

    async def clear_faults(self) -> None:
        resp = await self.http.delete("/_local/faults")
        assert resp.status_code < 300, resp.text

    async def crash(self, app: str, machine_id: str) -> None:
        await self.post(f"/_local/apps/{app}/machines/{machine_id}/crash")

    async def put_data(self, app: str, machine_id: str, key: str, value: bytes) -> httpx.Response:
        base, headers = self.client.proxy_target(app, machine_id)
        headers = {**headers, TOKEN_HEADER: GATEWAY_TOKEN}
        return await self.proxy.put(f"{base}/data/{key}", content=value, headers=headers)

    async def get_data(self, app: str, machine_id: str, key: str) -> httpx.Response:
        base, headers = self.client.proxy_target(app, machine_id)
        headers = {**headers, TOKEN_HEADER: GATEWAY_TOKEN}
        return await self.proxy.get(f"{base}/data/{key}", headers=headers)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.proxy.aclose()
        await self.client.aclose()


class SpecCheckingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport that checks every /v1 request and answer against Fly's spec file."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/"):
            check_request(request)
        response = await self.inner.handle_async_request(request)
        if request.url.path.startswith("/v1/"):
            content = await response.aread()
            validate(request.url.path, request.method, response.status_code, json.loads(content) if content else None)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def make_local(handle: HostHandle) -> Local:
    clock = RecordingClock()
    client = MachinesClient(handle.url, handle.token, proxy_url=handle.proxy_url, clock=clock, timeout=30.0,
                            max_attempts=5, backoff_base=0.05, backoff_max=0.5, transport=SpecCheckingTransport())
    return Local(handle, client, clock)


@pytest.fixture()
async def local(host_session: HostHandle) -> AsyncIterator[Local]:
    """A client on the session-wide host (use a fresh app per test; do not change global host state)."""
    loc = await make_local(host_session)
    yield loc
    await loc.aclose()


@pytest.fixture()
async def fresh_local(host: HostHandle) -> AsyncIterator[Local]:
    """A client on a host of its own (for outages, capacity and fault injection, which are host-wide)."""
    loc = await make_local(host)
    yield loc
    await loc.aclose()


@pytest.fixture()
def app_name(request: pytest.FixtureRequest) -> str:
    """A unique, Fly-valid app name per test."""
    return f"sk-t{os.getpid() % 10000}-{next(_counter)}"
