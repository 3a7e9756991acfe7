"""Web sign-in: server-side sessions, CSRF tokens bound to the session, one-time login links, throttling.

* The session cookie carries only an opaque random session id; the session itself (user, role, expiry)
  is a row in the database, keyed by the id's SHA-256 (:class:`sandkeep.credentials.Credentials`). Sign-out
  deletes the row, so a copied cookie stops working at once, on every API process. A session made from a
  pasted API token also ends when that token is revoked or expires.
* Every form carries a CSRF token: an HMAC of the session id under the JWT secret. It travels in a
  hidden field (``csrf_token``) and, for htmx requests, in the ``X-CSRF-Token`` header. A request that
  changes anything must present the token of *its own* session.
* The sign-in forms (token paste, one-time link confirmation) are protected by a double-submit cookie (a
  random value in a short-lived cookie that must match the hidden field), so nobody can sign a victim into
  an attacker's account.
* :func:`issue_login_code` mints single-use, expiring codes (stored hashed in the database) that
  ``sandkeep serve`` prints as ``http://HOST/login/once/<code>``. Opening the link shows a confirmation
  page; only its POST consumes the code, so link previewers that fetch URLs do not burn it.
* :class:`SignInThrottle`: after ``SANDKEEP_SIGNIN_MAX_FAILURES`` failed sign-ins (bad token, unknown or
  used code) from one client address within ``SANDKEEP_SIGNIN_FAILURE_WINDOW`` seconds, sign-in answers
  429 with ``Retry-After`` until the oldest failure leaves the window (counted per API process).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sandkeep.api.auth import TokenError
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials, TokenRecord
from sandkeep.engine.service import Actor, InstanceServiceAPI

SESSION_COOKIE = "sk_session"
LOGIN_CSRF_COOKIE = "sk_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
ROLES = ("user", "admin", "platform")


class WebRuntime(Protocol):
    """What the web pages need from :class:`sandkeep.runtime.Runtime`."""

    @property
    def settings(self) -> Settings: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def service(self) -> InstanceServiceAPI: ...

    @property
    def jwt_secret(self) -> str: ...

    @property
    def credentials(self) -> Credentials: ...


class BadToken(ValueError):
    """The pasted token is not a valid sandkeep API token."""


def actor_from_api_token(runtime: WebRuntime, token: str) -> tuple[Actor, TokenRecord]:
    """Check a pasted API token exactly as the API does (registered, not revoked, not expired)."""
    token = token.strip()
    if not token:
        raise BadToken("Paste an API token (the output of `sandkeep token`).")
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    try:
        actor, record = runtime.credentials.check_token(token)
    except TokenError as exc:
        raise BadToken(f"That token was not accepted: {exc}") from exc
    except Exception as exc:  # anything odd about the pasted text
        raise BadToken("That token was not accepted: malformed token") from exc
    if actor.role not in ROLES:
        raise BadToken(f"That token has an unknown role {actor.role!r}.")
    return actor, record


@dataclass(frozen=True)
class Session:
    actor: Actor
    sid: str
    expires_at: datetime


def new_session_cookie(runtime: WebRuntime, actor: Actor, *, not_after: datetime | None = None,
                       token_jti: str | None = None) -> tuple[str, Session]:
    """A new server-side session; returns (cookie value = the session id, session)."""
    sid, expires = runtime.credentials.new_session(actor, float(runtime.settings.web_session_ttl),
                                                   not_after=not_after, token_jti=token_jti)
    return sid, Session(actor=actor, sid=sid, expires_at=expires)


def read_session(runtime: WebRuntime, cookie: str | None) -> Session | None:
    """The live session the cookie names, or None (missing, unknown, signed out, expired, token revoked)."""
    if not cookie:
        return None
    found = runtime.credentials.get_session(cookie)
    if found is None:
        return None
    return Session(actor=found.actor, sid=cookie, expires_at=found.expires_at)


def end_session(runtime: WebRuntime, cookie: str | None) -> bool:
    """Sign-out: delete the session the cookie names (True when there was one)."""
    return runtime.credentials.end_session(cookie)


def _secret_bytes(runtime: WebRuntime) -> bytes:
    secret: Any = runtime.jwt_secret
    return secret if isinstance(secret, bytes) else str(secret).encode()


def csrf_token_for(runtime: WebRuntime, sid: str) -> str:
    return hmac.new(_secret_bytes(runtime), f"csrf|{sid}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(runtime: WebRuntime, session: Session, presented: str | None) -> bool:
    if not presented:
        return False
    return hmac.compare_digest(csrf_token_for(runtime, session.sid), presented)


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def login_csrf_ok(cookie: str | None, presented: str | None) -> bool:
    return bool(cookie) and bool(presented) and hmac.compare_digest(str(cookie), str(presented))


def issue_login_code(runtime: WebRuntime, user_id: str, role: str) -> str:
    """A single-use sign-in code for ``user_id`` with ``role``; valid for settings.web_login_code_ttl."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not user_id:
        raise ValueError("user_id must not be empty")
    return runtime.credentials.issue_login_code(user_id, role, float(runtime.settings.web_login_code_ttl))


# --- sign-in throttling --------------------------------------------------------------------------------


class SignInThrottle:
    """Failed sign-ins per client address in a sliding window (in memory, per process, bounded in size)."""

    MAX_CLIENTS = 10000

    def __init__(self, clock: Clock, max_failures: int, window: float) -> None:
        self.clock = clock
        self.max_failures = int(max_failures)
        self.window = float(window)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _trim(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may try now."""
        if self.max_failures <= 0 or self.window <= 0:
            return None
        now = self.clock.monotonic()
        with self._lock:
            times = self._trim(client, now)
            if times is None or len(times) < self.max_failures:
                return None
            wait = times[-self.max_failures] + self.window - now
        return max(1, int(wait + 0.999))

    def failed(self, client: str) -> None:
        if self.max_failures <= 0 or self.window <= 0:
            return
        now = self.clock.monotonic()
        with self._lock:
            times = self._trim(client, now) or deque()
            times.append(now)
            while len(times) > self.max_failures:
                times.popleft()
            self._failures[client] = times
            self._failures.move_to_end(client)
            while len(self._failures) > self.MAX_CLIENTS:
                self._failures.popitem(last=False)
