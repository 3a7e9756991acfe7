"""The HTTP API (FastAPI): instances, admin actions, events, audit, gateway traffic, health, metrics.

OpenAPI at ``/openapi.json``, interactive docs at ``/docs``. Authentication and roles: see
:mod:`sandkeep.api.auth`. Every error answers ``{"error": {"code", "message", "status"}}``
(see :mod:`sandkeep.api.errors`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandkeep import __version__
from sandkeep.api import routes_deadhost
from sandkeep.api.auth import TokenError
from sandkeep.api.docs import install_docs, readable_operation_id
from sandkeep.api.errors import ApiError, install_error_handlers
from sandkeep.api.middleware import JsonBodyRequired, RequestContext
from sandkeep.api.proxy import HOP_BY_HOP, GatewayUnreachable, stream_gateway
from sandkeep.api.readiness import readiness_checks
from sandkeep.api.schemas import (
    AuditPage,
    CleanupResult,
    CreateInstanceBody,
    ErrorBody,
    EventPage,
    Instance,
    InstancePage,
    TokenInfo,
    TokenList,
    UpdateConfigBody,
    render_audit,
    render_debug,
    render_event,
    render_instance,
    render_token,
)
from sandkeep.credentials import TOKEN_ID_RE, Credentials, TokenNotFound
from sandkeep.engine.service import Actor, InstanceNotFound, InstanceServiceAPI, valid_user_id
from sandkeep.gateway import PROXY_TOKEN_HEADER
from sandkeep.gateway import TOKEN_HEADER as GATEWAY_TOKEN_HEADER
from sandkeep.logs import get_logger
from sandkeep.metrics import REGISTRY as METRICS_REGISTRY
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.web.auth import WebRuntime
from sandkeep.web.routes import create_web_router

MAX_JSON_BODY = 1024 * 1024
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_IDEMPOTENCY_KEY = 200
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:=+/-]{1,200}$")
STATUS_VALUES = [s.value for s in Status]
DROP_REQUEST_HEADERS = HOP_BY_HOP | {"host", "authorization", "cookie", "fly-force-instance-id", "x-forwarded-for",
                                     "x-forwarded-proto", "x-forwarded-host", GATEWAY_TOKEN_HEADER,
                                     PROXY_TOKEN_HEADER}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 422, 503)
}

bearer = HTTPBearer(auto_error=False, description="HS256 JWT with claims sub, role (user|admin|platform), exp")


async def current_actor(request: Request,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Actor:
    """The caller, from ``Authorization: Bearer <JWT>``; 401 with a reason (and a code) otherwise.

    The token must be registered and neither revoked nor expired (checked on every request).
    """
    if creds is None or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header",
                       headers={"WWW-Authenticate": "Bearer"})
    credentials: Credentials = request.app.state.credentials
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


def create_app(runtime: WebRuntime, *, proxy_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The API app for ``runtime`` (a :class:`sandkeep.runtime.Runtime` or anything with the same fields).

    ``proxy_transport`` replaces the network transport of the gateway proxy (tests).
    """
    service: InstanceServiceAPI = runtime.service
    secret: str = runtime.jwt_secret
    settings = runtime.settings
    log = get_logger("sandkeep.api")
    retry_after = str(max(1, math.ceil(settings.interval_busy)))
    proxy_timeout = float(settings.gateway_proxy_timeout)
    state: dict[str, httpx.AsyncClient] = {}

    def proxy_client() -> httpx.AsyncClient:
        client = state.get("client")
        if client is None:
            client = httpx.AsyncClient(timeout=httpx.Timeout(proxy_timeout, connect=10.0),
                                       transport=proxy_transport, follow_redirects=False)
            state["client"] = client
        return client

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client = state.pop("client", None)
        if client is not None:
            await client.aclose()

    app = FastAPI(
        title="sandkeep",
        version=__version__,
        summary="Keeps one persistent machine per user alive and recovers it when it stops unexpectedly.",
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}},
        docs_url=None,  # served from the package's own Swagger UI files below (works offline)
        redoc_url=None,
        generate_unique_id_function=readable_operation_id,
    )
    app.state.runtime = runtime
    app.state.jwt_secret = secret
    credentials: Credentials = runtime.credentials
    app.state.credentials = credentials
    install_error_handlers(app)

    app.add_middleware(JsonBodyRequired)
    app.add_middleware(BodyLimit, max_bytes=MAX_JSON_BODY)  # outside: a huge body is 413 whatever its type
    app.add_middleware(RejectMalformed)
    app.add_middleware(RequestContext, monotonic=runtime.clock.monotonic)

    def require_admin(actor: Actor) -> None:
        if actor.role != "admin":
            raise ApiError(403, "forbidden", "this route needs an admin token")

    def audit_denied(actor: Actor, action: str, instance_id: str | None, error: ApiError) -> None:
        """Admin actions refused at the door (non-admin token, unknown instance) go to the audit log too
        (rate-limited per actor by the service, so refusals cannot grow the log without bound)."""
        shown = None if instance_id is None else (
            instance_id if INSTANCE_ID_RE.match(instance_id) else instance_id[:64])
        try:
            service.audit_denied(actor, action, shown, f"{error.status} {error.code}: {error.message}")
        except Exception as exc:  # the refusal itself must still be answered
            log.warning("api.audit_failed", action=action, error=str(exc))

    def admin_action(actor: Actor, action: str, instance_id: str) -> None:
        """Gate an admin action (admin role, visible instance), auditing a refusal."""
        try:
            require_admin(actor)
            load(actor, instance_id)
        except ApiError as exc:
            audit_denied(actor, action, instance_id, exc)
            raise

    def not_found(instance_id: str) -> ApiError:
        shown = instance_id if len(instance_id) <= 64 else instance_id[:64] + "..."
        return ApiError(404, InstanceNotFound.code, f"instance {shown!r} not found")

    def load(actor: Actor, instance_id: str) -> InstanceRecord:
        """The instance if ``actor`` may see it; others' instances are 404 (existence is not leaked)."""
        if not INSTANCE_ID_RE.match(instance_id):
            raise not_found(instance_id)
        try:
            record = service.get_instance(instance_id)
        except InstanceNotFound as exc:
            raise not_found(instance_id) from exc
        if record is None:
            raise not_found(instance_id)
        if actor.role in ("admin", "platform") or record.user_id == actor.user_id:
            return record
        raise not_found(instance_id)


    # ------------------------------------------------------------------------------------------ routes

    v1 = APIRouter(prefix="/v1", responses=ERRORS)

    @v1.post("/instances", status_code=201, response_model=Instance, tags=["instances"])
    async def create_instance(
        actor: ActorDep, body: CreateInstanceBody | None = None,
        idempotency_key: Annotated[str | None, Header(
            alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
            description="Makes a retried create safe: the same caller, owner and key return the first instance "
                        "instead of creating another (1-200 characters of letters, digits and ._:=+/-).")] = None,
    ) -> dict[str, Any]:
        """Create an instance and start it right away. Users create for themselves only."""
        body = body or CreateInstanceBody()
        if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.match(idempotency_key):
            raise ApiError(422, "validation_error", "Idempotency-Key must be 1-200 characters of letters, digits "
                           "and ._:=+/-")
        user_id = actor.user_id if body.user_id is None else body.user_id
        # refused here before the service is reached (the service holds the same rules for every caller; the
        # API's fake-service tests pin these answers)
        if not valid_user_id(user_id):
            raise ApiError(422, "validation_error", f"invalid user_id {user_id[:64]!r}: 1-128 letters, digits "
                           "or ._@:+- starting with a letter or digit")
        if user_id != actor.user_id and actor.role not in ("admin", "platform"):
            raise ApiError(403, "forbidden", "a user token can only create instances for its own user")
        extra = {"idempotency_key": idempotency_key} if idempotency_key is not None else {}
        record = await service.create_instance(actor, user_id=user_id, size=body.size, env=body.env,
                                               secrets=body.secrets, image=body.image, **extra)
        return render_instance(record)

    @v1.get("/instances", response_model=InstancePage, tags=["instances"])
    async def list_instances(
        actor: ActorDep,
        status: Annotated[list[str] | None, Query(description="Filter by status (repeat or comma-separate).")] = None,
        user_id: Annotated[str | None, Query(max_length=200)] = None,
        region: Annotated[str | None, Query(max_length=100)] = None,
        cursor: Cursor = None,
        limit: Limit200 = 50,
    ) -> dict[str, Any]:
        """Own instances for users; all (filterable by user_id) for admins and platform."""
        statuses: list[str] | None = None
        if status:
            statuses = [s.strip() for raw in status for s in raw.split(",") if s.strip()]
            bad = [s for s in statuses if s not in STATUS_VALUES]
            if bad:
                raise ApiError(422, "validation_error",
                               f"unknown status {bad[0][:40]!r}; one of {', '.join(STATUS_VALUES)}")
        if actor.role == "user":
            if user_id is not None and user_id != actor.user_id:
                raise ApiError(403, "forbidden", "a user token can only list its own instances")
            user_id = actor.user_id
        page = service.list_instances(user_id=user_id, status=statuses, region=region, cursor=cursor, limit=limit)
        return {"items": [render_instance(r) for r in page.items], "next_cursor": page.next_cursor}

    @v1.get("/instances/{instance_id}", response_model=Instance, tags=["instances"])
    async def get_instance(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        return render_instance(load(actor, instance_id))

    @v1.patch("/instances/{instance_id}", response_model=Instance, tags=["instances"])
    async def update_config(actor: ActorDep, instance_id: InstanceId, body: UpdateConfigBody) -> dict[str, Any]:
        """Change size, env or secrets; applied at the next start or restart (and by every recovery)."""
        load(actor, instance_id)
        if body.size is None and body.env is None and body.secrets is None:
            raise ApiError(422, "validation_error", "nothing to change: give size, env or secrets")
        record = await service.update_config(actor, instance_id, size=body.size, env=body.env, secrets=body.secrets)
        return render_instance(record)

    @v1.delete("/instances/{instance_id}", status_code=202, response_model=Instance, tags=["instances"])
    async def destroy_instance(actor: ActorDep, instance_id: InstanceId,
                               force: Annotated[bool, Query(description="Admin only: destroy even while "
                                                                         "recovering.")] = False) -> dict[str, Any]:
        """Two-phase destroy; refused with 409 while recovering unless an admin passes force=true."""
        if force:
            admin_action(actor, "force_destroy", instance_id)
        load(actor, instance_id)
        return render_instance(await service.destroy(actor, instance_id, force=force))

    @v1.post("/instances/{instance_id}/start", status_code=202, response_model=Instance, tags=["instances"])
    async def start(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        load(actor, instance_id)
        return render_instance(await service.start(actor, instance_id))

    @v1.post("/instances/{instance_id}/stop", status_code=202, response_model=Instance, tags=["instances"])
    async def stop(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        load(actor, instance_id)
        return render_instance(await service.stop(actor, instance_id))

    @v1.post("/instances/{instance_id}/restart", status_code=202, response_model=Instance, tags=["instances"])
    async def restart(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        load(actor, instance_id)
        return render_instance(await service.restart(actor, instance_id))

    @v1.get("/instances/{instance_id}/events", response_model=EventPage, tags=["events"])
    async def instance_events(actor: ActorDep, instance_id: InstanceId,
                              name: Annotated[str | None, Query(max_length=200)] = None,
                              cursor: Cursor = None,
                              limit: Limit500 = 100) -> dict[str, Any]:
        """The instance's events, newest first."""
        load(actor, instance_id)
        page = service.list_events(instance_id=instance_id, name=name, cursor=cursor, limit=limit)
        return {"items": [render_event(e) for e in page.items], "next_cursor": page.next_cursor}

    # ------------------------------------------------------------------------------------------ admin

    @v1.get("/events", response_model=EventPage, tags=["admin"])
    async def fleet_events(actor: ActorDep, name: Annotated[str | None, Query(max_length=200)] = None,
                           instance_id: Annotated[str | None, Query(max_length=200)] = None,
                           cursor: Cursor = None,
                           limit: Limit500 = 100) -> dict[str, Any]:
        """Admin: fleet-wide events, newest first, filterable by event name."""
        require_admin(actor)
        page = service.list_events(instance_id=instance_id, name=name, cursor=cursor, limit=limit)
        return {"items": [render_event(e) for e in page.items], "next_cursor": page.next_cursor}

    @v1.get("/audit", response_model=AuditPage, tags=["admin"])
    async def audit(actor: ActorDep, instance_id: Annotated[str | None, Query(max_length=200)] = None,
                    cursor: Cursor = None, limit: Limit500 = 100) -> dict[str, Any]:
        """Admin: the audit log of admin actions, newest first."""
        require_admin(actor)
        page = service.list_audit(instance_id=instance_id, cursor=cursor, limit=limit)
        return {"items": [render_audit(a) for a in page.items], "next_cursor": page.next_cursor}

    @v1.get("/instances/{instance_id}/debug", tags=["admin"])
    async def debug(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        """Admin: every persisted field, including alarm_at and the lease (secret values redacted)."""
        require_admin(actor)
        load(actor, instance_id)
        return render_debug(service.debug(instance_id))

    @v1.post("/instances/{instance_id}/recovery/retry", status_code=202, response_model=Instance, tags=["admin"])
    async def retry_recovery(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        """Admin: set the alarm to now so the instance is reconciled at once."""
        admin_action(actor, "retry_recovery", instance_id)
        return render_instance(await service.retry_recovery(actor, instance_id))

    @v1.post("/instances/{instance_id}/retained-volume/cleanup", response_model=CleanupResult, tags=["admin"])
    async def cleanup_retained(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        """Admin: delete the retained old volume now (409 while recovering or when refused)."""
        admin_action(actor, "retained_volume_cleanup", instance_id)
        deleted = await service.cleanup_retained_volume(actor, instance_id)
        return {"ok": True, "deleted_volume_id": deleted}

    @v1.post("/instances/{instance_id}/machine/destroy", status_code=202, response_model=Instance, tags=["admin"])
    async def destroy_machine(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        """Admin: force-destroy the instance's current machine (reconcile then sees it gone)."""
        admin_action(actor, "destroy_machine", instance_id)
        return render_instance(await service.destroy_machine(actor, instance_id))

    # ------------------------------------------------------------------------------------------ tokens

    @v1.get("/tokens", response_model=TokenList, tags=["tokens"])
    async def my_tokens(actor: ActorDep) -> dict[str, Any]:
        """The caller's own live tokens (ids and lifetimes; a token's text is never stored)."""
        now = runtime.clock.now()
        rows = await run_in_threadpool(lambda: credentials.list_tokens(user_id=actor.user_id))
        return {"items": [render_token(t, now) for t in rows]}

    @v1.get("/admin/tokens", response_model=TokenList, tags=["admin"])
    async def admin_tokens(actor: ActorDep, user_id: Annotated[str | None, Query(max_length=200)] = None,
                           include_ended: Annotated[bool, Query(description="Also revoked and expired "
                                                                            "tokens.")] = False) -> dict[str, Any]:
        """Admin: tokens (of one user with user_id), newest first, live ones unless include_ended."""
        require_admin(actor)
        now = runtime.clock.now()
        rows = await run_in_threadpool(lambda: credentials.list_tokens(user_id=user_id, include_ended=include_ended))
        return {"items": [render_token(t, now) for t in rows]}

    @v1.post("/admin/tokens/{token_id}/revoke", response_model=TokenInfo, tags=["admin"])
    async def revoke_token(actor: ActorDep, token_id: TokenId) -> dict[str, Any]:
        """Admin: revoke a token; requests with it get 401 token_revoked at once (idempotent)."""
        try:
            require_admin(actor)
        except ApiError as exc:
            audit_denied(actor, "token_revoke", None, exc)
            raise
        if not TOKEN_ID_RE.match(token_id):
            raise ApiError(404, "token_not_found", f"no token {token_id[:64]!r}")
        try:
            record = await run_in_threadpool(lambda: credentials.revoke_token(token_id, by=actor.user_id))
        except TokenNotFound as exc:
            raise ApiError(404, "token_not_found", str(exc)) from exc
        log.info("api.token_revoked", token_id=record.jti, token_user=record.user_id, by=actor.user_id)
        return render_token(record, runtime.clock.now())
    @v1.post("/instances/{instance_id}/gateway-token/rotate", status_code=202, response_model=Instance,
             tags=["admin"])
    async def rotate_gateway_token(actor: ActorDep, instance_id: InstanceId) -> dict[str, Any]:
        """Admin: give the instance a new gateway token (a running instance restarts with it; 409 while busy)."""
        admin_action(actor, "rotate_gateway_token", instance_id)
        return render_instance(await service.rotate_gateway_token(actor, instance_id))

    # ------------------------------------------------------------------------------------------ traffic

    async def gateway(actor: ActorDep, instance_id: InstanceId, path: str, request: Request) -> Response:
        """Proxy to the instance's gateway (owner or admin). 503 with Retry-After while not running."""
        record = load(actor, instance_id)
        if actor.role == "platform" and record.user_id != actor.user_id:
            raise ApiError(403, "forbidden", "gateway traffic is for the instance's owner or an admin")
        target = service.gateway_target(instance_id) if record.status == Status.RUNNING else None
        if target is None:
            status = str(record.status)
            raise ApiError(503, "instance_not_running", f"instance {instance_id} is {status}, not running; "
                           f"retry in {retry_after}s", headers={"Retry-After": retry_after},
                           instance_status=status, busy=record.busy)
        base, extra_headers = target
        url = base.rstrip("/") + "/" + quote(path, safe="/:@!$&'()*+,;=-._~%")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST_HEADERS]
        headers += list(extra_headers.items())
        client_host = request.client.host if request.client else ""
        headers.append(("x-forwarded-for", client_host))
        headers.append(("x-forwarded-proto", request.url.scheme))
        has_body = "content-length" in request.headers or "chunked" in request.headers.get("transfer-encoding", "")

        query: list[tuple[str, str | int | float | bool | None]] = list(request.query_params.multi_items())

        def broken(error: str) -> None:
            log.warning("api.gateway_stream_broken", instance_id=instance_id, error=error)

        try:
            return await stream_gateway(proxy_client(), request.method, url, headers=headers,
                                        params=httpx.QueryParams(query),
                                        content=request.stream() if has_body else None, on_broken=broken)
        except GatewayUnreachable as exc:
            if exc.timed_out:
                log.warning("api.gateway_timeout", instance_id=instance_id, error=str(exc.error))
                raise ApiError(504, "gateway_timeout",
                               f"the gateway of {instance_id} did not answer in time") from exc
            log.warning("api.gateway_unreachable", instance_id=instance_id, error=str(exc))
            raise ApiError(502, "gateway_unreachable", f"cannot reach the gateway of {instance_id}: "
                           f"{type(exc.error).__name__}", headers={"Retry-After": retry_after}) from exc

    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        v1.add_api_route("/instances/{instance_id}/gateway/{path:path}", gateway, methods=[method],
                         operation_id=f"gateway_{method.lower()}", tags=["traffic"],
                         responses={502: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    routes_deadhost.register(v1, service, current_actor=current_actor, admin_action=admin_action)
    app.include_router(v1)

    # ------------------------------------------------------------------------------------------ ops

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the API process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 when the database and the machine provider answer, 503 (naming which) otherwise."""
        checks = await readiness_checks(runtime, timeout=float(settings.ready_timeout))
        failed = {name: result for name, result in checks.items() if result != "ok"}
        if not failed:
            return JSONResponse({"ok": True, "checks": checks})
        message = "; ".join(f"{name}: {result}" for name, result in failed.items())
        return JSONResponse({"error": {"code": "not_ready", "message": message, "status": 503}, "checks": checks},
                            status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics (engine counters and histograms)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(METRICS_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    install_docs(app)
    _include_web(app, runtime)
    return app


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HTML_PREFIXES = ("/ui", "/login", "/logout")


class RejectMalformed:
    """400 before any route runs for requests no route should see:

    * both ``Transfer-Encoding`` and ``Content-Length`` (ambiguous framing, the request-smuggling shape;
      RFC 9112 §6.3 lets a server reject it);
    * outside the API (``/v1/``, whose routes answer weird ids with 404 themselves), a path that decodes to
      control characters (e.g. ``/ui/instances/x/open/%00``).

    Web UI paths get a small HTML page, everything else the API's JSON error shape.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = None
            names = {name.lower() for name, _ in scope.get("headers", [])}
            if b"transfer-encoding" in names and b"content-length" in names:
                problem = "a request may not carry both Transfer-Encoding and Content-Length"
            elif not str(scope.get("path", "")).startswith("/v1/") and _CONTROL_CHARS.search(scope.get("path", "")):
                problem = "the request path contains control characters"
            if problem is not None:
                path = str(scope.get("path", ""))
                if path.startswith(_HTML_PREFIXES):
                    html = (f"<!doctype html><title>Bad request</title><h1>Bad request</h1><p>{problem}.</p>"
                            '<p><a href="/">Back to the start page</a></p>')
                    response: Response = HTMLResponse(html, status_code=400, headers={"Connection": "close"})
                else:
                    response = _err(400, "bad_request", problem)
                    response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing re-raises it untouched."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body larger than {max_bytes} bytes")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (gateway traffic is exempt: it streams through)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "/gateway/" in scope.get("path", ""):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await _err(400, "bad_request", "Content-Length must be a number")(scope, receive, send)
                    return
                if int(value) > self.max_bytes:
                    await _err(413, "payload_too_large",
                               f"request body larger than {self.max_bytes} bytes")(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _err(413, "payload_too_large",
                           f"request body larger than {self.max_bytes} bytes")(scope, receive, send)


def _err(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, status_code=status)


def _include_web(app: FastAPI, runtime: WebRuntime) -> None:
    app.include_router(create_web_router(runtime))
