"""``/v1/instances``: create, list, read, change, start/stop/restart, destroy, an instance's events.

Every route hands the caller to the service, which decides what it may see and do
(:mod:`sandkeep.engine.access`); refusals come back as service errors mapped by :mod:`sandkeep.api.errors`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from sandkeep.api.deps import ERRORS, ActorDep, Cursor, InstanceId, Limit200, Limit500, StateDep
from sandkeep.api.errors import ApiError
from sandkeep.api.schemas import (
    CreateInstanceBody,
    EventPage,
    Instance,
    InstancePage,
    UpdateConfigBody,
    render_event,
    render_instance,
)
from sandkeep.store.records import Status

MAX_IDEMPOTENCY_KEY = 200
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:=+/-]{1,200}$")
STATUS_VALUES = [s.value for s in Status]

router = APIRouter(prefix="/v1", responses=ERRORS)


@router.post("/instances", status_code=201, response_model=Instance, tags=["instances"])
async def create_instance(
    actor: ActorDep, api: StateDep, body: CreateInstanceBody | None = None,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
        description="Makes a retried create safe: the same caller, owner and key return the first instance "
                    "instead of creating another (1-200 characters of letters, digits and ._:=+/-).")] = None,
) -> dict[str, Any]:
    """Create an instance and start it right away. Users create for themselves only."""
    body = body or CreateInstanceBody()
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.match(idempotency_key):
        raise ApiError(422, "validation_error", "Idempotency-Key must be 1-200 characters of letters, digits "
                       "and ._:=+/-")
    record = await api.service.create_instance(
        actor, user_id=body.user_id, size=body.size, env=body.env, secrets=body.secrets, image=body.image,
        idempotency_key=idempotency_key, name=body.name, labels=body.labels,
        guest=body.guest.model_dump() if body.guest is not None else None)
    return render_instance(record)


def _statuses(status: list[str] | None) -> list[str] | None:
    if not status:
        return None
    statuses = [s.strip() for raw in status for s in raw.split(",") if s.strip()]
    bad = [s for s in statuses if s not in STATUS_VALUES]
    if bad:
        raise ApiError(422, "validation_error", f"unknown status {bad[0][:40]!r}; one of {', '.join(STATUS_VALUES)}")
    return statuses or None


@router.get("/instances", response_model=InstancePage, tags=["instances"])
async def list_instances(
    actor: ActorDep, api: StateDep,
    status: Annotated[list[str] | None, Query(description="Filter by status (repeat or comma-separate).")] = None,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    region: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit200 = 50,
) -> dict[str, Any]:
    """Own instances for users; all (filterable by user_id) for admins and platform."""
    page = api.service.list_instances(actor, user_id=user_id, status=_statuses(status), region=region,
                                      cursor=cursor, limit=limit)
    return {"items": [render_instance(r) for r in page.items], "next_cursor": page.next_cursor}


@router.get("/instances/{instance_id}", response_model=Instance, tags=["instances"])
async def get_instance(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    return render_instance(api.service.get_instance(actor, instance_id))


@router.patch("/instances/{instance_id}", response_model=Instance, tags=["instances"])
async def update_config(actor: ActorDep, api: StateDep, instance_id: InstanceId,
                        body: UpdateConfigBody) -> dict[str, Any]:
    """Change size, env, secrets or guest (applied at the next start or restart, and by every recovery), or the
    name and labels (at once)."""
    api.service.get_instance(actor, instance_id)  # an invisible instance is 404 before the body is judged
    if all(v is None for v in (body.size, body.env, body.secrets, body.name, body.labels, body.guest)):
        raise ApiError(422, "validation_error", "nothing to change: give size, env, secrets, name, labels or guest")
    record = await api.service.update_config(
        actor, instance_id, size=body.size, env=body.env, secrets=body.secrets, name=body.name, labels=body.labels,
        guest=body.guest.model_dump() if body.guest is not None else None)
    return render_instance(record)


@router.delete("/instances/{instance_id}", status_code=202, response_model=Instance, tags=["instances"])
async def destroy_instance(actor: ActorDep, api: StateDep, instance_id: InstanceId,
                           force: Annotated[bool, Query(description="Admin only: destroy even while "
                                                                     "recovering.")] = False) -> dict[str, Any]:
    """Two-phase destroy; refused with 409 while recovering unless an admin passes force=true."""
    return render_instance(await api.service.destroy(actor, instance_id, force=force))


@router.post("/instances/{instance_id}/start", status_code=202, response_model=Instance, tags=["instances"])
async def start(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    return render_instance(await api.service.start(actor, instance_id))


@router.post("/instances/{instance_id}/stop", status_code=202, response_model=Instance, tags=["instances"])
async def stop(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    return render_instance(await api.service.stop(actor, instance_id))


@router.post("/instances/{instance_id}/restart", status_code=202, response_model=Instance, tags=["instances"])
async def restart(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    return render_instance(await api.service.restart(actor, instance_id))


@router.get("/instances/{instance_id}/events", response_model=EventPage, tags=["events"])
async def instance_events(actor: ActorDep, api: StateDep, instance_id: InstanceId,
                          name: Annotated[str | None, Query(max_length=200)] = None,
                          cursor: Cursor = None, limit: Limit500 = 100) -> dict[str, Any]:
    """The instance's events, newest first."""
    page = api.service.list_events(actor, instance_id, name=name, cursor=cursor, limit=limit)
    return {"items": [render_event(e) for e in page.items], "next_cursor": page.next_cursor}
