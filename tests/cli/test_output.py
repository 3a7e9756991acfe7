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
