"""The web UI: server-rendered pages (Jinja2) with htmx for live updates and actions.

Every page calls ``runtime.service`` — the same :class:`~sandkeep.engine.service.InstanceServiceAPI` the
HTTP API uses — so the UI never has a second implementation of any rule. Routes:

* ``GET /login`` (form field ``token``), ``POST /login``, ``GET /login/once/<code>`` (a confirmation page:
  link previewers do not consume the code), ``POST /login/once/<code>`` (signs in), ``POST /logout`` (ends
  the server-side session)
* ``GET /ui/`` — the owner's instances; ``GET /ui/instances/live`` — the polled fragment;
  ``POST /ui/instances/<id>/<start|stop|restart|destroy>``; ``GET /ui/instances/<id>/open/<path>`` — the
  instance's gateway through the provider's proxy, authorised by the session cookie
* ``GET /ui/admin/`` — fleet; ``GET /ui/admin/instances/<id>`` — detail; ``POST /ui/admin/instances/<id>/
  <cleanup-retained-volume|retry-recovery|destroy-machine>``; ``GET /ui/admin/audit``
* ``GET /ui/static/<name>`` — vendored htmx, CSS, icon

Errors never escape as JSON or a 500: every failure renders a page (or, for htmx requests, a message in
the page's status area).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from sandkeep.api.proxy import HOP_BY_HOP, GatewayUnreachable, stream_gateway
from sandkeep.engine.service import Actor, ServiceError
from sandkeep.logs import get_logger
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status
from sandkeep.web import charts, present
from sandkeep.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    BadToken,
    Session,
    SignInThrottle,
    WebRuntime,
    actor_from_api_token,
    csrf_ok,
    csrf_token_for,
    end_session,
    login_csrf_ok,
    new_login_csrf,
    new_session_cookie,
    read_session,
)
from sandkeep.web.progress import fleet_progress

T = TypeVar("T")
log = get_logger("sandkeep.web")

STATIC_FILES: dict[str, str] = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "htmx.LICENSE": "text/plain; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")
OWNER_ACTIONS = ("start", "stop", "restart", "destroy")
ADMIN_ACTIONS = ("cleanup-retained-volume", "retry-recovery", "destroy-machine")
PAGE_SIZE = 25
MAX_RECOVERING = 2000  # instances listed under "recovering now"
MAX_EVENTS = 5000  # events scanned for the charts
TRAIL_MAX = 50
#: what the Open link never passes on from a gateway: hop-by-hop headers, and cookies (the gateway must not set
#: any on sandkeep's origin)
GATEWAY_DROP_HEADERS = HOP_BY_HOP | {"set-cookie"}
GATEWAY_SAFETY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                          "Content-Security-Policy": "sandbox; default-src 'none'"}


@dataclass
class Flash:
    kind: str  # "ok" | "error"
    message: str
    status: int = 200
    details: list[str] = field(default_factory=list)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _safe_next(target: str | None) -> str | None:
    """Only same-site paths may be redirect targets after sign-in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    return target


LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _cookie_would_be_dropped(request: Request) -> bool:
    """True when browsers will refuse the Secure session cookie: plain HTTP to a non-loopback host.

    Browsers only keep Secure cookies over HTTPS or from localhost; anywhere else sign-in would silently
    bounce back to /login, so the sign-in page says so up front.
    """
    if request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https":
        return False
    host = (request.url.hostname or "").lower()
    return not (host in LOOPBACK_HOSTS or host.endswith(".localhost") or host.startswith("127."))


def _collect(fetch: Callable[[str | None], Page[T]], cap: int) -> list[T]:
    items: list[T] = []
    cursor: str | None = None
    while len(items) < cap:
        page = fetch(cursor)
        items.extend(page.items)
        if not page.next_cursor or not page.items:
            break
        cursor = page.next_cursor
    return items[:cap]


class WebUI:
    def __init__(self, runtime: WebRuntime) -> None:
        self.rt = runtime
        self.env = Environment(loader=PackageLoader("sandkeep.web", "templates"),
                               autoescape=select_autoescape(["html", "svg", "xml"]))
        self.env.globals.update(badge_label=present.badge_label, status_value=present.status_value,
                                relative=self.relative, absolute=present.absolute, iso=present.iso,
                                duration_ms_text=present.duration_ms_text)
        self.env.filters["jsontext"] = lambda value: json.dumps(value, sort_keys=True, default=str)
        self.live_template = self.env.from_string(
            '<div id="live" hx-get="{{ url }}?{{ query }}" hx-trigger="every {{ poll }}, sk-refresh from:body" '
            'hx-swap="outerHTML" data-digest="{{ digest }}">{{ inner }}</div>')
        self.cleanups_running: set[str] = set()
        self.chart_cache: dict[str, tuple[float, Markup, Markup]] = {}

    # --- helpers ----------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.rt.clock.now()

    def relative(self, when: datetime | None) -> str:
        return present.relative(when, self.now())

    @property
    def poll(self) -> str:
        seconds = max(0.2, float(self.rt.settings.web_poll_interval))
        return f"{seconds:g}s"

    def session(self, request: Request) -> Session | None:
        return read_session(self.rt, request.cookies.get(SESSION_COOKIE))

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        out = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
        out.update(extra or {})
        return out

    def render(self, template: str, *, request: Request, session: Session | None, status: int = 200,
               headers: dict[str, str] | None = None, **ctx: Any) -> HTMLResponse:
        csrf = csrf_token_for(self.rt, session.sid) if session else ""
        html = self.env.get_template(template).render(
            request=request, session=session, actor=session.actor if session else None, csrf=csrf,
            csrf_field=CSRF_FIELD, csrf_header=CSRF_HEADER, poll=self.poll, path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status, headers=self.headers(headers))

    def need_login(self, request: Request) -> Response:
        if _is_htmx(request):
            return Response(status_code=200, headers=self.headers({"HX-Redirect": "/login"}))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = "/ui/"
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303,
                                headers=self.headers())

    def forbidden(self, request: Request, session: Session) -> HTMLResponse:
        return self.render("error.html", request=request, session=session, status=403, title="Admins only",
                           message="This page is for administrators. You are signed in as "
                                   f"{session.actor.user_id} ({session.actor.role}).")

    def not_found(self, request: Request, session: Session | None, message: str) -> HTMLResponse:
        return self.render("error.html", request=request, session=session, status=404, title="Not found",
                           message=message)

    async def form_and_csrf(self, request: Request, session: Session) -> tuple[dict[str, str], bool]:
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        presented = request.headers.get(CSRF_HEADER) or data.get(CSRF_FIELD)
        return data, csrf_ok(self.rt, session, presented)

    def csrf_failed(self, request: Request, session: Session | None) -> HTMLResponse:
        return self.render("error.html", request=request, session=session, status=403,
                           title="Form expired",
                           message="This form's security token is missing or does not belong to your session "
                                   "(CSRF protection). Reload the page and try again.")

    def flash_response(self, request: Request, session: Session, flash: Flash) -> HTMLResponse:
        # htmx does not swap 4xx/5xx answers, so the message travels with 200 and names its real status
        return self.render("_flash.html", request=request, session=session, flash=flash,
                           headers={"HX-Trigger": "sk-refresh", "X-Sandkeep-Status": str(flash.status)})

    # --- view models ------------------------------------------------------------------------------

    def instance_view(self, rec: InstanceRecord, *, admin: bool) -> dict[str, Any]:
        status = present.status_value(rec.status)
        now = self.now()
        uptime = ""
        if status == Status.RUNNING and rec.last_started_at is not None:
            uptime = present.human_duration((now - rec.last_started_at).total_seconds())
        healthy = present.is_healthy(rec)
        buttons = present.owner_buttons(rec, admin=admin)
        reasons, reason_index = present.reason_groups(buttons)
        return {
            "rec": rec, "status": status, "label": present.badge_label(status), "busy": rec.busy,
            "uptime": uptime, "healthy": healthy,
            "open_url": f"/ui/instances/{quote(rec.id)}/open/health" if healthy else None,
            "buttons": buttons, "reasons": reasons, "reason_index": reason_index,
            "explanation": present.recovery_explanation(rec),
            "provider_problem": present.provider_problem(rec),
        }

    def owner_views(self, actor: Actor) -> list[dict[str, Any]]:
        records = _collect(lambda c: self.rt.service.list_instances(user_id=actor.user_id,
                                                                    status=present.LIVE_STATUSES, cursor=c,
                                                                    limit=100), 500)
        records.sort(key=lambda r: (r.created_at, r.id))
        views = []
        for r in records:
            view = self.instance_view(r, admin=actor.is_admin)
            events = self.rt.service.list_events(instance_id=r.id, name=present.RECOVERY_SUCCEEDED, limit=20).items
            view["last_recovery"] = present.last_recovery(list(events))
            views.append(view)
        return views

    def inner(self, template: str, session: Session, **ctx: Any) -> str:
        return self.env.get_template(template).render(
            session=session, actor=session.actor, csrf=csrf_token_for(self.rt, session.sid), csrf_field=CSRF_FIELD,
            poll=self.poll, **ctx)

    def live_block(self, url: str, params: list[tuple[str, str]], inner: str) -> tuple[Markup, str]:
        """The polled ``#live`` container: htmx re-fetches ``url`` every poll interval and on sk-refresh."""
        digest = hashlib.sha256(inner.encode()).hexdigest()[:16]
        query = urlencode([*[(k, v) for k, v in params if k != "digest"], ("digest", digest)])
        html = self.live_template.render(url=url, query=query, poll=self.poll, digest=digest, inner=Markup(inner))
        return Markup(html), digest

    def live(self, template: str, url: str, request: Request, session: Session, **ctx: Any) -> Response:
        """A polled fragment: 204 (htmx keeps the page as it is) when nothing visible changed."""
        block, digest = self.live_block(url, list(request.query_params.multi_items()),
                                        self.inner(template, session, **ctx))
        if request.query_params.get("digest") == digest:
            return Response(status_code=204, headers=self.headers())
        return HTMLResponse(str(block), headers=self.headers())

    # --- fleet -----------------------------------------------------------------------------------

    def fleet_ctx(self, request: Request, *, fresh: bool = True) -> dict[str, Any]:
        q = request.query_params
        status = q.get("status") or ""
        user = (q.get("user") or "").strip()
        region = q.get("region") or ""
        cursor = q.get("cursor") or None
        trail = [t for t in q.getlist("trail")][-TRAIL_MAX:]
        window = q.get("window") or charts.DEFAULT_WINDOW
        if window not in charts.WINDOWS:
            window = charts.DEFAULT_WINDOW
        svc = self.rt.service
        counts = {s: 0 for s in present.ALL_STATUSES}
        counts.update(svc.count_by_status())
        recovering = [self.instance_view(r, admin=True) for r in _collect(
            lambda c: svc.list_instances(status=[Status.RECOVERING.value], cursor=c, limit=500), MAX_RECOVERING)]
        error = ""
        try:
            page = svc.list_instances(user_id=user or None, status=[status] if status else None,
                                      region=region or None, cursor=cursor, limit=PAGE_SIZE)
        except ValueError as exc:  # a cursor this server did not hand out
            page, error = Page(items=[]), f"That page link is not valid any more ({exc}). Showing nothing."
        chart, histogram = self.charts(window, fresh=fresh)
        filters = [("status", status), ("user", user), ("region", region), ("window", window)]
        base = [(k, v) for k, v in filters if v]
        next_url = prev_url = None
        if page.next_cursor:
            next_url = "?" + urlencode([*base, *[("trail", t) for t in trail], ("trail", cursor or ""),
                                        ("cursor", page.next_cursor)])
        if cursor:
            prev = trail[-1] if trail else ""
            prev_params = [*base, *[("trail", t) for t in trail[:-1]]]
            if prev:
                prev_params.append(("cursor", prev))
            prev_url = "?" + urlencode(prev_params)
        return {
            "counts": counts, "total": sum(counts.values()),
            "recovering": recovering, "rows": [self.instance_view(r, admin=True) for r in page.items],
            "filters": {"status": status, "user": user, "region": region, "window": window},
            "statuses": present.ALL_STATUSES, "regions": self.rt.settings.region_list,
            "windows": list(charts.WINDOWS), "next_url": next_url, "prev_url": prev_url,
            "page_number": len(trail) + 1 if cursor else 1, "list_error": error,
            "chart": chart, "histogram": histogram, "progress": fleet_progress(self.rt),
        }

    def charts(self, window: str, *, fresh: bool) -> tuple[Markup, Markup]:
        """Both fleet charts: computed from the events for a page load; polls reuse them for a few intervals."""
        ttl = max(5.0, 5 * float(self.rt.settings.web_poll_interval))
        cached = self.chart_cache.get(window)
        if not fresh and cached is not None and self.rt.clock.monotonic() - cached[0] < ttl:
            return cached[1], cached[2]
        svc = self.rt.service
        events: list[EventRecord] = []
        for name in charts.RECOVERY_EVENTS:
            events.extend(_collect(lambda c, n=name: svc.list_events(name=n, cursor=c, limit=500),  # type: ignore[misc]
                                   MAX_EVENTS))
        chart = charts.recovery_chart_svg(charts.recovery_buckets(events, self.now(), window), window)
        histogram = charts.duration_histogram_svg(charts.duration_bins(events))
        self.chart_cache[window] = (self.rt.clock.monotonic(), chart, histogram)
        return chart, histogram

    # --- instance detail ---------------------------------------------------------------------------

    def detail_ctx(self, instance_id: str) -> dict[str, Any]:
        svc = self.rt.service
        rec = svc.get_instance(instance_id)
        try:
            debug = svc.debug(instance_id)
        except ServiceError:
            debug = {}
        fields: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for name in [*InstanceRecord.field_names(), *sorted(debug)]:
            if name in seen:
                continue
            seen.add(name)
            value = debug.get(name, getattr(rec, name, None))
            if "secret" in name:
                count = len(value) if isinstance(value, dict | list) else (1 if value else 0)
                value = f"({count} hidden)"
            fields.append((name, self.field_text(value)))
        events = _collect(lambda c: svc.list_events(instance_id=instance_id, cursor=c, limit=200), 1000)
        events.sort(key=lambda e: (e.at, e.id or 0), reverse=True)
        audit: list[AuditRecord] = _collect(lambda c: svc.list_audit(instance_id=instance_id, cursor=c, limit=200),
                                            1000)
        audit.sort(key=lambda a: (a.at, a.id or 0), reverse=True)
        status = present.status_value(rec.status)
        cleanup_running = instance_id in self.cleanups_running
        now = self.now()
        # the engine deletes a retained volume by itself once its deadline passed, under the instance's lease
        auto_cleanup_running = bool(
            rec.retained_volume_id and rec.retained_volume_cleanup_after is not None
            and rec.retained_volume_cleanup_after <= now and rec.lease_owner
            and rec.lease_expires_at is not None and rec.lease_expires_at > now)
        if status == Status.RECOVERING:
            cleanup_reason = "Refused while the instance is recovering."
        elif cleanup_running:
            cleanup_reason = "A cleanup of this volume is running."
        elif auto_cleanup_running:
            cleanup_reason = "The automatic cleanup of this volume is running now (its deadline has passed)."
        elif status in (Status.DESTROYING, Status.DESTROYED):
            cleanup_reason = "The instance is being destroyed; its volumes go with it."
        else:
            cleanup_reason = ""
        gone = status in (Status.DESTROYING, Status.DESTROYED)
        return {
            "view": self.instance_view(rec, admin=True), "rec": rec, "fields": fields,
            "recovery_state": present.recovery_state(rec), "events": events[:100], "event_total": len(events),
            "audit": audit[:100], "cleanup_reason": cleanup_reason,
            "retry_reason": present.retry_recovery_reason(rec),
            "destroy_machine_reason": ("The instance is being destroyed." if gone else
                                       "There is no machine to destroy." if not rec.machine_id else ""),
        }

    def field_text(self, value: Any) -> str:
        if value is None or value == "":
            return "—"
        if isinstance(value, datetime):
            return f"{present.absolute(value)} ({self.relative(value)})"
        if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return value
            return f"{present.absolute(when)} ({self.relative(when)})"
        if isinstance(value, dict | list):
            return json.dumps(value, sort_keys=True, default=str)
        return str(value.value if isinstance(value, Status) else value)

    # --- actions --------------------------------------------------------------------------------

    async def owner_action(self, actor: Actor, rec: InstanceRecord, action: str) -> Flash:
        svc = self.rt.service
        try:
            if action == "start":
                await svc.start(actor, rec.id)
                return Flash("ok", f"Start requested for {rec.id}: it is starting now.")
            if action == "stop":
                await svc.stop(actor, rec.id)
                return Flash("ok", f"Stop requested for {rec.id}.")
            if action == "restart":
                await svc.restart(actor, rec.id)
                return Flash("ok", f"Restart requested for {rec.id}.")
            force = actor.is_admin and present.status_value(rec.status) == Status.RECOVERING
            await svc.destroy(actor, rec.id, force=force)
            return Flash("ok", f"Destroy started for {rec.id}{' (forced)' if force else ''}: its machine and "
                               "volumes are being deleted.")
        except ServiceError as exc:
            return Flash("error", f"Could not {action} {rec.id}: {exc.message}", status=exc.http_status)
        except Exception as exc:  # a provider or store failure: say so in the page, log the rest
            log.error("web.action_failed", action=action, instance_id=rec.id, error=f"{type(exc).__name__}: {exc}")
            return Flash("error", f"Could not {action} {rec.id}: unexpected error ({type(exc).__name__}). "
                                  "Try again; the server log has details.", status=500)

    async def admin_action(self, actor: Actor, rec: InstanceRecord, action: str) -> Flash:
        svc = self.rt.service
        try:
            if action == "cleanup-retained-volume":
                if rec.id in self.cleanups_running:
                    return Flash("error", f"A cleanup of {rec.id}'s retained volume is already running.", 409)
                self.cleanups_running.add(rec.id)
                try:
                    deleted = await svc.cleanup_retained_volume(actor, rec.id)
                finally:
                    self.cleanups_running.discard(rec.id)
                if deleted:
                    return Flash("ok", f"Deleted retained volume {deleted} of {rec.id}.")
                return Flash("ok", f"{rec.id} had no retained volume left to delete.")
            if action == "retry-recovery":
                await svc.retry_recovery(actor, rec.id)
                return Flash("ok", f"Recovery of {rec.id} scheduled to run now.")
            await svc.destroy_machine(actor, rec.id)
            return Flash("ok", f"Destroyed the machine of {rec.id}; the engine will notice and react.")
        except ServiceError as exc:
            return Flash("error", f"{action.replace('-', ' ').capitalize()} failed for {rec.id}: {exc.message}",
                         status=exc.http_status)
        except Exception as exc:
            log.error("web.admin_action_failed", action=action, instance_id=rec.id,
                      error=f"{type(exc).__name__}: {exc}")
            return Flash("error", f"{action.replace('-', ' ').capitalize()} failed for {rec.id}: unexpected error "
                                  f"({type(exc).__name__}). The server log has details.", status=500)


def _static_bytes(name: str) -> bytes:
    return resources.files("sandkeep.web").joinpath("static", name).read_bytes()


def create_web_router(runtime: WebRuntime) -> APIRouter:
    """The web UI's routes, to be included by the API app (``app.include_router``)."""
    ui = WebUI(runtime)
    router = APIRouter(include_in_schema=False)

    # --- sign-in ------------------------------------------------------------------------------------

    throttle = SignInThrottle(runtime.clock, runtime.settings.signin_max_failures,
                              runtime.settings.signin_failure_window)

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def set_login_csrf(response: Response, token: str) -> None:
        response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", secure=True, httponly=True,
                            samesite="lax")

    def login_page(request: Request, *, error: str = "", status: int = 200, next_url: str | None = None) -> Response:
        token = new_login_csrf()
        response = ui.render("login.html", request=request, session=None, status=status, error=error,
                             login_csrf=token, next_url=next_url or "",
                             insecure_origin=_cookie_would_be_dropped(request))
        set_login_csrf(response, token)
        return response

    def throttled(request: Request) -> Response | None:
        """429 with Retry-After when this client failed to sign in too often recently."""
        wait = throttle.retry_after(client_of(request))
        if wait is None:
            return None
        log.warning("web.signin_throttled", client=client_of(request), retry_after=wait)
        return ui.render("error.html", request=request, session=None, status=429,
                         headers={"Retry-After": str(wait)}, title="Too many sign-in attempts",
                         message=f"Too many failed sign-ins from your address. Try again in {wait} seconds.",
                         link=("/login", "Sign in"))

    def failed_signin(request: Request, how: str) -> None:
        throttle.failed(client_of(request))
        log.info("web.signin_failed", client=client_of(request), how=how)

    def home_for(actor: Actor) -> str:
        return "/ui/admin/" if actor.is_admin else "/ui/"

    def start_session(actor: Actor, target: str, not_after: datetime | None = None,
                      token_jti: str | None = None) -> Response:
        value, sess = new_session_cookie(runtime, actor, not_after=not_after, token_jti=token_jti)
        response = RedirectResponse(target, status_code=303, headers=ui.headers())
        max_age = max(1, int((sess.expires_at - runtime.clock.now()).total_seconds()))
        response.set_cookie(SESSION_COOKIE, value, max_age=max_age, path="/", secure=True, httponly=True,
                            samesite="lax")
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login", secure=True, httponly=True, samesite="lax")
        return response

    @router.get("/", response_model=None)
    async def root(request: Request) -> Response:
        session = ui.session(request)
        return RedirectResponse(home_for(session.actor) if session else "/login", status_code=303)

    @router.get("/login", response_model=None)
    async def login_get(request: Request) -> Response:
        session = ui.session(request)
        if session is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")) or home_for(session.actor),
                                    status_code=303)
        return login_page(request, next_url=_safe_next(request.query_params.get("next")))

    @router.post("/login", response_model=None)
    async def login_post(request: Request) -> Response:
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        next_url = _safe_next(data.get("next"))
        if not login_csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), data.get(CSRF_FIELD)):
            return login_page(request, status=403, next_url=next_url,
                              error="The sign-in form expired or was not sent from this site (CSRF check). "
                                    "It has been reloaded: paste your token again.")
        blocked = throttled(request)
        if blocked is not None:
            return blocked
        try:
            actor, record = actor_from_api_token(runtime, data.get("token", ""))
        except BadToken as exc:
            failed_signin(request, "token")
            return login_page(request, status=401, error=str(exc), next_url=next_url)
        return start_session(actor, next_url or home_for(actor), not_after=record.expires_at, token_jti=record.jti)

    def code_gone(request: Request) -> Response:
        return ui.render("error.html", request=request, session=ui.session(request), status=410,
                         title="Sign-in link expired",
                         message="This one-time sign-in link was already used or has expired. Restart "
                                 "`sandkeep serve` for fresh links, or sign in with a token.",
                         link=("/login", "Sign in with a token"))

    def code_actor(request: Request, code: str, *, consume: bool) -> Actor | Response:
        """Who ``code`` signs in (consuming it when ``consume``), or the 429 / 410 page to answer instead."""
        blocked = throttled(request)
        if blocked is not None:
            return blocked
        credentials = runtime.credentials
        actor = credentials.redeem_login_code(code) if consume else credentials.peek_login_code(code)
        if actor is None:
            failed_signin(request, "code")
            return code_gone(request)
        return actor

    @router.get("/login/once/{code}", response_model=None)
    async def login_once(request: Request, code: str) -> Response:
        """A confirmation page: opening (or previewing) the link does not use the code; its POST does."""
        actor = code_actor(request, code, consume=False)
        if not isinstance(actor, Actor):
            return actor
        token = new_login_csrf()
        response = ui.render("login_once.html", request=request, session=None, who=actor, login_csrf=token,
                             action_url=f"/login/once/{quote(code, safe='')}")
        set_login_csrf(response, token)
        return response

    @router.post("/login/once/{code}", response_model=None)
    async def login_once_post(request: Request, code: str) -> Response:
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        if not login_csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), data.get(CSRF_FIELD)):
            return ui.render("error.html", request=request, session=None, status=403, title="Form expired",
                             message="This sign-in confirmation was not sent from this site (CSRF check). "
                                     "Open the sign-in link again.", link=(request.url.path, "Open the link again"))
        actor = code_actor(request, code, consume=True)
        if not isinstance(actor, Actor):
            return actor
        return start_session(actor, home_for(actor))

    @router.post("/logout", response_model=None)
    async def logout(request: Request) -> Response:
        session = ui.session(request)
        if session is not None:
            _, ok = await ui.form_and_csrf(request, session)
            if not ok:
                return ui.csrf_failed(request, session)
            end_session(runtime, session.sid)
        response = RedirectResponse("/login", status_code=303, headers=ui.headers())
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="lax")
        return response

    # --- static ------------------------------------------------------------------------------------

    @router.get("/ui/static/{name}", response_model=None)
    async def static(name: str) -> Response:
        media = STATIC_FILES.get(name)
        if media is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(_static_bytes(name), media_type=media,
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @router.get("/favicon.ico", response_model=None)
    async def favicon() -> Response:
        return Response(_static_bytes("favicon.svg"), media_type="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})

    # --- owner ---------------------------------------------------------------------------------------

    @router.get("/ui", response_model=None)
    async def ui_bare(request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/", response_model=None)
    async def owner_page(request: Request) -> Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        return owner_full(request, session)

    def owner_full(request: Request, session: Session, flash: Flash | None = None) -> HTMLResponse:
        inner = ui.inner("_owner_live.html", session, instances=ui.owner_views(session.actor))
        live, _ = ui.live_block("/ui/instances/live", [], inner)
        return ui.render("owner.html", request=request, session=session, live=live, flash=flash,
                         status=flash.status if flash else 200)

    @router.get("/ui/instances/live", response_model=None)
    async def owner_live(request: Request) -> Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        return ui.live("_owner_live.html", "/ui/instances/live", request, session,
                       instances=ui.owner_views(session.actor))

    def lookup(instance_id: str, actor: Actor) -> InstanceRecord | None:
        try:
            rec = runtime.service.get_instance(instance_id)
        except ServiceError:  # InstanceNotFound, or an id the service rejects
            return None
        if rec.user_id != actor.user_id and not actor.is_admin:
            return None  # like the API: another user's instance does not exist for you
        return rec

    @router.post("/ui/instances/{instance_id}/{action}", response_model=None)
    async def owner_post(request: Request, instance_id: str, action: str) -> Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        data, ok = await ui.form_and_csrf(request, session)
        if not ok:
            return ui.csrf_failed(request, session)
        back = data.get("back") or ""
        rec = lookup(instance_id, session.actor)
        if action not in OWNER_ACTIONS:
            flash = Flash("error", f"Unknown action {action!r}.", status=404)
        elif rec is None:
            flash = Flash("error", f"No instance {instance_id} of yours.", status=404)
        elif action == "destroy" and data.get("confirm") != "yes":
            if _is_htmx(request):
                flash = Flash("error", "Destroying needs a confirmation; nothing was changed.", status=400)
            else:
                return ui.render("confirm.html", request=request, session=session, rec=rec,
                                 action_url=f"/ui/instances/{quote(rec.id)}/destroy", back=back,
                                 question=f"Destroy instance {rec.id}? Its machine and its volume (your data) "
                                          "are deleted for good.", button="Destroy")
        else:
            flash = await ui.owner_action(session.actor, rec, action)
        if _is_htmx(request):
            return ui.flash_response(request, session, flash)
        if back == "admin" and session.actor.is_admin and rec is not None:
            return detail_full(request, session, rec.id, flash)
        return owner_full(request, session, flash)

    @router.api_route("/ui/instances/{instance_id}/open/{path:path}", methods=["GET", "HEAD"], response_model=None)
    async def open_gateway(request: Request, instance_id: str, path: str) -> Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        actor = session.actor
        rec = lookup(instance_id, actor)
        if rec is None:
            return ui.not_found(request, session, f"No instance {instance_id} of yours.")
        try:
            target = runtime.service.gateway_target(instance_id)
        except ServiceError as exc:
            target, problem = None, exc.message
        else:
            problem = ""
        if target is None:
            label = present.badge_label(rec.status).lower()
            return ui.render("error.html", request=request, session=session, status=503,
                             headers={"Retry-After": "5"}, title="Instance not reachable",
                             message=problem or f"{instance_id} is {label}; its gateway can be opened once it "
                                                "is running.", link=("/ui/", "Back to your instances"))
        base, extra = target
        url = base.rstrip("/") + "/" + path.lstrip("/")
        if request.url.query:
            url += "?" + request.url.query
        client = httpx.AsyncClient(timeout=runtime.settings.web_gateway_timeout, follow_redirects=False)
        try:
            return await stream_gateway(client, request.method, url, headers=extra.items(),
                                        drop_headers=GATEWAY_DROP_HEADERS, add_headers=GATEWAY_SAFETY_HEADERS,
                                        close_client=True)
        except GatewayUnreachable as exc:
            return ui.render("error.html", request=request, session=session, status=502,
                             title="Gateway did not answer",
                             message=f"The gateway of {instance_id} did not answer ({type(exc.error).__name__}). "
                                     "If the instance just recovered, try again in a few seconds.",
                             link=("/ui/", "Back to your instances"))

    # --- admin ---------------------------------------------------------------------------------------

    def admin_session(request: Request) -> Session | Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        if not session.actor.is_admin:
            return ui.forbidden(request, session)
        return session

    @router.get("/ui/admin", response_model=None)
    async def admin_bare() -> Response:
        return RedirectResponse("/ui/admin/", status_code=307)

    @router.get("/ui/admin/", response_model=None)
    async def fleet(request: Request) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        ctx = ui.fleet_ctx(request)
        live, _ = ui.live_block("/ui/admin/live", list(request.query_params.multi_items()),
                                ui.inner("_fleet_live.html", got, **ctx))
        return ui.render("fleet.html", request=request, session=got, live=live, **ctx)

    @router.get("/ui/admin/live", response_model=None)
    async def fleet_live(request: Request) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        return ui.live("_fleet_live.html", "/ui/admin/live", request, got, **ui.fleet_ctx(request, fresh=False))

    def detail_full(request: Request, session: Session, instance_id: str, flash: Flash | None = None) -> Response:
        try:
            ctx = ui.detail_ctx(instance_id)
        except ServiceError:  # InstanceNotFound, or an id the service rejects
            return ui.not_found(request, session, f"There is no instance {instance_id}.")
        live, _ = ui.live_block(f"/ui/admin/instances/{quote(instance_id)}/live", [],
                                ui.inner("_detail_live.html", session, **ctx))
        return ui.render("detail.html", request=request, session=session, live=live, flash=flash,
                         status=flash.status if flash else 200, **ctx)

    @router.get("/ui/admin/instances/{instance_id}", response_model=None)
    async def detail(request: Request, instance_id: str) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        return detail_full(request, got, instance_id)

    @router.get("/ui/admin/instances/{instance_id}/live", response_model=None)
    async def detail_live(request: Request, instance_id: str) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        try:
            ctx = ui.detail_ctx(instance_id)
        except ServiceError:  # InstanceNotFound, or an id the service rejects
            return Response(status_code=286, headers=ui.headers())  # htmx: stop polling
        return ui.live("_detail_live.html", f"/ui/admin/instances/{quote(instance_id)}/live", request, got,
                       **ctx)

    @router.post("/ui/admin/instances/{instance_id}/{action}", response_model=None)
    async def admin_post(request: Request, instance_id: str, action: str) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        data, ok = await ui.form_and_csrf(request, got)
        if not ok:
            return ui.csrf_failed(request, got)
        rec = lookup(instance_id, got.actor)
        needs_confirm = action in ("cleanup-retained-volume", "destroy-machine")
        if action not in ADMIN_ACTIONS:
            flash = Flash("error", f"Unknown action {action!r}.", status=404)
        elif rec is None:
            flash = Flash("error", f"There is no instance {instance_id}.", status=404)
        elif needs_confirm and data.get("confirm") != "yes":
            if _is_htmx(request):
                flash = Flash("error", "This action needs a confirmation; nothing was changed.", status=400)
            else:
                question = (f"Delete retained volume {rec.retained_volume_id} of {rec.id}? Its snapshots go with it."
                            if action == "cleanup-retained-volume" else
                            f"Destroy machine {rec.machine_id} of {rec.id}?")
                return ui.render("confirm.html", request=request, session=got, rec=rec, back="admin",
                                 action_url=f"/ui/admin/instances/{quote(rec.id)}/{action}", question=question,
                                 button="Delete retained volume" if action == "cleanup-retained-volume"
                                 else "Destroy machine")
        else:
            flash = await ui.admin_action(got.actor, rec, action)
        if _is_htmx(request):
            return ui.flash_response(request, got, flash)
        if rec is None:
            return ui.render("error.html", request=request, session=got, status=flash.status, title="Not done",
                             message=flash.message)
        return detail_full(request, got, rec.id, flash)

    @router.get("/ui/admin/audit", response_model=None)
    async def audit_page(request: Request) -> Response:
        got = admin_session(request)
        if not isinstance(got, Session):
            return got
        q = request.query_params
        cursor = q.get("cursor") or None
        trail = q.getlist("trail")[-TRAIL_MAX:]
        error = ""
        try:
            page = runtime.service.list_audit(cursor=cursor, limit=PAGE_SIZE * 2)
        except ValueError as exc:
            page, error = Page(items=[]), f"That page link is not valid any more ({exc})."
        next_url = prev_url = None
        if page.next_cursor:
            next_url = "?" + urlencode([*[("trail", t) for t in trail], ("trail", cursor or ""),
                                        ("cursor", page.next_cursor)])
        if cursor:
            prev = trail[-1] if trail else ""
            params = [("trail", t) for t in trail[:-1]]
            if prev:
                params.append(("cursor", prev))
            prev_url = "?" + urlencode(params)
        entries = sorted(page.items, key=lambda a: (a.at, a.id or 0), reverse=True)
        return ui.render("audit.html", request=request, session=got, entries=entries, next_url=next_url,
                         prev_url=prev_url, list_error=error, status=400 if error else 200,
                         page_number=len(trail) + 1 if cursor else 1)

    @router.get("/ui/{rest:path}", response_model=None)
    async def ui_not_found(request: Request, rest: str) -> Response:
        session = ui.session(request)
        if session is None:
            return ui.need_login(request)
        return ui.not_found(request, session, f"There is no page at {request.url.path}.")

    return router
