"""One error shape for every answer that is not a success: ``{"error": {"code", "message", "status"}}``.

``status`` is the HTTP status code (an integer). Some errors add ``details`` (e.g. the instance's
current status for ``instance_busy`` and ``instance_not_running``). Handlers cover HTTP errors (unknown
routes 404, wrong methods 405), request validation (422, malformed JSON 400), every
:class:`~sandkeep.engine.service.ServiceError`, and a last resort (500 ``internal_error``, logged with
its traceback) so no answer ever leaks a stack trace or a different shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sandkeep.engine.service import ServiceError
from sandkeep.logs import get_logger
from sandkeep.provider.errors import ProviderError
from sandkeep.store.base import FencedError

_HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


class ApiError(Exception):
    """Raise from a route to answer with the standard error shape."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details


def error_body(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return {"error": err}


def error_response(status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                   details: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, details), status_code=status, headers=headers)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str, list[dict[str, Any]]]:
    problems: list[dict[str, Any]] = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        problems.append({"loc": loc, "msg": str(err.get("msg", "invalid")), "type": str(err.get("type", ""))})
    if any(p["type"] == "json_invalid" for p in problems):
        return 400, "invalid_json", "request body is not valid JSON", problems
    parts = []
    for p in problems[:5]:
        where = ".".join(x for x in p["loc"] if x) or "request"
        parts.append(f"{where}: {p['msg']}")
    message = "invalid request: " + "; ".join(parts) if parts else "invalid request"
    return 422, "validation_error", message, problems


def install_error_handlers(app: FastAPI) -> None:
    log = get_logger("sandkeep.api")

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers,
                              details=_jsonable(exc.details) or None)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code = _HTTP_CODES.get(status, "error")
        if status == 404 and exc.detail in (None, "Not Found"):
            message = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail) if exc.detail else code.replace("_", " ")
        return error_response(status, code, message, headers=dict(exc.headers) if exc.headers else None)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status, code, message, problems = _describe_validation(exc)
        return error_response(status, code, message, details={"problems": _jsonable(problems)})

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        status = int(getattr(exc, "http_status", 400) or 400)
        headers = None
        if status == 503:
            headers = {"Retry-After": "5"}
        return error_response(status, exc.code, exc.message or exc.code, headers=headers,
                              details=_jsonable(exc.details) or None)

    async def provider_error(request: Request, exc: Exception) -> JSONResponse:
        # a provider failure the service did not translate: the machine provider is the one in trouble
        log.warning("api.provider_error", method=request.method, path=request.url.path, error=str(exc))
        return error_response(503, "provider_unavailable", f"the machine provider failed: {exc}",
                              headers={"Retry-After": "5"})

    async def fenced(request: Request, exc: Exception) -> JSONResponse:
        return error_response(409, "conflict", "the instance changed concurrently; retry the request",
                              headers={"Retry-After": "1"})

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:
        # the client hung up while sending its body: nothing to answer, nothing went wrong on our side
        log.info("api.client_disconnected", method=request.method, path=request.url.path)
        return error_response(400, "client_disconnected", "the client disconnected before the request body "
                              "was complete")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ValueError) and "Cursor" in type(exc).__name__:
            # the store's InvalidCursor: a pagination cursor it did not hand out
            return error_response(400, "invalid_cursor", str(exc) or "invalid cursor")
        log.error("api.unhandled_exception", method=request.method, path=request.url.path,
                  error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return error_response(500, "internal_error", "internal error; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ValueError, unexpected)
    app.add_exception_handler(ProviderError, provider_error)
    app.add_exception_handler(FencedError, fenced)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
