"""Fixtures for the web UI page tests: the web router on a small FastAPI app with a fake service."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sandkeep.api.errors import install_error_handlers
from sandkeep.web.routes import install_web
from tests.support.fake_service import FakeRuntime, make_runtime, token
from tests.web.browser import LAPTOP, ConsoleLog, launched_browser

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
    install_web(app, runtime)
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
        r = await client.post("/login", data={"token": token(rt, user, role), "csrf_token": csrf_of(page.text)})
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


# --- browser tests ---------------------------------------------------------------------------------------

OpenPage = Callable[..., tuple[Any, ConsoleLog]]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Debian Chromium per test module (launched only when a test asks for it).

    Module scope, not session: Playwright's sync API runs its own event loop, which must be gone before
    the pytest-asyncio tests of the next module run."""
    with launched_browser() as b:
        yield b


@pytest.fixture()
def open_page(browser: Any) -> Iterator[OpenPage]:
    """open_page(viewport=..., **context_options) -> (page, console log), in a fresh browser context.

    Every page opened here is watched for console errors/warnings and uncaught page errors; the test
    fails at teardown if any occurred that it did not expect with ``log.allow(pattern)``.
    """
    contexts: list[Any] = []
    logs: list[ConsoleLog] = []

    def do(viewport: dict[str, int] | None = None, **options: Any) -> tuple[Any, ConsoleLog]:
        context = browser.new_context(viewport=viewport or LAPTOP, **options)
        contexts.append(context)
        pg = context.new_page()
        log = ConsoleLog()
        log.attach(pg)
        logs.append(log)
        return pg, log

    yield do
    for context in contexts:
        context.close()
    problems = [p for log in logs for p in log.unexpected()]
    assert not problems, "browser console problems:\n" + "\n".join(problems)


@pytest.fixture()
def page(open_page: OpenPage) -> tuple[Any, ConsoleLog]:
    """A laptop-sized page whose console is checked at teardown (see ``open_page``)."""
    return open_page()
