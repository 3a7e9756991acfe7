"""Helpers for the credential and limit attacks: a real `sandkeep serve`, signed in like a browser.

The session cookie is ``Secure``, so httpx's cookie jar will not send it over plain HTTP to 127.0.0.1 (a
browser would: loopback counts as secure). These helpers carry cookies by hand, exactly as a browser sends
them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import httpx

from tests.e2e.serving import Serve

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
COOKIE_RE = re.compile(r"sk_session=([^;]*)")


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, f"page has no CSRF field: {html[:300]}"
    return match.group(1)


@dataclass
class Browser:
    """A signed-in web session: its cookie value and the CSRF token of its pages."""

    serve: Serve
    cookie: str

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.serve.url}{path}", headers={"Cookie": f"sk_session={self.cookie}", **headers},
                         timeout=30, follow_redirects=False)

    def post(self, path: str, data: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{self.serve.url}{path}", data=data, headers={"Cookie": f"sk_session={self.cookie}"},
                          timeout=30, follow_redirects=False)


def session_cookie(response: httpx.Response) -> str | None:
    for value in response.headers.get_list("set-cookie"):
        match = COOKIE_RE.search(value)
        if match and match.group(1) and "max-age=0" not in value.lower():
            return match.group(1)
    return None


def paste_token(serve: Serve, token: str) -> httpx.Response:
    """The sign-in form, used like a person: load it (login CSRF cookie), post the token."""
    page = httpx.get(f"{serve.url}/login", timeout=30)
    csrf = csrf_of(page.text)
    return httpx.post(f"{serve.url}/login", data={"token": token, "csrf_token": csrf},
                      headers={"Cookie": f"sk_login_csrf={csrf}"}, timeout=30, follow_redirects=False)


def sign_in(serve: Serve, token: str) -> Browser:
    r = paste_token(serve, token)
    assert r.status_code == 303, r.text[:500]
    cookie = session_cookie(r)
    assert cookie, r.headers
    return Browser(serve, cookie)


def sandkeep_cli(serve: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `sandkeep` command against serve's data dir, with serve's environment (secret, database)."""
    return subprocess.run([sys.executable, "-m", "sandkeep", *args], capture_output=True, text=True, timeout=120,
                          env=serve.proc.env, check=False)


def error_code(response: httpx.Response) -> str:
    body = response.json()
    code: str = body["error"]["code"]
    return code
