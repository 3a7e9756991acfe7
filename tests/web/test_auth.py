"""Sign-in, sessions, one-time links, sign-out and CSRF on the web UI (fake service)."""

from __future__ import annotations

import httpx

from sandkeep.api.auth import issue_token
from sandkeep.web.auth import SESSION_COOKIE, issue_login_code, read_session
from tests.support.fake_service import FakeRuntime, token
from tests.web.conftest import Login, csrf_of


async def test_login_page_has_token_field_and_csrf(anon: httpx.AsyncClient) -> None:
    r = await anon.get("/login")
    assert r.status_code == 200
    assert 'name="token"' in r.text
    assert csrf_of(r.text)
    assert "Content-Security-Policy" in r.headers


async def test_token_login_sets_secure_httponly_lax_cookie(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    page = await anon.get("/login")
    r = await anon.post("/login", data={"token": token(rt, "alice"), "csrf_token": csrf_of(page.text)})
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
    attrs = cookie.lower()
    assert "secure" in attrs and "httponly" in attrs and "samesite=lax" in attrs
    session = read_session(rt, anon.cookies.get(SESSION_COOKIE))
    assert session is not None and session.actor.user_id == "alice" and session.actor.role == "user"
    home = await anon.get("/ui/")
    assert home.status_code == 200
    assert 'data-testid="whoami"' in home.text and "alice" in home.text


async def test_admin_login_lands_on_fleet(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    page = await anon.get("/login")
    r = await anon.post("/login", data={"token": token(rt, "root", "admin"), "csrf_token": csrf_of(page.text)})
    assert r.headers["location"] == "/ui/admin/"


async def test_bad_token_is_refused_with_a_message(anon: httpx.AsyncClient) -> None:
    page = await anon.get("/login")
    r = await anon.post("/login", data={"token": "not-a-jwt", "csrf_token": csrf_of(page.text)})
    assert r.status_code == 401
    assert "not accepted" in r.text
    assert SESSION_COOKIE not in anon.cookies
    page = await anon.get("/login")  # a token signed with another secret
    r = await anon.post("/login", data={"token": issue_token("other-secret-xxxxxxxxxxxxxxxxxxxx", "eve", "admin"),
                                        "csrf_token": csrf_of(page.text)})
    assert r.status_code == 401
    assert SESSION_COOKIE not in anon.cookies


async def test_login_without_matching_csrf_is_refused(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    await anon.get("/login")
    r = await anon.post("/login", data={"token": token(rt, "alice"), "csrf_token": "forged"})
    assert r.status_code == 403
    assert SESSION_COOKIE not in anon.cookies
    fresh = httpx.AsyncClient(transport=anon._transport, base_url="https://testserver")
    try:  # no login cookie at all (a cross-site form post)
        r = await fresh.post("/login", data={"token": token(rt, "alice"), "csrf_token": "x"})
        assert r.status_code == 403
        assert SESSION_COOKIE not in fresh.cookies
    finally:
        await fresh.aclose()


async def test_next_parameter_only_allows_local_paths(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    page = await anon.get("/login?next=https://evil.example/")
    assert "evil.example" not in page.text
    r = await anon.post("/login", data={"token": token(rt, "alice"), "csrf_token": csrf_of(page.text),
                                        "next": "//evil.example/x"})
    assert r.headers["location"] == "/ui/"


async def test_pages_redirect_anonymous_users_to_login(anon: httpx.AsyncClient) -> None:
    for path in ("/ui/", "/ui/admin/", "/ui/admin/audit", "/ui/admin/instances/ins_1"):
        r = await anon.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/login?next="), path
    r = await anon.get("/ui/instances/live", headers={"HX-Request": "true"})
    assert r.headers.get("HX-Redirect") == "/login"


async def test_one_time_link_works_once(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    code = issue_login_code(rt, "root", "admin")
    confirm = await anon.get(f"/login/once/{code}")  # a confirmation page; the GET does not sign in
    assert confirm.status_code == 200 and SESSION_COOKIE not in anon.cookies
    assert 'data-testid="login-once-user">root<' in confirm.text
    r = await anon.post(f"/login/once/{code}", data={"csrf_token": csrf_of(confirm.text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/admin/"
    assert (await anon.get("/ui/admin/")).status_code == 200
    anon.cookies.clear()
    again = await anon.get(f"/login/once/{code}")
    assert again.status_code == 410
    assert "already used or has expired" in again.text
    assert SESSION_COOKIE not in anon.cookies


async def test_one_time_link_expires(rt: FakeRuntime, anon: httpx.AsyncClient) -> None:
    code = issue_login_code(rt, "demo", "user")
    rt.clock.advance(rt.settings.web_login_code_ttl + 1)
    r = await anon.get(f"/login/once/{code}")
    assert r.status_code == 410
    assert SESSION_COOKIE not in anon.cookies


async def test_session_expires_on_the_clock(rt: FakeRuntime, login: Login) -> None:
    client = await login("alice", "user")
    assert (await client.get("/ui/")).status_code == 200
    rt.clock.advance(rt.settings.web_session_ttl + 1)
    r = await client.get("/ui/")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


async def test_tampered_session_cookie_is_ignored(rt: FakeRuntime, login: Login) -> None:
    client = await login("alice", "user")
    value = client.cookies.get(SESSION_COOKIE)
    assert value
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value)  # the jar really sends a cookie set this way
    assert (await client.get("/ui/")).status_code == 200
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value[::-1])
    r = await client.get("/ui/")
    assert r.status_code == 303
    # an API token is not a session either
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, token(rt, "root", "admin"))
    assert (await client.get("/ui/admin/")).status_code == 303


async def test_logout_needs_csrf_and_clears_the_session(login: Login) -> None:
    client = await login("alice", "user")
    page = await client.get("/ui/")
    refused = await client.post("/logout", data={})
    assert refused.status_code == 403
    assert (await client.get("/ui/")).status_code == 200
    r = await client.post("/logout", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert (await client.get("/ui/")).status_code == 303


def test_issue_login_code_validates_role(rt: FakeRuntime) -> None:
    import pytest

    with pytest.raises(ValueError, match="role"):
        issue_login_code(rt, "x", "superuser")
    assert issue_login_code(rt, "x", "user") != issue_login_code(rt, "x", "user")


def test_login_codes_are_stored_hashed_and_work_once(rt: FakeRuntime) -> None:
    from sqlalchemy import select

    from sandkeep.store.tables import login_codes

    code = issue_login_code(rt, "demo", "user")
    with rt.credentials.store.engine.connect() as conn:
        stored = [r.code_hash for r in conn.execute(select(login_codes.c.code_hash))]
    assert code not in stored and len(stored) == 1
    assert rt.credentials.peek_login_code(code) is not None  # looking does not consume
    actor = rt.credentials.redeem_login_code(code)
    assert actor is not None and actor.user_id == "demo" and actor.role == "user"
    assert rt.credentials.redeem_login_code(code) is None


async def test_login_page_warns_when_the_secure_cookie_cannot_stick(rt: FakeRuntime) -> None:
    from tests.web.conftest import make_app

    transport = httpx.ASGITransport(app=make_app(rt))
    for base, warned in (("http://192.168.1.20:8080", True), ("http://sandkeep.example", True),
                         ("https://sandkeep.example", False), ("http://127.0.0.1:8080", False),
                         ("http://localhost:8080", False)):
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            page = (await client.get("/login")).text
            assert ('data-testid="insecure-origin"' in page) is warned, base
    async with httpx.AsyncClient(transport=transport, base_url="http://sandkeep.example") as client:
        proxied = await client.get("/login", headers={"X-Forwarded-Proto": "https"})  # TLS ends at a proxy
        assert 'data-testid="insecure-origin"' not in proxied.text


async def test_sign_in_throttle_lifts_when_the_failures_leave_the_window() -> None:
    from tests.support.fake_service import make_runtime
    from tests.web.conftest import make_app

    rt = make_runtime(signin_max_failures=2, signin_failure_window=60.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(rt)),
                                 base_url="https://testserver") as client:
        for _ in range(2):
            page = await client.get("/login")
            bad = await client.post("/login", data={"token": "nope", "csrf_token": csrf_of(page.text)})
            assert bad.status_code == 401
        page = await client.get("/login")
        good = {"token": token(rt, "alice"), "csrf_token": csrf_of(page.text)}
        blocked = await client.post("/login", data=good)
        assert blocked.status_code == 429 and blocked.headers["retry-after"] == "60"
        rt.clock.advance(30)
        assert (await client.post("/login", data=good)).headers["retry-after"] == "30"
        rt.clock.advance(31)
        assert (await client.post("/login", data=good)).status_code == 303
