"""The HTTP API (FastAPI): instances, admin actions, events, audit, tokens, gateway traffic, health, metrics.

OpenAPI at ``/openapi.json``, interactive docs at ``/docs``. Authentication: :mod:`sandkeep.api.deps`;
authorization: the service (:mod:`sandkeep.engine.access`). Every error answers
``{"error": {"code", "message", "status"}}`` (see :mod:`sandkeep.api.errors`). The routes live in
:mod:`sandkeep.api.routes` (one router per area) and the web UI's in :mod:`sandkeep.web`; this module only
wires them to one runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from sandkeep import __version__
from sandkeep.api.deps import ApiState, GatewayClient
from sandkeep.api.docs import install_docs, readable_operation_id
from sandkeep.api.errors import install_error_handlers
from sandkeep.api.middleware import BodyLimit, JsonBodyRequired, RejectMalformed, RequestContext
from sandkeep.api.routes import admin, deadhost, gateway, heartbeat, instances, ops, tokens
from sandkeep.api.schemas import ErrorBody
from sandkeep.provider.client import MachinesClient
from sandkeep.runtime import Runtime
from sandkeep.web.routes import install_web

MAX_JSON_BODY = 1024 * 1024
ROUTERS = (instances.router, admin.router, deadhost.router, tokens.router, gateway.router, heartbeat.router, ops.router)


def api_state(runtime: Runtime, proxy_transport: httpx.AsyncBaseTransport | None = None) -> ApiState:
    """The typed pieces of ``runtime`` the routes use."""
    provider = runtime.provider if isinstance(runtime.provider, MachinesClient) else None
    return ApiState(settings=runtime.settings, clock=runtime.clock, service=runtime.service,
                    credentials=runtime.credentials, store=runtime.store, provider=provider,
                    heartbeats=runtime.engine.heartbeats if runtime.engine is not None else None,
                    gateway=GatewayClient(float(runtime.settings.gateway_proxy_timeout), proxy_transport))


def create_app(runtime: Runtime, *, proxy_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The API app for ``runtime``. ``proxy_transport`` replaces the gateway proxy's network transport (tests)."""
    state = api_state(runtime, proxy_transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.gateway.close()

    app = FastAPI(
        title="sandkeep",
        version=__version__,
        summary="Keeps one persistent machine per user alive and recovers it when it stops unexpectedly.",
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}},
        docs_url=None,  # served from the package's own Swagger UI files (works offline)
        redoc_url=None,
        generate_unique_id_function=readable_operation_id,
    )
    app.state.api = state
    app.state.credentials = runtime.credentials
    install_error_handlers(app)
    app.add_middleware(JsonBodyRequired)
    app.add_middleware(BodyLimit, max_bytes=MAX_JSON_BODY)  # outside: a huge body is 413 whatever its type
    app.add_middleware(RejectMalformed)
    app.add_middleware(RequestContext, monotonic=runtime.clock.monotonic)
    app.add_middleware(heartbeat.HeartbeatStreams, state=state)  # outermost: a stream's lines skip the rest
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)
    install_web(app, runtime)
    return app
