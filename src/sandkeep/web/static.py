"""Static files (vendored htmx, CSS, icon) and the UI's catch-all "no such page"."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sandkeep.web.ui import STATIC_FILES, UiDep, _static_bytes

router = APIRouter(include_in_schema=False)
#: included last: its ``/ui/{rest}`` answers every UI path no other page took
not_found_router = APIRouter(include_in_schema=False)


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


@not_found_router.get("/ui/{rest:path}", response_model=None)
async def ui_not_found(request: Request, rest: str, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is None:
        return ui.need_login(request)
    return ui.not_found(request, session, f"There is no page at {request.url.path}.")
