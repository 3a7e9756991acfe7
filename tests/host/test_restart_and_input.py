"""Host restart, the token, and bad input (never a 500, the host stays healthy)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx

from tests.host.conftest import Api
from tests.support.procs import free_port, running_host, spawn
from tests.support.wait import wait_until


def test_restart_keeps_volumes_snapshots_and_stops_machines(tmp_path: Path) -> None:
    data = tmp_path / "host"
    with running_host(data) as handle:
        api = Api(handle)
        app = api.new_app()
        vol = api.volume(app, "lcl-c")
        m = api.machine(app, volume=vol["id"])
        idle = api.machine(app, wait=None, skip_launch=True)
        api.put_key(m["id"], "k", b"survives")
        snap = api.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
        pid = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
        api.close()
        handle.proc.stop(signal.SIGKILL)  # a host crash, not a clean shutdown

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_until(gone, timeout=10, message="machine process died with its host")
    with running_host(data) as handle:
        api = Api(handle)
        got = api.get(app, m["id"])
        assert got["state"] == "stopped"
        ev = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]
        assert ev["type"] == "exit" and ev["request"]["requested_stop"] is False
        assert api.get(app, idle["id"])["state"] == "created"
        assert api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["attached_machine_id"] == m["id"]
        assert [s["id"] for s in api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)] == [
            snap["id"]]
        api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
        api.wait(app, m["id"], "started")
        assert api.get_key(m["id"], "k").content == b"survives"
        api.close()


def test_token_generated_once_and_required(tmp_path: Path) -> None:
    data = tmp_path / "host"
    port, proxy_port = free_port(), free_port()
    proc = spawn(["host", "--listen", f"127.0.0.1:{port}", "--proxy-listen", f"127.0.0.1:{proxy_port}",
                  "--data-dir", str(data)], log_path=tmp_path / "host.log", env={"SANDKEEP_HOST_TOKEN": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, timeout=30, message="host up")
        token_file = data / "token"
        assert str(token_file) in proc.log()
        token = token_file.read_text().strip()
        assert len(token) >= 32 and (token_file.stat().st_mode & 0o777) == 0o600
        for path in ("/v1/apps", "/_local/faults", "/_local/watch"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["status"] == "unknown" and "token" in r.json()["error"]
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/v1/apps", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.stop()
    assert (data / "token").read_text().strip() == token


BAD_BODIES: list[tuple[str, str, object, int]] = [
    ("POST", "/machines", "{not json", 400),
    ("POST", "/machines", "[1, 2]", 400),
    ("POST", "/machines", {"config": "gateway"}, 400),
    ("POST", "/machines", {"config": {}}, 422),
    ("POST", "/machines", {"config": {"image": 5}}, 422),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "env": {"A": 1}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "env": []}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "guest": {"cpus": "two"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "mounts": {"volume": "x"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "mounts": [{"path": "/d"}]}}, 422),
    ("POST", "/machines", {"region": "mars", "config": {"image": "sandkeep/gateway"}}, 422),
    ("POST", "/machines", {"region": 7, "config": {"image": "sandkeep/gateway"}}, 400),
    ("POST", "/machines", {"skip_launch": "yes", "config": {"image": "sandkeep/gateway"}}, 400),
    ("POST", "/machines", {"name": 12, "config": {"image": "sandkeep/gateway"}}, 422),
    ("POST", "/volumes", "", 400),
    ("POST", "/volumes", {"name": "d"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "size_gb": "1"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "size_gb": 0}, 422),
    ("POST", "/volumes", {"name": "bad-name!", "region": "lcl-a"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "nowhere"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "source_volume_id": 3}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "source_volume_id": "vol_a", "snapshot_id": "vs_b"}, 422),
    ("GET", "/machines?include_deleted=maybe", None, 400),
    ("GET", "/machines/00000000000000", None, 404),
    ("GET", "/machines/00000000000000/events", None, 404),
    ("POST", "/machines/00000000000000/stop", None, 404),
    ("DELETE", "/machines/00000000000000", None, 404),
    ("GET", "/volumes/vol_nope", None, 404),
    ("GET", "/volumes/vol_nope/snapshots", None, 404),
    ("POST", "/volumes/vol_nope/snapshots", None, 404),
]


def test_bad_input_gets_clear_4xx_and_host_stays_healthy(api: Api) -> None:
    app = api.new_app()
    for method, suffix, body, expect in BAD_BODIES:
        content = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body else None)
        path = f"/v1/apps/{app}{suffix}"
        err = api.call(method, path.split("?")[0], expect, content=content,
                       params=dict([suffix.split("?")[1].split("=")]) if "?" in suffix else None,
                       headers={"Content-Type": "application/json"})
        assert err["error"], (method, suffix)
    m = api.machine(app, wait=None, skip_launch=True)
    base = f"/v1/apps/{app}/machines/{m['id']}"
    api.call("POST", base + "/stop", 400, json={"signal": "SIGNOPE"})
    api.call("POST", base + "/stop", 400, json={"timeout": "soon"})
    api.call("POST", base + "/metadata/k", 400, content=b"{", headers={"Content-Type": "application/json"})
    api.call("POST", base, 422, json={"config": {"image": "sandkeep/gateway"}, "region": "lcl-b"})
    api.call("POST", base, 422, json={"config": {"image": "unknown/image"}})
    assert api.raw("GET", "/v1/nothing-here").status_code == 404
    assert api.raw("PUT", f"/v1/apps/{app}").status_code == 405
    assert api.get(app, m["id"])["config"]["image"] == "sandkeep/gateway", "failed updates changed nothing"
    assert api.call("GET", f"/v1/apps/{app}/volumes", 200) == []
    assert httpx.get(api.handle.url + "/healthz").json()["status"] == "ok"
    assert "host.unhandled" not in api.handle.proc.log()


def test_fly_rate_limits_when_enabled(tmp_path: Path) -> None:
    with running_host(tmp_path / "host", extra_args=["--rate-limits"]) as handle:
        api = Api(handle)
        app = api.new_app()
        m = api.machine(app, wait=None, skip_launch=True)
        answers = [api.raw("POST", f"/v1/apps/{app}/machines/{m['id']}/stop") for _ in range(10)]
        assert [r.status_code for r in answers[:3]] == [200, 200, 200]  # Fly's burst of 3
        limited = [r for r in answers[3:] if r.status_code == 429]
        assert limited and float(limited[0].headers["retry-after"]) > 0
        assert "rate limit" in limited[0].json()["error"]
        assert api.raw("GET", f"/v1/apps/{app}/machines/{m['id']}").status_code == 200  # other actions unaffected
        api.close()
