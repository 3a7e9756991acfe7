"""Admin routes of SPEC §15 (dead hosts and orphans): approve a data-losing snapshot restore, list and restore
snapshots, delete a flagged old volume, list the orphans the inventory found. The service checks the admin role
(and audits refusals); these routes only translate.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from sandkeep.api.deps import ERRORS, ActorDep, InstanceId, StateDep
from sandkeep.api.schemas import CleanupResult, Instance, render_instance
from sandkeep.clock import utc_iso


class RestoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    snapshot_id: str | None = Field(default=None, max_length=200,
                                    description="Restore this snapshot (of the current, retained or a flagged volume).")
    volume_id: str | None = Field(default=None, max_length=200,
                                  description="Or fork this retained or flagged volume (e.g. the old volume a dead "
                                              "host left behind, which may hold newer writes).")


class SnapshotItem(BaseModel):
    volume_id: str
    volume_role: str = Field(description="current, retained or flagged")
    snapshot_id: str
    created_at: str | None
    status: str | None
    size: int | None
    source_volume_size: int | None


class SnapshotList(BaseModel):
    items: list[SnapshotItem]


class OrphanItem(BaseModel):
    kind: str = Field(description="machine or volume")
    id: str
    app_name: str
    region: str | None
    instance_id: str = Field(description="the instance whose metadata or volume name the resource carries")
    reason: str
    first_seen_at: str
    last_seen_at: str
    deletes_at: str = Field(description="first_seen_at + SANDKEEP_ORPHAN_GRACE: the next inventory pass after "
                                        "this deletes it (ownership check of SPEC 7.5; refused when foreign)")


class OrphanList(BaseModel):
    items: list[OrphanItem]


VolumeId = Annotated[str, Path(description="Volume id (vol_...)", max_length=200)]


router = APIRouter(prefix="/v1", responses=ERRORS)


@router.post("/instances/{instance_id}/recovery/approve-restore", status_code=202, response_model=Instance,
         tags=["admin"])
async def approve_restore(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: approve the snapshot restore an instance on a dead host waits for
    (``SANDKEEP_SNAPSHOT_RESTORE_POLICY=approve``); data written after the snapshot is lost. 409 when none
    awaits approval."""
    return render_instance(await api.service.approve_restore(actor, instance_id))

@router.get("/instances/{instance_id}/snapshots", response_model=SnapshotList, tags=["admin"])
async def list_volume_snapshots(actor: ActorDep, api: StateDep, instance_id: InstanceId) -> dict[str, Any]:
    """Admin: every snapshot of the instance's current, retained and flagged volumes, newest first."""
    return {"items": await api.service.list_volume_snapshots(actor, instance_id)}

@router.post("/instances/{instance_id}/restore", status_code=202, response_model=Instance, tags=["admin"])
async def restore_volume(actor: ActorDep, api: StateDep, instance_id: InstanceId,
                         body: RestoreBody | None = None) -> dict[str, Any]:
    """Admin: restore a snapshot (``snapshot_id``) or fork a retained/flagged volume (``volume_id``) into a
    new volume sized from its source, and switch the instance over; the previous volume is retained."""
    body = body or RestoreBody()
    return render_instance(await api.service.restore_volume(actor, instance_id, snapshot_id=body.snapshot_id,
                                                        volume_id=body.volume_id))

@router.post("/instances/{instance_id}/flagged-volumes/{volume_id}/delete", response_model=CleanupResult,
         tags=["admin"])
async def delete_flagged_volume(actor: ActorDep, api: StateDep, instance_id: InstanceId,
                                volume_id: VolumeId) -> dict[str, Any]:
    """Admin: delete an old volume flagged after a snapshot restore (it may hold writes newer than the
    snapshot; sandkeep never deletes it on its own). 400 when the volume is not flagged on the instance."""
    deleted = await api.service.delete_flagged_volume(actor, instance_id, volume_id)
    return {"ok": True, "deleted_volume_id": deleted}


@router.get("/admin/orphans", response_model=OrphanList, tags=["admin"])
async def list_orphans(actor: ActorDep, api: StateDep) -> dict[str, Any]:
    """Admin: machines and volumes of sandkeep's that no instance record references (found by the periodic
    inventory, ``SANDKEEP_INVENTORY_INTERVAL``), oldest sighting first, with when each will be deleted."""
    items = [{**o, **{k: utc_iso(o[k]) for k in ("first_seen_at", "last_seen_at", "deletes_at")}}
             for o in api.service.list_orphans(actor)]
    return {"items": items}
