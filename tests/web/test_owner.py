"""The instance owner's page: what is shown, which buttons work, live fragments, actions and CSRF."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandkeep.store.records import Status
from tests.support.fake_service import FakeRuntime
from tests.web.conftest import Login, csrf_of

HX = {"HX-Request": "true"}


def button(html: str, action: str, instance_id: str) -> str:
    match = re.search(rf'<button[^>]*id="{action}-{instance_id}"[^>]*>', html)
    assert match, f"no {action} button for {instance_id}"
    return match.group(0)


def card(html: str, instance_id: str) -> str:
    start = html.index(f'id="ins-{instance_id}"')
    end = html.find("</article>", start)
    return html[start:end]


async def test_owner_sees_only_their_instances(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    rt.service.put("ins_b1", "bob")
    rt.service.put("ins_a2", "alice", Status.DESTROYED)
    client = await login("alice", "user")
    r = await client.get("/ui/")
    assert r.status_code == 200
    assert "ins_a1" in r.text
    assert "ins_b1" not in r.text
    assert "ins_a2" not in r.text  # destroyed instances are gone from the owner's view


async def test_card_shows_status_region_uptime_and_last_start(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", region="lcl-b")
    client = await login("alice", "user")
    html = card((await client.get("/ui/")).text, "ins_a1")
    assert 'data-status="running"' in html and ">Running</span>" in html
    assert "lcl-b" in html
    assert re.search(r'data-field="uptime">30 min<', html)
    assert "30 min ago" in html


@pytest.mark.parametrize("status", [Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING])
async def test_buttons_disabled_while_busy_with_a_reason(rt: FakeRuntime, login: Login, status: Status) -> None:
    rt.service.put("ins_a1", "alice", status)
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    for action in ("start", "stop", "restart"):
        b = button(html, action, "ins_a1")
        assert "disabled" in b
        assert f"the instance is {status.value}" in b  # title says why
    assert f"unavailable: Busy: the instance is {status.value}" in html  # and so does visible text
    destroy = button(html, "destroy", "ins_a1")
    if status in (Status.RECOVERING, Status.DESTROYING):
        assert "disabled" in destroy and "title=" in destroy
    else:
        assert "disabled" not in destroy
    assert "open-ins_a1" not in html  # no gateway link unless running and healthy
    if status == Status.RECOVERING:
        assert "spinner" in card(html, "ins_a1")


async def test_running_instance_buttons_and_open_link(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    rt.service.put("ins_a2", "alice", health_fail_count=1)
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    assert "disabled" in button(html, "start", "ins_a1") and "Already running." in html
    assert "disabled" not in button(html, "stop", "ins_a1")
    assert "disabled" not in button(html, "restart", "ins_a1")
    destroy = button(html, "destroy", "ins_a1")
    assert "disabled" not in destroy
    assert 'hx-confirm="Destroy instance ins_a1?' in card(html, "ins_a1")
    assert 'href="/ui/instances/ins_a1/open/health"' in html
    assert "open-ins_a2" not in html  # running but failing its health check


async def test_stopped_instance_can_start(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    assert "disabled" not in button(html, "start", "ins_a1")
    assert "disabled" in button(html, "stop", "ins_a1")
    assert "Already stopped." in html
    assert "disabled" in button(html, "restart", "ins_a1") and "Stopped: use Start." in html


async def test_start_via_htmx_calls_the_service_and_reports(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    client = await login("alice", "user")
    csrf = csrf_of((await client.get("/ui/")).text)
    r = await client.post("/ui/instances/ins_a1/start", data={"csrf_token": csrf}, headers=HX)
    assert r.status_code == 200
    assert "Start requested for ins_a1" in r.text and "flash-ok" in r.text
    assert r.headers["HX-Trigger"] == "sk-refresh"
    assert rt.service.calls == [("start", "alice", "ins_a1")]
    assert rt.service.instances["ins_a1"].status == Status.STARTING


async def test_busy_refusal_is_shown_in_the_page(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.RECOVERING)
    client = await login("alice", "user")
    csrf = csrf_of((await client.get("/ui/")).text)
    r = await client.post("/ui/instances/ins_a1/restart", data={"csrf_token": csrf}, headers=HX)
    assert "flash-error" in r.text and "is recovering; restart is refused while busy" in r.text
    assert r.headers["X-Sandkeep-Status"] == "409"
    plain = await client.post("/ui/instances/ins_a1/restart", data={"csrf_token": csrf})
    assert plain.status_code == 409 and "is recovering; restart is refused while busy" in plain.text
    assert "<h1>My instances</h1>" in plain.text


async def test_actions_need_the_sessions_csrf_token(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.STOPPED)
    rt.service.put("ins_b1", "bob", Status.STOPPED)
    alice = await login("alice", "user")
    bob = await login("bob", "user")
    bobs_csrf = csrf_of((await bob.get("/ui/")).text)
    for data, headers in (({}, HX), ({"csrf_token": "nope"}, {}), ({"csrf_token": bobs_csrf}, HX),
                          ({}, {**HX, "X-CSRF-Token": bobs_csrf})):
        r = await alice.post("/ui/instances/ins_a1/start", data=data, headers=headers)
        assert r.status_code == 403
        assert "CSRF" in r.text
    assert rt.service.calls == []
    alices_csrf = csrf_of((await alice.get("/ui/")).text)
    ok = await alice.post("/ui/instances/ins_a1/start", headers={**HX, "X-CSRF-Token": alices_csrf})
    assert "Start requested" in ok.text
    assert rt.service.calls == [("start", "alice", "ins_a1")]


async def test_cannot_act_on_someone_elses_instance(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_b1", "bob", Status.STOPPED)
    alice = await login("alice", "user")
    csrf = csrf_of((await alice.get("/ui/")).text)
    r = await alice.post("/ui/instances/ins_b1/start", data={"csrf_token": csrf}, headers=HX)
    assert "No instance ins_b1 of yours" in r.text and r.headers["X-Sandkeep-Status"] == "404"
    r = await alice.get("/ui/instances/ins_b1/open/health")
    assert r.status_code == 404
    assert rt.service.calls == []


async def test_destroy_requires_confirmation(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    client = await login("alice", "user")
    csrf = csrf_of((await client.get("/ui/")).text)
    page = await client.post("/ui/instances/ins_a1/destroy", data={"csrf_token": csrf})
    assert page.status_code == 200 and "Please confirm" in page.text and 'name="confirm" value="yes"' in page.text
    htmx = await client.post("/ui/instances/ins_a1/destroy", data={"csrf_token": csrf}, headers=HX)
    assert "needs a confirmation" in htmx.text
    assert rt.service.calls == []
    done = await client.post("/ui/instances/ins_a1/destroy", data={"csrf_token": csrf, "confirm": "yes"}, headers=HX)
    assert "Destroy started for ins_a1" in done.text
    assert rt.service.calls == [("destroy", "alice", "ins_a1")]


async def test_unknown_action_is_a_clear_error(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    client = await login("alice", "user")
    csrf = csrf_of((await client.get("/ui/")).text)
    r = await client.post("/ui/instances/ins_a1/explode", data={"csrf_token": csrf})
    assert r.status_code == 404 and "Unknown action" in r.text
    assert rt.service.calls == []


async def test_live_fragment_polls_and_answers_204_when_unchanged(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    client = await login("alice", "user")
    page = await client.get("/ui/")
    assert 'hx-trigger="every 2s, sk-refresh from:body"' in page.text
    digest = re.search(r'data-digest="([0-9a-f]+)"', page.text)
    assert digest
    same = await client.get(f"/ui/instances/live?digest={digest.group(1)}", headers=HX)
    assert same.status_code == 204
    rt.service.instances["ins_a1"] = rt.service.instances["ins_a1"].copy(status=Status.RECOVERING)
    changed = await client.get(f"/ui/instances/live?digest={digest.group(1)}", headers=HX)
    assert changed.status_code == 200
    assert ">Recovering</span>" in changed.text and 'id="live"' in changed.text
    assert 'class="badge badge-recovering"' in changed.text


async def test_failed_recovery_is_explained(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.STOPPED, last_recovery_error="recovery timed out after 600s",
                   last_recovery_error_at=rt.clock.now())
    rt.service.put("ins_a2", "alice", Status.RUNNING, last_recovery_error="old news")
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    failed = card(html, "ins_a1")
    assert "The last automatic recovery failed" in failed
    assert "recovery timed out after 600s" not in failed  # plain words for owners; the error is on the admin page
    assert "Press Start to try again" in failed
    assert "recovery failed" not in card(html, "ins_a2").lower()


class _Gateway(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f'{{"status": "ok", "path": "{self.path}", "hdr": "{self.headers.get("fly-force-instance-id")}"}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "sk_session=from-the-gateway; Path=/")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture()
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_open_proxies_to_the_gateway_with_the_session(rt: FakeRuntime, login: Login, gateway: str) -> None:
    rt.service.put("ins_a1", "alice")
    rt.service.put("ins_a2", "alice", Status.STOPPED)
    rt.service.gateway = (gateway, {"fly-force-instance-id": "m_ins_a1"})
    client = await login("alice", "user")
    r = await client.get("/ui/instances/ins_a1/open/health?x=1")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "path": "/health?x=1", "hdr": "m_ins_a1"}
    # the gateway never sets cookies on sandkeep's origin, and its pages are sandboxed
    assert "set-cookie" not in r.headers and client.cookies.get("sk_session") != "from-the-gateway"
    assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    stopped = await client.get("/ui/instances/ins_a2/open/health")
    assert stopped.status_code == 503 and "stopped" in stopped.text and stopped.headers["Retry-After"] == "5"
    client.cookies.clear()
    assert (await client.get("/ui/instances/ins_a1/open/health")).status_code == 303


async def test_unknown_pages_are_html_404s(login: Login) -> None:
    client = await login("alice", "user")
    r = await client.get("/ui/nothing/here")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html") and "There is no page at /ui/nothing/here" in r.text
    r = await client.get("/ui/static/../../etc/passwd")
    assert r.status_code == 404 and "root:" not in r.text
    r = await client.get("/ui/static/nope.js")
    assert r.status_code == 404
    ok = await client.get("/ui/static/htmx.min.js")
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/javascript")
