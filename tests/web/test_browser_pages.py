"""Browser tests of the pages' client-side behaviour against the web router with a fake service.

A real Chromium drives the real router (uvicorn on a loopback port); only the service behind it is
fake, so the state can be flipped at will: live updates without a reload, the confirmation dialog, the
CSRF header htmx sends, keyboard use, phone width, and no console errors. The end-to-end flows against
``sandkeep serve`` and the local host are in test_browser_serve.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import uvicorn

from sandkeep.engine.service import InstanceBusy
from sandkeep.store.records import Status
from sandkeep.web import charts
from tests.support.procs import free_port
from tests.support.wait import wait_until
from tests.web.browser import LAPTOP, PHONE, ConsoleLog, launched_browser, screenshot, sign_in_with_token
from tests.web.conftest import make_app
from tests.web.fakes import FakeRuntime, make_runtime, token

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched_browser() as b:
        yield b


@pytest.fixture()
def site() -> Iterator[tuple[str, FakeRuntime]]:
    rt = make_runtime(web_poll_interval=0.3)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(rt), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=15, message="uvicorn started")
    try:
        yield f"http://127.0.0.1:{port}", rt
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture()
def page(browser: Any) -> Iterator[tuple[Any, ConsoleLog]]:
    context = browser.new_context(viewport=LAPTOP)
    pg = context.new_page()
    log = ConsoleLog()
    log.attach(pg)
    try:
        yield pg, log
    finally:
        context.close()


def test_badge_follows_the_state_without_reload(site: tuple[str, FakeRuntime],
                                                page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    rt.service.add("ins_a1", "alice")
    sign_in_with_token(pg, base, token("alice"))
    badge = pg.locator("#ins-ins_a1 [data-testid=badge]")
    assert badge.inner_text() == "Running"
    pg.evaluate("window.__noReload = 'still here'")
    rt.service.instances["ins_a1"] = rt.service.instances["ins_a1"].copy(status=Status.RECOVERING)
    pg.wait_for_selector("#ins-ins_a1[data-status=recovering]")
    assert badge.inner_text() == "Recovering"
    assert badge.evaluate("el => getComputedStyle(el).animationName") == "pulse"  # visibly animated
    assert pg.locator("#start-ins_a1").is_disabled() and pg.locator("#stop-ins_a1").is_disabled()
    assert "wait until it finishes" in (pg.locator("#stop-ins_a1").get_attribute("title") or "")
    assert pg.locator("#open-ins_a1").count() == 0
    rt.service.instances["ins_a1"] = rt.service.instances["ins_a1"].copy(status=Status.RUNNING)
    pg.wait_for_selector("#ins-ins_a1[data-status=running]")
    assert pg.locator("#open-ins_a1").is_visible()
    assert pg.evaluate("window.__noReload") == "still here"
    log.assert_clean()


def test_destroy_asks_first_and_reports_the_result(site: tuple[str, FakeRuntime],
                                                   page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    rt.service.add("ins_a1", "alice")
    sign_in_with_token(pg, base, token("alice"))
    questions: list[str] = []

    def dismiss(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.dismiss()

    pg.once("dialog", dismiss)
    pg.click("#destroy-ins_a1")
    wait_until(lambda: questions, timeout=10, message="confirmation dialog")
    assert questions[0].startswith("Destroy instance ins_a1?")
    assert rt.service.calls == []
    pg.once("dialog", lambda dialog: dialog.accept())
    pg.click("#destroy-ins_a1")
    pg.wait_for_selector("#flash .flash-ok")
    assert "Destroy started for ins_a1" in pg.inner_text("#flash")
    assert rt.service.calls == [("destroy", "alice", "ins_a1")]  # htmx sent the CSRF header
    pg.wait_for_selector("#ins-ins_a1[data-status=destroying]")
    assert pg.locator("#restart-ins_a1").is_disabled()
    log.assert_clean()


def test_keyboard_only_start(site: tuple[str, FakeRuntime], page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    rt.service.add("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token("alice"))
    for _ in range(30):
        pg.keyboard.press("Tab")
        if pg.evaluate("document.activeElement && document.activeElement.id") == "start-ins_a1":
            break
    else:
        pytest.fail("the Start button is not reachable with the Tab key")
    pg.keyboard.press("Enter")
    pg.wait_for_selector("#flash .flash-ok")
    assert rt.service.calls == [("start", "alice", "ins_a1")]
    log.assert_clean()


def test_busy_refusal_is_shown(site: tuple[str, FakeRuntime], page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    rt.service.add("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token("alice"))
    # the engine moved on between drawing the page and the click: the service refuses
    rt.service.fail_next = InstanceBusy("instance ins_a1 is busy (starting)", status="starting")
    pg.click("#restart-ins_a1")
    pg.wait_for_selector("#flash .flash-error")
    assert "Could not restart ins_a1: instance ins_a1 is busy (starting)" in pg.inner_text("#flash")
    assert rt.service.calls == [("restart", "alice", "ins_a1")]
    log.assert_clean()


def test_admin_pages_render_cleanly_at_laptop_and_phone_width(site: tuple[str, FakeRuntime], browser: Any) -> None:
    base, rt = site
    now = rt.clock.now()
    rt.service.add("ins_a1", "alice")
    rt.service.add("ins_b1", "bob", Status.RECOVERING, recovery_started_at=now - timedelta(seconds=40),
                   pending_recovery_volume_id="vol_fork1")
    rt.service.add("ins_c1", "carol", Status.STOPPED, last_recovery_error="replacement machine gone",
                   last_recovery_error_at=now - timedelta(minutes=3), retained_volume_id="vol_keep",
                   retained_volume_cleanup_after=now + timedelta(days=7))
    for minutes in range(5, 600, 37):
        rt.service.event(charts.STARTED, "ins_c1", at=now - timedelta(minutes=minutes))
        rt.service.event(charts.SUCCEEDED if minutes % 3 else charts.FAILED, "ins_c1",
                         at=now - timedelta(minutes=minutes - 1), duration_ms=minutes * 900)
    for name, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        pg = context.new_page()
        log = ConsoleLog()
        log.attach(pg)
        sign_in_with_token(pg, base, token("root", "admin"))
        assert pg.url.endswith("/ui/admin/")
        assert pg.locator("[data-testid=recovering-now]").inner_text().count("ins_b1") == 1
        assert pg.locator("svg.chart").count() == 2
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"{name}: page scrolls sideways ({width}px)"
        screenshot(pg, f"fake-fleet-{name}")
        pg.goto(f"{base}/ui/admin/instances/ins_c1")
        assert "vol_keep" in pg.inner_text("[data-testid=recovery-card]")
        assert pg.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(pg, f"fake-detail-{name}")
        log.assert_clean()
        context.close()
