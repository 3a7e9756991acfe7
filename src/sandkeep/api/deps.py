"""What every API route depends on: the caller (:func:`current_actor`) and the app's typed state (:class:`ApiState`).

``create_app`` puts one :class:`ApiState` on ``app.state.api``; routes ask for it with :data:`StateDep` and for
the caller with :data:`ActorDep`. Authorization is not decided here: routes hand the actor to the service,
which applies :mod:`sandkeep.engine.access` and raises; :mod:`sandkeep.api.errors` maps that to a status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from sandkeep.api.auth import TokenError
from sandkeep.api.errors import ApiError
from sandkeep.api.schemas import ErrorBody
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials
from sandkeep.engine.heartbeat import HeartbeatBook
from sandkeep.engine.service import Actor, InstanceServiceAPI
from sandkeep.provider.client import MachinesClient
from sandkeep.store.base import Store

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 422, 503)
}


@dataclass
class GatewayClient:
    """The API gateway route's HTTP client, made on first use and closed with the app."""

    timeout: float
    transport: httpx.AsyncBaseTransport | None = None
    _client: httpx.AsyncClient | None = field(default=None, init=False)

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                             transport=self.transport, follow_redirects=False)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


@dataclass
class ApiState:
    """The runtime pieces the API routes use (``app.state.api``)."""

    settings: Settings
    clock: Clock
    service: InstanceServiceAPI
    credentials: Credentials
    gateway: GatewayClient
    store: Store | None = None
    provider: MachinesClient | None = None
    """The provider when it is a Machines API client (``/readyz`` asks it to list apps)."""
    heartbeats: HeartbeatBook | None = None
    """Where gateway heartbeats land (``POST /v1/gateway/heartbeat``)."""


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


StateDep = Annotated[ApiState, Depends(api_state)]

bearer = HTTPBearer(auto_error=False, description="HS256 JWT with claims sub, role (user|admin|platform), exp")


async def current_actor(request: Request,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Actor:
    """The caller, from ``Authorization: Bearer <JWT>``; 401 with a reason (and a code) otherwise.

    The token must be registered and neither revoked nor expired (checked on every request).
    """
    if creds is None or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header",
                       headers={"WWW-Authenticate": "Bearer"})
    credentials = api_state(request).credentials
    try:
        actor, _ = await run_in_threadpool(credentials.check_token, creds.credentials)
    except TokenError as exc:
        raise ApiError(401, exc.code, str(exc),
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from exc
    return actor


ActorDep = Annotated[Actor, Depends(current_actor)]
InstanceId = Annotated[str, Path(description="Instance id (ins_...)", max_length=200)]
TokenId = Annotated[str, Path(description="Token id (tok_...)", max_length=200)]
Cursor = Annotated[str | None, Query(max_length=2000, description="Opaque cursor from next_cursor.")]
Limit200 = Annotated[int, Query(ge=1, le=200, description="Page size (1-200).")]
Limit500 = Annotated[int, Query(ge=1, le=500, description="Page size (1-500).")]
