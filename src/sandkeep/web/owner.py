"""The owner's pages: ``GET /ui/`` (your instances), ``GET /ui/instances/live`` (the polled fragment),
``POST /ui/instances`` (create), ``POST /ui/instances/<id>/<start|stop|restart|destroy>``, and
``GET /ui/instances/<id>/open/<path>`` (the instance's gateway through the provider's proxy, authorised by the
session cookie)."""

from __future__ import annotations

from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from sandkeep.api.proxy import GatewayUnreachable, stream_gateway
from sandkeep.engine.service import ServiceError
from sandkeep.web import present
from sandkeep.web.ui import (
    GATEWAY_DROP_HEADERS,
    GATEWAY_SAFETY_HEADERS,
    OWNER_ACTIONS,
    Flash,
    UiDep,
    _is_htmx,
    log,
)

router = APIRouter(include_in_schema=False)


@router.get("/ui", response_model=None)
async def ui_bare(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", response_model=None)
async def owner_page(request: Request, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    return ui.owner_full(request, session)


@router.get("/ui/instances/live", response_model=None)
async def owner_live(request: Request, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    return ui.live("_owner_live.html", "/ui/instances/live", request, session,
                   instances=ui.owner_views(session.actor))


@router.post("/ui/instances", response_model=None)
async def create(request: Request, ui: UiDep) -> Response:
    """The Create form: a new instance for the signed-in user (size, name and labels as the API takes them)."""
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    data, ok = await ui.form_and_csrf(request, session)
    if not ok:
        return ui.csrf_failed(request, session)
    flash = await ui.create_instance(session.actor, data)
    if _is_htmx(request):
        return ui.flash_response(request, session, flash)
    return ui.owner_full(request, session, flash)


@router.post("/ui/instances/{instance_id}/{action}", response_model=None)
async def owner_post(request: Request, instance_id: str, action: str, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    data, ok = await ui.form_and_csrf(request, session)
    if not ok:
        return ui.csrf_failed(request, session)
    back = data.get("back") or ""
    rec = ui.lookup(session.actor, instance_id)
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
        return ui.detail_full(request, session, rec.id, flash)
    return ui.owner_full(request, session, flash)


@router.api_route("/ui/instances/{instance_id}/open/{path:path}", methods=["GET", "HEAD"], response_model=None)
async def open_gateway(request: Request, instance_id: str, path: str, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    rec = ui.lookup(session.actor, instance_id)
    if rec is None:
        return ui.not_found(request, session, f"No instance {instance_id} of yours.")
    try:
        target = ui.rt.service.gateway_target(session.actor, instance_id)
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
    client = httpx.AsyncClient(timeout=ui.rt.settings.web_gateway_timeout, follow_redirects=False)
    try:
        return await stream_gateway(client, request.method, url, headers=extra.items(),
                                    drop_headers=GATEWAY_DROP_HEADERS, add_headers=GATEWAY_SAFETY_HEADERS,
                                    close_client=True)
    except GatewayUnreachable as exc:
        log.info("web.gateway_unreachable", instance_id=instance_id, error=str(exc))
        return ui.render("error.html", request=request, session=session, status=502,
                         title="Gateway did not answer",
                         message=f"The gateway of {instance_id} did not answer ({type(exc.error).__name__}). "
                                 "If the instance just recovered, try again in a few seconds.",
                         link=("/ui/", "Back to your instances"))
