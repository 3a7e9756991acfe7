"""Fixtures for the web UI page tests: the web router on a small FastAPI app with a fake service."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI

from sandkeep.api.errors import install_error_handlers
from sandkeep.web.routes import create_web_router
from tests.web.fakes import FakeRuntime, make_runtime, token

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF field"
    return match.group(1)


@pytest.fixture()
def rt() -> FakeRuntime:
    return make_runtime(web_poll_interval=2.0)


def make_app(runtime: FakeRuntime) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)  # as in the real API app: the web routes must never fall through to JSON
    app.include_router(create_web_router(runtime))
    return app


Login = Callable[[str, str], Awaitable[httpx.AsyncClient]]


@pytest.fixture()
async def login(rt: FakeRuntime) -> AsyncIterator[Login]:
    """login(user, role) -> an httpx client holding a signed-in session cookie."""
    clients: list[httpx.AsyncClient] = []
    app = make_app(rt)

    async def do(user: str, role: str = "user") -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver")
        clients.append(client)
        page = await client.get("/login")
        assert page.status_code == 200
        r = await client.post("/login", data={"token": token(user, role), "csrf_token": csrf_of(page.text)})
        assert r.status_code == 303, r.text
        return client

    yield do
    for c in clients:
        await c.aclose()


@pytest.fixture()
async def anon(rt: FakeRuntime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(rt)),
                                 base_url="https://testserver") as client:
        yield client
