"""Operations routes (no token): ``/healthz`` (alive), ``/readyz`` (database and provider answer), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sandkeep.api.deps import StateDep
from sandkeep.api.readiness import readiness_checks
from sandkeep.api.schemas import ErrorBody
from sandkeep.metrics import REGISTRY as METRICS_REGISTRY

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, Any]:
    """Liveness: the API process answers."""
    return {"ok": True}


@router.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
async def readyz(api: StateDep) -> JSONResponse:
    """Readiness: 200 when the database and the machine provider answer, 503 (naming which) otherwise."""
    checks = await readiness_checks(api.settings, store=api.store, provider=api.provider,
                                    timeout=float(api.settings.ready_timeout))
    failed = {name: result for name, result in checks.items() if result != "ok"}
    if not failed:
        return JSONResponse({"ok": True, "checks": checks})
    message = "; ".join(f"{name}: {result}" for name, result in failed.items())
    return JSONResponse({"error": {"code": "not_ready", "message": message, "status": 503}, "checks": checks},
                        status_code=503)


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics() -> Response:
    """Prometheus metrics (engine counters and histograms)."""
    return Response(generate_latest(METRICS_REGISTRY), media_type=CONTENT_TYPE_LATEST)
