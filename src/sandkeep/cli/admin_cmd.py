"""`sandkeep admin …`: admin actions through the HTTP API (needs an admin token). Each is audited."""

from __future__ import annotations

from typing import Any

import click

from sandkeep.api.cli_common import (
    Ctx,
    api_options,
    audit_rows,
    event_rows,
    instance_detail,
    status_label,
    table,
)

ID = click.argument("instance_id", metavar="ID")


@click.group("admin")
def admin() -> None:
    """Debug an instance, retry its recovery, approve a snapshot restore, delete a flagged or retained volume,
    destroy its machine, rotate its gateway token; events, audit, orphans."""


@admin.command("debug")
@ID
@api_options
def debug(ctx: Ctx, instance_id: str) -> None:
    """Every persisted field of an instance, including alarm_at and the lease."""
    with ctx.client() as client:
        data = client.request("GET", f"/v1/instances/{instance_id}/debug")
    if ctx.as_json:
        ctx.emit(data)
    else:
        click.echo(table(["FIELD", "VALUE"], [[k, v] for k, v in sorted(data.items())]))


@admin.command("retry-recovery")
@ID
@api_options
def retry_recovery(ctx: Ctx, instance_id: str) -> None:
    """Set the instance's alarm to now so it is reconciled at once."""
    with ctx.client() as client:
        inst = client.request("POST", f"/v1/instances/{instance_id}/recovery/retry")
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(f"reconcile scheduled for {inst['id']} ({status_label(inst)})")


@admin.command("cleanup-retained-volume")
@ID
@api_options
def cleanup_retained_volume(ctx: Ctx, instance_id: str) -> None:
    """Delete the old volume kept after a recovery now (refused while recovering)."""
    with ctx.client() as client:
        result = client.request("POST", f"/v1/instances/{instance_id}/retained-volume/cleanup")
    if ctx.as_json:
        ctx.emit(result)
    elif result.get("deleted_volume_id"):
        click.echo(f"deleted retained volume {result['deleted_volume_id']} of {instance_id}")
    else:
        click.echo(f"{instance_id} had no retained volume")


@admin.command("destroy-machine")
@ID
@api_options
def destroy_machine(ctx: Ctx, instance_id: str) -> None:
    """Force-destroy the instance's current machine."""
    with ctx.client() as client:
        inst = client.request("POST", f"/v1/instances/{instance_id}/machine/destroy")
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(instance_detail(inst))


@admin.command("approve-restore")
@ID
@api_options
def approve_restore(ctx: Ctx, instance_id: str) -> None:
    """Approve the snapshot restore an instance on a dead host waits for (data written after the snapshot is
    lost; SANDKEEP_SNAPSHOT_RESTORE_POLICY=approve)."""
    with ctx.client() as client:
        inst = client.request("POST", f"/v1/instances/{instance_id}/recovery/approve-restore")
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(f"snapshot restore of {inst['id']} approved ({status_label(inst)})")


@admin.command("snapshots")
@ID
@api_options
def snapshots(ctx: Ctx, instance_id: str) -> None:
    """Every snapshot of the instance's current, retained and flagged volumes, newest first."""
    with ctx.client() as client:
        data = client.request("GET", f"/v1/instances/{instance_id}/snapshots")
    if ctx.as_json:
        ctx.emit(data)
    elif not data["items"]:
        click.echo(f"{instance_id} has no snapshots")
    else:
        rows = [[i["snapshot_id"], i["created_at"], i["volume_id"], i["volume_role"]] for i in data["items"]]
        click.echo(table(["SNAPSHOT", "CREATED", "VOLUME", "ROLE"], rows))


@admin.command("restore")
@ID
@click.option("--snapshot", "snapshot_id", default=None, help="Restore this snapshot (see `admin snapshots`).")
@click.option("--from-volume", "volume_id", default=None, help="Or fork this retained or flagged volume.")
@api_options
def restore(ctx: Ctx, instance_id: str, snapshot_id: str | None, volume_id: str | None) -> None:
    """Put the instance on a new volume restored from a snapshot (or forked from a kept volume); the previous
    volume is retained."""
    body = {k: v for k, v in (("snapshot_id", snapshot_id), ("volume_id", volume_id)) if v}
    with ctx.client() as client:
        inst = client.request("POST", f"/v1/instances/{instance_id}/restore", json=body)
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(f"{inst['id']} now on volume {inst['volume_id']} ({status_label(inst)})")


@admin.command("delete-flagged-volume")
@ID
@click.argument("volume_id")
@api_options
def delete_flagged_volume(ctx: Ctx, instance_id: str, volume_id: str) -> None:
    """Delete an old volume flagged after a snapshot restore (it may hold writes newer than the snapshot)."""
    with ctx.client() as client:
        result = client.request("POST", f"/v1/instances/{instance_id}/flagged-volumes/{volume_id}/delete")
    if ctx.as_json:
        ctx.emit(result)
    else:
        click.echo(f"deleted flagged volume {result['deleted_volume_id']} of {instance_id}")


@admin.command("orphans")
@api_options
def orphans(ctx: Ctx) -> None:
    """Machines and volumes of sandkeep's that no instance references (found by the periodic inventory), oldest
    sighting first, with when each is deleted (SANDKEEP_ORPHAN_GRACE after it was first seen)."""
    with ctx.client() as client:
        data = client.request("GET", "/v1/admin/orphans")
    if ctx.as_json:
        ctx.emit(data["items"])
    elif not data["items"]:
        click.echo("no orphans")
    else:
        rows = [[o["kind"], o["id"], o["app_name"], o["region"] or "-", o["instance_id"], o["first_seen_at"],
                 o["deletes_at"], o["reason"]] for o in data["items"]]
        click.echo(table(["KIND", "ID", "APP", "REGION", "INSTANCE", "FIRST SEEN", "DELETES AT", "REASON"], rows))


@admin.command("rotate-gateway-token")
@ID
@api_options
def rotate_gateway_token(ctx: Ctx, instance_id: str) -> None:
    """Give the instance a new gateway token; a running instance restarts with it (refused while busy)."""
    with ctx.client() as client:
        inst = client.request("POST", f"/v1/instances/{instance_id}/gateway-token/rotate")
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(f"gateway token of {inst['id']} rotated ({status_label(inst)})")


@admin.command("events")
@click.option("--name", default=None,
              help="Only events with this name, e.g. instance.unexpected_stop_recovery_started.")
@click.option("--instance", "instance_id", default=None, help="Only this instance's events.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@api_options
def events(ctx: Ctx, name: str | None, instance_id: str | None, limit: int) -> None:
    """Fleet-wide events, newest first."""
    params: dict[str, Any] = {"limit": min(limit, 500)}
    if name:
        params["name"] = name
    if instance_id:
        params["instance_id"] = instance_id
    ctx.print_listing("/v1/events", params, limit, event_rows, "no events")


@admin.command("audit")
@click.option("--instance", "instance_id", default=None, help="Only this instance's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@api_options
def audit(ctx: Ctx, instance_id: str | None, limit: int) -> None:
    """The audit log of admin actions, newest first."""
    params: dict[str, Any] = {"limit": min(limit, 500)}
    if instance_id:
        params["instance_id"] = instance_id
    ctx.print_listing("/v1/audit", params, limit, audit_rows, "no audit entries")
