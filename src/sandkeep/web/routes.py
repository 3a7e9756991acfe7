"""The web UI's wiring: one :class:`~sandkeep.web.ui.WebUI` on ``app.state.web`` and the page routers.

Pages: :mod:`sandkeep.web.signin` (``/``, ``/login``, ``/login/once/<code>``, ``/logout``),
:mod:`sandkeep.web.owner` (``/ui/``), :mod:`sandkeep.web.admin` (``/ui/admin/``) and
:mod:`sandkeep.web.static` (``/ui/static/<name>``, and the UI's "no such page", included last).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from sandkeep.web import admin, owner, signin, static
from sandkeep.web.auth import WebRuntime
from sandkeep.web.ui import WebUI

ROUTERS: tuple[APIRouter, ...] = (signin.router, static.router, owner.router, admin.router,
                                  static.not_found_router)


def install_web(app: FastAPI, runtime: WebRuntime) -> None:
    """Serve the web UI for ``runtime`` from ``app``."""
    app.state.web = WebUI(runtime)
    for router in ROUTERS:
        app.include_router(router)
