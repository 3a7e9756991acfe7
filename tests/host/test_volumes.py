"""Volumes, forks, snapshots and the proxy against a real host process."""

from __future__ import annotations

from tests.host.conftest import Api


def test_volume_create_get_list_delete(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-c", name="my_data", snapshot_retention=3)
    assert vol["id"].startswith("vol_") and len(vol["id"]) == 20
    assert (vol["region"], vol["name"], vol["size_gb"], vol["host_status"]) == ("lcl-c", "my_data", 1, "ok")
    assert vol["attached_machine_id"] is None and vol["snapshot_retention"] == 3
    assert api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["id"] == vol["id"]
    assert [v["id"] for v in api.call("GET", f"/v1/apps/{app}/volumes", 200)] == [vol["id"]]
    deleted = api.call("DELETE", f"/v1/apps/{app}/volumes/{vol['id']}", 200)
    assert deleted["id"] == vol["id"]
    api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 404)
    api.call("DELETE", f"/v1/apps/{app}/volumes/{vol['id']}", 404)
    assert not (api.handle.data_dir / "regions" / "lcl-c" / "volumes" / vol["id"]).exists()


def test_delete_attached_volume_refused(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app)
    m = api.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    err = api.call("DELETE", f"/v1/apps/{app}/volumes/{vol['id']}", 412)
    assert err["error"] == f"failed_precondition: volume is currently bound to machine: {m['id']}"
    api.call("DELETE", f"/v1/apps/{app}/machines/{m['id']}", 200)
    api.call("DELETE", f"/v1/apps/{app}/volumes/{vol['id']}", 200)


def test_one_volume_per_machine_same_region(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-b")
    err = api.call("POST", f"/v1/apps/{app}/machines", 422,
                   json={"region": "lcl-a", "config": {"image": "sandkeep/gateway",
                                                       "mounts": [{"volume": vol["id"], "path": "/data"}]}})
    assert "same region" in err["error"]
    m = api.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    err = api.call("POST", f"/v1/apps/{app}/machines", 422,
                   json={"config": {"image": "sandkeep/gateway", "mounts": [{"volume": vol["id"], "path": "/d"}]}})
    assert f"already attached to machine {m['id']}" in err["error"]
    other = api.volume(app, "lcl-b", name="other")
    err = api.call("POST", f"/v1/apps/{app}/machines", 422,
                   json={"config": {"image": "sandkeep/gateway", "mounts": [
                       {"volume": vol["id"], "path": "/a"}, {"volume": other["id"], "path": "/b"}]}})
    assert "one volume" in err["error"]
    err = api.call("POST", f"/v1/apps/{app}/machines", 400,  # Fly: a 400, never a 404 (see test_fidelity)
                   json={"config": {"image": "sandkeep/gateway", "mounts": [{"volume": "vol_missing0000000"}]}})
    assert "volume not found" in err["error"]


def test_fork_across_regions_is_an_independent_copy(api: Api) -> None:
    app = api.new_app()
    src = api.volume(app, "lcl-a")
    a = api.machine(app, volume=src["id"])
    api.put_key(a["id"], "note", b"written before the fork")
    fork = api.call("POST", f"/v1/apps/{app}/volumes", 200,
                    json={"name": "data", "region": "lcl-c", "source_volume_id": src["id"]})
    assert fork["region"] == "lcl-c" and fork["id"] != src["id"] and fork["attached_machine_id"] is None
    b = api.machine(app, volume=fork["id"])
    assert b["region"] == "lcl-c"
    assert api.get_key(b["id"], "note").content == b"written before the fork"
    api.put_key(b["id"], "note", b"changed in the fork")
    api.put_key(a["id"], "only-in-source", b"x")
    assert api.get_key(a["id"], "note").content == b"written before the fork"
    assert api.get_key(b["id"], "only-in-source").status_code == 404
    api.call("POST", f"/v1/apps/{app}/volumes", 404,
             json={"name": "data", "region": "lcl-b", "source_volume_id": "vol_doesnotexist00"})


def test_snapshot_and_restore(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-b")
    m = api.machine(app, volume=vol["id"])
    api.put_key(m["id"], "k", b"v1")
    snap = api.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    assert snap["id"].startswith("vs_") and snap["size"] == 2 and snap["digest"].startswith("sha256:")
    api.put_key(m["id"], "k", b"v2-after-snapshot")
    listed = api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    assert [s["id"] for s in listed] == [snap["id"]]
    restored = api.call("POST", f"/v1/apps/{app}/volumes", 200,
                        json={"name": "restored", "region": "lcl-a", "snapshot_id": snap["id"]})
    r = api.machine(app, volume=restored["id"])
    assert api.get_key(r["id"], "k").content == b"v1"
    err = api.call("POST", f"/v1/apps/{app}/volumes", 404,
                   json={"name": "x", "region": "lcl-a", "snapshot_id": "vs_nope"})
    assert "snapshot not found" in err["error"]


def test_proxy_routes_by_machine_id(api: Api) -> None:
    app = api.new_app()
    one = api.machine(app, region="lcl-a")
    two = api.machine(app, region="lcl-b")
    for m in (one, two):
        r = api.proxy.get("/health?x=1", headers={"fly-force-instance-id": m["id"]})
        assert r.status_code == 200 and r.json()["machine_id"] == m["id"]
        assert r.json()["region"] == m["region"]
    r = api.proxy.get("/health")
    assert r.status_code == 400 and "fly-force-instance-id" in r.json()["error"]
    r = api.proxy.get("/health", headers={"fly-force-instance-id": "00000000000000"})
    assert r.status_code == 404
    stopped = api.machine(app, wait=None, skip_launch=True)
    r = api.proxy.post("/data/x", headers={"fly-force-instance-id": stopped["id"]})
    assert r.status_code == 503 and "not started" in r.json()["error"]
    # the gateway rejects path traversal, through the proxy too
    r = api.proxy.get("/data/..%2F..%2Fetc%2Fpasswd", headers={"fly-force-instance-id": one["id"]})
    assert r.status_code == 400
