"""Admin routes of SPEC §15 (dead hosts): approve a data-losing snapshot restore, list and restore snapshots,
delete a flagged old volume. The service checks the admin role (and audits refusals); these routes only translate.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from sandkeep.api.deps import ERRORS, ActorDep, InstanceId, StateDep
from sandkeep.api.schemas import CleanupResult, Instance, render_instance


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
