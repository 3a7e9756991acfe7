"""Credentials end: sign-out, token revocation (CLI and admin API), unregistered tokens, one-time links that
survive link previewers. Every attack runs against a real `sandkeep serve` over HTTP."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import httpx
import jwt
import pytest
from sqlalchemy import select

from sandkeep.api.auth import issue_token
from sandkeep.store.tables import web_sessions
from tests.e2e.serving import Serve, running_serve
from tests.security.authsupport import csrf_of, error_code, sandkeep_cli, session_cookie, sign_in


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(tmp_path_factory.mktemp("credentials")) as running:
        yield running


def api_get(serve: Serve, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{serve.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_a_signed_out_cookie_is_refused_at_once(serve: Serve) -> None:
    browser = sign_in(serve, serve.token("sec-alice"))
    home = browser.get("/ui/")
    assert home.status_code == 200 and "sec-alice" in home.text
    stolen = browser.cookie  # e.g. copied from the browser before the user signs out

    out = browser.post("/logout", {"csrf_token": csrf_of(home.text)})
    assert out.status_code == 303 and out.headers["location"] == "/login"

    replay = httpx.get(f"{serve.url}/ui/", headers={"Cookie": f"sk_session={stolen}"}, timeout=30)
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")
    htmx = httpx.get(f"{serve.url}/ui/instances/live", headers={"Cookie": f"sk_session={stolen}",
                                                               "HX-Request": "true"}, timeout=30)
    assert htmx.headers.get("HX-Redirect") == "/login"
    admin_page = httpx.get(f"{serve.url}/ui/admin/", headers={"Cookie": f"sk_session={stolen}"}, timeout=30)
    assert admin_page.status_code == 303


def test_the_cookie_is_an_opaque_id_and_the_database_keeps_only_its_hash(serve: Serve) -> None:
    browser = sign_in(serve, serve.token("sec-bob"))
    assert browser.cookie.count(".") < 2, "the session cookie must not be a self-contained (JWT) credential"
    with serve.credentials.store.engine.connect() as conn:
        hashes = {row.id_hash: row.user_id for row in conn.execute(select(web_sessions))}
    assert browser.cookie not in hashes
    assert hashes.get(hashlib.sha256(browser.cookie.encode()).hexdigest()) == "sec-bob"


def test_a_token_revoked_with_the_cli_gets_401_at_once(serve: Serve) -> None:
    issued = sandkeep_cli(serve, "token", "--user", "sec-carol", "--data-dir", str(serve.data_dir))
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip().splitlines()[-1]
    assert api_get(serve, "/v1/instances", token).status_code == 200
    listed = sandkeep_cli(serve, "token", "list", "--user", "sec-carol", "--data-dir", str(serve.data_dir))
    assert listed.returncode == 0, listed.stderr
    ids = re.findall(r"^(tok_[0-9a-f]+)\tsec-carol\tuser", listed.stdout, re.M)
    assert len(ids) == 1, listed.stdout

    revoked = sandkeep_cli(serve, "token", "revoke", token, "--data-dir", str(serve.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    assert ids[0] in revoked.stdout

    r = api_get(serve, "/v1/instances", token)
    assert r.status_code == 401 and error_code(r) == "token_revoked"
    assert r.headers["www-authenticate"].startswith("Bearer")
    again = sandkeep_cli(serve, "token", "revoke", ids[0], "--data-dir", str(serve.data_dir))  # by id, idempotent
    assert again.returncode == 0, again.stderr
    unknown = sandkeep_cli(serve, "token", "revoke", "tok_" + "0" * 24, "--data-dir", str(serve.data_dir))
    assert unknown.returncode != 0 and "no token" in unknown.stderr


def test_an_admin_revokes_a_users_token_through_the_api_and_its_web_session_ends(serve: Serve) -> None:
    admin = serve.token("sec-root", "admin")
    token = serve.token("sec-dave")
    keep = serve.token("sec-dave")  # the user's other token keeps working
    browser = sign_in(serve, token)
    assert browser.get("/ui/").status_code == 200

    mine = api_get(serve, "/v1/tokens", token)
    assert mine.status_code == 200
    own_ids = {t["id"] for t in mine.json()["items"]}
    assert len(own_ids) == 2 and all(t["user_id"] == "sec-dave" for t in mine.json()["items"])
    listing = api_get(serve, "/v1/admin/tokens?user_id=sec-dave", admin)
    assert {t["id"] for t in listing.json()["items"]} == own_ids
    target = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert target in own_ids

    refused = httpx.post(f"{serve.url}/v1/admin/tokens/{target}/revoke",
                         headers={"Authorization": f"Bearer {keep}"}, timeout=30)
    assert refused.status_code == 403
    assert api_get(serve, "/v1/instances", token).status_code == 200

    done = httpx.post(f"{serve.url}/v1/admin/tokens/{target}/revoke",
                      headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert done.status_code == 200, done.text
    assert done.json()["revoked_by"] == "sec-root" and done.json()["live"] is False

    r = api_get(serve, "/v1/instances", token)
    assert r.status_code == 401 and error_code(r) == "token_revoked"
    assert browser.get("/ui/").status_code == 303  # the session made from that token ended with it
    assert api_get(serve, "/v1/instances", keep).status_code == 200
    left = api_get(serve, "/v1/tokens", keep).json()["items"]
    assert [t["id"] for t in left] == [i for i in own_ids if i != target]
    missing = httpx.post(f"{serve.url}/v1/admin/tokens/tok_{'f' * 24}/revoke",
                         headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert missing.status_code == 404 and error_code(missing) == "token_not_found"


def test_tokens_the_registry_never_issued_are_refused(serve: Serve) -> None:
    """A token signed with the right secret but not recorded (e.g. one issued before the registry existed,
    without an id, or minted by someone holding the secret) is refused: only registered tokens can be revoked."""
    legacy = issue_token(serve.secret, "sec-erin", "admin", 3600)
    r = api_get(serve, "/v1/instances", legacy)
    assert r.status_code == 401 and error_code(r) == "token_unregistered"
    forged_id = issue_token(serve.secret, "sec-erin", "admin", 3600, jti="tok_" + "a" * 24)
    r = api_get(serve, "/v1/instances", forged_id)
    assert r.status_code == 401 and error_code(r) == "token_unregistered"
    page = httpx.get(f"{serve.url}/login", timeout=30)
    csrf = csrf_of(page.text)
    pasted = httpx.post(f"{serve.url}/login", data={"token": legacy, "csrf_token": csrf},
                        headers={"Cookie": f"sk_login_csrf={csrf}"}, timeout=30)
    assert pasted.status_code == 401 and session_cookie(pasted) is None


def test_a_link_previewer_does_not_use_up_a_one_time_sign_in_link(serve: Serve) -> None:
    code = serve.credentials.issue_login_code("sec-frank", "user", 600)
    url = f"{serve.url}/login/once/{code}"
    for _ in range(2):  # a chat app's previewer, then the person's own click
        preview = httpx.get(url, timeout=30)
        assert preview.status_code == 200, preview.text[:300]
        assert session_cookie(preview) is None
        assert 'method="post"' in preview.text and "sec-frank" in preview.text
    csrf = csrf_of(preview.text)

    no_csrf = httpx.post(url, data={}, timeout=30)  # a cross-site form post
    assert no_csrf.status_code == 403 and session_cookie(no_csrf) is None

    confirmed = httpx.post(url, data={"csrf_token": csrf}, headers={"Cookie": f"sk_login_csrf={csrf}"}, timeout=30)
    assert confirmed.status_code == 303 and confirmed.headers["location"] == "/ui/"
    cookie = session_cookie(confirmed)
    assert cookie
    home = httpx.get(f"{serve.url}/ui/", headers={"Cookie": f"sk_session={cookie}"}, timeout=30)
    assert home.status_code == 200 and "sec-frank" in home.text

    assert httpx.get(url, timeout=30).status_code == 410
    replay = httpx.post(url, data={"csrf_token": csrf}, headers={"Cookie": f"sk_login_csrf={csrf}"}, timeout=30)
    assert replay.status_code == 410 and session_cookie(replay) is None
