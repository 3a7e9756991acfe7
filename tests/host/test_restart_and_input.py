"""Host restart, the token, and bad input (never a 500, the host stays healthy)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
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
        restored = api.call("POST", f"/v1/apps/{app}/volumes", 200,
                            json={"name": "restored", "region": "lcl-a", "snapshot_id": snap["id"]})
        restored_file = data / "regions" / "lcl-a" / "volumes" / restored["id"] / "data" / "k"
        assert restored_file.read_bytes() == b"survives", "the snapshot's data survived the restart"
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


UNKNOWN_MACHINE = "/machines/00000000000000"
BAD_BODIES: list[tuple[str, str, object, int]] = [
    ("POST", "/machines", "{not json", 400),
    ("POST", "/machines", "[1, 2]", 400),
    ("POST", "/machines", "[" * 50_000 + "]" * 50_000, 400),  # nesting deeper than the parser's recursion
    ("POST", "/machines", b"\xff\xfe{}", 400),
    ("POST", "/machines", {"config": "gateway"}, 400),
    ("POST", "/machines", {"config": {}}, 422),
    ("POST", "/machines", {"config": {"image": 5}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "env": {"A": 1}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "env": []}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "metadata": {"k": ["v"]}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "guest": {"cpus": "two"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "mounts": {"volume": "x"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "mounts": [{"path": "/d"}]}}, 422),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "mounts": [{"volume": "v", "size_gb": "9"}]}},
     400),
    # fields Fly defines that the local host does not act on are still type-checked, as Fly's decoder does
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "schedule": 5}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "init": {"cmd": "echo hi"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway", "restart": {"max_retries": "3"}}}, 400),
    ("POST", "/machines", {"config": {"image": "sandkeep/gateway"}, "lease_ttl": "10s"}, 400),
    ("POST", "/machines", {"region": "mars", "config": {"image": "sandkeep/gateway"}}, 422),
    ("POST", "/machines", {"region": 7, "config": {"image": "sandkeep/gateway"}}, 400),
    ("POST", "/machines", {"skip_launch": "yes", "config": {"image": "sandkeep/gateway"}}, 400),
    ("POST", "/machines", {"name": 12, "config": {"image": "sandkeep/gateway"}}, 400),
    ("POST", "/machines", {"name": "x" * 64, "config": {"image": "sandkeep/gateway"}}, 422),
    ("POST", "/volumes", "", 400),
    ("POST", "/volumes", "{", 400),
    ("POST", "/volumes", {"name": "d"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "size_gb": "1"}, 400),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "size_gb": 0}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "size_gb": 10**30}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "encrypted": "yes"}, 400),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "compute": {"memory_mb": "lots"}}, 400),
    ("POST", "/volumes", {"name": "bad-name!", "region": "lcl-a"}, 422),
    ("POST", "/volumes", {"name": "d" * 31, "region": "lcl-a"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "nowhere"}, 422),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "source_volume_id": 3}, 400),
    ("POST", "/volumes", {"name": "d", "region": "lcl-a", "source_volume_id": "vol_a", "snapshot_id": "vs_b"}, 422),
    ("GET", "/machines?include_deleted=maybe", None, 400),
    ("GET", UNKNOWN_MACHINE, None, 404),
    ("POST", UNKNOWN_MACHINE, {"config": {"image": "sandkeep/gateway"}}, 404),
    ("GET", UNKNOWN_MACHINE + "/events", None, 404),
    ("GET", UNKNOWN_MACHINE + "/wait", None, 404),
    ("GET", UNKNOWN_MACHINE + "/metadata", None, 404),
    ("POST", UNKNOWN_MACHINE + "/metadata/k", {"value": "v"}, 404),
    ("DELETE", UNKNOWN_MACHINE + "/metadata/k", None, 404),
    ("POST", UNKNOWN_MACHINE + "/start", None, 404),
    ("POST", UNKNOWN_MACHINE + "/stop", None, 404),
    ("POST", UNKNOWN_MACHINE + "/restart", None, 404),
    ("DELETE", UNKNOWN_MACHINE, None, 404),
    ("GET", "/volumes/vol_nope", None, 404),
    ("DELETE", "/volumes/vol_nope", None, 404),
    ("GET", "/volumes/vol_nope/snapshots", None, 404),
    ("POST", "/volumes/vol_nope/snapshots", None, 404),
]

BAD_LOCAL: list[tuple[str, str, object, int]] = [
    ("POST", "/_local/regions/lcl-a/outage", "{", 400),
    ("POST", "/_local/regions/lcl-a/outage", "[]", 400),
    ("POST", "/_local/regions/lcl-a/outage", {"down": 1}, 400),
    ("POST", "/_local/regions/lcl-a/outage", None, 400),
    ("POST", "/_local/regions/mars/outage", {"down": True}, 404),
    ("POST", "/_local/regions/lcl-a/capacity", "{", 400),
    ("POST", "/_local/regions/lcl-a/capacity", {"available": "no"}, 400),
    ("POST", "/_local/regions/mars/capacity", {"available": False}, 404),
    ("POST", "/_local/faults", "{", 400),
    ("POST", "/_local/faults", {"rules": "all"}, 400),
    ("POST", "/_local/faults", {"rules": [{"status": 503}, {"status": 200}]}, 400),
    ("POST", "/_local/faults", {"status": 503, "colour": "red"}, 400),
    ("POST", "/_local/faults", {"latency": -1}, 400),
    ("POST", "/_local/faults", {"status": 503, "seed": "x"}, 400),
    ("POST", "/_local/faults", {"status": 503, "phase": "during"}, 400),
    ("POST", "/_local/apps/no-such-app-xyz/machines/00000000000000/crash", None, 404),
    ("GET", "/_local/watch?since=-1", None, 400),
    ("GET", "/_local/watch?since=abc", None, 400),
    ("GET", "/_local/watch?timeout=nan", None, 400),
]


def _content(body: object) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


def _params(suffix: str) -> dict[str, str] | None:
    return dict([suffix.split("?")[1].split("=")]) if "?" in suffix else None


def test_bad_input_gets_clear_4xx_and_host_stays_healthy(api: Api) -> None:
    app = api.new_app()
    for method, suffix, body, expect in BAD_BODIES:
        path = f"/v1/apps/{app}{suffix}"
        err = api.call(method, path.split("?")[0], expect, content=_content(body), params=_params(suffix),
                       headers={"Content-Type": "application/json"})
        assert err["error"], (method, suffix)
    for method, path, body, expect in BAD_LOCAL:
        r = api.raw(method, path.split("?")[0], content=_content(body), params=_params(path),
                    headers={"Content-Type": "application/json"})
        assert r.status_code == expect, (method, path, r.status_code, r.text)
        assert r.json()["error"], (method, path)
    assert api.local("GET", "/_local/faults")["rules"] == [], "rejected fault bodies installed nothing"
    assert all(r["down"] is False and r["available"] is True for r in api.local("GET", "/_local/regions")["regions"])
    for method, path, body in (("POST", "/v1/apps", "{"), ("POST", "/v1/apps", {"app_name": 5}),
                               ("POST", "/v1/apps", {"app_name": "fine-name-1", "org_slug": 5})):
        api.call(method, path, 400, content=_content(body), headers={"Content-Type": "application/json"})
    api.call("GET", "/v1/apps/fine-name-1", 404)
    m = api.machine(app, wait=None, skip_launch=True)
    base = f"/v1/apps/{app}/machines/{m['id']}"
    api.call("POST", base + "/stop", 400, json={"signal": "SIGNOPE"})
    api.call("POST", base + "/stop", 400, json={"signal": 9})
    api.call("POST", base + "/stop", 400, json={"timeout": "soon"})
    api.call("POST", base + "/metadata/k", 400, content=b"{", headers={"Content-Type": "application/json"})
    api.call("POST", base + "/metadata/k", 400, json={"value": "v" * 70_000})
    api.call("POST", base + "/metadata/bad%20key", 400, json={"value": "v"})
    api.call("POST", base, 422, json={"config": {"image": "sandkeep/gateway"}, "region": "lcl-b"})
    api.call("POST", base, 422, json={"config": {"image": "unknown/image"}})
    api.call("POST", base, 400, json={"config": {"image": "sandkeep/gateway"}, "current_version": 3})
    api.call("POST", base, 400, json={"config": {"image": "sandkeep/gateway", "auto_destroy": "yes"}})
    assert api.raw("GET", "/v1/nothing-here").status_code == 501  # not implemented, never "gone" (404)
    assert api.raw("PUT", f"/v1/apps/{app}").status_code == 405
    got = api.get(app, m["id"])
    assert got["config"]["image"] == "sandkeep/gateway" and "auto_destroy" not in got["config"], \
        "failed updates changed nothing"
    assert api.call("GET", base + "/metadata", 200) == {}
    assert api.call("GET", f"/v1/apps/{app}/volumes", 200) == []
    assert httpx.get(api.handle.url + "/healthz").json()["status"] == "ok"
    assert "host.unhandled" not in api.handle.proc.log()


def test_oversized_bodies_get_413_and_the_host_stays_healthy(api: Api) -> None:
    app = api.new_app()
    big = json.dumps({"config": {"image": "sandkeep/gateway", "env": {"BIG": "x" * (1024 * 1024)}}}).encode()
    err = api.call("POST", f"/v1/apps/{app}/machines", 413, content=big, headers={"Content-Type": "application/json"})
    assert "too large" in err["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming too
        yield b'{"name": "d", "region": "lcl-a", "pad": "'
        for _ in range(24):
            yield b"y" * 65536
        yield b'"}'
    r = api.raw("POST", f"/v1/apps/{app}/volumes", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert api.call("GET", f"/v1/apps/{app}/machines", 200) == []
    assert api.call("GET", f"/v1/apps/{app}/volumes", 200) == []
    assert httpx.get(api.handle.url + "/healthz").json()["status"] == "ok"


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
