"""End-to-end browser tests: Chromium against a real ``sandkeep serve`` with the local machine host.

One ``sandkeep serve`` (API + engine + web UI + local host child) runs for the module on loopback ports
with short engine intervals; every test uses its own users, so the tests do not see each other's
instances. Machines are crashed through the host's fault API; the pages must follow by themselves.
Screenshots of the main pages land in test-artifacts/web/.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import running_serve
from tests.support.procs import Proc
from tests.support.wait import wait_until
from tests.web.browser import PHONE, ConsoleLog, screenshot, sign_in_with_token
from tests.web.conftest import OpenPage

pytestmark = pytest.mark.browser

HOST_TOKEN = "test-host-token"
ENGINE_ENV = {
    "SANDKEEP_HOST_TOKEN": HOST_TOKEN,
    "SANDKEEP_INTERVAL_RUNNING": "2",
    "SANDKEEP_INTERVAL_BUSY": "1",
    "SANDKEEP_DETECT_POLL_INTERVAL": "0.5",
    "SANDKEEP_ALARM_POLL_INTERVAL": "0.2",
    "SANDKEEP_HEALTH_PROBE_INTERVAL": "0.2",
    "SANDKEEP_WEB_POLL_INTERVAL": "0.5",
    "SANDKEEP_LOG_LEVEL": "info",
}
HOLD_MACHINE_CREATE = {"operation": "machine.create", "status": 503}
SETTLE = 90.0  # generous upper bound for an engine transition on a loaded 2-core machine (not a timing assertion)


@dataclass
class Stack:
    url: str
    host_url: str
    data_dir: Path
    proc: Proc
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def token(self, user: str, role: str = "user") -> str:
        key = (user, role)
        if key not in self.tokens:
            out = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", user, "--role", role,
                                  "--data-dir", str(self.data_dir)], capture_output=True, text=True, timeout=60,
                                 env=self.proc.env, check=True)
            self.tokens[key] = out.stdout.strip().splitlines()[-1].strip()
        return self.tokens[key]

    def api(self, method: str, path: str, *, role: str = "admin", user: str = "web-admin",
            **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(user, role)}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def host(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.host_url}{path}", headers={"Authorization": f"Bearer {HOST_TOKEN}"},
                             timeout=30, **kw)

    def instance(self, instance_id: str) -> dict[str, Any]:
        r = self.api("GET", f"/v1/instances/{instance_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def create(self, user: str) -> dict[str, Any]:
        r = self.api("POST", "/v1/instances", json={"user_id": user})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def wait_status(self, instance_id: str, status: str) -> dict[str, Any]:
        def check() -> dict[str, Any]:
            data = self.instance(instance_id)
            return data if data["status"] == status else {}

        return wait_until(check, timeout=SETTLE, interval=0.2, message=f"{instance_id} {status}\n{self.tail()}")

    def faults(self, *rules: dict[str, Any]) -> None:
        r = self.host("POST", "/_local/faults", json={"rules": list(rules)}) if rules else \
            self.host("DELETE", "/_local/faults")
        assert r.status_code == 200, r.text

    def crash(self, data: dict[str, Any]) -> None:
        r = self.host("POST", f"/_local/apps/{data['app_name']}/machines/{data['machine_id']}/crash")
        assert r.status_code == 200, r.text

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.proc.log().splitlines()[-lines:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Stack]:
    with running_serve(tmp_path_factory.mktemp("web-serve"), extra_env=ENGINE_ENV) as serve:
        yield Stack(url=serve.url, host_url=serve.host_url, data_dir=serve.data_dir, proc=serve.proc)


@pytest.fixture(autouse=True)
def _clear_faults(stack: Stack) -> Iterator[None]:
    yield
    stack.faults()


def card_state(pg: Any, instance_id: str) -> dict[str, Any]:
    """One consistent snapshot of an owner card: status, button states and reasons, open link."""
    return dict(pg.evaluate("""id => {
        const card = document.getElementById('ins-' + id);
        if (!card) return {status: null};
        const btn = a => { const b = document.getElementById(a + '-' + id);
                           return b ? {disabled: b.disabled, title: b.title} : null; };
        return {status: card.dataset.status,
                badge: card.querySelector('[data-testid=badge]').textContent.trim(),
                start: btn('start'), stop: btn('stop'), restart: btn('restart'), destroy: btn('destroy'),
                open: !!document.getElementById('open-' + id), text: card.innerText};
    }""", instance_id))


def wait_card(pg: Any, instance_id: str, status: str, timeout: float = SETTLE) -> dict[str, Any]:
    """Wait (in the page, without reloading) until the card shows ``status``; return that snapshot."""
    pg.wait_for_function("([id, status]) => { const c = document.getElementById('ins-' + id); "
                         "return c && c.dataset.status === status; }", arg=[instance_id, status],
                         timeout=timeout * 1000, polling="raf")
    return card_state(pg, instance_id)


def test_owner_sees_only_their_instance_and_busy_buttons(stack: Stack, page: tuple[Any, ConsoleLog]) -> None:
    pg, log = page
    other = stack.create("web-bob")
    # the provider fails every machine create until the faults are cleared: 'starting' (busy) holds
    stack.faults(HOLD_MACHINE_CREATE)
    mine = stack.create("web-alice")
    sign_in_with_token(pg, stack.url, stack.token("web-alice"))
    assert pg.locator(f"#ins-{mine['id']}").count() == 1
    assert pg.locator(f"#ins-{other['id']}").count() == 0
    assert other["id"] not in pg.content()
    busy = wait_card(pg, mine["id"], "starting")
    for action in ("start", "stop", "restart"):
        assert busy[action]["disabled"], busy
        assert "starting" in busy[action]["title"], busy
    assert "unavailable: Busy: the instance is starting" in busy["text"]
    assert not busy["open"]
    screenshot(pg, "serve-owner-starting")
    stack.faults()
    running = wait_card(pg, mine["id"], "running")
    assert running["badge"] == "Running"
    assert running["start"]["disabled"] and "Already running" in running["start"]["title"]
    assert not running["stop"]["disabled"] and not running["restart"]["disabled"]
    assert not running["destroy"]["disabled"]
    log.assert_clean()


def test_crash_shows_recovering_then_running_and_open_works(stack: Stack, page: tuple[Any, ConsoleLog]) -> None:
    pg, log = page
    created = stack.create("web-carol")
    before = stack.wait_status(created["id"], "running")
    sign_in_with_token(pg, stack.url, stack.token("web-carol"))
    wait_card(pg, created["id"], "running")
    pg.evaluate("window.__sameDocument = true")
    # no replacement machine can be created until the faults are cleared: 'recovering' holds
    stack.faults(HOLD_MACHINE_CREATE)
    stack.crash(before)
    recovering = wait_card(pg, created["id"], "recovering", timeout=30)
    assert recovering["badge"] == "Recovering"
    assert all(recovering[a]["disabled"] for a in ("start", "stop", "restart", "destroy")), recovering
    assert not recovering["open"]
    animation = pg.locator(f"#ins-{created['id']} [data-testid=badge]").evaluate(
        "el => getComputedStyle(el).animationName")
    assert animation == "pulse"
    screenshot(pg, "serve-owner-recovering")
    stack.faults()
    running = wait_card(pg, created["id"], "running")
    assert running["open"] and running["badge"] == "Running"
    assert pg.evaluate("window.__sameDocument") is True  # no reload happened
    after = stack.instance(created["id"])
    assert after["machine_id"] != before["machine_id"]
    with pg.context.expect_page() as opened:
        pg.click(f"#open-{created['id']}")
    gateway = opened.value
    gateway.wait_for_load_state()
    health = gateway.evaluate("() => JSON.parse(document.body.innerText)")
    assert health["status"] == "ok"
    assert health["machine_id"] == after["machine_id"]
    screenshot(pg, "serve-owner-running")
    log.assert_clean()


def test_admin_recovery_card_and_retained_volume_cleanup(stack: Stack, page: tuple[Any, ConsoleLog]) -> None:
    pg, log = page
    created = stack.create("web-dave")
    before = stack.wait_status(created["id"], "running")
    snap = stack.host("POST", f"/v1/apps/{before['app_name']}/volumes/{before['volume_id']}/snapshots")
    assert snap.status_code in (200, 201), snap.text
    sign_in_with_token(pg, stack.url, stack.token("web-root", "admin"))
    assert pg.url.endswith("/ui/admin/")
    pg.goto(f"{stack.url}/ui/admin/instances/{created['id']}")
    card = pg.locator("[data-testid=recovery-card]")

    def field(name: str) -> str:
        return str(card.locator(f"[data-field={name}]").inner_text()).strip()

    assert field("recovery_state") == "No recovery in progress"
    assert field("retained_volume_id") == "—"
    assert pg.locator(f"#cleanup-{created['id']}").count() == 0
    # hold the recovery after the fork (no replacement machine until the faults are cleared)
    stack.faults(HOLD_MACHINE_CREATE)
    stack.crash(before)
    pg.wait_for_function("() => { const c = document.querySelector('[data-testid=recovery-card]'); "
                         "return c.querySelector('[data-field=recovery_state]').innerText.startsWith('Recovering') "
                         "&& c.querySelector('[data-field=pending_recovery_volume_id]').innerText.trim() !== '—'; }",
                         timeout=SETTLE * 1000, polling="raf")
    assert field("recovery_started_at") != "—" and "UTC" in field("recovery_started_at")
    screenshot(pg, "serve-admin-recovering")
    stack.faults()
    pg.wait_for_function("old => document.querySelector('[data-field=retained_volume_id]').innerText.trim() === old",
                         arg=before["volume_id"], timeout=SETTLE * 1000, polling="raf")
    assert field("recovery_state") == "Recovered; old volume retained"
    assert field("pending_recovery_volume_id") == "—"
    deadline = field("retained_volume_cleanup_after")
    assert deadline.startswith("in 6 days") or deadline.startswith("in 7 days"), deadline
    assert "UTC" in deadline
    screenshot(pg, "serve-admin-retained")
    button = pg.locator(f"#cleanup-{created['id']}")
    assert button.is_enabled()
    questions: list[str] = []

    def accept(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept()

    pg.once("dialog", accept)
    button.click()
    pg.wait_for_selector("#flash .flash-ok", timeout=SETTLE * 1000)
    assert questions and questions[0].startswith(f"Delete retained volume {before['volume_id']}")
    assert f"Deleted retained volume {before['volume_id']}" in pg.inner_text("#flash")
    pg.wait_for_function("() => document.querySelector('[data-field=retained_volume_id]').innerText.trim() === '—'",
                         timeout=SETTLE * 1000, polling="raf")
    assert pg.locator(f"#cleanup-{created['id']}").count() == 0
    gone = stack.host("GET", f"/v1/apps/{before['app_name']}/volumes/{before['volume_id']}")
    assert gone.status_code == 404 or gone.json().get("state") in ("destroyed", "destroying"), gone.text
    pg.goto(f"{stack.url}/ui/admin/audit")
    rows = pg.locator("[data-testid=audit-table] tbody tr")
    texts = [rows.nth(i).inner_text() for i in range(rows.count())]
    assert any(created["id"] in t and "web-root" in t and "ok" in t and "retained" in t for t in texts), texts
    screenshot(pg, "serve-admin-audit")
    pg.goto(f"{stack.url}/ui/admin/?user=web-dave")
    assert pg.locator(f"tr[data-instance={created['id']}] [data-testid=badge]").inner_text() == "Running"
    chart = pg.locator("[data-testid=recovery-chart] svg")
    assert int(chart.get_attribute("data-started") or 0) >= 1
    assert int(chart.get_attribute("data-succeeded") or 0) >= 1
    assert int(pg.locator("[data-testid=duration-histogram] svg").get_attribute("data-total") or 0) >= 1
    screenshot(pg, "serve-admin-fleet")
    log.assert_clean()


def test_non_admin_cannot_reach_admin_pages(stack: Stack, open_page: OpenPage) -> None:
    pg, log = open_page(PHONE)
    # the browser notes each 403 page load in the console; anything else would be a real problem
    log.allow(r"status of 403")
    pg.goto(f"{stack.url}/ui/admin/")
    assert "/login" in pg.url  # anonymous: sent to sign in
    sign_in_with_token(pg, stack.url, stack.token("web-erin"))
    assert pg.locator("nav a[href='/ui/admin/']").count() == 0
    for path in ("/ui/admin/", "/ui/admin/audit", "/ui/admin/instances/ins_whatever"):
        response = pg.goto(f"{stack.url}{path}")
        assert response is not None and response.status == 403
        assert "Admins only" in pg.inner_text("h1")
    screenshot(pg, "serve-user-forbidden-phone")
    pg.goto(f"{stack.url}/ui/")
    assert pg.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    screenshot(pg, "serve-owner-phone")


def test_one_time_links_printed_by_serve(stack: Stack, page: tuple[Any, ConsoleLog]) -> None:
    pg, log = page
    log.allow(r"status of 410")  # the browser notes the 410 page load in the console
    links = wait_until(lambda: re.findall(r"(http://\S+/login/once/\S+)", stack.proc.log()), timeout=30,
                       message="one-time sign-in links in serve's output")
    assert len(links) >= 2, links
    demo = next(line for line in stack.proc.log().splitlines() if "/login/once/" in line and "demo" in line)
    demo_link = re.search(r"(http://\S+/login/once/\S+)", demo)
    assert demo_link
    pg.goto(demo_link.group(1))  # a confirmation page: opening the link alone signs nobody in
    assert pg.inner_text("[data-testid=login-once-user]") == "demo"
    pg.context.clear_cookies()
    pg.goto(demo_link.group(1))  # still valid: only the confirmation uses it
    pg.click("button[type=submit]")
    pg.wait_for_url(lambda url: url.endswith("/ui/"))
    assert pg.inner_text("[data-testid=whoami]").startswith("demo")
    pg.context.clear_cookies()
    response = pg.goto(demo_link.group(1))  # single use
    assert response is not None and response.status == 410
    assert "already used or has expired" in pg.inner_text("main")
    log.assert_clean()


def test_failed_recovery_is_explained_to_the_owner(stack: Stack, page: tuple[Any, ConsoleLog]) -> None:
    pg, log = page
    created = stack.create("web-fran")
    before = stack.wait_status(created["id"], "running")
    sign_in_with_token(pg, stack.url, stack.token("web-fran"))
    wait_card(pg, created["id"], "running")
    regions = [r["name"] if isinstance(r, dict) else r
               for r in stack.host("GET", "/_local/regions").json()["regions"]]
    try:
        for region in regions:  # nowhere to move the machine to
            r = stack.host("POST", f"/_local/regions/{region}/capacity", json={"available": False})
            assert r.status_code == 200, r.text
        stack.crash(before)
        failed = wait_card(pg, created["id"], "stopped")
    finally:
        for region in regions:
            stack.host("POST", f"/_local/regions/{region}/capacity", json={"available": True})
    assert "The last automatic recovery failed" in failed["text"], failed["text"]
    error = stack.instance(created["id"])["recovery"]["last_error"]
    assert error and error not in failed["text"]  # owners get plain words, admins the error
    assert not failed["start"]["disabled"]
    screenshot(pg, "serve-owner-recovery-failed")
    log.assert_clean()
