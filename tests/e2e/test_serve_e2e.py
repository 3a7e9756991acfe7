"""End to end against a real `sandkeep serve` (API + engine + local host child + real gateway processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.serving import Serve
from tests.support.wait import wait_until


def _user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def _create_running(serve: Serve, client: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/instances", json=body)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["status"] in ("provisioned", "starting", "running")
    return serve.wait_status(client, created["id"], "running")


def test_create_runs_and_the_gateway_proxy_round_trips_data(serve: Serve) -> None:
    user = _user()
    with serve.client(user) as client:
        inst = _create_running(serve, client, env={"GREETING": "hi"}, secrets={"API_KEY": "s3cr3t-value"})
        assert inst["user_id"] == user and inst["machine_id"] and inst["volume_id"] and inst["region"]
        assert inst["secret_names"] == ["API_KEY"] and "s3cr3t-value" not in str(inst)
        put = client.put(f"/v1/instances/{inst['id']}/gateway/data/notes.txt", content=b"hello sandkeep")
        assert put.status_code in (200, 201, 204), put.text
        got = client.get(f"/v1/instances/{inst['id']}/gateway/data/notes.txt")
        assert got.status_code == 200 and got.content == b"hello sandkeep"
        missing = client.get(f"/v1/instances/{inst['id']}/gateway/data/absent.txt")
        assert missing.status_code == 404
        big = os.urandom(3 * 1024 * 1024)  # larger than the API's JSON body limit: gateway traffic streams through
        assert client.put(f"/v1/instances/{inst['id']}/gateway/data/big.bin", content=big).status_code < 300
        assert client.get(f"/v1/instances/{inst['id']}/gateway/data/big.bin").content == big
    with serve.client(_user()) as stranger:
        assert stranger.get(f"/v1/instances/{inst['id']}/gateway/data/notes.txt").status_code == 404


def test_crash_recovers_onto_a_new_machine_with_the_data_intact(serve: Serve) -> None:
    user = _user()
    with serve.client(user) as client, serve.client("ops", "admin") as admin:
        inst = _create_running(serve, client)
        assert client.put(f"/v1/instances/{inst['id']}/gateway/data/keep.txt", content=b"precious").status_code < 300

        crash = serve.host("POST", f"/_local/apps/{inst['app_name']}/machines/{inst['machine_id']}/crash")
        assert crash.status_code < 300, crash.text

        def recovered() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/instances/{inst['id']}").json()
            return body if body["status"] == "running" and body["machine_id"] != inst["machine_id"] else None

        after = wait_until(recovered, timeout=90, message="recovery back to running on a new machine")
        assert after["volume_id"] != inst["volume_id"]
        assert after["region"] != inst["region"]  # 3 regions: the old one is excluded
        assert after["recovery"]["started_at"] is None and after["recovery"]["last_error"] is None
        got = client.get(f"/v1/instances/{inst['id']}/gateway/data/keep.txt")
        assert got.status_code == 200 and got.content == b"precious"

        names = [e["event"] for e in client.get(f"/v1/instances/{inst['id']}/events?limit=500").json()["items"]]
        assert "instance.unexpected_stop_recovery_started" in names
        assert "instance.unexpected_stop_recovery_succeeded" in names
        fleet = admin.get("/v1/events", params={"name": "instance.unexpected_stop_recovery_succeeded"}).json()
        assert inst["id"] in {e["instance_id"] for e in fleet["items"]}
        debug = admin.get(f"/v1/instances/{inst['id']}/debug").json()
        assert "alarm_at" in debug and debug["status"] == "running"


def test_gateway_answers_503_with_retry_after_while_stopped(serve: Serve) -> None:
    with serve.client(_user()) as client:
        inst = _create_running(serve, client)
        assert client.post(f"/v1/instances/{inst['id']}/stop").status_code == 202
        serve.wait_status(client, inst["id"], "stopped")
        resp = client.get(f"/v1/instances/{inst['id']}/gateway/health")
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["details"]["instance_status"] == "stopped"


def test_busy_instance_refuses_user_actions_with_409(serve: Serve) -> None:
    with serve.client(_user()) as client:
        seen: list[dict[str, Any]] = []
        for _ in range(3):
            created = client.post("/v1/instances", json={}).json()
            if not created["busy"]:
                continue
            resp = client.post(f"/v1/instances/{created['id']}/restart")
            if resp.status_code == 409:
                seen.append(resp.json())
                break
        assert seen, "never caught an instance while busy"
        err = seen[0]["error"]
        assert err["code"] == "instance_busy" and err["status"] == 409 and err["message"]


def test_destroy_removes_machine_and_volume(serve: Serve) -> None:
    with serve.client(_user()) as client:
        inst = _create_running(serve, client)
        resp = client.delete(f"/v1/instances/{inst['id']}")
        assert resp.status_code == 202 and resp.json()["status"] in ("destroying", "destroyed")

        def gone() -> bool:
            r = client.get(f"/v1/instances/{inst['id']}")
            return r.status_code == 404 or r.json()["status"] == "destroyed"

        wait_until(gone, timeout=60, message="instance destroyed")
        vols = serve.host("GET", f"/v1/apps/{inst['app_name']}/volumes").json()
        assert inst["volume_id"] not in {v["id"] for v in vols if v.get("state") not in ("destroyed", "deleted")}
        machine = serve.host("GET", f"/v1/apps/{inst['app_name']}/machines/{inst['machine_id']}")
        assert machine.status_code == 404 or machine.json()["state"] == "destroyed"


def test_real_server_errors_have_the_standard_shape(serve: Serve) -> None:
    no_token = httpx.get(f"{serve.url}/v1/instances", timeout=10)
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "unauthorized"
    bad = httpx.post(f"{serve.url}/v1/instances", content=b"{oops", headers={**serve.headers("x"),
                                                                             "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    cursor = httpx.get(f"{serve.url}/v1/instances?cursor=bogus", headers=serve.headers("x"))
    assert cursor.status_code == 400 and "cursor" in cursor.json()["error"]["message"]
    assert httpx.get(f"{serve.url}/metrics").status_code == 200


def test_token_command_uses_the_same_secret_as_serve(serve: Serve, tmp_path: Path) -> None:
    env = {**os.environ, "SANDKEEP_JWT_SECRET": serve.secret}
    # the token's id is recorded in serve's database (found through serve's data dir), or serve refuses it
    out = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "tok-user", "--ttl", "60",
                          "--data-dir", str(serve.data_dir)],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    token = out.stdout.strip()
    ok = httpx.get(f"{serve.url}/v1/instances", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200

    env.pop("SANDKEEP_JWT_SECRET")
    other = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "tok-user", "--data-dir",
                            str(tmp_path / "elsewhere")], env=env, capture_output=True, text=True, timeout=60,
                           check=True)
    assert (tmp_path / "elsewhere" / "jwt-secret").stat().st_mode & 0o777 == 0o600
    denied = httpx.get(f"{serve.url}/v1/instances", headers={"Authorization": f"Bearer {other.stdout.strip()}"})
    assert denied.status_code == 401
    bad = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "bad user!", "--data-dir",
                          str(tmp_path / "elsewhere")], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid user id" in bad.stderr


def test_authorization_against_the_real_service(serve: Serve) -> None:
    owner, stranger = _user(), _user()
    with serve.client(owner) as client:
        inst = _create_running(serve, client)
    iid = inst["id"]
    routes = [("GET", f"/v1/instances/{iid}"), ("PATCH", f"/v1/instances/{iid}"), ("DELETE", f"/v1/instances/{iid}"),
              ("POST", f"/v1/instances/{iid}/start"), ("POST", f"/v1/instances/{iid}/stop"),
              ("POST", f"/v1/instances/{iid}/restart"), ("GET", f"/v1/instances/{iid}/events"),
              ("GET", f"/v1/instances/{iid}/gateway/health")]
    admin_routes = [("GET", f"/v1/instances/{iid}/debug"), ("POST", f"/v1/instances/{iid}/recovery/retry"),
                    ("POST", f"/v1/instances/{iid}/retained-volume/cleanup"),
                    ("POST", f"/v1/instances/{iid}/machine/destroy"), ("GET", "/v1/events"), ("GET", "/v1/audit")]
    with serve.client(stranger) as other, serve.client("backend", "platform") as platform:
        for method, path in routes:
            body = {"env": {"X": "1"}} if method == "PATCH" else None
            resp = other.request(method, path, json=body)
            assert resp.status_code == 404, (method, path, resp.text)
        for method, path in admin_routes:
            assert other.request(method, path).status_code == 403, (method, path)
            assert platform.request(method, path).status_code == 403, (method, path)
        assert platform.get(f"/v1/instances/{iid}").status_code == 200
        assert platform.get(f"/v1/instances/{iid}/gateway/health").status_code == 403
        made = platform.post("/v1/instances", json={"user_id": stranger})
        assert made.status_code == 201 and made.json()["user_id"] == stranger
        for method, path in routes + admin_routes:
            assert httpx.request(method, f"{serve.url}{path}").status_code == 401
    with serve.client(owner) as client:
        after = client.get(f"/v1/instances/{iid}").json()
    assert after["status"] == "running" and after["machine_id"] == inst["machine_id"] and after["env"] == {}
