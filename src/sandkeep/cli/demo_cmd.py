"""`sandkeep demo`: a self-contained unexpected-stop recovery demo.

It starts `sandkeep serve` (with its local machine host) as a child process on free loopback ports with a
temporary data dir and short intervals, provisions three instances, writes a file into each through the
API's gateway proxy, crashes one machine with the host's fault API (SIGKILL), prints the recovery live
as a timeline from the instance's events, reads the file back through the new machine, prints the
detection latency and the time to running, and cleans up. Exit code 0 only if the data survived.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from sandkeep.api.client import ApiCallError, ApiClient, ApiUnreachable
from sandkeep.clock import SystemClock
from sandkeep.credentials import open_credentials
from sandkeep.net import free_port

DEMO_ENV = {
    "SANDKEEP_INTERVAL_RUNNING": "5",
    "SANDKEEP_INTERVAL_BUSY": "0.5",
    "SANDKEEP_ALARM_POLL_INTERVAL": "0.2",
    "SANDKEEP_DETECT_POLL_INTERVAL": "0.5",
    "SANDKEEP_HEALTH_PROBE_INTERVAL": "0.2",
    "SANDKEEP_HEALTH_PROBE_TIMEOUT": "20",
    "SANDKEEP_RECOVERY_TIMEOUT": "120",
    "SANDKEEP_LOG_LEVEL": "warning",
}
"""Short intervals so the whole demo takes seconds, not minutes (all are ordinary settings)."""

DESCRIBE = {
    "reconcile.unexpected_stop_recovery_trigger": "detected: machine stopped while the instance should run",
    "instance.unexpected_stop_recovery_started": "recovery started",
    "instance.unexpected_stop_recovery_succeeded": "recovery succeeded: traffic cut over to the new machine",
    "instance.unexpected_stop_recovery_failed": "recovery FAILED",
    "instance.retained_volume_deleted": "old volume deleted",
    "reconcile.delete_volume": "old volume deleted",
    "reconcile.destroy_machine": "stopped machine force-destroyed",
    "reconcile.fork_volume": "forking the volume (another region first)",
    "reconcile.restore_from_snapshot": "restoring the newest snapshot (source host unreachable)",
    "reconcile.create_machine": "replacement machine created",
    "reconcile.adopt_replacement_machine": "adopted the replacement machine",
    "instance.started": "instance running",
    "instance.stopped": "instance stopped",
}


def _describe(e: dict[str, Any]) -> str:
    name = str(e["event"])
    text = DESCRIBE.get(name)
    if text is None:
        for key, phrase in (("fork", "volume forked"), ("snapshot", "restored from snapshot"),
                            ("machine_created", "replacement machine created"), ("health", "gateway health"),
                            ("cutover", "cutover"), ("retain", "old volume retained"),
                            ("destroy_machine", "old machine destroyed")):
            if key in name:
                text = phrase
                break
    fields: dict[str, Any] = {k: e[k] for k in ("label", "region", "machine_id", "volume_id", "error") if e.get(k)}
    for key, value in (e.get("details") or {}).items():  # details are more specific than the row's columns
        if key in ("old_state", "new_state") or value in (None, "", [], {}):
            continue
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str | int | float):
            fields[key] = value
    bits = [f"{k}={v}" for k, v in fields.items()]
    if e.get("duration_ms") is not None:
        bits.append(f"took {e['duration_ms'] / 1000:.2f}s")
    return f"{name}{'  — ' + text if text else ''}{'  (' + ', '.join(bits) + ')' if bits else ''}"


def _at(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(e["at"]).replace("Z", "+00:00"))


@dataclass
class _Demo:
    """One demo run: the serve child, the two API clients and what happened so far."""

    say: Callable[..., None]
    timeout: float
    url: str
    host_url: str
    host_token: str
    admin: ApiClient
    platform: ApiClient
    created: list[dict[str, Any]] = field(default_factory=list)
    payloads: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Timeline:
    crash_at: datetime
    final: dict[str, Any]
    detected_at: datetime | None = None
    engine_latency_ms: Any = None
    running_at: datetime | None = None
    ended: str | None = None  # the recovery's last event (succeeded or failed), once seen


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary data dir (its path is printed).")
@click.option("--timeout", type=click.FloatRange(min=1), default=180.0, show_default=True,
              help="Give up on any single phase after this many seconds.")
def demo(keep: bool, timeout: float) -> None:
    """Provision three instances, crash one machine, watch sandkeep recover it with the data intact."""
    data = Path(tempfile.mkdtemp(prefix="sandkeep-demo-"))
    api_port, host_port, proxy_port = free_port(), free_port(), free_port()
    secret, host_token = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
    url, host_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{host_port}"
    log_path = data / "serve.log"
    say = click.echo
    say(f"sandkeep demo — data dir {data}")
    say(f"  starting sandkeep serve on {url} (local host {host_url}, log {log_path})")
    admin, platform = _clients(url, data, secret)
    run = _Demo(say=say, timeout=timeout, url=url, host_url=host_url, host_token=host_token, admin=admin,
                platform=platform)
    proc = _start_serve(data, log_path, secret, host_token, api_port, host_port, proxy_port)
    survived = False
    try:
        _wait(lambda: proc.poll() is None and _healthy(url), timeout, "sandkeep serve to answer /healthz",
              failed=lambda: proc.poll() is not None)
        say("  serve is up\n")
        _provision(run)
        _write_files(run)
        timeline = _crash_and_watch(run)
        survived = _read_back(run, timeline.final)
        _figures(run, timeline)
    except (ApiCallError, ApiUnreachable, TimeoutError) as exc:
        say(f"demo failed: {exc}", err=True)
        say(f"serve log: {log_path}", err=True)
    finally:
        _clean_up(run, proc, data, keep=keep or not survived)
    say("\nRESULT: the data survived the crash" if survived else "\nRESULT: data did NOT survive", err=not survived)
    sys.exit(0 if survived else 1)


def _clients(url: str, data: Path, secret: str) -> tuple[ApiClient, ApiClient]:
    """An admin and a platform client whose tokens are recorded in serve's database (like `sandkeep token` does,
    or serve refuses them; opening the database creates and migrates it, before serve starts)."""
    credentials = open_credentials(f"sqlite:///{data / 'sandkeep.db'}", secret, SystemClock())
    try:
        admin = ApiClient(url, credentials.issue_token("demo-admin", "admin", 3600, issued_by="demo").token)
        platform = ApiClient(url, credentials.issue_token("demo-platform", "platform", 3600, issued_by="demo").token)
    finally:
        credentials.store.close()
    return admin, platform


def _start_serve(data: Path, log_path: Path, secret: str, host_token: str, api_port: int, host_port: int,
                 proxy_port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **DEMO_ENV, "SANDKEEP_JWT_SECRET": secret, "SANDKEEP_HOST_TOKEN": host_token,
           "PYTHONUNBUFFERED": "1"}
    for var in ("SANDKEEP_DATABASE_URL", "SANDKEEP_HOST_URL", "SANDKEEP_PROVIDER"):
        env.pop(var, None)
    with open(log_path, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "sandkeep", "serve", "--listen", f"127.0.0.1:{api_port}", "--data-dir", str(data),
             "--provider", "local", "--host-listen", f"127.0.0.1:{host_port}",
             "--host-proxy-listen", f"127.0.0.1:{proxy_port}", "--no-login-links"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


def _provision(run: _Demo) -> None:
    run.say("1. provisioning three instances")
    for n in (1, 2, 3):
        inst = run.platform.create(user_id=f"demo-user-{n}")
        run.created.append(inst)
        run.say(f"   {inst['id']} for {inst['user_id']}: {inst['status']}")
    for inst in run.created:
        final = run.admin.wait_settled(inst["id"], timeout=run.timeout, interval=0.2)
        if final is None or final["status"] != "running":
            raise click.ClickException(f"{inst['id']} did not start: {final}")
        inst.update(final)
        run.say(f"   {inst['id']} running in {final['region']} on machine {final['machine_id']}")


def _write_files(run: _Demo) -> None:
    run.say("\n2. writing a file into each instance through its gateway")
    for inst in run.created:
        payload = f"written to {inst['id']} at {datetime.now(UTC).isoformat()}\n".encode()
        run.admin.gateway("PUT", inst["id"], "data/demo.txt", payload)
        run.payloads[inst["id"]] = payload
        run.say(f"   PUT /v1/instances/{inst['id']}/gateway/data/demo.txt ({len(payload)} bytes)")


def _crash_and_watch(run: _Demo) -> _Timeline:
    victim = run.created[0]
    events_path = f"/v1/instances/{victim['id']}/events"
    seen_ids = {e["id"] for e in run.admin.request("GET", events_path, params={"limit": 500})["items"]}
    run.say(f"\n3. crashing machine {victim['machine_id']} of {victim['id']} (SIGKILL via the host's fault API)")
    timeline = _Timeline(crash_at=datetime.now(UTC), final=victim)
    resp = _host_post(run.host_url, run.host_token,
                      f"/_local/apps/{victim['app_name']}/machines/{victim['machine_id']}/crash")
    if resp >= 300:
        raise click.ClickException(f"the host refused the crash: HTTP {resp}")
    run.say("\n4. recovery timeline (seconds after the crash)")
    last_status = "running"
    deadline = time.monotonic() + run.timeout
    def note_new_events() -> None:
        page = run.admin.request("GET", events_path, params={"limit": 500})["items"]
        for e in sorted((e for e in page if e["id"] not in seen_ids), key=lambda e: (e["at"], e["id"] or 0)):
            seen_ids.add(e["id"])
            _note_event(run, timeline, e)

    while time.monotonic() < deadline:
        note_new_events()
        timeline.final = final = run.admin.get(victim["id"])
        if final["status"] != last_status:
            last_status = final["status"]
            run.say(f"   +{(datetime.now(UTC) - timeline.crash_at).total_seconds():6.2f}s  status -> {last_status}")
        if timeline.detected_at is not None and not final["busy"] and final["status"] in ("running", "stopped"):
            # the recovery's last event is written just after the status it ends with: wait for it (briefly)
            settle_until = time.monotonic() + 5.0
            note_new_events()  # the events written between the page above and the instance read
            while timeline.ended is None and time.monotonic() < settle_until:
                time.sleep(0.1)  # demo pacing: the event write follows the status write within milliseconds
                note_new_events()
            if final["status"] == "running" and timeline.running_at is None:
                timeline.running_at = datetime.now(UTC)
            return timeline
        time.sleep(0.2)  # demo pacing: poll the API a few times a second
    raise click.ClickException(f"recovery did not finish within {run.timeout:g}s (status {last_status})")


def _note_event(run: _Demo, timeline: _Timeline, e: dict[str, Any]) -> None:
    run.say(f"   +{(_at(e) - timeline.crash_at).total_seconds():6.2f}s  {_describe(e)}")
    if timeline.detected_at is None and e["event"] in ("reconcile.unexpected_stop_recovery_trigger",
                                                       "instance.unexpected_stop_recovery_started"):
        timeline.detected_at = _at(e)
    if e["event"] == "instance.unexpected_stop_recovery_started":
        timeline.engine_latency_ms = (e.get("details") or {}).get("detection_latency_ms")
    if e["event"] == "instance.unexpected_stop_recovery_succeeded":
        timeline.running_at = _at(e)
    if e["event"] in ("instance.unexpected_stop_recovery_succeeded", "instance.unexpected_stop_recovery_failed"):
        timeline.ended = e["event"]


def _read_back(run: _Demo, final: dict[str, Any]) -> bool:
    run.say(f"\n5. reading the file back through the new machine {final.get('machine_id')} in {final.get('region')}")
    ok = True
    for inst in run.created:
        try:
            got = run.admin.gateway("GET", inst["id"], "data/demo.txt").content
        except ApiCallError as exc:
            got = f"<{exc}>".encode()
        same = got == run.payloads[inst["id"]]
        ok = ok and same
        mark = "intact" if same else f"DIFFERENT: {got[:80]!r}"
        run.say(f"   {inst['id']}{' (recovered)' if inst is run.created[0] else ''}: {mark}")
    return ok and final["status"] == "running"


def _figures(run: _Demo, timeline: _Timeline) -> None:
    say, victim, final = run.say, run.created[0], timeline.final
    say("\n6. figures")
    if timeline.detected_at is not None:
        detection = (timeline.detected_at - timeline.crash_at).total_seconds()
        say(f"   detection latency (crash -> recovering): {detection:.2f}s")
    if isinstance(timeline.engine_latency_ms, int | float):
        say(f"   detection latency as the engine measured it (machine exit -> recovering): "
            f"{timeline.engine_latency_ms / 1000:.2f}s")
    if timeline.running_at is not None and final["status"] == "running":
        say(f"   time to running (crash -> running again): "
            f"{(timeline.running_at - timeline.crash_at).total_seconds():.2f}s")
    rec = final.get("recovery") or {}
    say(f"   region {victim.get('region')} -> {final.get('region')}; volume {victim.get('volume_id')} -> "
        f"{final.get('volume_id')}")
    if rec.get("retained_volume_id"):
        say(f"   old volume {rec['retained_volume_id']} retained (it has snapshots) until "
            f"{rec.get('retained_volume_cleanup_after')}")
    else:
        say(f"   old volume {victim.get('volume_id')} deleted (no snapshots)")
    if rec.get("last_error"):
        say(f"   last recovery error: {rec['last_error']}")


def _clean_up(run: _Demo, proc: subprocess.Popen[bytes], data: Path, *, keep: bool) -> None:
    run.say("\n7. cleaning up")
    for inst in run.created:
        try:
            run.admin.destroy(inst["id"], force=True)
        except (ApiCallError, ApiUnreachable):
            pass
    for inst in run.created:
        try:
            run.admin.wait_settled(inst["id"], timeout=min(run.timeout, 60), interval=0.2)
        except Exception:
            pass
    run.admin.close()
    run.platform.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if keep:
        run.say(f"   data dir kept: {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)
        run.say("   removed the data dir")


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _host_post(host_url: str, token: str, path: str) -> int:
    import httpx

    resp = httpx.post(f"{host_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return resp.status_code


def _wait(predicate: Any, timeout: float, what: str, *, failed: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if failed is not None and failed():
            raise TimeoutError(f"gave up waiting for {what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)  # start-up polling, bounded by the deadline
