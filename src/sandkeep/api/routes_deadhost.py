"""Admin routes of SPEC §15 (dead hosts): approve a data-losing snapshot restore, delete a flagged old volume.

``register(v1, ...)`` adds them to the ``/v1`` router; the app passes in its own admin gate and its instance
renderer, so this module owns nothing but the routes.
"""


from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from sandkeep.api.schemas import CleanupResult, Instance, render_instance
from sandkeep.engine.service import Actor, InstanceServiceAPI


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
InstanceIdPath = Annotated[str, Path(description="Instance id (ins_...)", max_length=200)]


def register(v1: APIRouter, service: InstanceServiceAPI, *, current_actor: Callable[..., Any],
             admin_action: Callable[[Actor, str, str], None]) -> None:
    actor_dep = Annotated[Actor, Depends(current_actor)]

    @v1.post("/instances/{instance_id}/recovery/approve-restore", status_code=202, response_model=Instance,
             tags=["admin"])
    async def approve_restore(actor: actor_dep, instance_id: InstanceIdPath) -> dict[str, Any]:
        """Admin: approve the snapshot restore an instance on a dead host waits for
        (``SANDKEEP_SNAPSHOT_RESTORE_POLICY=approve``); data written after the snapshot is lost. 409 when none
        awaits approval."""
        admin_action(actor, "approve_restore", instance_id)
        return render_instance(await service.approve_restore(actor, instance_id))

    @v1.get("/instances/{instance_id}/snapshots", response_model=SnapshotList, tags=["admin"])
    async def list_volume_snapshots(actor: actor_dep, instance_id: InstanceIdPath) -> dict[str, Any]:
        """Admin: every snapshot of the instance's current, retained and flagged volumes, newest first."""
        admin_action(actor, "list_snapshots", instance_id)
        return {"items": await service.list_volume_snapshots(actor, instance_id)}

    @v1.post("/instances/{instance_id}/restore", status_code=202, response_model=Instance, tags=["admin"])
    async def restore_volume(actor: actor_dep, instance_id: InstanceIdPath,
                             body: RestoreBody | None = None) -> dict[str, Any]:
        """Admin: restore a snapshot (``snapshot_id``) or fork a retained/flagged volume (``volume_id``) into a
        new volume sized from its source, and switch the instance over; the previous volume is retained."""
        admin_action(actor, "volume_restore", instance_id)
        body = body or RestoreBody()
        return render_instance(await service.restore_volume(actor, instance_id, snapshot_id=body.snapshot_id,
                                                            volume_id=body.volume_id))

    @v1.post("/instances/{instance_id}/flagged-volumes/{volume_id}/delete", response_model=CleanupResult,
             tags=["admin"])
    async def delete_flagged_volume(actor: actor_dep, instance_id: InstanceIdPath,
                                    volume_id: VolumeId) -> dict[str, Any]:
        """Admin: delete an old volume flagged after a snapshot restore (it may hold writes newer than the
        snapshot; sandkeep never deletes it on its own). 400 when the volume is not flagged on the instance."""
        admin_action(actor, "flagged_volume_delete", instance_id)
        deleted = await service.delete_flagged_volume(actor, instance_id, volume_id)
        return {"ok": True, "deleted_volume_id": deleted}
