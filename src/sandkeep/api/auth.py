"""API tokens: HS256 JWTs with claims ``sub`` (user id), ``role`` and an optional ``exp``.

Roles:

* ``user`` — sees and acts on its own instances only. Another user's instance answers **404, not 403**,
  so a token cannot probe which instance ids exist.
* ``admin`` — every instance, the admin routes (debug, recovery retry, retained-volume cleanup, machine
  destroy, fleet events, audit log), forced destroy while recovering, gateway traffic of any instance.
* ``platform`` — a provisioning service (e.g. the product's backend): creates instances for any
  ``user_id`` and may read, configure, start, stop, restart and destroy (unforced) any instance. It gets
  no admin routes and no gateway traffic: user data is reached by its owner (or an admin) only.

Every token carries an id claim ``jti`` recorded in the database when it is issued
(:class:`sandkeep.credentials.Credentials`); requests are checked against that registry, so tokens can be
listed and revoked. :func:`verify_token` here only checks the signature and the claims.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from sandkeep.engine.service import Actor, valid_user_id

ALGORITHM = "HS256"
ROLES: tuple[str, ...] = ("user", "admin", "platform")


class TokenError(Exception):
    """The token is missing, malformed, badly signed, expired, carries bad claims, is unknown or revoked.

    ``code`` is the machine-readable error code of the 401 answer.
    """

    def __init__(self, message: str, *, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.code = code


def issue_token(secret: str, user_id: str, role: str = "user", ttl_seconds: float | None = None, *,
                now: float | None = None, jti: str | None = None) -> str:
    """A signed token for ``user_id`` with ``role``; no ``exp`` claim when ``ttl_seconds`` is None or <= 0.

    Only tokens whose ``jti`` is recorded are accepted by the API: issue them through
    :meth:`sandkeep.credentials.Credentials.issue_token` (or ``sandkeep token``), which records it.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not valid_user_id(user_id):
        raise ValueError(f"invalid user id {user_id!r}: 1-128 letters, digits or ._@:+- (starting alphanumeric)")
    if not secret:
        raise ValueError("empty signing secret")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": user_id, "role": role, "iat": issued}
    if ttl_seconds is not None and ttl_seconds > 0:
        claims["exp"] = issued + int(ttl_seconds)
    if jti is not None:
        claims["jti"] = jti
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, *, now: float | None = None) -> tuple[Actor, dict[str, Any]]:
    """Check ``token``'s signature and claims (not the registry); (actor, claims) or :class:`TokenError`.

    ``exp`` is checked against ``now`` (seconds since the epoch; default the system time), so the
    injected clock decides, like everywhere else.
    """
    if not token:
        raise TokenError("missing bearer token")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub", "role"], "verify_exp": False, "verify_iat": False,
                                     "verify_nbf": False})
    except jwt.InvalidSignatureError as exc:
        raise TokenError("token signature does not match this server's secret") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"token lacks the {exc.claim!r} claim") from exc
    except jwt.PyJWTError as exc:
        raise TokenError(f"malformed token: {exc}") from exc
    except Exception as exc:  # defensive: never let a weird token become a 500
        raise TokenError("malformed token") from exc
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    exp = claims.get("exp")
    if exp is not None:
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenError("token 'exp' claim is not a number")
        if float(exp) <= (time.time() if now is None else now):
            raise TokenError("token expired", code="token_expired")
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not valid_user_id(sub):
        raise TokenError("token 'sub' claim is not a valid user id")
    if role not in ROLES:
        raise TokenError(f"token 'role' claim must be one of {', '.join(ROLES)}")
    return Actor(user_id=sub, role=str(role)), claims

