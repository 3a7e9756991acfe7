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
from sandkeep.store.records import AuditRecord, Status
from sandkeep.web import charts
from tests.support.fake_service import FakeRuntime, make_runtime, token
from tests.support.procs import free_port
from tests.support.wait import wait_until
from tests.web.browser import LAPTOP, PHONE, ConsoleLog, screenshot, sign_in_with_token
from tests.web.conftest import OpenPage, make_app

pytestmark = pytest.mark.browser


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


def test_badge_follows_the_state_without_reload(site: tuple[str, FakeRuntime],
                                                page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    rt.service.put("ins_a1", "alice")
    sign_in_with_token(pg, base, token(rt, "alice"))
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
    rt.service.put("ins_a1", "alice")
    sign_in_with_token(pg, base, token(rt, "alice"))
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
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token(rt, "alice"))
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
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token(rt, "alice"))
    # the engine moved on between drawing the page and the click: the service refuses
    rt.service.fail_next = InstanceBusy("instance ins_a1 is busy (starting)", status="starting")
    pg.click("#start-ins_a1")
    pg.wait_for_selector("#flash .flash-error")
    assert "Could not start ins_a1: instance ins_a1 is busy (starting)" in pg.inner_text("#flash")
    assert rt.service.calls == [("start", "alice", "ins_a1")]
    log.assert_clean()


def test_admin_pages_render_cleanly_at_laptop_and_phone_width(site: tuple[str, FakeRuntime],
                                                              open_page: OpenPage) -> None:
    base, rt = site
    now = rt.clock.now()
    rt.service.put("ins_a1", "alice")
    rt.service.put("ins_b1", "bob", Status.RECOVERING, recovery_started_at=now - timedelta(seconds=40),
                   pending_recovery_volume_id="vol_fork1")
    rt.service.put("ins_c1", "carol", Status.STOPPED, last_recovery_error="replacement machine gone",
                   last_recovery_error_at=now - timedelta(minutes=3), retained_volume_id="vol_keep",
                   retained_volume_cleanup_after=now + timedelta(days=7))
    for minutes in range(5, 600, 37):
        rt.service.event(charts.STARTED, "ins_c1", at=now - timedelta(minutes=minutes))
        rt.service.event(charts.SUCCEEDED if minutes % 3 else charts.FAILED, "ins_c1",
                         at=now - timedelta(minutes=minutes - 1), duration_ms=minutes * 900)
    for name, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
        pg, log = open_page(viewport)
        sign_in_with_token(pg, base, token(rt, "root", "admin"))
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


# --- quality bar: phone width, keyboard, focus, reduced motion, failures shown in the page ------------------

FITS = "document.scrollingElement.scrollWidth <= innerWidth"


def busy_fleet(rt: FakeRuntime) -> None:
    """Instances in many states, long ids and errors, recovery events and admin actions on record."""
    now = rt.clock.now()
    rt.service.put("ins_a1", "root", Status.STOPPED)
    rt.service.put("ins_a2_with_a_rather_long_identifier_0123456789", "root")
    rt.service.put("ins_b1", "bob", Status.RECOVERING, recovery_started_at=now - timedelta(seconds=40),
                   pending_recovery_volume_id="vol_fork_0123456789abcdef")
    rt.service.put("ins_c1", "carol", Status.STOPPED,
                   last_recovery_error="fork of vol_0123456789abcdef failed: create_volume sk-carol/ins_c1 in "
                                       "lcl-c: insufficient resources to create new volume (HTTP 412)",
                   last_recovery_error_at=now - timedelta(minutes=3), retained_volume_id="vol_keep_0123456789",
                   retained_volume_cleanup_after=now + timedelta(days=7))
    for minutes in range(5, 600, 37):
        rt.service.event(charts.STARTED, "ins_c1", at=now - timedelta(minutes=minutes))
        rt.service.event(charts.SUCCEEDED if minutes % 3 else charts.FAILED, "ins_c1",
                         at=now - timedelta(minutes=minutes - 1), duration_ms=minutes * 900,
                         error=None if minutes % 3 else "replacement machine never became healthy " * 3)
    rt.service.audit.append(AuditRecord(actor="root", role="admin", action="retained_volume_cleanup", at=now,
                                        instance_id="ins_c1", outcome="refused", id=1,
                                        details={"error": "volume vol_keep_0123456789 has snapshots " * 4}))


def test_every_page_fits_a_phone_and_its_charts_stay_readable(site: tuple[str, FakeRuntime],
                                                              open_page: OpenPage) -> None:
    base, rt = site
    busy_fleet(rt)
    pg, log = open_page(PHONE)
    log.allow(r"status of 404")  # the browser notes the 404 page load in the console
    pg.goto(f"{base}/login")
    assert pg.evaluate(FITS), "login page scrolls sideways"
    sign_in_with_token(pg, base, token(rt, "root", "admin"))
    for path in ("/ui/", "/ui/admin/", "/ui/admin/?window=7d", "/ui/admin/instances/ins_c1",
                 "/ui/admin/instances/ins_b1", "/ui/admin/audit", "/ui/nowhere"):
        pg.goto(f"{base}{path}")
        assert pg.evaluate(FITS), f"{path} scrolls sideways at {PHONE['width']} px"
        inner = pg.eval_on_selector_all(".table-wrap", "els => els.filter(e => e.scrollWidth > e.clientWidth)"
                                                       ".map(e => e.getAttribute('aria-label'))")
        assert inner == [], f"{path}: tables that scroll sideways at {PHONE['width']} px: {inner}"
    pg.goto(f"{base}/ui/admin/")
    # the charts are drawn at about half size on a phone: their labels must still be readable (>= 9 px)
    heights = pg.eval_on_selector_all("svg.chart text.axis, svg.chart text.legend",
                                      "els => els.map(e => e.getBoundingClientRect().height)")
    assert heights and min(heights) >= 9, heights
    screenshot(pg, "fake-fleet-charts-phone")


FOCUSABLE_JS = """() => {
    const sel = 'a[href], button:not([disabled]), input:not([type=hidden]), select, textarea, [tabindex]';
    const key = e => e.id || (e.tagName + ' ' + (e.getAttribute('href') || '') + ' ' + e.textContent.trim());
    return [...document.querySelectorAll(sel)]
        .filter(e => e.tabIndex >= 0 && (e.getClientRects().length > 0 || e.classList.contains('skip')))
        .map(key);
}"""
ACTIVE_JS = """() => {
    const e = document.activeElement;
    if (!e || e === document.body) return null;
    const key = e.id || (e.tagName + ' ' + (e.getAttribute('href') || '') + ' ' + e.textContent.trim());
    const s = getComputedStyle(e);
    return {key, tag: e.tagName, outline: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2};
}"""


def tab_through(pg: Any) -> list[dict[str, Any]]:
    """Press Tab until focus leaves the page or comes back round; every stop with its focus style."""
    seen: list[dict[str, Any]] = []
    for _ in range(200):
        pg.keyboard.press("Tab")
        active = pg.evaluate(ACTIVE_JS)
        if active is None or (seen and active["key"] == seen[0]["key"]):
            break
        seen.append(active)
    return seen


def test_tab_reaches_every_control_with_a_visible_focus(site: tuple[str, FakeRuntime],
                                                        open_page: OpenPage) -> None:
    base, rt = site
    busy_fleet(rt)
    pg, _ = open_page()
    sign_in_with_token(pg, base, token(rt, "root", "admin"))
    for path in ("/ui/", "/ui/admin/", "/ui/admin/instances/ins_c1", "/ui/admin/audit"):
        pg.goto(f"{base}{path}")
        expected = pg.evaluate(FOCUSABLE_JS)
        stops = tab_through(pg)
        reached = [s["key"] for s in stops]
        assert set(expected) <= set(reached), f"{path}: not reachable with Tab: {set(expected) - set(reached)}"
        unstyled = [s["key"] for s in stops if not s["outline"]]
        assert not unstyled, f"{path}: no visible focus outline on {unstyled}"
        # actions are real buttons; the only other "buttons" are links that go somewhere
        fake = pg.eval_on_selector_all(".btn, [role=button], [onclick]",
                                       "els => els.filter(e => !(e.tagName === 'BUTTON' || "
                                       "(e.tagName === 'A' && e.getAttribute('href')))).map(e => e.outerHTML)")
        assert fake == [], f"{path}: controls that are not buttons: {fake}"


def test_destroy_confirmation_works_from_the_keyboard(site: tuple[str, FakeRuntime],
                                                      page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, _ = page
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token(rt, "alice"))
    questions: list[str] = []

    def answer_with_enter(dialog: Any) -> None:  # a native confirm: Enter accepts, Escape dismisses
        questions.append(dialog.message)
        dialog.accept()

    pg.on("dialog", answer_with_enter)
    for _ in range(40):
        pg.keyboard.press("Tab")
        if pg.evaluate("document.activeElement.id") == "destroy-ins_a1":
            break
    else:
        pytest.fail("the Destroy button is not reachable with the Tab key")
    pg.keyboard.press("Enter")
    pg.wait_for_selector("#flash .flash-ok")
    assert questions and questions[0].startswith("Destroy instance ins_a1?")
    assert rt.service.calls == [("destroy", "alice", "ins_a1")]


def test_keyboard_focus_survives_live_updates(site: tuple[str, FakeRuntime], page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, _ = page
    busy_fleet(rt)
    sign_in_with_token(pg, base, token(rt, "root", "admin"))
    for _ in range(80):
        pg.keyboard.press("Tab")
        if pg.evaluate("document.activeElement.id") == "row-ins_c1":
            break
    else:
        pytest.fail("the instance link is not reachable with the Tab key")
    # the fleet changes while the admin's focus rests on a link in the polled list
    rt.service.instances["ins_b1"] = rt.service.instances["ins_b1"].copy(status=Status.RUNNING)
    pg.wait_for_selector("tr[data-instance=ins_b1] [data-testid=badge][data-status=running]")
    assert pg.evaluate("document.activeElement.id") == "row-ins_c1"
    pg.keyboard.press("Tab")  # and keyboard navigation goes on from there
    assert pg.evaluate("document.activeElement.id") != "row-ins_c1"


def test_reduced_motion_stops_the_recovering_animation(site: tuple[str, FakeRuntime],
                                                       open_page: OpenPage) -> None:
    base, rt = site
    rt.service.put("ins_a1", "alice", Status.RECOVERING)
    still, _ = open_page(reduced_motion="reduce")
    sign_in_with_token(still, base, token(rt, "alice"))
    badge = still.locator("#ins-ins_a1 [data-testid=badge]")
    assert badge.evaluate("el => getComputedStyle(el).animationName") == "none"
    assert badge.locator(".spinner").evaluate("el => getComputedStyle(el).animationName") == "none"
    style = badge.evaluate("el => { const s = getComputedStyle(el); return [s.borderTopStyle, s.backgroundImage]; }")
    assert style[0] == "dashed" and "gradient" in style[1]  # still visibly different from the other badges
    moving, _ = open_page()
    sign_in_with_token(moving, base, token(rt, "alice"))
    assert moving.locator("#ins-ins_a1 [data-testid=badge] .spinner").evaluate(
        "el => getComputedStyle(el).animationName") == "spin"


def test_failed_requests_are_reported_in_the_page(site: tuple[str, FakeRuntime],
                                                  page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    # the simulated failures themselves are logged by the browser and by htmx; nothing else may be
    log.allow(r"status of (502|403)|net::ERR_FAILED|Response Status Error Code|"
              r"htmx:(sendError|responseError|afterRequest)")
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token(rt, "alice"))
    # a proxy in front of sandkeep fails the request
    pg.route("**/ui/instances/ins_a1/start", lambda route: route.fulfill(status=502, body="bad gateway"))
    pg.click("#start-ins_a1")
    pg.wait_for_selector("#flash .flash-error")
    assert "HTTP 502" in pg.inner_text("#flash")
    # the network is gone
    pg.route("**/ui/instances/ins_a1/start", lambda route: route.abort())  # the newest route wins
    pg.click("#start-ins_a1")
    pg.wait_for_function("() => document.querySelector('#flash').innerText.includes('could not reach sandkeep')")
    # a request without this session's CSRF token is refused, and the page says why
    pg.evaluate("""document.body.setAttribute('hx-headers', '{"X-CSRF-Token": "forged"}');
                   document.querySelectorAll('input[name=csrf_token]').forEach(i => i.remove());""")
    pg.once("dialog", lambda dialog: dialog.accept())
    pg.click("#destroy-ins_a1")
    pg.wait_for_function("() => document.querySelector('#flash').innerText.includes('HTTP 403')")
    assert "CSRF" in pg.inner_text("#flash")
    assert rt.service.calls == []
    # live updates that cannot reach the server say so, and the note goes once they work again
    pg.route("**/ui/instances/live*", lambda route: route.abort())
    pg.wait_for_selector("#conn:not([hidden])")
    assert "Lost the connection" in pg.inner_text("#conn")
    screenshot(pg, "fake-owner-connection-lost")
    pg.unroute("**/ui/instances/live*")
    pg.wait_for_selector("#conn", state="hidden")


def test_keyboard_focus_stays_on_the_card_when_its_button_becomes_disabled(site: tuple[str, FakeRuntime],
                                                                           page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, _ = page
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    rt.service.put("ins_a2", "alice", Status.STOPPED)
    sign_in_with_token(pg, base, token(rt, "alice"))
    for _ in range(40):
        pg.keyboard.press("Tab")
        if pg.evaluate("document.activeElement.id") == "start-ins_a1":
            break
    else:
        pytest.fail("the Start button is not reachable with the Tab key")
    pg.keyboard.press("Enter")
    pg.wait_for_selector("#ins-ins_a1[data-status=starting]")
    pg.wait_for_selector("#flash .flash-ok")
    # Start is disabled now; the keyboard user must not be thrown back to the top of the page
    pg.wait_for_function("() => document.getElementById('ins-ins_a1').contains(document.activeElement)",
                         timeout=10_000)
    pg.keyboard.press("Tab")  # and Tab goes on to the card's next enabled button
    assert pg.evaluate("document.activeElement.id") == "destroy-ins_a1"


def test_create_button_makes_an_instance_that_appears_without_reload(site: tuple[str, FakeRuntime],
                                                                     page: tuple[Any, ConsoleLog]) -> None:
    base, rt = site
    pg, log = page
    sign_in_with_token(pg, base, token(rt, "alice"))
    assert "You have no instances yet" in pg.inner_text("#live")
    pg.fill("#create-name", "dev-box")
    pg.fill("#create-labels", "team=ml")
    pg.select_option("#create-size", "shared-cpu-2x")
    pg.click("#create-submit")
    pg.wait_for_selector("#flash .flash-ok")
    assert "Created dev-box" in pg.inner_text("#flash")
    [made] = rt.service.instances.values()
    assert (made.user_id, made.name, made.labels, made.machine_size) == ("alice", "dev-box", {"team": "ml"},
                                                                         "shared-cpu-2x")
    pg.wait_for_selector(f"#ins-{made.id}")  # the live list picked it up (sk-refresh), no reload
    assert "team=ml" in pg.inner_text(f"#ins-{made.id}")
    log.assert_clean()
