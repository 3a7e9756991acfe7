"""Idempotency-Key on create, through the API and the CLI of a real `sandkeep serve`."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

from tests.cli.test_cli import run
from tests.e2e.serving import Serve


def test_a_retried_create_with_the_same_key_returns_the_first_instance(serve: Serve) -> None:
    user, other = f"idem-{uuid.uuid4().hex[:8]}", f"idem-{uuid.uuid4().hex[:8]}"
    key = f"req-{uuid.uuid4().hex}"
    with serve.client(user) as client, serve.client(other) as other_client:
        first = client.post("/v1/instances", json={}, headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        again = client.post("/v1/instances", json={}, headers={"Idempotency-Key": key})
        assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
        theirs = other_client.post("/v1/instances", json={}, headers={"Idempotency-Key": key})
        assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]  # keys are per caller
        fresh = client.post("/v1/instances", json={}, headers={"Idempotency-Key": key + "-2"})
        assert fresh.json()["id"] != first.json()["id"]
        listed = client.get("/v1/instances").json()["items"]
        assert sorted(i["id"] for i in listed) == sorted([first.json()["id"], fresh.json()["id"]])
        for bad in ("", "has space", "x" * 201, "ü"):
            resp = client.post("/v1/instances", json={}, headers={"Idempotency-Key": bad.encode()})
            assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error", (bad, resp.text)


def test_concurrent_creates_with_one_key_make_one_instance(serve: Serve) -> None:
    user = f"idem-{uuid.uuid4().hex[:8]}"
    key = f"burst-{uuid.uuid4().hex}"

    def create() -> str:
        with serve.client(user) as client:
            resp = client.post("/v1/instances", json={}, headers={"Idempotency-Key": key})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(lambda _: create(), range(4)))
    assert len(set(ids)) == 1
    with serve.client(user) as client:
        assert [i["id"] for i in client.get("/v1/instances").json()["items"]] == ids[:1]


def test_the_cli_sends_the_key(serve: Serve) -> None:
    user = f"idem-{uuid.uuid4().hex[:8]}"
    key = f"cli-{uuid.uuid4().hex}"
    one = run(serve, "instances", "create", "--idempotency-key", key, "-o", "json", user=user)
    two = run(serve, "instances", "create", "--idempotency-key", key, "-o", "json", user=user)
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert json.loads(one.stdout)["id"] == json.loads(two.stdout)["id"]
