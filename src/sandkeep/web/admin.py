"""The admin pages: ``GET /ui/admin/`` (fleet) and its polled fragment, ``GET /ui/admin/instances/<id>`` (detail)
and its fragment, ``POST /ui/admin/instances/<id>/<cleanup-retained-volume|retry-recovery|destroy-machine>``,
``GET /ui/admin/audit``."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from sandkeep.engine.service import ServiceError
from sandkeep.store.records import Page
from sandkeep.web.auth import Session
from sandkeep.web.ui import ADMIN_ACTIONS, PAGE_SIZE, TRAIL_MAX, Flash, UiDep, _is_htmx, pager_links

router = APIRouter(include_in_schema=False)


@router.get("/ui/admin", response_model=None)
async def admin_bare() -> Response:
    return RedirectResponse("/ui/admin/", status_code=307)


@router.get("/ui/admin/", response_model=None)
async def fleet(request: Request, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    ctx = ui.fleet_ctx(request, got.actor)
    live, _ = ui.live_block("/ui/admin/live", list(request.query_params.multi_items()),
                            ui.inner("_fleet_live.html", got, **ctx))
    return ui.render("fleet.html", request=request, session=got, live=live, **ctx)


@router.get("/ui/admin/live", response_model=None)
async def fleet_live(request: Request, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    return ui.live("_fleet_live.html", "/ui/admin/live", request, got,
                   **ui.fleet_ctx(request, got.actor, fresh=False))


@router.get("/ui/admin/instances/{instance_id}", response_model=None)
async def detail(request: Request, instance_id: str, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    return ui.detail_full(request, got, instance_id)


@router.get("/ui/admin/instances/{instance_id}/live", response_model=None)
async def detail_live(request: Request, instance_id: str, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    try:
        ctx = ui.detail_ctx(got.actor, instance_id)
    except ServiceError:  # InstanceNotFound, or an id the service rejects
        return Response(status_code=286, headers=ui.headers())  # htmx: stop polling
    return ui.live("_detail_live.html", f"/ui/admin/instances/{quote(instance_id)}/live", request, got, **ctx)


@router.post("/ui/admin/instances/{instance_id}/{action}", response_model=None)
async def admin_post(request: Request, instance_id: str, action: str, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    data, ok = await ui.form_and_csrf(request, got)
    if not ok:
        return ui.csrf_failed(request, got)
    rec = ui.lookup(got.actor, instance_id)
    needs_confirm = action in ("cleanup-retained-volume", "destroy-machine", "approve-restore")
    if action not in ADMIN_ACTIONS:
        flash = Flash("error", f"Unknown action {action!r}.", status=404)
    elif rec is None:
        flash = Flash("error", f"There is no instance {instance_id}.", status=404)
    elif needs_confirm and data.get("confirm") != "yes":
        if _is_htmx(request):
            flash = Flash("error", "This action needs a confirmation; nothing was changed.", status=400)
        else:
            question = (f"Delete retained volume {rec.retained_volume_id} of {rec.id}? Its snapshots go with it."
                        if action == "cleanup-retained-volume" else f"Destroy machine {rec.machine_id} of {rec.id}?")
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
    return ui.detail_full(request, got, rec.id, flash)


@router.get("/ui/admin/audit", response_model=None)
async def audit_page(request: Request, ui: UiDep) -> Response:
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    q = request.query_params
    cursor = q.get("cursor") or None
    trail = q.getlist("trail")[-TRAIL_MAX:]
    error = ""
    try:
        page = ui.rt.service.list_audit(got.actor, cursor=cursor, limit=PAGE_SIZE * 2)
    except ValueError as exc:
        page, error = Page(items=[]), f"That page link is not valid any more ({exc})."
    next_url, prev_url = pager_links([], trail, cursor, page.next_cursor)
    entries = sorted(page.items, key=lambda a: (a.at, a.id or 0), reverse=True)
    return ui.render("audit.html", request=request, session=got, entries=entries, next_url=next_url,
                     prev_url=prev_url, list_error=error, status=400 if error else 200,
                     page_number=len(trail) + 1 if cursor else 1)
