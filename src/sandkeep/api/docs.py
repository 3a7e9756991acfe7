"""Interactive API docs at ``/docs`` from Swagger UI files shipped inside the package (no CDN, works offline).

The files under ``sandkeep/api/static/swagger-ui/`` are ``swagger-ui-bundle.js`` and ``swagger-ui.css`` of
swagger-ui-dist (npm), Apache-2.0, with its LICENSE and NOTICE beside them (VERSION names the release).
Operation ids are the handlers' names (``create_instance``, ``list_instances``, …), not FastAPI's
path-derived defaults.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

SWAGGER_DIR = Path(__file__).parent / "static" / "swagger-ui"
ASSETS_PATH = "/docs/assets"


def readable_operation_id(route: APIRoute) -> str:
    """The handler's name as the OpenAPI operationId (FastAPI uses it when a route sets none)."""
    return route.name


def install_docs(app: FastAPI) -> None:
    """``GET /docs`` (Swagger UI) and its assets under ``/docs/assets``."""
    app.mount(ASSETS_PATH, StaticFiles(directory=SWAGGER_DIR), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="sandkeep API",
                                   swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url="/favicon.ico")
