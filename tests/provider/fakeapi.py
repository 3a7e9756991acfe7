"""A scripted Machines API for client unit tests (httpx.MockTransport) and a clock that records sleeps."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import httpx

from sandkeep.clock import FakeClock
from sandkeep.provider.client import MachinesClient

TOKEN = "s3cret-token-value"

Reply = httpx.Response | Callable[[httpx.Request], httpx.Response]


class RecordingClock(FakeClock):
    """A FakeClock that remembers every sleep asked of it (no real waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


class FakeApi:
    """Routes (method, path) to a queue of replies; the last reply repeats. Records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *replies: Reply) -> FakeApi:
        self.routes[(method.upper(), path)] = list(replies)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = (request.method, _raw_path(request))
        queue = self.routes.get(key)
        if not queue:
            return httpx.Response(599, json={"error": f"unscripted request {key}"})
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(reply) and not isinstance(reply, httpx.Response):
            return reply(request)
        return reply

    def calls(self, method: str, path: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and (path is None or _raw_path(r) == path)]


def _raw_path(request: httpx.Request) -> str:
    """The path as sent (percent-escapes kept, so an escaped '/' stays one segment)."""
    return request.url.raw_path.split(b"?", 1)[0].decode()


def body(request: httpx.Request) -> Any:
    return json.loads(request.content or b"null")


def err(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": message, "status": str(status)}, headers=headers)


def ok(data: Any = None, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=data) if data is not None else httpx.Response(status)


def raises(exc_type: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated network failure", request=request)

    return reply


def machine(mid: str = "m1", *, name: str | None = "vm", state: str = "started", region: str = "lcl-a",
            metadata: dict[str, str] | None = None) -> dict[str, Any]:
    return {"id": mid, "name": name, "state": state, "region": region, "instance_id": f"i-{mid}",
            "config": {"image": "sandkeep/gateway", "env": {}, "metadata": metadata or {}}}


def volume(vid: str = "vol_1", *, name: str = "data", region: str = "lcl-a", state: str = "created",
           attached: str | None = None) -> dict[str, Any]:
    return {"id": vid, "name": name, "region": region, "state": state, "size_gb": 1,
            "attached_machine_id": attached, "host_status": "ok"}


def make_client(api: FakeApi, *, base_url: str = "http://fly.test", proxy_url: str | None = None,
                clock: RecordingClock | None = None, **kw: Any) -> tuple[MachinesClient, RecordingClock]:
    clock = clock or RecordingClock()
    client = MachinesClient(base_url, TOKEN, proxy_url=proxy_url, clock=clock,
                            transport=httpx.MockTransport(api), rng=random.Random(1234), **kw)
    return client, clock
