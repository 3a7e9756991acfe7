"""The admin pages: ``GET /ui/admin/`` (fleet, with the orphans the inventory found) and its polled fragment,
``GET /ui/admin/instances/<id>`` (detail) and its fragment, ``GET /ui/admin/instances/<id>/restore`` (snapshots
and kept volumes to restore from), ``POST /ui/admin/instances/<id>/<action>`` (cleanup-retained-volume,
retry-recovery, destroy-machine, approve-restore, restore, delete-flagged-volume), ``GET /ui/admin/audit``."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from sandkeep.engine.service import ServiceError
from sandkeep.store.records import InstanceRecord, Page
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
    needs_confirm = action in CONFIRM
    if action not in ADMIN_ACTIONS:
        flash = Flash("error", f"Unknown action {action!r}.", status=404)
    elif rec is None:
        flash = Flash("error", f"There is no instance {instance_id}.", status=404)
    elif needs_confirm and data.get("confirm") != "yes":
        if _is_htmx(request):
            flash = Flash("error", "This action needs a confirmation; nothing was changed.", status=400)
        else:
            question, button = _question(rec, action, data)
            extra = {k: data[k] for k in ("snapshot_id", "volume_id") if data.get(k)}
            return ui.render("confirm.html", request=request, session=got, rec=rec, back="admin",
                             action_url=f"/ui/admin/instances/{quote(rec.id)}/{action}", question=question,
                             button=button, extra=extra)
    else:
        flash = await ui.admin_action(got.actor, rec, action, data)
    if _is_htmx(request):
        return ui.flash_response(request, got, flash)
    if rec is None:
        return ui.render("error.html", request=request, session=got, status=flash.status, title="Not done",
                         message=flash.message)
    return ui.detail_full(request, got, rec.id, flash)


CONFIRM = ("cleanup-retained-volume", "destroy-machine", "approve-restore", "restore", "delete-flagged-volume")


def _question(rec: InstanceRecord, action: str, data: dict[str, str]) -> tuple[str, str]:
    """The confirmation page's question and button for an action that loses or moves data."""
    volume = data.get("volume_id") or "?"
    if action == "cleanup-retained-volume":
        return (f"Delete retained volume {rec.retained_volume_id} of {rec.id}? Its snapshots go with it.",
                "Delete retained volume")
    if action == "approve-restore":
        return (f"Restore {rec.id} from its newest snapshot? What was written after it is lost (the old volume is "
                "kept).", "Approve snapshot restore")
    if action == "restore":
        source = f"snapshot {data['snapshot_id']}" if data.get("snapshot_id") else f"volume {volume}"
        return (f"Put {rec.id} on a new volume restored from {source}? Its machine restarts on it; the current "
                f"volume {rec.volume_id} is kept.", "Restore")
    if action == "delete-flagged-volume":
        return (f"Delete flagged volume {volume} of {rec.id}? It may hold writes newer than the snapshot the "
                "instance was restored from; this cannot be undone.", "Delete flagged volume")
    return f"Destroy machine {rec.machine_id} of {rec.id}?", "Destroy machine"


@router.get("/ui/admin/instances/{instance_id}/restore", response_model=None)
async def restore_page(request: Request, instance_id: str, ui: UiDep) -> Response:
    """Every snapshot of the instance's current, retained and flagged volumes, and the kept volumes themselves,
    each with a Restore button (asks the provider: not part of the polled detail page)."""
    got = ui.admin_session(request)
    if not isinstance(got, Session):
        return got
    rec = ui.lookup(got.actor, instance_id)
    if rec is None:
        return ui.not_found(request, got, f"There is no instance {instance_id}.")
    error = ""
    try:
        snapshots = await ui.rt.service.list_volume_snapshots(got.actor, rec.id)
    except ServiceError as exc:
        snapshots, error = [], f"Could not list the snapshots: {exc.message}"
    except Exception as exc:  # a provider failure: say so in the page
        snapshots, error = [], f"Could not list the snapshots ({type(exc).__name__}); try again."
    kept = [(v, "retained") for v in [rec.retained_volume_id] if v] + [(v, "flagged") for v in rec.flagged_volume_ids]
    return ui.render("restore.html", request=request, session=got, rec=rec, snapshots=snapshots, kept=kept,
                     list_error=error)


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
