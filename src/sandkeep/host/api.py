"""HTTP faces of the local host: the Machines API app (``/v1``, ``/_local``, ``/healthz``) and the proxy app."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandkeep.gateway import PROXY_TOKEN_HEADER
from sandkeep.host.core import WAIT_STATES, Host, HostError, bad
from sandkeep.host.faults import OPERATIONS, FaultInputError, Faults, RateLimiter
from sandkeep.host.schema import type_errors

log = structlog.get_logger("sandkeep.host.api")  # lazy: configured by the command

Handler = Callable[[Request], Awaitable[Response]]
MAX_WAIT = 60
MAX_WATCH = 30
MAX_BODY = 1024 * 1024  # bytes; a Fly machine config is a few KiB
MAX_DRAIN = 16 * MAX_BODY
_SIGNALS = {name: getattr(signal, name) for name in (
    "SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE", "SIGQUIT", "SIGSEGV",
    "SIGTERM", "SIGTRAP", "SIGUSR1")}
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length"}


def error(status: int, message: str, code: str = "unknown", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": code}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body; beyond ``limit`` bytes a 413. An oversized body is read and dropped (up to
    ``MAX_DRAIN``) so the client gets the 413 instead of a reset connection; nothing beyond ``limit`` is kept."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > MAX_DRAIN:
            break
    if size > limit:
        raise HostError(413, f"request body too large: more than {limit} bytes (a machine or volume request "
                             f"is a few KiB)")
    return b"".join(chunks)


async def read_json(request: Request, *, required: bool = True, shape: str | None = None) -> dict[str, Any]:
    """The body as a JSON object; with ``shape`` (a Fly request definition) every known field's type is checked."""
    raw = await read_body(request)
    if not raw.strip():
        if required:
            raise bad("request body is required (a JSON object)")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        raise bad("malformed JSON body: nested too deeply") from exc
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    if shape is not None:
        problems = type_errors(body, shape)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise bad("invalid request body: " + "; ".join(problems[:5]) + more)
    return body


def qbool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return False
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise bad(f"query parameter '{name}' must be true or false, got {raw!r}")


def _duration_seconds(value: Any) -> float | None:
    """Fly's stop timeout: a Go duration string ('10s', '500ms', '1m') or a number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise bad("timeout must be a duration such as '10s'")
    if isinstance(value, int | float):
        return float(value) if value < 1e6 else float(value) / 1e9  # big numbers are Go nanoseconds
    if isinstance(value, dict) and isinstance(value.get("time.Duration"), int):
        return float(value["time.Duration"]) / 1e9
    if isinstance(value, str):
        units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
        for suffix, factor in units:
            if value.endswith(suffix):
                try:
                    return float(value[: -len(suffix)]) * factor
                except ValueError:
                    break
        try:
            return float(value)
        except ValueError:
            pass
    raise bad(f"timeout must be a duration such as '10s', got {value!r}")


# Every operation of Fly's Machines API (tests/data/fly-machines-api.swagger.json, plus the app-level
# ip_assignments that fly-go's flaps client calls), as (path under /v1, methods): a request the host has no route
# for is a 501 when Fly defines it and a 405 when Fly defines the path with other methods, never a 404 (which a
# client reads as "that resource is gone").
_A, _M, _V = "/v1/apps/{app}", "/v1/apps/{app}/machines/{mid}", "/v1/apps/{app}/volumes/{vid}"
FLY_OPERATIONS: tuple[tuple[str, frozenset[str]], ...] = tuple((p, frozenset(ms.split())) for p, ms in (
    ("/v1/apps", "GET POST"), (_A, "GET DELETE"), (_A + "/machines", "GET POST"), (_M, "GET POST DELETE"),
    (_M + "/cordon", "POST"), (_M + "/events", "GET"), (_M + "/exec", "POST"), (_M + "/lease", "GET POST DELETE"),
    (_M + "/metadata", "GET"), (_M + "/metadata/{key}", "POST DELETE"), (_M + "/ps", "GET"),
    (_M + "/restart", "POST"), (_M + "/signal", "POST"), (_M + "/start", "POST"), (_M + "/stop", "POST"),
    (_M + "/uncordon", "POST"), (_M + "/versions", "GET"), (_M + "/wait", "GET"), (_A + "/volumes", "GET POST"),
    (_V, "GET POST PUT DELETE"), (_V + "/extend", "PUT"), (_V + "/snapshots", "GET POST"),
    (_A + "/ip_assignments", "GET POST"), (_A + "/ip_assignments/{ip}", "DELETE")))


def _path_matches(template: str, path: str) -> bool:
    parts, want = path.rstrip("/").split("/"), template.split("/")
    if template.endswith("{key}"):  # a metadata key may contain '/'
        return len(parts) >= len(want) and all(w.startswith("{") or w == p for w, p in zip(want, parts, strict=False))
    return len(parts) == len(want) and all(w.startswith("{") or w == p for w, p in zip(want, parts, strict=True))


def unrouted(method: str, path: str, served: dict[str, set[str]]) -> JSONResponse:
    """The answer to a request no route takes: 405 (with ``Allow``) for a wrong method on a path Fly or the host
    knows, else 501 with Fly's error body. Never 404: that means "the resource is gone"."""
    allowed: set[str] = set()
    for template, methods in FLY_OPERATIONS:
        if _path_matches(template, path):
            if method in methods:
                return error(501, f"not implemented: the local host does not serve {method} {path} (a Fly Machines "
                                  f"API operation outside the subset it implements)")
            allowed |= methods
    for template, verbs in served.items():
        if _path_matches(template.replace("{key:path}", "{key}"), path):
            allowed |= verbs - {"HEAD"}
    if allowed:
        return error(405, f"method not allowed: {method} {path} (allowed: {', '.join(sorted(allowed))})",
                     headers={"Allow": ", ".join(sorted(allowed))})
    return error(501, f"not implemented: no route {method} {path} on the local host")


class HostAPI:
    def __init__(self, host: Host, token: str, faults: Faults | None = None, *, rate_limits: bool = False) -> None:
        self.host = host
        self.token = token
        self.faults = faults or Faults()
        self.limiter = RateLimiter(host.clock.monotonic) if rate_limits else None

    # -------------------------------------------------------------- plumbing
    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def op(self, name: str | None, fn: Handler) -> Handler:
        async def handler(request: Request) -> Response:
            if not self._authorized(request):
                return error(401, "unauthorized: missing or invalid bearer token (Authorization: Bearer <token>)")
            injection = None
            if name is not None:
                latency, injection = self.faults.decide(name)
                latency += self.host.opt.delays.get("api", 0.0)
                if latency > 0:
                    await self.host.clock.sleep(latency)
                if injection is not None and injection.phase == "before":
                    return self._injected(injection)
                if self.limiter is not None:
                    key = f"{request.path_params.get('app', '')}/{request.path_params.get('mid', '')}"
                    wait = self.limiter.check(name, key)
                    if wait is not None:
                        return error(429, f"rate limit exceeded for {name}", headers={"Retry-After": f"{wait:.2f}"})
            try:
                response = await fn(request)
            except HostError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)
            except Exception:
                log.exception("host.unhandled", path=request.url.path, method=request.method)
                response = error(500, "internal error in the local host (see its log)")
            if injection is not None:
                return self._injected(injection)
            return response
        return handler

    @staticmethod
    def _injected(injection: Any) -> Response:
        headers = None
        if injection.retry_after is not None:
            headers = {"Retry-After": f"{injection.retry_after:g}"}
        return error(injection.status, injection.message, headers=headers)

    def routes(self) -> list[Route]:
        r: list[Route] = []

        def add(path: str, method: str, name: str | None, fn: Handler) -> None:
            r.append(Route(path, self.op(name, fn), methods=[method]))

        a, m, v = "/v1/apps/{app}", "/v1/apps/{app}/machines/{mid}", "/v1/apps/{app}/volumes/{vid}"
        add("/v1/apps", "GET", "app.list", self.list_apps)
        add("/v1/apps", "POST", "app.create", self.create_app)
        add(a, "GET", "app.get", self.get_app)
        add(a, "DELETE", "app.delete", self.delete_app)
        add(a + "/ip_assignments", "GET", "app.ips.list", self.list_ips)
        add(a + "/ip_assignments", "POST", "app.ips.assign", self.assign_ip)
        add(a + "/ip_assignments/{ip}", "DELETE", "app.ips.release", self.release_ip)
        add(a + "/machines", "GET", "machine.list", self.list_machines)
        add(a + "/machines", "POST", "machine.create", self.create_machine)
        add(m, "GET", "machine.get", self.get_machine)
        add(m, "POST", "machine.update", self.update_machine)
        add(m, "DELETE", "machine.destroy", self.destroy_machine)
        add(m + "/start", "POST", "machine.start", self.start_machine)
        add(m + "/stop", "POST", "machine.stop", self.stop_machine)
        add(m + "/restart", "POST", "machine.restart", self.restart_machine)
        add(m + "/wait", "GET", "machine.wait", self.wait_machine)
        add(m + "/events", "GET", "machine.events", self.machine_events)
        add(m + "/metadata", "GET", "machine.metadata.get", self.get_metadata)
        add(m + "/metadata/{key:path}", "POST", "machine.metadata.set", self.set_metadata)
        add(m + "/metadata/{key:path}", "DELETE", "machine.metadata.delete", self.delete_metadata)
        add(a + "/volumes", "GET", "volume.list", self.list_volumes)
        add(a + "/volumes", "POST", "volume.create", self.create_volume)
        add(v, "GET", "volume.get", self.get_volume)
        add(v, "DELETE", "volume.delete", self.delete_volume)
        add(v + "/extend", "PUT", "volume.extend", self.extend_volume)
        add(v + "/snapshots", "GET", "volume.snapshots.list", self.list_snapshots)
        add(v + "/snapshots", "POST", "volume.snapshots.create", self.create_snapshot)
        add("/_local/apps/{app}/machines/{mid}/crash", "POST", None, self.crash_machine)
        add("/_local/regions", "GET", None, self.list_regions)
        add("/_local/regions/{region}/outage", "POST", None, self.outage)
        add("/_local/regions/{region}/capacity", "POST", None, self.capacity)
        add("/_local/faults", "GET", None, self.get_faults)
        add("/_local/faults", "POST", None, self.set_faults)
        add("/_local/faults", "DELETE", None, self.clear_faults)
        add("/_local/watch", "GET", None, self.watch)
        add("/_local/snapshots/run", "POST", None, self.run_snapshots)
        r.append(Route("/healthz", self.healthz, methods=["GET"]))
        return r

    def app(self) -> Starlette:
        served: dict[str, set[str]] = {}
        for route in self.routes():
            served.setdefault(route.path, set()).update(route.methods or ())

        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            if status in (404, 405):
                return unrouted(request.method, request.url.path, served)
            detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
            return error(status, str(detail))

        return Starlette(routes=self.routes(), exception_handlers={HTTPException: http_error})

    # -------------------------------------------------------------- misc
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "regions": self.host.opt.regions, "seq": self.host.seq})

    # -------------------------------------------------------------- apps
    async def list_apps(self, request: Request) -> Response:
        return JSONResponse(self.host.list_apps(request.query_params.get("org_slug")))

    async def create_app(self, request: Request) -> Response:
        a = self.host.create_app(await read_json(request, shape="CreateAppRequest"))
        return JSONResponse(self.host.app_json(a), status_code=201)

    async def get_app(self, request: Request) -> Response:
        return JSONResponse(self.host.app_json(self.host.app(request.path_params["app"])))

    async def delete_app(self, request: Request) -> Response:
        await self.host.delete_app(request.path_params["app"])
        return Response(status_code=202)

    async def list_ips(self, request: Request) -> Response:
        return JSONResponse(self.host.list_ips(request.path_params["app"]))

    async def assign_ip(self, request: Request) -> Response:
        return JSONResponse(self.host.assign_ip(request.path_params["app"], await read_json(request)))

    async def release_ip(self, request: Request) -> Response:
        self.host.release_ip(request.path_params["app"], request.path_params["ip"])
        return JSONResponse({"ok": True})

    # -------------------------------------------------------------- machines
    async def list_machines(self, request: Request) -> Response:
        metadata: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key.startswith("metadata."):
                if len(key) == len("metadata."):
                    raise bad("metadata filter needs a key: metadata.KEY=VALUE")
                metadata[key[len("metadata."):]] = value
        include_deleted = qbool(request, "include_deleted")
        ms = self.host.list_machines(request.path_params["app"], metadata=metadata,
                                     region=request.query_params.get("region") or None,
                                     include_deleted=include_deleted)
        return JSONResponse([self.host.machine_json(x) for x in ms])

    async def create_machine(self, request: Request) -> Response:
        app = request.path_params["app"]
        self.host.app(app)
        _m, answer = await self.host.create_machine(app, await read_json(request, shape="CreateMachineRequest"))
        return JSONResponse(answer)

    async def get_machine(self, request: Request) -> Response:
        m = self.host.machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse(self.host.machine_json(m))

    async def update_machine(self, request: Request) -> Response:
        app, mid = request.path_params["app"], request.path_params["mid"]
        self.host.machine(app, mid, live=True)
        m = await self.host.update_machine(app, mid, await read_json(request, shape="UpdateMachineRequest"))
        return JSONResponse(self.host.machine_json(m))

    async def destroy_machine(self, request: Request) -> Response:
        force = qbool(request, "force") or qbool(request, "kill")
        await self.host.destroy_machine(request.path_params["app"], request.path_params["mid"], force=force)
        return JSONResponse({"ok": True})

    async def start_machine(self, request: Request) -> Response:
        out = await self.host.start_machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse(out)

    async def stop_machine(self, request: Request) -> Response:
        app, mid = request.path_params["app"], request.path_params["mid"]
        m = self.host.machine(app, mid, live=True)
        body = await read_json(request, required=False, shape="StopRequest")
        stop_config = m["config"].get("stop_config") or {}  # the machine's own defaults, as on Fly
        sig_name = body.get("signal") or stop_config.get("signal") or "SIGTERM"
        if not isinstance(sig_name, str) or sig_name.upper() not in _SIGNALS:
            raise bad(f"signal must be one of {', '.join(sorted(_SIGNALS))}")
        timeout = _duration_seconds(body.get("timeout") if body.get("timeout") is not None
                                    else stop_config.get("timeout"))
        if timeout is not None and not 0 <= timeout <= 3600:
            raise bad("timeout must be between 0s and 1h")
        await self.host.stop_machine(app, mid, sig=_SIGNALS[sig_name.upper()], timeout=timeout)
        return JSONResponse({"ok": True})

    async def restart_machine(self, request: Request) -> Response:
        await self.host.restart_machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse({"ok": True})

    async def wait_machine(self, request: Request) -> Response:
        app, mid = request.path_params["app"], request.path_params["mid"]
        self.host.machine(app, mid)
        state = request.query_params.get("state") or "started"
        if state not in WAIT_STATES:
            raise bad(f"state must be one of {', '.join(WAIT_STATES)}, got {state!r}")
        raw = request.query_params.get("timeout")
        timeout = MAX_WAIT
        if raw not in (None, ""):
            try:
                timeout = int(str(raw).removesuffix("s"))
            except ValueError as exc:
                raise bad(f"timeout must be a whole number of seconds (1-{MAX_WAIT}), got {raw!r}") from exc
            if not 1 <= timeout <= MAX_WAIT:
                raise bad(f"timeout must be between 1 and {MAX_WAIT} seconds, got {timeout}")
        await self.host.wait_machine(app, mid, state=state, timeout=float(timeout))
        return JSONResponse({"ok": True})

    async def machine_events(self, request: Request) -> Response:
        m = self.host.machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse(m.get("events", []))

    async def get_metadata(self, request: Request) -> Response:
        m = self.host.machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse(dict(m["config"].get("metadata") or {}))

    async def set_metadata(self, request: Request) -> Response:
        app, mid, key = request.path_params["app"], request.path_params["mid"], request.path_params["key"]
        self.host.machine(app, mid, live=True)
        body = await read_json(request)
        value = body.get("value")
        if not isinstance(value, str):
            raise bad("body must be {\"value\": \"<string>\"}")
        self.host.check_metadata(key, value)
        self.host.set_metadata(app, mid, key, value)
        return Response(status_code=204)

    async def delete_metadata(self, request: Request) -> Response:
        self.host.delete_metadata(request.path_params["app"], request.path_params["mid"], request.path_params["key"])
        return Response(status_code=204)

    # -------------------------------------------------------------- volumes
    async def list_volumes(self, request: Request) -> Response:
        return JSONResponse([self.host.volume_json(v) for v in self.host.list_volumes(request.path_params["app"])])

    async def create_volume(self, request: Request) -> Response:
        app = request.path_params["app"]
        self.host.app(app)
        v = await self.host.create_volume(app, await read_json(request, shape="CreateVolumeRequest"))
        return JSONResponse(self.host.volume_json(v))

    async def get_volume(self, request: Request) -> Response:
        v = self.host.volume(request.path_params["app"], request.path_params["vid"])
        return JSONResponse(self.host.volume_json(v))

    async def delete_volume(self, request: Request) -> Response:
        out = await self.host.delete_volume(request.path_params["app"], request.path_params["vid"])
        return JSONResponse(out)

    async def extend_volume(self, request: Request) -> Response:
        v, needs_restart = await self.host.extend_volume(request.path_params["app"], request.path_params["vid"],
                                                         await read_json(request, shape="ExtendVolumeRequest"))
        return JSONResponse({"volume": self.host.volume_json(v), "needs_restart": needs_restart})

    async def list_snapshots(self, request: Request) -> Response:
        snaps = self.host.list_snapshots(request.path_params["app"], request.path_params["vid"])
        return JSONResponse([self.host.snapshot_json(s) for s in snaps])

    async def create_snapshot(self, request: Request) -> Response:
        s = await self.host.create_snapshot(request.path_params["app"], request.path_params["vid"])
        return JSONResponse(self.host.snapshot_json(s))

    # -------------------------------------------------------------- fault injection
    async def crash_machine(self, request: Request) -> Response:
        await self.host.crash_machine(request.path_params["app"], request.path_params["mid"])
        return JSONResponse({"ok": True})

    async def list_regions(self, request: Request) -> Response:
        return JSONResponse({"regions": [self.host.region_json(self.host.regions[r]) for r in self.host.opt.regions]})

    async def outage(self, request: Request) -> Response:
        body = await read_json(request)
        down = body.get("down")
        if not isinstance(down, bool):
            raise bad("body must be {\"down\": true|false}")
        return JSONResponse(self.host.set_outage(request.path_params["region"], down))

    async def capacity(self, request: Request) -> Response:
        body = await read_json(request)
        available = body.get("available")
        if not isinstance(available, bool):
            raise bad("body must be {\"available\": true|false}")
        return JSONResponse(self.host.set_capacity(request.path_params["region"], available))

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse({"rules": [r.as_json() for r in self.faults.rules], "operations": list(OPERATIONS)})

    async def set_faults(self, request: Request) -> Response:
        body = await read_json(request)
        try:
            rules = self.faults.configure(body)
        except FaultInputError as exc:
            raise bad(str(exc)) from exc
        return JSONResponse({"rules": [r.as_json() for r in rules]})

    async def clear_faults(self, request: Request) -> Response:
        self.faults.clear()
        return JSONResponse({"rules": []})

    async def watch(self, request: Request) -> Response:
        try:
            since = int(request.query_params.get("since") or 0)
            timeout = float(request.query_params.get("timeout") or 0)
        except ValueError as exc:
            raise bad("since must be a whole number and timeout a number of seconds") from exc
        if since < 0 or not 0 <= timeout <= MAX_WATCH:
            raise bad(f"since must be >= 0 and timeout between 0 and {MAX_WATCH} seconds")
        return JSONResponse(await self.host.watch(since, timeout))

    async def run_snapshots(self, request: Request) -> Response:
        return JSONResponse(await self.host.scheduled_pass())


def proxy_token_ok(token: str | None, presented: str | None) -> bool:
    """Whether a proxy request may pass: always without a configured token, else only with that token."""
    if not token:
        return True
    return bool(presented) and hmac.compare_digest(str(presented).strip().encode(), token.encode())


PROXY_UNAUTHORIZED = f"unauthorized: this proxy needs its token in the {PROXY_TOKEN_HEADER} header"


class ProxyApp:
    """Fly's proxy, locally: ``fly-force-instance-id: <machine id>`` routes a request to that machine's gateway.

    With a ``token`` (``SANDKEEP_HOST_PROXY_TOKEN``) every request must carry it in ``sandkeep-proxy-token``
    (401 otherwise); the header is not passed on to the machine."""

    def __init__(self, host: Host, *, timeout: float = 60.0, token: str | None = None) -> None:
        self.host = host
        self.token = token
        self.client = httpx.AsyncClient(timeout=timeout)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.forward(request)
        await response(scope, receive, send)

    async def forward(self, request: Request) -> Response:
        if not proxy_token_ok(self.token, request.headers.get(PROXY_TOKEN_HEADER)):
            return error(401, PROXY_UNAUTHORIZED)
        mid = request.headers.get("fly-force-instance-id", "").strip()
        if not mid:
            return error(400, "missing fly-force-instance-id header: the local proxy routes by machine id")
        m, port = self.host.proxy_target(mid)
        if m is None:
            return error(404, f"machine not found: {mid}")
        if port is None:
            return error(503, f"machine {mid} is not started (state {m['state']})")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {PROXY_TOKEN_HEADER}}
        headers["fly-forwarded-port"] = str(request.url.port or "")
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        url = f"http://127.0.0.1:{port}{raw_path.decode('latin-1')}"
        if request.url.query:
            url += "?" + request.url.query
        try:
            upstream = await self.client.request(request.method, url, headers=headers, content=await request.body())
        except httpx.HTTPError as exc:
            return error(502, f"machine {mid} did not answer: {type(exc).__name__}")
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        out_headers["fly-request-id"] = mid
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)


def _raw_error(status: int, message: str) -> bytes:
    body = json.dumps({"error": message, "status": "unknown"}).encode()
    reason = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 502: "Bad Gateway",
              503: "Service Unavailable"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


def _drop_header(head: bytes, name: str) -> bytes:
    """``head`` without the lines of header ``name`` (case-insensitive)."""
    lines = head.split(b"\r\n")
    prefix = name.lower().encode() + b":"
    return b"\r\n".join([lines[0], *[x for x in lines[1:] if not x.lower().startswith(prefix)]])


def _head_fields(head: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then pass the EOF on (half-close)."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


class ProxyFront:
    """The proxy's listening side: WebSocket upgrades are tunnelled to the machine, everything else goes to
    :class:`ProxyApp` (served by uvicorn on an internal loopback port).

    uvicorn cannot pass an upgraded connection through without a WebSocket library, so this reads the head of
    the first request on each connection: an ``Upgrade: websocket`` request is routed by its
    ``fly-force-instance-id`` header and the connection becomes a raw TCP tunnel to the machine's gateway
    (which answers the handshake itself); any other connection is spliced byte for byte to the internal HTTP
    proxy, which routes every request on it. A WebSocket upgrade must therefore be the first request on its
    connection (as browsers and WebSocket clients do).
    """

    def __init__(self, host: Host, internal: tuple[str, int], *, head_timeout: float = 30.0,
                 max_head: int = 64 * 1024, token: str | None = None) -> None:
        self.host = host
        self.token = token
        self.internal = internal
        self.head_timeout = head_timeout
        self.max_head = max_head
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=self.head_timeout)
        except (TimeoutError, asyncio.IncompleteReadError):
            return
        except asyncio.LimitOverrunError:
            writer.write(_raw_error(400, f"request head larger than {self.max_head} bytes"))
            await writer.drain()
            return
        fields = _head_fields(head)
        upgrade = "websocket" in fields.get("upgrade", "").lower()
        if upgrade:
            mid = fields.get("fly-force-instance-id", "")
            allowed = proxy_token_ok(self.token, fields.get(PROXY_TOKEN_HEADER))
            m, port = self.host.proxy_target(mid) if mid and allowed else (None, None)
            head = _drop_header(head, PROXY_TOKEN_HEADER)
            problem = (_raw_error(401, PROXY_UNAUTHORIZED) if not allowed
                       else _raw_error(400, "missing fly-force-instance-id header: the local proxy routes by "
                                            "machine id")
                       if not mid else _raw_error(404, f"machine not found: {mid}") if m is None
                       else _raw_error(503, f"machine {mid} is not started (state {m['state']})") if port is None
                       else None)
            target = ("127.0.0.1", port or 0)
        else:
            problem, target = None, self.internal
        if problem is not None:
            writer.write(problem)
            await writer.drain()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            writer.write(_raw_error(502, f"upstream did not answer: {type(exc).__name__}"))
            await writer.drain()
            return
        up_writer.write(head)
        await up_writer.drain()
        await _splice((reader, writer), (up_reader, up_writer))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
