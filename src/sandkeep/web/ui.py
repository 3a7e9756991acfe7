"""The web UI's shared machinery: :class:`WebUI` (templates, sessions, CSRF, view models, actions) and the
dependency :func:`web_ui` the page routers (:mod:`sandkeep.web.signin`, :mod:`sandkeep.web.owner`,
:mod:`sandkeep.web.admin`, :mod:`sandkeep.web.static`) use to reach it (``app.state.web``).

Every page calls ``runtime.service`` with the signed-in actor — the same
:class:`~sandkeep.engine.service.InstanceServiceAPI` the HTTP API uses — so the UI has no second copy of any
rule, authorization included. Errors never escape as JSON or a 500: every failure renders a page (or, for
htmx requests, a message in the page's status area).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlencode

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from sandkeep.api.proxy import HOP_BY_HOP
from sandkeep.engine import access
from sandkeep.engine.labels import parse_labels
from sandkeep.engine.service import Actor, ServiceError
from sandkeep.logs import get_logger
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status
from sandkeep.web import charts, present
from sandkeep.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Session,
    SignInThrottle,
    WebRuntime,
    csrf_ok,
    csrf_token_for,
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
ADMIN_ACTIONS = ("cleanup-retained-volume", "retry-recovery", "destroy-machine", "approve-restore", "restore",
                 "delete-flagged-volume")
PAGE_SIZE = 25
MAX_RECOVERING = 2000  # instances listed under "recovering now"
MAX_EVENTS = 5000  # events scanned for the charts
TRAIL_MAX = 50
MAX_PANEL_SCAN = 5000  # instances scanned for the fleet page's attention panels
PANEL_ROWS = 50  # rows shown per attention panel
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


def pager_links(base: list[tuple[str, str]], trail: list[str], cursor: str | None,
                next_cursor: str | None) -> tuple[str | None, str | None]:
    """(next, previous) links of a cursor-paged list whose earlier cursors travel in ``trail`` parameters."""
    next_url = prev_url = None
    if next_cursor:
        next_url = "?" + urlencode([*base, *[("trail", t) for t in trail], ("trail", cursor or ""),
                                    ("cursor", next_cursor)])
    if cursor:
        prev = trail[-1] if trail else ""
        params = [*base, *[("trail", t) for t in trail[:-1]]]
        if prev:
            params.append(("cursor", prev))
        prev_url = "?" + urlencode(params)
    return next_url, prev_url


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
        self.attention_cache: tuple[float, dict[str, Any]] | None = None
        self.throttle = SignInThrottle(runtime.clock, runtime.settings.signin_max_failures,
                                       runtime.settings.signin_failure_window)

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
        records = _collect(lambda c: self.rt.service.list_instances(actor, user_id=actor.user_id,
                                                                    status=present.LIVE_STATUSES, cursor=c,
                                                                    limit=100), 500)
        records.sort(key=lambda r: (r.created_at, r.id))
        views = []
        for r in records:
            view = self.instance_view(r, admin=actor.is_admin)
            events = self.rt.service.list_events(actor, r.id, name=present.RECOVERY_SUCCEEDED, limit=20).items
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

    def fleet_ctx(self, request: Request, actor: Actor, *, fresh: bool = True) -> dict[str, Any]:
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
        counts.update(svc.count_by_status(actor))
        recovering = [self.instance_view(r, admin=True) for r in _collect(
            lambda c: svc.list_instances(actor, status=[Status.RECOVERING.value], cursor=c, limit=500),
            MAX_RECOVERING)]
        error = ""
        try:
            page = svc.list_instances(actor, user_id=user or None, status=[status] if status else None,
                                      region=region or None, cursor=cursor, limit=PAGE_SIZE)
        except ValueError as exc:  # a cursor this server did not hand out
            page, error = Page(items=[]), f"That page link is not valid any more ({exc}). Showing nothing."
        chart, histogram = self.charts(actor, window, fresh=fresh)
        filters = [("status", status), ("user", user), ("region", region), ("window", window)]
        next_url, prev_url = pager_links([(k, v) for k, v in filters if v], trail, cursor, page.next_cursor)
        return {
            "counts": counts, "total": sum(counts.values()),
            "recovering": recovering, "rows": [self.instance_view(r, admin=True) for r in page.items],
            "filters": {"status": status, "user": user, "region": region, "window": window},
            "statuses": present.ALL_STATUSES, "regions": self.rt.settings.region_list,
            "windows": list(charts.WINDOWS), "window_labels": charts.WINDOW_LABELS, "next_url": next_url,
            "prev_url": prev_url, "page_number": len(trail) + 1 if cursor else 1, "list_error": error,
            "chart": chart, "histogram": histogram, "progress": fleet_progress(self.rt),
            **self.attention(actor, fresh=fresh),
        }

    def attention(self, actor: Actor, *, fresh: bool) -> dict[str, Any]:
        """The fleet page's "needs attention" panels: instances whose last recovery failed (stopped, with the
        error), retained old volumes awaiting cleanup (overdue first) and orphans awaiting deletion. Computed on a
        page load, reused by polls for a few intervals, like the charts."""
        ttl = max(5.0, 5 * float(self.rt.settings.web_poll_interval))
        if not fresh and self.attention_cache is not None and \
                self.rt.clock.monotonic() - self.attention_cache[0] < ttl:
            return self.attention_cache[1]
        svc = self.rt.service
        stopped = _collect(lambda c: svc.list_instances(actor, status=[Status.STOPPED.value], cursor=c, limit=500),
                           MAX_PANEL_SCAN)
        failed = sorted((r for r in stopped if r.last_recovery_error),
                        key=lambda r: r.last_recovery_error_at or r.updated_at, reverse=True)
        live = _collect(lambda c: svc.list_instances(actor, cursor=c, limit=500), MAX_PANEL_SCAN)
        retained = sorted((r for r in live if r.retained_volume_id),
                          key=lambda r: (r.retained_volume_cleanup_after or r.updated_at, r.id))
        now = self.now()
        orphans = svc.list_orphans(actor)  # the inventory's findings (SPEC §15), oldest sighting first
        out = {"orphans": orphans[:PANEL_ROWS], "orphans_total": len(orphans),
               "failed_recoveries": failed[:PANEL_ROWS], "failed_total": len(failed),
               "retained_volumes": [(r, r.retained_volume_cleanup_after is not None
                                     and r.retained_volume_cleanup_after <= now) for r in retained[:PANEL_ROWS]],
               "retained_total": len(retained)}
        self.attention_cache = (self.rt.clock.monotonic(), out)
        return out

    def charts(self, actor: Actor, window: str, *, fresh: bool) -> tuple[Markup, Markup]:
        """Both fleet charts: computed from the events for a page load; polls reuse them for a few intervals."""
        ttl = max(5.0, 5 * float(self.rt.settings.web_poll_interval))
        cached = self.chart_cache.get(window)
        if not fresh and cached is not None and self.rt.clock.monotonic() - cached[0] < ttl:
            return cached[1], cached[2]
        svc = self.rt.service
        events: list[EventRecord] = []
        for name in charts.RECOVERY_EVENTS:
            events.extend(_collect(lambda c, n=name: svc.fleet_events(actor, name=n, cursor=c, limit=500),  # type: ignore[misc]
                                   MAX_EVENTS))
        chart = charts.recovery_chart_svg(charts.recovery_buckets(events, self.now(), window), window)
        histogram = charts.duration_histogram_svg(charts.duration_bins(events))
        self.chart_cache[window] = (self.rt.clock.monotonic(), chart, histogram)
        return chart, histogram

    # --- instance detail ---------------------------------------------------------------------------

    def detail_ctx(self, actor: Actor, instance_id: str) -> dict[str, Any]:
        svc = self.rt.service
        rec = svc.get_instance(actor, instance_id)
        try:
            debug = svc.debug(actor, instance_id)
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
        events = _collect(lambda c: svc.list_events(actor, instance_id, cursor=c, limit=200), 1000)
        events.sort(key=lambda e: (e.at, e.id or 0), reverse=True)
        audit: list[AuditRecord] = _collect(
            lambda c: svc.list_audit(actor, instance_id=instance_id, cursor=c, limit=200), 1000)
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

    async def _volume_action(self, actor: Actor, rec: InstanceRecord, action: str, data: dict[str, str]) -> Flash:
        """Restore from a snapshot or a kept volume, or delete a flagged volume (SPEC §15; the service checks)."""
        svc = self.rt.service
        snapshot_id, volume_id = data.get("snapshot_id") or None, data.get("volume_id") or None
        if action == "delete-flagged-volume":
            deleted = await svc.delete_flagged_volume(actor, rec.id, volume_id or "")
            return Flash("ok", f"Deleted flagged volume {deleted} of {rec.id}.")
        await svc.restore_volume(actor, rec.id, snapshot_id=snapshot_id, volume_id=volume_id)
        source = f"snapshot {snapshot_id}" if snapshot_id else f"volume {volume_id}"
        return Flash("ok", f"Restore of {rec.id} from {source} started: it moves to a new volume; the previous one "
                           "is kept.")

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

    async def create_instance(self, actor: Actor, data: dict[str, str]) -> Flash:
        """The owner page's Create form (CSRF checked by the caller): size, and optionally a name and labels
        (``key=value`` pairs separated by commas or new lines)."""
        size = (data.get("size") or "").strip() or None
        name = (data.get("name") or "").strip() or None
        try:
            labels = parse_labels(data.get("labels") or "")
            rec = await self.rt.service.create_instance(actor, size=size, name=name, labels=labels)
        except ServiceError as exc:
            return Flash("error", f"Could not create an instance: {exc.message}", status=exc.http_status)
        except Exception as exc:  # a provider or store failure: say so in the page, log the rest
            log.error("web.create_failed", error=f"{type(exc).__name__}: {exc}")
            return Flash("error", f"Could not create an instance: unexpected error ({type(exc).__name__}). "
                                  "Try again; the server log has details.", status=500)
        return Flash("ok", f"Created {rec.name or rec.id}: it is starting now.")

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

    async def admin_action(self, actor: Actor, rec: InstanceRecord, action: str,
                           data: dict[str, str] | None = None) -> Flash:
        svc = self.rt.service
        data = data or {}
        try:
            if action in ("restore", "delete-flagged-volume"):
                return await self._volume_action(actor, rec, action, data)
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
            if action == "approve-restore":
                await svc.approve_restore(actor, rec.id)
                return Flash("ok", f"Snapshot restore of {rec.id} approved: it is being moved to another host.")
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

    # --- pages shared by several routers --------------------------------------------------------------

    def lookup(self, actor: Actor, instance_id: str) -> InstanceRecord | None:
        """The instance if ``actor`` may see it (the service decides); None otherwise, as for a missing one."""
        try:
            return self.rt.service.get_instance(actor, instance_id)
        except ServiceError:  # InstanceNotFound, or an id the service rejects
            return None

    def admin_session(self, request: Request) -> Session | Response:
        """The signed-in admin's session, or the page to answer instead (sign-in, or 403 for others)."""
        session = self.session(request)
        if session is None:
            return self.need_login(request)
        try:
            access.require_admin(session.actor)
        except ServiceError:
            return self.forbidden(request, session)
        return session

    def owner_full(self, request: Request, session: Session, flash: Flash | None = None) -> HTMLResponse:
        inner = self.inner("_owner_live.html", session, instances=self.owner_views(session.actor))
        live, _ = self.live_block("/ui/instances/live", [], inner)
        return self.render("owner.html", request=request, session=session, live=live, flash=flash,
                           status=flash.status if flash else 200, create=self.create_form())

    def detail_full(self, request: Request, session: Session, instance_id: str,
                    flash: Flash | None = None) -> Response:
        try:
            ctx = self.detail_ctx(session.actor, instance_id)
        except ServiceError:  # InstanceNotFound, or an id the service rejects
            return self.not_found(request, session, f"There is no instance {instance_id}.")
        live, _ = self.live_block(f"/ui/admin/instances/{quote(instance_id)}/live", [],
                                  self.inner("_detail_live.html", session, **ctx))
        return self.render("detail.html", request=request, session=session, live=live, flash=flash,
                           status=flash.status if flash else 200, **ctx)

    def create_form(self) -> dict[str, Any]:
        """What the owner page's Create form offers: the sizes a user may pick."""
        sizes = [s.strip() for s in self.rt.settings.user_machine_sizes.split(",") if s.strip()]
        return {"sizes": sizes, "default_size": self.rt.settings.default_size}



def _static_bytes(name: str) -> bytes:
    return resources.files("sandkeep.web").joinpath("static", name).read_bytes()


def web_ui(request: Request) -> WebUI:
    """The app's :class:`WebUI` (put on ``app.state.web`` by :func:`sandkeep.web.routes.install_web`)."""
    ui: WebUI = request.app.state.web
    return ui


UiDep = Annotated[WebUI, Depends(web_ui)]
