"""One test per row of the README's "Fidelity to Fly" table: the local host answers as Fly does.

Each test drives the real host over HTTP (every /v1 answer is validated against Fly's spec by ``Api.call``) and,
where the answer is an error, checks that sandkeep's client classifies it as SPEC §10 says.
"""

from __future__ import annotations

import json

from sandkeep.provider.errors import (
    CapacityError,
    HostUnavailableError,
    MissingVolumeError,
    TransientError,
    classify,
)
from tests.host.conftest import Api


def _classified(api: Api, method: str, path: str, expect: int, **kw: object) -> tuple[dict[str, object], object]:
    """Call, check status and Fly's error body, and return (body, the client's classification)."""
    body = api.call(method, path, expect, **kw)  # type: ignore[arg-type]
    assert set(body) >= {"error", "status"} and body["status"] in ("unknown", "insufficient_capacity"), body
    return body, classify(expect, json.dumps(body))


# ------------------------------------------------------------------ 1. update launches


def _stopped_machine(api: Api) -> tuple[str, dict[str, object]]:
    app = api.new_app()
    m = api.machine(app)
    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/stop", 200)
    api.wait(app, m["id"], "stopped")
    return app, m


def test_update_of_a_stopped_machine_launches_it(api: Api) -> None:
    app, m = _stopped_machine(api)
    updated = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}", 200,
                       json={"config": {"image": "sandkeep/gateway", "env": {"V": "2"}}})
    assert updated["config"]["env"] == {"V": "2"}
    api.wait(app, m["id"], "started")  # no start call: the update launched it
    events = [e["type"] for e in api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)]
    assert events[:3] == ["start", "start", "update"]  # newest first: update, starting, started


def test_update_with_skip_launch_leaves_a_stopped_machine_stopped(api: Api) -> None:
    app, m = _stopped_machine(api)
    updated = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}", 200,
                       json={"config": {"image": "sandkeep/gateway", "env": {"V": "2"}}, "skip_launch": True})
    assert updated["state"] == "stopped"
    assert api.get(app, m["id"])["state"] == "stopped"
    assert api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]["type"] == "update"
    out = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)  # the separate start
    assert out["previous_state"] == "stopped"
    api.wait(app, m["id"], "started")


def test_a_start_of_a_machine_already_started_changes_nothing(api: Api) -> None:
    # Fly's answer is undocumented (a 412 "unable to start machine from current state" is reported); the host
    # answers 200 with previous_state and changes nothing; the engine copes with both (tests/engine)
    app = api.new_app()
    m = api.machine(app)
    events = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)
    out = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
    assert out["previous_state"] == "started"
    assert api.get(app, m["id"])["state"] == "started"
    assert api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200) == events


# ------------------------------------------------------------------ 2. missing volume is a 400


def test_create_mounting_a_missing_volume_is_400_volume_not_found(api: Api) -> None:
    app = api.new_app()
    body, kind = _classified(api, "POST", f"/v1/apps/{app}/machines", 400,
                             json={"config": {"image": "sandkeep/gateway",
                                              "mounts": [{"volume": "vol_gone00000000", "path": "/data"}]}})
    assert "volume not found" in str(body["error"])
    assert isinstance(kind, MissingVolumeError)


def test_update_mounting_a_vanished_volume_is_400_and_the_machine_lives_on(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-a")
    m = api.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    other = api.volume(app, "lcl-a", name="other")
    api.call("DELETE", f"/v1/apps/{app}/volumes/{other['id']}", 200)
    body, kind = _classified(api, "POST", f"/v1/apps/{app}/machines/{m['id']}", 400,
                             json={"config": {"image": "sandkeep/gateway",
                                              "mounts": [{"volume": other["id"], "path": "/data"}]}})
    assert "invalid_argument: volume does not exist" in str(body["error"])
    assert isinstance(kind, MissingVolumeError)
    still = api.get(app, m["id"])  # not gone: nothing changed
    assert still["config"]["mounts"][0]["volume"] == vol["id"] and still["state"] == "created"


# ------------------------------------------------------------------ 3. unsupported routes: 501 / 405


def test_a_fly_operation_the_host_does_not_implement_is_501(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app, wait=None, skip_launch=True)
    body = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/cordon", 501)
    assert "not implemented" in body["error"] and body["status"] == "unknown"
    assert api.raw("GET", f"/v1/apps/{app}/machines/{m['id']}/no-such-thing").status_code == 501


def test_a_wrong_method_on_a_known_path_is_405_with_allow(api: Api) -> None:
    app = api.new_app()
    resp = api.raw("PATCH", f"/v1/apps/{app}/volumes")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, POST"
    assert set(resp.json()) == {"error", "status"}


def test_volume_extend_grows_the_volume(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-a")
    out = api.call("PUT", f"/v1/apps/{app}/volumes/{vol['id']}/extend", 200, json={"size_gb": 3})
    assert out["volume"]["size_gb"] == 3 and out["needs_restart"] is False
    assert api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["size_gb"] == 3
    err = api.call("PUT", f"/v1/apps/{app}/volumes/{vol['id']}/extend", 400, json={"size_gb": 2})
    assert "only be extended" in err["error"]
    api.call("PUT", f"/v1/apps/{app}/volumes/{vol['id']}/extend", 400, json={"size_gb": "3"})
    api.call("PUT", f"/v1/apps/{app}/volumes/vol_gone00000000/extend", 404, json={"size_gb": 3})


def test_app_ip_allocation_is_recorded(api: Api) -> None:
    app = api.new_app()
    base = f"/v1/apps/{app}/ip_assignments"
    assert api.call("GET", base, 200) == {"ips": []}
    shared = api.call("POST", base, 200, json={"type": "shared_v4"})
    v6 = api.call("POST", base, 200, json={"type": "v6", "region": "lcl-a"})
    assert shared["shared"] is True and ":" in v6["ip"] and v6["shared"] is False
    assert api.call("POST", base, 200, json={"type": "shared_v4"}) == shared  # one shared address per app
    assert [ip["ip"] for ip in api.call("GET", base, 200)["ips"]] == [shared["ip"], v6["ip"]]
    api.call("POST", base, 400, json={"type": "anycast"})
    api.call("DELETE", f"{base}/{v6['ip']}", 200)
    api.call("DELETE", f"{base}/{v6['ip']}", 404)
    assert api.call("GET", base, 200)["ips"] == [shared]
    api.call("GET", "/v1/apps/no-such-app/ip_assignments", 404)


# ------------------------------------------------------------------ 4. capacity shapes


def test_volume_create_without_capacity_is_400_no_capacity(fapi: Api) -> None:
    app = fapi.new_app()
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": False})
    body, kind = _classified(fapi, "POST", f"/v1/apps/{app}/volumes", 400, json={"name": "d", "region": "lcl-a"})
    assert str(body["error"]).endswith("no capacity")
    assert isinstance(kind, CapacityError)


def test_machine_create_without_capacity_is_412_insufficient_resources(fapi: Api) -> None:
    app = fapi.new_app()
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": False})
    body, kind = _classified(fapi, "POST", f"/v1/apps/{app}/machines", 412,
                             json={"region": "lcl-a", "config": {"image": "sandkeep/gateway"}})
    assert "insufficient resources" in str(body["error"]) and body["status"] == "insufficient_capacity"
    assert isinstance(kind, CapacityError)


def test_start_or_update_of_an_existing_machine_without_capacity_is_409_insufficient_memory(fapi: Api) -> None:
    app = fapi.new_app()
    m = fapi.machine(app, region="lcl-a", wait=None, skip_launch=True)
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": False})
    for path, payload in ((f"/v1/apps/{app}/machines/{m['id']}/start", None),
                          (f"/v1/apps/{app}/machines/{m['id']}",
                           {"config": {"image": "sandkeep/gateway", "env": {"V": "2"}}}),
                          (f"/v1/apps/{app}/machines/{m['id']}/restart", None)):
        body, kind = _classified(fapi, "POST", path, 409, json=payload)
        assert "insufficient memory" in str(body["error"]), path
        assert isinstance(kind, CapacityError), path
    after = fapi.get(app, m["id"])
    assert after["state"] == "created" and after["config"].get("env") == m["config"]["env"]  # nothing half-applied
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": True})
    fapi.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
    fapi.wait(app, m["id"], "started")


# ------------------------------------------------------------------ 5. host_status, volume_size, dead-host forks


def test_machines_report_host_status(fapi: Api) -> None:
    app = fapi.new_app()
    m = fapi.machine(app, region="lcl-b", wait=None, skip_launch=True)
    assert fapi.get(app, m["id"])["host_status"] == "ok"
    fapi.local("POST", "/_local/regions/lcl-b/outage", json={"down": True})
    assert fapi.get(app, m["id"])["host_status"] == "unreachable"
    listed = fapi.call("GET", f"/v1/apps/{app}/machines", 200)
    assert [x["host_status"] for x in listed] == ["unreachable"]
    fapi.local("POST", "/_local/regions/lcl-b/outage", json={"down": False})
    assert fapi.get(app, m["id"])["host_status"] == "ok"


def test_snapshot_listings_carry_volume_size(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-a")
    api.call("PUT", f"/v1/apps/{app}/volumes/{vol['id']}/extend", 200, json={"size_gb": 2})
    api.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    snaps = api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    assert [s["volume_size"] for s in snaps] == [2 * 1024 ** 3]


def test_a_fork_from_an_unreachable_host_is_host_unavailable(fapi: Api) -> None:
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-c")
    fapi.local("POST", "/_local/regions/lcl-c/outage", json={"down": True})
    body, kind = _classified(fapi, "POST", f"/v1/apps/{app}/volumes", 412,
                             json={"name": "data", "region": "lcl-a", "source_volume_id": vol["id"]})
    assert "unreachable" in str(body["error"])
    assert isinstance(kind, HostUnavailableError)
    assert not isinstance(kind, CapacityError | TransientError)
    assert [v["id"] for v in fapi.call("GET", f"/v1/apps/{app}/volumes", 200)] == [vol["id"]]  # nothing made
