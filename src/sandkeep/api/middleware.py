"""Request context for every HTTP request the API answers: request id, one access log line, HTTP metrics.

* **Request id.** ``X-Request-ID`` from the caller is kept when it is sane (1-128 characters of
  ``A-Za-z0-9._:-``); otherwise a new one (``req_`` + 24 hex digits) is made. It is bound to every log line
  written while the request runs (structlog context) and sent back in the ``X-Request-ID`` response header.
* **Access log.** One JSON line per request, event ``http.request``: method, route template, path, status,
  duration, client address, request id. Paths of routes that carry a one-time secret are logged as their
  route template only.
* **Metrics.** ``sandkeep_http_requests_total{route,method,status}`` and
  ``sandkeep_http_request_duration_seconds{route,method}``; the route is the template
  (``/v1/instances/{instance_id}``), never the raw path, so the series count stays bounded.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

import structlog
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandkeep import metrics
from sandkeep.logs import get_logger

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED_ROUTE = "(unmatched)"
SECRET_PATH_PARAMS = frozenset({"code", "token"})
"""Path parameters whose value is a secret: such paths are logged as their route template."""


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def accepted_request_id(value: str | None) -> str | None:
    """The caller's request id when it is sane (length and characters), else None."""
    if value is None:
        return None
    value = value.strip()
    return value if REQUEST_ID_RE.match(value) else None


def _route_template(scope: Scope) -> tuple[str, bool]:
    """(route template, whether the path holds a secret) for a request the router handled."""
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else None
    if not isinstance(path, str):
        return UNMATCHED_ROUTE, False
    params = scope.get("path_params") or {}
    return path, any(name in SECRET_PATH_PARAMS for name in params)


class RequestContext:
    """Outermost ASGI middleware: request id, access log line and HTTP metrics for every request."""

    def __init__(self, app: ASGIApp, monotonic: Callable[[], float]) -> None:
        self.app = app
        self.monotonic = monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = accepted_request_id(incoming) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = self.monotonic()
        status = 500
        headers_sent_at: float | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, headers_sent_at
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers_sent_at = self.monotonic()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                ended = self.monotonic()
                route, secret_path = _route_template(scope)
                method = str(scope.get("method", ""))
                # a streamed answer (gateway traffic) is timed to its headers: its body can last for hours
                duration = max(0.0, (headers_sent_at if route.endswith("{path:path}") and headers_sent_at
                                     else ended) - started)
                metrics.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
                metrics.HTTP_DURATION.labels(route=route, method=method).observe(duration)
                client = scope.get("client")
                # looked up per request so a logging set-up made after the app was built applies
                get_logger("sandkeep.access").info("http.request", method=method, route=route,
                                                   path=route if secret_path else str(scope.get("path", "")),
                                                   status=status, duration_ms=round(duration * 1000, 2),
                                                   client=client[0] if client else None)


class JsonBodyRequired:
    """``POST``/``PUT``/``PATCH`` to ``/v1/`` with a body must say ``Content-Type: application/json``: anything else
    (curl's ``-d`` sends form encoding) answers 415 ``unsupported_media_type`` naming the fix, instead of a
    confusing validation error. Gateway traffic is exempt (it carries whatever the user's gateway accepts)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH")
                or not path.startswith("/v1/") or "/gateway/" in path):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        has_body = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if has_body and not (media == b"application/json" or media.endswith(b"+json")):
            from starlette.responses import JSONResponse

            shown = media.decode("latin-1")[:80] or "none"
            message = (f"send the body as JSON with 'Content-Type: application/json' (got {shown}); "
                       "with curl: -H 'Content-Type: application/json' -d '{...}'")
            await JSONResponse({"error": {"code": "unsupported_media_type", "message": message, "status": 415}},
                               status_code=415)(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
