"""Hosts inside regions (SPEC §15, issue 12 §1): zones, host death, reboot and return, restore sizing.

Runs against both machine runners (real processes and simulated machines) through ``fapi``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from sandkeep.provider.errors import HostUnavailableError, InvalidRequestError, classify
from tests.host.conftest import Api
from tests.support.procs import running_host


def _hosts(fapi: Api, region: str | None = None) -> list[dict[str, Any]]:
    path = "/_local/hosts" + (f"?region={region}" if region else "")
    return fapi.local("GET", path)["hosts"]  # type: ignore[no-any-return]


def _host_unavailable(fapi: Api, method: str, path: str, **kw: Any) -> dict[str, Any]:
    """The request fails with the 412 the client classifies as HostUnavailableError."""
    r = fapi.raw(method, path, **kw)
    assert r.status_code == 412, f"{method} {path} -> {r.status_code} {r.text}"
    assert isinstance(classify(r.status_code, r.text), HostUnavailableError), r.text
    return r.json()  # type: ignore[no-any-return]


def test_every_region_has_hosts_and_volumes_name_theirs(fapi: Api) -> None:
    hosts = _hosts(fapi)
    assert {h["name"] for h in hosts} == {f"{r}-z{n}" for r in ("lcl-a", "lcl-b", "lcl-c") for n in (1, 2, 3)}
    assert all(h["host_status"] == "ok" and h["dead"] is False for h in hosts)
    assert {h["name"] for h in _hosts(fapi, "lcl-b")} == {"lcl-b-z1", "lcl-b-z2", "lcl-b-z3"}
    fapi.local("GET", "/_local/hosts?region=nowhere", 422)
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-a")
    assert vol["zone"] in {"lcl-a-z1", "lcl-a-z2", "lcl-a-z3"}
    m = fapi.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    by_name = {h["name"]: h for h in _hosts(fapi, "lcl-a")}
    assert m["id"] in by_name[vol["zone"]]["machines"] and vol["id"] in by_name[vol["zone"]]["volumes"]
    fork = fapi.call("POST", f"/v1/apps/{app}/volumes", 200,
                     json={"name": "data", "region": "lcl-a", "source_volume_id": vol["id"]})
    assert fork["zone"] != vol["zone"] and fork["zone"].startswith("lcl-a-"), "a fork lands on another host"


def test_a_dead_host_freezes_its_machines_and_they_resume_when_it_returns(fapi: Api) -> None:
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-b")
    spare = fapi.volume(app, "lcl-b", name="spare")
    m = fapi.machine(app, volume=vol["id"])
    fapi.put_key(m["id"], "k", b"written before the host died")
    pid = fapi.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
    snap = fapi.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    other = fapi.machine(app, region="lcl-c")

    died = fapi.local("POST", f"/_local/hosts/{vol['zone']}/die")
    assert died["dead"] is True and died["host_status"] == "unreachable" and m["id"] in died["machines"]
    if spare["zone"] != vol["zone"]:
        fapi.local("POST", f"/_local/hosts/{spare['zone']}/die")
    got = fapi.get(app, m["id"])
    assert got["state"] == "started" and got["host_status"] == "unreachable", "its last state, unreachable"
    assert fapi.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["host_status"] == "unreachable"
    r = fapi.get_key(m["id"], "k")
    assert r.status_code == 503 and "unreachable" in r.text, "its gateway does not answer through the proxy"
    # its volumes cannot be forked, attached or snapshotted; actions on its machine fail as Fly's do
    body = _host_unavailable(fapi, "POST", f"/v1/apps/{app}/volumes",
                             json={"name": "data", "region": "lcl-c", "source_volume_id": vol["id"]})
    assert "cannot fork volume" in body["error"]
    _host_unavailable(fapi, "POST", f"/v1/apps/{app}/machines",
                      json={"config": {"image": "sandkeep/gateway", "mounts": [{"volume": spare["id"],
                                                                                 "path": "/data"}]}})
    _host_unavailable(fapi, "POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots")
    base = f"/v1/apps/{app}/machines/{m['id']}"
    for method, path in (("POST", f"{base}/stop"), ("POST", f"{base}/start"), ("POST", f"{base}/restart"),
                         ("DELETE", f"{base}?force=true"), ("GET", f"{base}/wait?state=stopped&timeout=1")):
        _host_unavailable(fapi, method, path)
    _host_unavailable(fapi, "POST", base, json={"config": {"image": "sandkeep/gateway"}})
    assert fapi.get(app, m["id"])["state"] == "started"
    # the rest of the world goes on: another region's machine answers, snapshots restore elsewhere
    assert fapi.proxy.get("/health", headers={"fly-force-instance-id": other["id"]}).status_code == 200
    restored = fapi.call("POST", f"/v1/apps/{app}/volumes", 200,
                         json={"name": "data", "region": "lcl-c", "snapshot_id": snap["id"]})
    assert fapi.get_key(fapi.machine(app, volume=restored["id"])["id"], "k").content == \
        b"written before the host died"

    back = fapi.local("POST", f"/_local/hosts/{vol['zone']}/return")
    assert back["dead"] is False and back["host_status"] == "ok"
    got = fapi.get(app, m["id"])
    assert got["state"] == "started" and got["host_status"] == "ok"
    assert fapi.get_key(m["id"], "k").content == b"written before the host died", "on the old volume"
    health = fapi.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()
    assert health["pid"] == pid, "the same machine resumed: not a restart"
    fapi.call("POST", f"{base}/stop", 200)
    fapi.wait(app, m["id"], "stopped")


def test_a_host_reboot_stops_its_machines_and_keeps_its_volumes(fapi: Api) -> None:
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-a")
    m = fapi.machine(app, volume=vol["id"])
    fapi.put_key(m["id"], "k", b"kept")
    out = fapi.local("POST", f"/_local/hosts/{vol['zone']}/reboot")
    assert out["dead"] is False
    fapi.wait(app, m["id"], "stopped")
    ev = fapi.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]
    assert ev["type"] == "exit" and ev["request"]["exit_code"] == 137 and ev["request"]["requested_stop"] is False
    assert fapi.get(app, m["id"])["host_status"] == "ok"
    fapi.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
    fapi.wait(app, m["id"], "started")
    assert fapi.get_key(m["id"], "k").content == b"kept"
    fapi.local("POST", "/_local/hosts/lcl-a-z99/reboot", 404)
    fapi.local("POST", "/_local/hosts/nowhere/die", 404)
    fapi.local("POST", f"/_local/hosts/{vol['zone']}/die", 400, json={"host_status": "gone"})


def test_a_dead_host_may_report_host_status_unknown(fapi: Api) -> None:
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-c")
    m = fapi.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    fapi.local("POST", f"/_local/hosts/{vol['zone']}/die", json={"host_status": "unknown"})
    assert fapi.get(app, m["id"])["host_status"] == "unknown"
    assert fapi.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["host_status"] == "unknown"
    _host_unavailable(fapi, "POST", f"/v1/apps/{app}/machines/{m['id']}/start")
    fapi.local("POST", f"/_local/hosts/{vol['zone']}/return")
    assert fapi.get(app, m["id"])["host_status"] == "ok"


def test_a_region_outage_is_every_host_of_the_region_down(fapi: Api) -> None:
    fapi.local("POST", "/_local/regions/lcl-c/outage", json={"down": True})
    assert {h["host_status"] for h in _hosts(fapi, "lcl-c")} == {"unreachable"}
    assert {h["host_status"] for h in _hosts(fapi, "lcl-b")} == {"ok"}
    fapi.local("POST", "/_local/regions/lcl-c/outage", json={"down": False})
    assert {h["host_status"] for h in _hosts(fapi, "lcl-c")} == {"ok"}


def test_a_region_whose_hosts_all_died_has_no_capacity(fapi: Api) -> None:
    app = fapi.new_app()
    for h in _hosts(fapi, "lcl-a"):
        fapi.local("POST", f"/_local/hosts/{h['name']}/die")
    err = fapi.call("POST", f"/v1/apps/{app}/volumes", 400, json={"name": "d", "region": "lcl-a"})
    assert "no capacity" in err["error"]
    fapi.call("POST", f"/v1/apps/{app}/machines", 412,
              json={"region": "lcl-a", "config": {"image": "sandkeep/gateway"}})
    fapi.volume(app, "lcl-b")


def test_a_snapshot_restores_only_into_a_volume_at_least_as_large_as_its_source(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-a", size_gb=3)
    snap = api.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    r = api.raw("POST", f"/v1/apps/{app}/volumes",
                json={"name": "data", "region": "lcl-b", "snapshot_id": snap["id"], "size_gb": 2})
    assert r.status_code == 400 and "3 GB" in r.json()["error"], r.text
    assert isinstance(classify(r.status_code, r.text), InvalidRequestError)
    assert [v["id"] for v in api.call("GET", f"/v1/apps/{app}/volumes", 200)] == [vol["id"]], "nothing made"
    same = api.call("POST", f"/v1/apps/{app}/volumes", 200,
                    json={"name": "data", "region": "lcl-b", "snapshot_id": snap["id"], "size_gb": 3})
    unsized = api.call("POST", f"/v1/apps/{app}/volumes", 200,
                       json={"name": "data", "region": "lcl-b", "snapshot_id": snap["id"]})
    assert same["size_gb"] == unsized["size_gb"] == 3


def test_simulated_data_survives_a_host_crash_and_a_process_host_reads_it(tmp_path: Path) -> None:
    """The simulated gateway keeps data where the real one does: restart the host with real processes."""
    data = tmp_path / "host"
    with running_host(data, extra_args=["--machines", "sim"]) as handle:
        api = Api(handle)
        app = api.new_app()
        vol = api.volume(app, "lcl-b")
        m = api.machine(app, volume=vol["id"])
        api.put_key(m["id"], "k", b"written by a simulated machine")
        api.close()
        handle.proc.stop(signal.SIGKILL)
    with running_host(data) as handle:
        api = Api(handle)
        assert api.get(app, m["id"])["state"] == "stopped", "a host restart stops its machines"
        api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
        api.wait(app, m["id"], "started")
        assert api.get_key(m["id"], "k").content == b"written by a simulated machine"
        pid = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
        os.kill(pid, 0)  # now a real process
        api.cleanup()
        api.close()
