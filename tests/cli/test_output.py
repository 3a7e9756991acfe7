"""`-o json|yaml|wide` and the narrow per-instance events table, against a real `sandkeep serve`."""

from __future__ import annotations

import json
import uuid

import yaml

from tests.cli.test_cli import create, run
from tests.e2e.serving import Serve


def test_output_formats_of_list_and_show(serve: Serve) -> None:
    user = f"cli-{uuid.uuid4().hex[:8]}"
    inst = create(serve, user)

    as_yaml = run(serve, "instances", "show", inst["id"], "-o", "yaml", user=user)
    assert as_yaml.exit_code == 0, as_yaml.output
    assert yaml.safe_load(as_yaml.stdout)["id"] == inst["id"]
    as_json = run(serve, "instances", "list", "-o", "json", user=user)
    assert [i["id"] for i in json.loads(as_json.stdout)] == [inst["id"]]
    listed_yaml = yaml.safe_load(run(serve, "instances", "list", "--output", "yaml", user=user).stdout)
    assert listed_yaml[0]["machine_id"] == inst["machine_id"]

    narrow = run(serve, "instances", "list", user=user).stdout
    wide = run(serve, "instances", "list", "-o", "wide", user=user).stdout
    assert "APP" not in narrow.splitlines()[0] and inst["app_name"] not in narrow
    header = wide.splitlines()[0].split()
    assert {"APP", "MACHINE", "SIZE", "CREATED"} <= set(header)
    assert inst["app_name"] in wide and inst["machine_id"] in wide  # what to crash, in one listing

    clash = run(serve, "instances", "list", "--json", "-o", "yaml", user=user)
    assert clash.exit_code == 2 and "disagree" in clash.output


def test_instance_events_table_is_narrow_and_wide_on_request(serve: Serve) -> None:
    user = f"cli-{uuid.uuid4().hex[:8]}"
    inst = create(serve, user)
    narrow = run(serve, "instances", "events", inst["id"], user=user)
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    assert lines[0].split() == ["WHEN", "EVENT", "STATUS", "LABEL", "REGION", "MS", "ERROR"]
    assert inst["id"] not in narrow.stdout and any(" ago" in line for line in lines[1:])
    assert any(line.split()[2] == "started" or "started" in line for line in lines[1:])
    wide = run(serve, "instances", "events", inst["id"], "-o", "wide", user=user)
    assert "INSTANCE" in wide.stdout.splitlines()[0] and inst["id"] in wide.stdout
    assert max(len(line) for line in lines) < max(len(line) for line in wide.stdout.splitlines())


def test_names_labels_and_guest_from_create_to_list_show_and_update(serve: Serve) -> None:
    user = f"cli-{uuid.uuid4().hex[:8]}"
    made = run(serve, "instances", "create", "--json", "--name", "dev-box", "--label", "team=ml", "--label",
               "tier=gold", "--cpus", "2", "--memory", "1024", user=user)
    assert made.exit_code == 0, made.output
    inst = json.loads(made.stdout)
    assert inst["name"] == "dev-box" and inst["labels"] == {"team": "ml", "tier": "gold"}
    assert inst["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024}

    narrow = run(serve, "instances", "list", user=user).stdout.splitlines()
    assert narrow[0].split()[:2] == ["ID", "NAME"] and narrow[1].split()[:2] == [inst["id"], "dev-box"]
    wide = run(serve, "instances", "list", "-o", "wide", user=user).stdout
    assert {"NAME", "GUEST", "LABELS"} <= set(wide.splitlines()[0].split())
    assert "team=ml,tier=gold" in wide and "2x shared 1024MB" in wide
    shown = run(serve, "instances", "show", inst["id"], user=user).stdout
    assert "dev-box" in shown and "team=ml,tier=gold" in shown

    changed = run(serve, "instances", "update", inst["id"], "--json", "--name", "renamed", "--label", "env=prod",
                  user=user)
    assert changed.exit_code == 0, changed.output
    assert json.loads(changed.stdout)["labels"] == {"env": "prod"}
    bad = run(serve, "instances", "update", inst["id"], "--label", "Bad Key=x", user=user)
    assert bad.exit_code != 0 and "invalid_labels" in bad.output
    half = run(serve, "instances", "create", "--cpus", "2", user=user)
    assert half.exit_code == 2 and "--memory" in half.output
