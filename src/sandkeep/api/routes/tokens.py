"""Token routes: the caller's own tokens; admins list everyone's and revoke.

Tokens live in :class:`sandkeep.credentials.Credentials`, not in the instance service; the role rule is the
same one the service uses (:func:`sandkeep.engine.access.require_admin`), and a refused revoke is audited
through the service like every refused admin action.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from sandkeep.api.deps import ERRORS, ActorDep, StateDep, TokenId
from sandkeep.api.errors import ApiError
from sandkeep.api.schemas import TokenInfo, TokenList, render_token
from sandkeep.credentials import TOKEN_ID_RE, TokenNotFound
from sandkeep.engine import access
from sandkeep.engine.service import ServiceError
from sandkeep.logs import get_logger

router = APIRouter(prefix="/v1", responses=ERRORS)


def log() -> Any:
    """The API's logger, as configured now (a logger bound at import would keep the configuration of then)."""
    return get_logger("sandkeep.api")


@router.get("/tokens", response_model=TokenList, tags=["tokens"])
async def my_tokens(actor: ActorDep, api: StateDep) -> dict[str, Any]:
    """The caller's own live tokens (ids and lifetimes; a token's text is never stored)."""
    now = api.clock.now()
    rows = await run_in_threadpool(lambda: api.credentials.list_tokens(user_id=actor.user_id))
    return {"items": [render_token(t, now) for t in rows]}


@router.get("/admin/tokens", response_model=TokenList, tags=["admin"])
async def admin_tokens(actor: ActorDep, api: StateDep, user_id: Annotated[str | None, Query(max_length=200)] = None,
                       include_ended: Annotated[bool, Query(description="Also revoked and expired "
                                                                        "tokens.")] = False) -> dict[str, Any]:
    """Admin: tokens (of one user with user_id), newest first, live ones unless include_ended."""
    access.require_admin(actor)
    now = api.clock.now()
    rows = await run_in_threadpool(lambda: api.credentials.list_tokens(user_id=user_id, include_ended=include_ended))
    return {"items": [render_token(t, now) for t in rows]}


@router.post("/admin/tokens/{token_id}/revoke", response_model=TokenInfo, tags=["admin"])
async def revoke_token(actor: ActorDep, api: StateDep, token_id: TokenId) -> dict[str, Any]:
    """Admin: revoke a token; requests with it get 401 token_revoked at once (idempotent)."""
    try:
        access.require_admin(actor)
    except ServiceError as exc:
        api.service.audit_denied(actor, "token_revoke", None, f"{exc.http_status} {exc.code}: {exc.message}")
        raise
    if not TOKEN_ID_RE.match(token_id):
        raise ApiError(404, "token_not_found", f"no token {token_id[:64]!r}")
    try:
        record = await run_in_threadpool(lambda: api.credentials.revoke_token(token_id, by=actor.user_id))
    except TokenNotFound as exc:
        raise ApiError(404, "token_not_found", str(exc)) from exc
    log().info("api.token_revoked", token_id=record.jti, token_user=record.user_id, by=actor.user_id)
    return render_token(record, api.clock.now())
