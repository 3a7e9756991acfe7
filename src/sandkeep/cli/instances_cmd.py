"""`sandkeep instances …`: manage instances through the HTTP API (human tables, or --json)."""

from __future__ import annotations

from typing import Any

import click

from sandkeep.api.cli_common import (
    Ctx,
    api_options,
    event_rows,
    instance_detail,
    instance_event_rows,
    instance_rows,
    instance_rows_wide,
    parse_pairs,
    show_result,
    wait_options,
    watch_options,
)
from sandkeep.api.cli_common import watch as watch_frames

ID = click.argument("instance_id", metavar="ID")


def _identity_options(f: Any) -> Any:
    for option in reversed([
        click.option("--name", default=None, help="A name for people (lowercase letters, digits, '-')."),
        click.option("--label", "label", multiple=True, metavar="KEY=VALUE",
                     help="Label (repeatable; on update the given labels replace all)."),
        click.option("--cpus", type=click.IntRange(min=1), default=None, help="Guest CPUs (with --memory)."),
        click.option("--memory", type=click.IntRange(min=256), default=None, metavar="MB",
                     help="Guest memory in MB, a multiple of 256 (with --cpus)."),
        click.option("--cpu-kind", type=click.Choice(["shared", "performance"]), default=None,
                     help="Guest CPU kind (default shared)."),
    ]):
        f = option(f)
    return f


def _identity(name: str | None, label: tuple[str, ...], cpus: int | None, memory: int | None,
              cpu_kind: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if label:
        out["labels"] = parse_pairs(label, "--label")
    if cpus is not None or memory is not None or cpu_kind is not None:
        if cpus is None or memory is None:
            raise click.UsageError("--cpus and --memory go together (and --cpu-kind with them)")
        out["guest"] = {"cpu_kind": cpu_kind or "shared", "cpus": cpus, "memory_mb": memory}
    return out


@click.group("instances")
def instances() -> None:
    """Create, list, show, start, stop, restart, update and destroy instances; read their events."""


@instances.command("create")
@click.option("--user", "user_id", default=None, help="Owner (platform/admin tokens only; default: the token's user).")
@click.option("--size", default=None, help="Machine size, e.g. shared-cpu-1x.")
@click.option("--image", default=None, help="Machine image (default: the server's).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Environment variable (repeatable).")
@click.option("--secret", "secret", multiple=True, metavar="NAME=VALUE",
              help="Secret, encrypted at rest and never shown again (repeatable).")
@click.option("--idempotency-key", default=None, metavar="KEY",
              help="Sent as Idempotency-Key: repeating the command with the same key returns the first instance.")
@_identity_options
@wait_options
@api_options
def create(ctx: Ctx, user_id: str | None, size: str | None, image: str | None, env: tuple[str, ...],
           secret: tuple[str, ...], idempotency_key: str | None, name: str | None, label: tuple[str, ...],
           cpus: int | None, memory: int | None, cpu_kind: str | None, wait: bool, timeout: float) -> None:
    """Create an instance (it starts right away)."""
    body: dict[str, Any] = {"user_id": user_id, "size": size, "image": image, "idempotency_key": idempotency_key,
                            **_identity(name, label, cpus, memory, cpu_kind)}
    if env:
        body["env"] = parse_pairs(env, "--env")
    if secret:
        body["secrets"] = parse_pairs(secret, "--secret")
    with ctx.client() as client:
        inst = client.create(**body)
    show_result(ctx, inst, wait=wait, timeout=timeout, want="running", verb="created")


@instances.command("list")
@click.option("--status", multiple=True, help="Filter by status (repeatable).")
@click.option("--user", "user_id", default=None, help="Filter by owner (admin/platform).")
@click.option("--region", default=None, help="Filter by region.")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Show at most this many (follows pages).")
@watch_options
@api_options
def list_(ctx: Ctx, status: tuple[str, ...], user_id: str | None, region: str | None, limit: int, watch: bool,
          interval: float) -> None:
    """List instances (your own; everything for admins)."""
    params: dict[str, Any] = {"limit": min(limit, 200)}
    if status:
        params["status"] = list(status)
    if user_id:
        params["user_id"] = user_id
    if region:
        params["region"] = region
    args = ("/v1/instances", params, limit, instance_rows, "no instances")
    if watch:
        watch_frames(lambda: ctx.listing_text(*args, render_wide=instance_rows_wide), interval=interval)
    else:
        ctx.print_listing(*args, render_wide=instance_rows_wide)


@instances.command("show")
@ID
@watch_options
@api_options
def show(ctx: Ctx, instance_id: str, watch: bool, interval: float) -> None:
    """Show one instance, including its recovery state."""

    def frame() -> str:
        with ctx.client() as client:
            inst = client.get(instance_id)
        return ctx.structured(inst) if ctx.as_json else instance_detail(inst)

    if watch:
        watch_frames(frame, interval=interval)
    else:
        click.echo(frame())


def _action(name: str, want: str, help_text: str) -> None:
    @instances.command(name, help=help_text)
    @ID
    @wait_options
    @api_options
    def command(ctx: Ctx, instance_id: str, wait: bool, timeout: float) -> None:
        with ctx.client() as client:
            inst = client.action(instance_id, name)
        show_result(ctx, inst, wait=wait, timeout=timeout, want=want, verb=f"{name}")


_action("start", "running", "Start a stopped instance (409 instance_busy while busy).")
_action("stop", "stopped", "Stop a running instance (409 instance_busy while busy).")
_action("restart", "running", "Restart an instance (409 instance_busy while busy).")


@instances.command("destroy")
@ID
@click.option("--force", is_flag=True, help="Admin: destroy even while recovering.")
@wait_options
@api_options
def destroy(ctx: Ctx, instance_id: str, force: bool, wait: bool, timeout: float) -> None:
    """Destroy an instance: its machine, then its volumes (two-phase)."""
    with ctx.client() as client:
        inst = client.destroy(instance_id, force=force)
    show_result(ctx, inst, wait=wait, timeout=timeout, want="destroyed", verb="destroy")


@instances.command("update")
@ID
@click.option("--size", default=None, help="New machine size.")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Replaces the whole environment (repeatable); --clear-env empties it.")
@click.option("--clear-env", is_flag=True, help="Remove every environment variable.")
@click.option("--secret", "secret", multiple=True, metavar="NAME=VALUE", help="Set a secret (repeatable).")
@click.option("--remove-secret", multiple=True, metavar="NAME", help="Remove a secret (repeatable).")
@_identity_options
@click.option("--clear-labels", is_flag=True, help="Remove every label.")
@api_options
def update(ctx: Ctx, instance_id: str, size: str | None, env: tuple[str, ...], clear_env: bool,
           secret: tuple[str, ...], remove_secret: tuple[str, ...], name: str | None, label: tuple[str, ...],
           cpus: int | None, memory: int | None, cpu_kind: str | None, clear_labels: bool) -> None:
    """Change size, env, secrets or guest (applied at the next start or restart), name or labels (at once)."""
    body: dict[str, Any] = {"size": size, **_identity(name, label, cpus, memory, cpu_kind)}
    if clear_labels:
        body["labels"] = {}
    if env or clear_env:
        body["env"] = parse_pairs(env, "--env")
    secrets: dict[str, str | None] = dict(parse_pairs(secret, "--secret"))
    for name in remove_secret:
        secrets[name] = None
    if secrets:
        body["secrets"] = secrets
    with ctx.client() as client:
        inst = client.update(instance_id, **body)
    if ctx.as_json:
        ctx.emit(inst)
    else:
        click.echo(f"updated {inst['id']} (applied at the next start or restart)")


@instances.command("events")
@ID
@click.option("--name", default=None, help="Only events with this name.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@api_options
def events(ctx: Ctx, instance_id: str, name: str | None, limit: int) -> None:
    """The instance's lifecycle events, newest first."""
    params: dict[str, Any] = {"limit": min(limit, 500)}
    if name:
        params["name"] = name
    ctx.print_listing(f"/v1/instances/{instance_id}/events", params, limit, instance_event_rows, "no events",
                      render_wide=event_rows)
