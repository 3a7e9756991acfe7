"""Credentials that end: the API token registry, server-side web sessions and one-time sign-in codes.

Everything lives in the store's database (tables ``api_tokens``, ``web_sessions``, ``login_codes``), so
several API processes share it and a sign-out or a revocation takes effect on every process at once.

* **API tokens** are HS256 JWTs (:mod:`sandkeep.api.auth`) with an id claim ``jti`` that is recorded in
  ``api_tokens`` when the token is issued. Every request checks the signature, then the row: a token whose
  id is unknown (e.g. one issued before the registry existed, or minted with the secret but never recorded)
  is refused (``token_unregistered``), a revoked one too (``token_revoked``), and so is an expired one.
* **Web sessions**: the cookie carries only a random session id; the database keeps its SHA-256, the
  user, role and expiry (``SANDKEEP_WEB_SESSION_TTL``, never longer than the token it was made from). A
  session made from a pasted API token ends when that token is revoked. Sign-out deletes the row.
* **One-time sign-in codes**: stored as their SHA-256; consuming one is a single conditional ``DELETE …
  RETURNING``, so a code works once even with several processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import Connection, and_, delete, insert, or_, select, update

from sandkeep.api.auth import ROLES, TokenError, issue_token, verify_token
from sandkeep.clock import Clock
from sandkeep.engine.service import Actor
from sandkeep.store.tables import api_tokens, login_codes, web_sessions

TOKEN_ID_RE = re.compile(r"^tok_[0-9a-f]{24}$")
MAX_TOKENS_LISTED = 500


class TokenNotFound(LookupError):
    """No token with that id (or the pasted token names no registered id)."""


@dataclass(frozen=True)
class TokenRecord:
    jti: str
    user_id: str
    role: str
    issued_at: datetime
    expires_at: datetime | None
    issued_by: str | None
    revoked_at: datetime | None
    revoked_by: str | None

    def live(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class IssuedToken:
    token: str
    record: TokenRecord


@dataclass(frozen=True)
class SessionRecord:
    actor: Actor
    expires_at: datetime
    token_jti: str | None


def digest(value: str) -> str:
    """SHA-256 hex of a secret value (session ids and sign-in codes are stored only as this)."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(12)


def _record(row: Any) -> TokenRecord:
    return TokenRecord(jti=row.jti, user_id=row.user_id, role=row.role, issued_at=row.issued_at,
                       expires_at=row.expires_at, issued_by=row.issued_by, revoked_at=row.revoked_at,
                       revoked_by=row.revoked_by)


class Credentials:
    """Issue, check and end credentials. ``store`` is a :class:`sandkeep.store.sql.SqlStore` (migrated)."""

    def __init__(self, store: Any, secret: str, clock: Clock) -> None:
        self.store = store
        self.secret = secret
        self.clock = clock

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.store._read() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.store._write() as conn:
            yield conn

    # ------------------------------------------------------------------------------------ API tokens

    def issue_token(self, user_id: str, role: str = "user", ttl_seconds: float | None = None, *,
                    issued_by: str | None = None) -> IssuedToken:
        """A signed token whose id is recorded (so it can be listed and revoked). ttl None/<=0: no expiry."""
        now = self.clock.now()
        jti = new_token_id()
        token = issue_token(self.secret, user_id, role, ttl_seconds, now=now.timestamp(), jti=jti)
        expires = now + timedelta(seconds=int(ttl_seconds)) if ttl_seconds and ttl_seconds > 0 else None
        record = TokenRecord(jti=jti, user_id=user_id, role=role, issued_at=now, expires_at=expires,
                             issued_by=(issued_by or None) and issued_by[:255], revoked_at=None, revoked_by=None)
        with self._write() as conn:
            conn.execute(insert(api_tokens).values(
                jti=jti, user_id=user_id, role=role, issued_at=now, expires_at=expires,
                issued_by=record.issued_by, revoked_at=None, revoked_by=None))
        return IssuedToken(token=token, record=record)

    def check_token(self, token: str) -> tuple[Actor, TokenRecord]:
        """The actor of a valid, registered, unrevoked, unexpired token; TokenError (with a code) otherwise."""
        actor, claims = verify_token(self.secret, token, now=self.clock.now().timestamp())
        jti = claims.get("jti")
        if not isinstance(jti, str) or not TOKEN_ID_RE.match(jti):
            raise TokenError("token has no registered id (issued before token revocation existed?); "
                             "make a new one with `sandkeep token`", code="token_unregistered")
        with self._read() as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.jti == jti)).first()
        if row is None or row.user_id != actor.user_id or row.role != actor.role:
            raise TokenError(f"token {jti} is not registered on this server", code="token_unregistered")
        record = _record(row)
        if record.revoked_at is not None:
            raise TokenError(f"token {jti} was revoked", code="token_revoked")
        if record.expires_at is not None and record.expires_at <= self.clock.now():
            raise TokenError(f"token {jti} expired", code="token_expired")
        return actor, record

    def token_id_of(self, token_or_id: str) -> str:
        """The token id named by ``token_or_id``: a ``tok_…`` id, or a token's text (its ``jti`` claim)."""
        value = (token_or_id or "").strip()
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if TOKEN_ID_RE.match(value):
            return value
        try:
            claims = jwt.decode(value, options={"verify_signature": False, "verify_exp": False})
        except jwt.PyJWTError as exc:
            raise TokenNotFound("not a token id (tok_…) nor a sandkeep token") from exc
        jti = claims.get("jti") if isinstance(claims, dict) else None
        if not isinstance(jti, str) or not TOKEN_ID_RE.match(jti):
            raise TokenNotFound("that token carries no id: it was issued before token revocation existed and "
                                "is refused anyway")
        return jti

    def get_token(self, jti: str) -> TokenRecord:
        with self._read() as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.jti == jti)).first()
        if row is None:
            raise TokenNotFound(f"no token {jti[:40]!r}")
        return _record(row)

    def revoke_token(self, token_or_id: str, *, by: str) -> TokenRecord:
        """Revoke (idempotent: an already revoked token keeps its first revocation). TokenNotFound if unknown."""
        jti = self.token_id_of(token_or_id)
        now = self.clock.now()
        with self._write() as conn:
            conn.execute(update(api_tokens).where(api_tokens.c.jti == jti, api_tokens.c.revoked_at.is_(None))
                         .values(revoked_at=now, revoked_by=by[:255]))
            row = conn.execute(select(api_tokens).where(api_tokens.c.jti == jti)).first()
        if row is None:
            raise TokenNotFound(f"no token {jti}")
        return _record(row)

    def list_tokens(self, *, user_id: str | None = None, include_ended: bool = False) -> list[TokenRecord]:
        """Tokens newest first (at most 500): live ones only unless ``include_ended``."""
        c = api_tokens.c
        query = select(api_tokens)
        if user_id is not None:
            query = query.where(c.user_id == user_id)
        if not include_ended:
            now = self.clock.now()
            query = query.where(c.revoked_at.is_(None), or_(c.expires_at.is_(None), c.expires_at > now))
        query = query.order_by(c.issued_at.desc(), c.jti).limit(MAX_TOKENS_LISTED)
        with self._read() as conn:
            return [_record(r) for r in conn.execute(query).all()]

    # ------------------------------------------------------------------------------------ web sessions

    def new_session(self, actor: Actor, ttl_seconds: float, *, not_after: datetime | None = None,
                    token_jti: str | None = None) -> tuple[str, datetime]:
        """(session id for the cookie, expiry). Expired sessions are swept on the way."""
        if actor.role not in ROLES:
            raise ValueError(f"unknown role {actor.role!r}")
        now = self.clock.now()
        expires = now + timedelta(seconds=ttl_seconds)
        if not_after is not None and not_after < expires:
            expires = not_after
        sid = secrets.token_urlsafe(32)
        with self._write() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.expires_at <= now))
            conn.execute(insert(web_sessions).values(id_hash=digest(sid), user_id=actor.user_id, role=actor.role,
                                                     created_at=now, expires_at=expires, token_jti=token_jti))
        return sid, expires

    def get_session(self, sid: str | None) -> SessionRecord | None:
        """The live session ``sid`` names; None when unknown, signed out, expired, or its token was revoked."""
        if not sid or len(sid) > 200:
            return None
        s, t = web_sessions.c, api_tokens.c
        now = self.clock.now()
        query = (select(s.user_id, s.role, s.expires_at, s.token_jti, t.revoked_at, t.expires_at.label("tok_exp"))
                 .select_from(web_sessions.outerjoin(api_tokens, t.jti == s.token_jti))
                 .where(s.id_hash == digest(sid), s.expires_at > now))
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None or row.role not in ROLES:
            return None
        if row.token_jti is not None and (row.revoked_at is not None
                                          or (row.tok_exp is not None and row.tok_exp <= now)):
            return None
        return SessionRecord(actor=Actor(user_id=row.user_id, role=row.role), expires_at=row.expires_at,
                             token_jti=row.token_jti)

    def end_session(self, sid: str | None) -> bool:
        if not sid or len(sid) > 200:
            return False
        with self._write() as conn:
            result = conn.execute(delete(web_sessions).where(web_sessions.c.id_hash == digest(sid)))
        return bool(result.rowcount)

    # ------------------------------------------------------------------------------------ sign-in codes

    def issue_login_code(self, user_id: str, role: str, ttl_seconds: float) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not user_id:
            raise ValueError("user_id must not be empty")
        now = self.clock.now()
        code = secrets.token_urlsafe(24)
        with self._write() as conn:
            conn.execute(delete(login_codes).where(login_codes.c.expires_at <= now))
            conn.execute(insert(login_codes).values(code_hash=digest(code), user_id=user_id, role=role,
                                                    created_at=now, expires_at=now + timedelta(seconds=ttl_seconds)))
        return code

    def peek_login_code(self, code: str) -> Actor | None:
        """Who ``code`` would sign in, without consuming it (the confirm page)."""
        if not code or len(code) > 200:
            return None
        c = login_codes.c
        with self._read() as conn:
            row = conn.execute(select(c.user_id, c.role).where(
                and_(c.code_hash == digest(code), c.expires_at > self.clock.now()))).first()
        return Actor(user_id=row.user_id, role=row.role) if row is not None else None

    def redeem_login_code(self, code: str) -> Actor | None:
        """Consume ``code`` (once, across processes); None when unknown, used or expired."""
        if not code or len(code) > 200:
            return None
        c = login_codes.c
        now = self.clock.now()
        with self._write() as conn:
            row = conn.execute(delete(login_codes).where(c.code_hash == digest(code), c.expires_at > now)
                               .returning(c.user_id, c.role)).first()
        if row is None or row.role not in ROLES:
            return None
        return Actor(user_id=row.user_id, role=row.role)


def open_credentials(database_url: str, secret: str, clock: Clock) -> Credentials:
    """Credentials on their own store connection (the CLI); migrates the database like serve does."""
    from sandkeep.store.sql import open_store

    return Credentials(open_store(database_url, clock), secret, clock)


def memory_credentials(secret: str, clock: Clock) -> Credentials:
    """Credentials in a private in-memory SQLite database (an app built on a runtime without a store)."""
    return open_credentials("sqlite://", secret, clock)
