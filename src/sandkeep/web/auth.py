"""Web sign-in: sessions in a signed cookie, CSRF tokens bound to the session, one-time login links.

* The session cookie holds a JWT (HS256, signed with the runtime's JWT secret) with the audience
  ``sandkeep-web``, so it is never mistaken for an API token, and a random session id ``sid``.
* Every form carries a CSRF token: an HMAC of the session id under the same secret. It travels in a
  hidden field (``csrf_token``) and, for htmx requests, in the ``X-CSRF-Token`` header. A request that
  changes anything must present the token of *its own* session.
* The sign-in form itself is protected by a double-submit cookie (a random value in a short-lived cookie
  that must match the hidden field), so nobody can sign a victim into an attacker's account.
* :func:`issue_login_code` mints single-use, expiring codes that ``sandkeep serve`` prints as
  ``http://HOST/login/once/<code>``. They live in memory, one table per runtime.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import jwt

from sandkeep.api.auth import actor_from_token
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.engine.service import Actor, InstanceServiceAPI

SESSION_COOKIE = "sk_session"
LOGIN_CSRF_COOKIE = "sk_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_AUDIENCE = "sandkeep-web"
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


class BadToken(ValueError):
    """The pasted token is not a valid sandkeep API token."""


def _secret_bytes(runtime: WebRuntime) -> bytes:
    secret: Any = runtime.jwt_secret
    return secret if isinstance(secret, bytes) else str(secret).encode()


def actor_from_api_token(runtime: WebRuntime, token: str) -> tuple[Actor, datetime | None]:
    """Check an API token with the API's own verifier; returns the actor and the token's expiry."""
    token = token.strip()
    if not token:
        raise BadToken("Paste an API token (the output of `sandkeep token`).")
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    try:
        actor = actor_from_token(runtime.jwt_secret, token)
    except Exception as exc:  # TokenError, or anything odd about the pasted text
        message = getattr(exc, "message", None) or str(exc) or "invalid token"
        raise BadToken(f"That token was not accepted: {message}") from exc
    if actor.role not in ROLES:
        raise BadToken(f"That token has an unknown role {actor.role!r}.")
    expires: datetime | None = None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        if isinstance(claims.get("exp"), int | float):
            expires = datetime.fromtimestamp(float(claims["exp"]), tz=runtime.clock.now().tzinfo)
    except jwt.PyJWTError:
        expires = None
    return actor, expires


@dataclass(frozen=True)
class Session:
    actor: Actor
    sid: str
    expires_at: datetime


def new_session_cookie(runtime: WebRuntime, actor: Actor, *, not_after: datetime | None = None) -> tuple[str, Session]:
    now = runtime.clock.now()
    expires = now + timedelta(seconds=runtime.settings.web_session_ttl)
    if not_after is not None and not_after < expires:
        expires = not_after
    sid = secrets.token_urlsafe(18)
    claims = {"sub": actor.user_id, "role": actor.role, "sid": sid, "aud": SESSION_AUDIENCE,
              "typ": "web-session", "iat": int(now.timestamp()), "exp": int(expires.timestamp())}
    value = jwt.encode(claims, _secret_bytes(runtime), algorithm="HS256")
    return value, Session(actor=actor, sid=sid, expires_at=expires)


def read_session(runtime: WebRuntime, cookie: str | None) -> Session | None:
    """The session in ``cookie``, or None when missing, forged, for another audience or expired."""
    if not cookie:
        return None
    try:
        claims = jwt.decode(cookie, _secret_bytes(runtime), algorithms=["HS256"], audience=SESSION_AUDIENCE,
                            options={"verify_exp": False, "verify_iat": False,
                                     "require": ["sub", "role", "sid", "exp"]})
    except jwt.PyJWTError:
        return None
    if claims.get("typ") != "web-session" or claims.get("role") not in ROLES:
        return None
    now = runtime.clock.now()
    try:
        expires = datetime.fromtimestamp(float(claims["exp"]), tz=now.tzinfo)
    except (TypeError, ValueError, OverflowError):
        return None
    if expires <= now:
        return None
    return Session(actor=Actor(user_id=str(claims["sub"]), role=str(claims["role"])), sid=str(claims["sid"]),
                   expires_at=expires)


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


# --- one-time sign-in codes ----------------------------------------------------------------------------


@dataclass
class _Code:
    user_id: str
    role: str
    expires_at: datetime


@dataclass
class LoginCodes:
    codes: dict[str, _Code] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, clock: Clock, ttl: float, user_id: str, role: str) -> str:
        code = secrets.token_urlsafe(24)
        now = clock.now()
        with self.lock:
            # drop expired codes so the table cannot grow without bound
            for key in [k for k, v in self.codes.items() if v.expires_at <= now]:
                del self.codes[key]
            self.codes[code] = _Code(user_id=user_id, role=role, expires_at=now + timedelta(seconds=ttl))
        return code

    def redeem(self, clock: Clock, code: str) -> Actor | None:
        """The actor for ``code`` (consuming it), or None when unknown, used or expired."""
        with self.lock:
            entry = self.codes.pop(code, None)
        if entry is None or entry.expires_at <= clock.now():
            return None
        return Actor(user_id=entry.user_id, role=entry.role)


_CODES: dict[int, tuple[Any, LoginCodes]] = {}
_CODES_LOCK = threading.Lock()


def login_codes(runtime: WebRuntime) -> LoginCodes:
    """The code table of ``runtime`` (created on first use), kept in ``runtime.extras`` when it has one."""
    extras = getattr(runtime, "extras", None)
    if isinstance(extras, dict):
        with _CODES_LOCK:
            table = extras.get("web.login_codes")
            if not isinstance(table, LoginCodes):
                table = extras["web.login_codes"] = LoginCodes()
            return table
    key = id(runtime)
    with _CODES_LOCK:
        found = _CODES.get(key)
        if found is not None and found[0]() is runtime:
            return found[1]
        table = LoginCodes()
        try:
            ref: Any = weakref.ref(runtime)
            weakref.finalize(runtime, _CODES.pop, key, None)
        except TypeError:  # not weak-referenceable: keep a strong reference (runtimes are few)
            def ref() -> Any:
                return runtime
        _CODES[key] = (ref, table)
        return table


def issue_login_code(runtime: WebRuntime, user_id: str, role: str) -> str:
    """A single-use sign-in code for ``user_id`` with ``role``; valid for settings.web_login_code_ttl."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not user_id:
        raise ValueError("user_id must not be empty")
    return login_codes(runtime).issue(runtime.clock, runtime.settings.web_login_code_ttl, user_id, role)
