"""Admin routes: fleet events, the audit log, an instance's debug view, and the admin actions.

The service checks the admin role (and audits refused admin actions itself); these routes only translate.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from sandkeep.api.deps import ERRORS, ActorDep, Cursor, InstanceId, Limit500, StateDep
from sandkeep.api.schemas import (
    AuditPage,
    CleanupResult,
    EventPage,
    Instance,
    render_audit,
    render_debug,
    render_event,
    render_instance,
)

router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/events", response_model=EventPage, tags=["admin"])
async def fleet_events(actor: ActorDep, api: StateDep, name: Annotated[str | None, Query(max_length=200)] = None,
                       instance_id: Annotated[str | None, Query(max_length=200)] = None,
                       cursor: Cursor = None, limit: Limit500 = 100) -> dict[str, Any]:
    """Admin: fleet-wide events, newest first, filterable by event name."""
    page = api.service.fleet_events(actor, instance_id=instance_id, name=name, cursor=cursor, limit=limit)
    return {"items": [render_event(e) for e in page.items], "next_cursor": page.next_cursor}


@router.get("/audit", response_model=AuditPage, tags=["admin"])
async def audit(actor: ActorDep, api: StateDep, instance_id: Annotated[str | None, Query(max_length=200)] = None,
                cursor: Cursor = None, limit: Limit500 = 100) -> dict[str, Any]:
    """Admin: the audit log of admin actions, newest first."""
    page = api.service.list_audit(actor, instance_id=instance_id, cursor=cursor, limit=limit)
    return {"items": [render_audit(a) for a in page.items], "next_cursor": page.next_cursor}


@router.get("/instances/{instance_id}/debug", tags=["admin"])
async def debug(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: every persisted field, including alarm_at and the lease (secret values redacted)."""
    return render_debug(api.service.debug(actor, instance_id))


@router.post("/instances/{instance_id}/recovery/retry", status_code=202, response_model=Instance, tags=["admin"])
async def retry_recovery(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: set the alarm to now so the instance is reconciled at once."""
    return render_instance(await api.service.retry_recovery(actor, instance_id))


@router.post("/instances/{instance_id}/retained-volume/cleanup", response_model=CleanupResult, tags=["admin"])
async def cleanup_retained(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: delete the retained old volume now (409 while recovering or when refused)."""
    deleted = await api.service.cleanup_retained_volume(actor, instance_id)
    return {"ok": True, "deleted_volume_id": deleted}


@router.post("/instances/{instance_id}/machine/destroy", status_code=202, response_model=Instance, tags=["admin"])
async def destroy_machine(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: force-destroy the instance's current machine (reconcile then sees it gone)."""
    return render_instance(await api.service.destroy_machine(actor, instance_id))


@router.post("/instances/{instance_id}/gateway-token/rotate", status_code=202, response_model=Instance,
             tags=["admin"])
async def rotate_gateway_token(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: give the instance a new gateway token (a running instance restarts with it; 409 while busy)."""
    return render_instance(await api.service.rotate_gateway_token(actor, instance_id))
