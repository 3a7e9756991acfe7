"""The API-talking CLI against a real `sandkeep serve`: tables, --json, --wait, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sandkeep.cli.main import cli
from tests.e2e.serving import Serve
from tests.support.procs import free_port


def run(serve: Serve, *args: str, user: str = "cli-user", role: str = "user", token: str | None = "auto",
        url: str | None = None) -> Result:
    env = {"SANDKEEP_URL": url or serve.url}
    if token == "auto":
        env["SANDKEEP_TOKEN"] = serve.token(user, role)
    elif token is not None:
        env["SANDKEEP_TOKEN"] = token
    runner = CliRunner()
    return runner.invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture()
def user() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def create(serve: Serve, user: str) -> dict[str, Any]:
    res = run(serve, "instances", "create", "--wait", "--json", "--env", "A=1", "--secret", "TOKEN=hidden", user=user)
    assert res.exit_code == 0, res.output
    inst: dict[str, Any] = json.loads(res.stdout)
    assert inst["status"] == "running"
    return inst


def test_lifecycle_through_the_cli(serve: Serve, user: str) -> None:
    created = run(serve, "instances", "create", "--wait", user=user)
    assert created.exit_code == 0, created.output
    assert "settled: running" in created.output and "+" in created.output  # progress lines with elapsed time
    instance_id = created.output.split()[1].rstrip(":")
    assert instance_id.startswith("ins_")

    listed = run(serve, "instances", "list", user=user)
    assert listed.exit_code == 0 and instance_id in listed.output and "STATUS" in listed.output

    shown = run(serve, "instances", "show", instance_id, user=user)
    assert shown.exit_code == 0 and "status" in shown.output and "running" in shown.output

    stopped = run(serve, "instances", "stop", instance_id, "--wait", user=user)
    assert stopped.exit_code == 0 and "settled: stopped" in stopped.output, stopped.output
    started = run(serve, "instances", "start", instance_id, "--wait", "--json", user=user)
    assert started.exit_code == 0 and json.loads(started.stdout)["status"] == "running", started.output
    restarted = run(serve, "instances", "restart", instance_id, "--wait", user=user)
    assert restarted.exit_code == 0 and "settled: running" in restarted.output, restarted.output

    events = run(serve, "instances", "events", instance_id, "--json", user=user)
    names = {e["event"] for e in json.loads(events.stdout)}
    assert "instance.started" in names and "instance.stopped" in names

    destroyed = run(serve, "instances", "destroy", instance_id, "--wait", user=user)
    assert destroyed.exit_code == 0 and "settled: destroyed" in destroyed.output, destroyed.output


def test_json_output_and_secret_values_never_printed(serve: Serve, user: str) -> None:
    inst = create(serve, user)
    assert inst["env"] == {"A": "1"} and inst["secret_names"] == ["TOKEN"]
    listed = run(serve, "instances", "list", "--json", user=user)
    assert [i["id"] for i in json.loads(listed.stdout)] == [inst["id"]]
    assert "hidden" not in listed.output
    updated = run(serve, "instances", "update", inst["id"], "--env", "B=2", "--remove-secret", "TOKEN", "--json",
                  user=user)
    assert updated.exit_code == 0, updated.output
    body = json.loads(updated.stdout)
    assert body["env"] == {"B": "2"} and body["secret_names"] == []


def test_admin_commands(serve: Serve, user: str) -> None:
    inst = create(serve, user)
    dbg = run(serve, "admin", "debug", inst["id"], "--json", user="root", role="admin")
    assert dbg.exit_code == 0 and "alarm_at" in json.loads(dbg.stdout)
    table = run(serve, "admin", "debug", inst["id"], user="root", role="admin")
    assert "lease_owner" in table.output
    retry = run(serve, "admin", "retry-recovery", inst["id"], user="root", role="admin")
    assert retry.exit_code == 0, retry.output
    cleanup = run(serve, "admin", "cleanup-retained-volume", inst["id"], "--json", user="root", role="admin")
    assert cleanup.exit_code == 0 and json.loads(cleanup.stdout)["ok"] is True, cleanup.output
    # dead-host commands reach their routes; nothing awaits approval and nothing is flagged here: refused (4xx)
    approve = run(serve, "admin", "approve-restore", inst["id"], user="root", role="admin")
    assert approve.exit_code != 0 and "no snapshot restore awaiting approval" in approve.output, approve.output
    flagged = run(serve, "admin", "delete-flagged-volume", inst["id"], "vol_nope", user="root", role="admin")
    assert flagged.exit_code != 0 and "not a flagged volume" in flagged.output, flagged.output
    audit = run(serve, "admin", "audit", "--instance", inst["id"], "--json", user="root", role="admin")
    entries = json.loads(audit.stdout)
    assert {"retry_recovery", "retained_volume_cleanup"} <= {a["action"] for a in entries}, audit.output
    assert all(a["actor"] == "root" and a["instance_id"] == inst["id"] for a in entries)
    events = run(serve, "admin", "events", "--instance", inst["id"], user="root", role="admin")
    assert events.exit_code == 0 and "instance.started" in events.output
    machine = run(serve, "admin", "destroy-machine", inst["id"], "--json", user="root", role="admin")
    assert machine.exit_code == 0, machine.output


def test_admin_rotates_a_gateway_token_and_the_instance_serves_again(serve: Serve, user: str) -> None:
    inst = create(serve, user)
    with serve.client(user) as client:
        assert client.put(f"/v1/instances/{inst['id']}/gateway/data/note", content=b"kept").status_code < 300
        refused = run(serve, "admin", "rotate-gateway-token", inst["id"], user=user)
        assert refused.exit_code != 0, refused.output
        rotated = run(serve, "admin", "rotate-gateway-token", inst["id"], "--json", user="root", role="admin")
        assert rotated.exit_code == 0, rotated.output
        assert json.loads(rotated.stdout)["id"] == inst["id"]
        events = run(serve, "admin", "events", "--instance", inst["id"], "--json", user="root", role="admin")
        assert "instance.gateway_token_rotated" in {e["event"] for e in json.loads(events.stdout)}, events.output
        serve.wait_status(client, inst["id"], "running")
        got = client.get(f"/v1/instances/{inst['id']}/gateway/data/note")
        assert got.status_code == 200 and got.content == b"kept", got.text
    audit = run(serve, "admin", "audit", "--instance", inst["id"], "--json", user="root", role="admin")
    assert "rotate_gateway_token" in {a["action"] for a in json.loads(audit.stdout)}, audit.output


def test_api_errors_become_messages_and_exit_codes(serve: Serve, user: str) -> None:
    inst = create(serve, user)
    forbidden = run(serve, "admin", "debug", inst["id"], user=user)
    assert forbidden.exit_code == 1 and "forbidden (403)" in forbidden.stderr
    missing = run(serve, "instances", "show", "ins_doesnotexist", user=user)
    assert missing.exit_code == 1 and "instance_not_found (404)" in missing.stderr
    other = run(serve, "instances", "stop", inst["id"], user="someone-else")
    assert other.exit_code == 1 and "(404)" in other.stderr
    no_token = run(serve, "instances", "list", token=None)
    assert no_token.exit_code == 1 and "unauthorized (401)" in no_token.stderr and "sandkeep token" in no_token.stderr
    as_json = run(serve, "instances", "show", "ins_nope", "--json", user=user)
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"]["status"] == 404
    bad_pair = run(serve, "instances", "create", "--env", "NOEQUALS", user=user)
    assert bad_pair.exit_code == 2 and "NAME=VALUE" in bad_pair.output
    unreachable = run(serve, "instances", "list", url=f"http://127.0.0.1:{free_port()}", user=user)
    assert unreachable.exit_code == 3 and "cannot reach" in unreachable.stderr


def test_busy_409_is_reported(serve: Serve, user: str) -> None:
    # hold the new instance in `starting`: the host answers machine creates 2 s late while this rule exists
    rule = serve.host("POST", "/_local/faults", json={"operation": "machine.create", "latency": 2.0})
    assert rule.status_code < 300, rule.text
    try:
        created = run(serve, "instances", "create", "--json", user=user)
        inst = json.loads(created.stdout)
        assert inst["busy"] is True, inst
        res = run(serve, "instances", "restart", inst["id"], user=user)
        assert res.exit_code == 1, res.output
        assert "instance_busy (409)" in res.stderr
        as_json = run(serve, "instances", "stop", inst["id"], "--json", user=user)
        assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"]["code"] == "instance_busy"
    finally:
        serve.host("DELETE", "/_local/faults")


def test_console_script_entry_point(serve: Serve, user: str) -> None:
    env = {**os.environ, "SANDKEEP_URL": serve.url, "SANDKEEP_TOKEN": serve.token(user)}
    out = subprocess.run([sys.executable, "-m", "sandkeep", "instances", "list", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_admin_lists_orphans(serve: Serve) -> None:
    from datetime import timedelta

    from sandkeep.store.records import OrphanRecord

    store = serve.credentials.store  # serve's database
    now = datetime.now(UTC)
    app = f"sk-cli-{uuid.uuid4().hex[:8]}"
    store.record_orphans(app, [OrphanRecord(app_name=app, kind="volume", resource_id="vol_leftover",
                                            instance_id="ins_gone", region="lcl-a", reason="instance destroyed",
                                            first_seen_at=now, last_seen_at=now)], now)
    try:
        refused = run(serve, "admin", "orphans", user="cli-user")
        assert refused.exit_code != 0 and "admin" in refused.output, refused.output
        listed = run(serve, "admin", "orphans", user="root", role="admin")
        assert listed.exit_code == 0, listed.output
        assert "DELETES AT" in listed.output and "vol_leftover" in listed.output and app in listed.output
        items = json.loads(run(serve, "admin", "orphans", "--json", user="root", role="admin").stdout)
        mine = next(o for o in items if o["app_name"] == app)
        assert mine["kind"] == "volume" and mine["instance_id"] == "ins_gone" and mine["region"] == "lcl-a"
        first = datetime.fromisoformat(mine["first_seen_at"].replace("Z", "+00:00"))
        deletes = datetime.fromisoformat(mine["deletes_at"].replace("Z", "+00:00"))
        assert deletes - first == timedelta(days=1)  # the default SANDKEEP_ORPHAN_GRACE
    finally:
        store.record_orphans(app, [], now)
