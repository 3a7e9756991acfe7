"""Shared plumbing of the API-talking CLI commands (`sandkeep instances …`, `sandkeep admin …`).

Exit codes: 0 success; 1 the API refused (4xx/5xx, the error code and message are printed);
2 usage error; 3 the API cannot be reached; 4 ``--wait`` timed out or the instance settled in another
state than the action aimed for.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from sandkeep.api.client import ApiCallError, ApiClient, ApiUnreachable, Transition, WaitTimedOut

EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_WAIT = 4

F = TypeVar("F", bound=Callable[..., Any])


OUTPUTS = ("table", "wide", "json", "yaml")
Render = Callable[[Sequence[dict[str, Any]]], str]


class Ctx:
    def __init__(self, url: str, token: str | None, output: str = "table") -> None:
        self.url = url
        self.token = token
        self.output = output

    @property
    def as_json(self) -> bool:
        """Structured output (JSON or YAML) instead of tables."""
        return self.output in ("json", "yaml")

    @property
    def wide(self) -> bool:
        return self.output == "wide"

    def emit(self, value: Any) -> None:
        """Print ``value`` as JSON or YAML (``-o``)."""
        click.echo(self.structured(value))

    def structured(self, value: Any) -> str:
        return yaml_text(value) if self.output == "yaml" else json.dumps(value, indent=2, sort_keys=False)

    def client(self) -> ApiClient:
        return ApiClient(self.url, self.token)

    def print_listing(self, path: str, params: dict[str, Any], limit: int, render: Render, empty: str,
                      render_wide: Render | None = None) -> None:
        """Fetch up to ``limit`` items of a paginated listing and print them as JSON, YAML or a table."""
        click.echo(self.listing_text(path, params, limit, render, empty, render_wide))

    def listing_text(self, path: str, params: dict[str, Any], limit: int, render: Render, empty: str,
                     render_wide: Render | None = None) -> str:
        with self.client() as client:
            items = list(client.pages(path, params, max_items=limit))
        if self.as_json:
            return self.structured(items)
        if items:
            return (render_wide if self.wide and render_wide else render)(items)
        return empty


def api_options(fn: F) -> F:
    """Adds --url, --token and --json; passes ``ctx: Ctx`` and turns API errors into exit codes."""

    @click.option("--url", envvar="SANDKEEP_URL", default="http://127.0.0.1:8080", show_default=True,
                  help="sandkeep API base URL [env SANDKEEP_URL].")
    @click.option("--token", envvar="SANDKEEP_TOKEN", default=None,
                  help="API token (see `sandkeep token`) [env SANDKEEP_TOKEN].")
    @click.option("-o", "--output", type=click.Choice(OUTPUTS), default=None,
                  help="table (default), wide (more columns), json or yaml.")
    @click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
    @functools.wraps(fn)
    def wrapper(*args: Any, url: str, token: str | None, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, "json"):
            raise click.UsageError(f"--json and -o {output} disagree: give one")
        ctx = Ctx(url, token, "json" if as_json else (output or "table"))
        as_json = ctx.as_json
        try:
            return fn(*args, ctx=ctx, **kwargs)
        except ApiCallError as exc:
            if as_json and exc.body is not None:
                ctx.emit(exc.body)
            click.echo(f"error: {exc.code} ({exc.status}): {exc.message}", err=True)
            if exc.status == 401 and not token:
                click.echo("hint: pass --token or set SANDKEEP_TOKEN (`sandkeep token --user ID`)", err=True)
            sys.exit(EXIT_API_ERROR)
        except ApiUnreachable as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except WaitTimedOut as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_WAIT)

    return wrapper  # type: ignore[return-value]


def wait_options(fn: F) -> F:
    fn = click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
                      help="With --wait: give up after this many seconds (exit 4).")(fn)
    fn = click.option("--wait", is_flag=True,
                      help="Show progress until the instance settles (not busy, nothing pending).")(fn)
    return fn


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def yaml_text(value: Any) -> str:
    import yaml

    return str(yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)).rstrip("\n")


def watch_options(fn: F) -> F:
    fn = click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
                      help="With --watch: seconds between refreshes.")(fn)
    fn = click.option("-w", "--watch", is_flag=True,
                      help="Keep refreshing; print the view again whenever it changes (Ctrl-C ends).")(fn)
    return fn


def watch(frame: Callable[[], str], *, interval: float) -> None:
    """Print ``frame()`` now and again every time it changes, until Ctrl-C (exit 0)."""
    last: str | None = None
    try:
        while True:
            text = frame()
            if text != last:
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                click.echo(("\n" if last is not None else "") + f"--- {stamp} UTC (Ctrl-C to stop)\n{text}")
                last = text
            time.sleep(interval)  # the CLI's own polling pace (not a test wait)
    except KeyboardInterrupt:
        return


def age(iso: str | None, now: datetime | None = None) -> str:
    if not iso:
        return "-"
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = f"{seconds:.0f}s"
    elif seconds < 5400:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 172800:
        text = f"{seconds / 3600:.0f}h"
    else:
        text = f"{seconds / 86400:.0f}d"
    return f"in {text}" if future else f"{text} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def status_label(inst: dict[str, Any]) -> str:
    status = str(inst.get("status"))
    if inst.get("busy"):
        status += " (busy)"
    if inst.get("pending_action"):
        status += f" ({inst['pending_action']} pending)"
    return status


def instance_rows(items: Sequence[dict[str, Any]]) -> str:
    return table(["ID", "NAME", "USER", "STATUS", "REGION", "MACHINE", "VOLUME", "STARTED"],
                 [[i["id"], i.get("name"), i["user_id"], status_label(i), i.get("region"), i.get("machine_id"),
                   i.get("volume_id"), age(i.get("last_started_at"))] for i in items])


def labels_text(labels: dict[str, str] | None) -> str | None:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or None


def guest_text(guest: dict[str, Any] | None) -> str | None:
    if not guest:
        return None
    return f"{guest.get('cpus')}x {guest.get('cpu_kind')} {guest.get('memory_mb')}MB"


def instance_rows_wide(items: Sequence[dict[str, Any]]) -> str:
    """``-o wide``: also the provider app (where to find the machine), size, guest, labels, creation time, last
    error."""
    return table(["ID", "NAME", "USER", "STATUS", "REGION", "APP", "MACHINE", "VOLUME", "SIZE", "GUEST", "LABELS",
                  "CREATED", "STARTED", "LAST ERROR"],
                 [[i["id"], i.get("name"), i["user_id"], status_label(i), i.get("region"), i.get("app_name"),
                   i.get("machine_id"), i.get("volume_id"), i.get("size"), guest_text(i.get("guest")),
                   labels_text(i.get("labels")), age(i.get("created_at")), age(i.get("last_started_at")),
                   _short((i.get("recovery") or {}).get("last_error") or i.get("last_provider_error"))]
                  for i in items])


def _short(text: str | None, limit: int = 60) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def instance_detail(inst: dict[str, Any]) -> str:
    rec = inst.get("recovery") or {}
    pairs: list[tuple[str, Any]] = [
        ("id", inst["id"]), ("name", inst.get("name")), ("labels", labels_text(inst.get("labels"))),
        ("user", inst["user_id"]), ("sandbox", inst.get("sandbox_id")),
        ("status", status_label(inst)), ("region", inst.get("region")), ("app", inst.get("app_name")),
        ("machine", inst.get("machine_id")), ("volume", inst.get("volume_id")), ("size", inst.get("size")),
        ("guest", guest_text(inst.get("guest"))),
        ("image", inst.get("image")),
        ("env", ", ".join(f"{k}={v}" for k, v in (inst.get("env") or {}).items()) or None),
        ("secrets", ", ".join(inst.get("secret_names") or []) or None),
        ("created", _when(inst.get("created_at"))), ("last started", _when(inst.get("last_started_at"))),
        ("last stopped", _when(inst.get("last_stopped_at"))),
        ("recovery started", _when(rec.get("started_at"))),
        ("pending recovery volume", rec.get("pending_volume_id")),
        ("retained volume", rec.get("retained_volume_id")),
        ("retained cleanup after", _when(rec.get("retained_volume_cleanup_after"))),
        ("last recovery error", rec.get("last_error")),
        ("last recovery error at", _when(rec.get("last_error_at"))),
        ("last provider error", inst.get("last_provider_error")),
        ("last provider error at", _when(inst.get("last_provider_error_at"))),
    ]
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {'-' if v in (None, '') else v}" for k, v in pairs)


def _when(iso: str | None) -> str | None:
    return None if not iso else f"{iso} ({age(iso)})"


def instance_event_rows(items: Sequence[dict[str, Any]]) -> str:
    """One instance's events, narrow enough for a terminal: no instance column, short time, clipped error."""
    return table(["WHEN", "EVENT", "STATUS", "LABEL", "REGION", "MS", "ERROR"],
                 [[age(e.get("at")), e["event"].removeprefix("instance."), e.get("status"), e.get("label"),
                   e.get("region"), e.get("duration_ms"), _short(e.get("error"), 50)] for e in items])


def event_rows(items: Sequence[dict[str, Any]]) -> str:
    return table(["AT", "EVENT", "INSTANCE", "STATUS", "LABEL", "MACHINE", "REGION", "MS", "ERROR"],
                 [[e.get("at"), e["event"], e.get("instance_id"), e.get("status"), e.get("label"), e.get("machine_id"),
                   e.get("region"), e.get("duration_ms"), e.get("error")] for e in items])


def audit_rows(items: Sequence[dict[str, Any]]) -> str:
    return table(["AT", "ACTOR", "ROLE", "ACTION", "INSTANCE", "OUTCOME", "DETAILS"],
                 [[a.get("at"), a["actor"], a["role"], a["action"], a.get("instance_id"), a.get("outcome"),
                   json.dumps(a.get("details") or {}) if a.get("details") else None] for a in items])


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in values:
        name, sep, value = raw.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {raw!r}", param_hint=what)
        out[name] = value
    return out


def show_result(ctx: Ctx, inst: dict[str, Any], *, wait: bool, timeout: float, want: str | None,
                verb: str) -> None:
    """Print an action's answer; with --wait follow it until it settles and check it reached ``want``."""
    if not wait:
        if ctx.as_json:
            ctx.emit(inst)
        else:
            click.echo(f"{verb} {inst['id']}: {status_label(inst)}")
        return

    def progress(t: Transition) -> None:
        if ctx.as_json:
            return
        label = "gone" if t.status is None else t.status
        extra = ""
        if t.instance is not None:
            extra = "  ".join(x for x in (t.instance.get("region") or "", t.instance.get("machine_id") or "") if x)
        click.echo(f"  +{t.elapsed:6.1f}s  {label}{('  ' + extra) if extra else ''}", err=False)

    if not ctx.as_json:
        click.echo(f"{verb} {inst['id']}: waiting for it to settle")
    with ctx.client() as client:
        final = client.wait_settled(inst["id"], timeout=timeout, on_change=progress)
    status = "destroyed" if final is None else str(final["status"])
    if ctx.as_json:
        ctx.emit(final if final is not None else {"id": inst["id"], "status": "destroyed"})
    else:
        click.echo(f"{inst['id']} settled: {status}")
        err = (final or {}).get("recovery", {}).get("last_error") if final else None
        if err and status != want:
            click.echo(f"  last recovery error: {err}")
    if want is not None and status != want:
        click.echo(f"error: {inst['id']} ended {status}, expected {want}", err=True)
        sys.exit(EXIT_WAIT)
