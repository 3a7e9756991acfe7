"""Fault injection: regions down, capacity, error/429 rules, watch. A host of their own (faults_host)."""

from __future__ import annotations

from sandkeep.provider.errors import CapacityError, RateLimitedError, TransientError, classify
from tests.host.conftest import Api
from tests.support.wait import wait_until


def test_region_outage(fapi: Api) -> None:
    app = fapi.new_app()
    vol = fapi.volume(app, "lcl-b")
    m = fapi.machine(app, volume=vol["id"])
    fapi.put_key(m["id"], "k", b"before outage")
    snap = fapi.call("POST", f"/v1/apps/{app}/volumes/{vol['id']}/snapshots", 200)
    out = fapi.local("POST", "/_local/regions/lcl-b/outage", json={"down": True})
    assert out == {"name": "lcl-b", "down": True, "available": True}

    fapi.wait(app, m["id"], "stopped")
    ev = fapi.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]
    assert ev["type"] == "exit" and ev["request"]["requested_stop"] is False and ev["request"]["exit_code"] == 137
    assert fapi.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["host_status"] == "unreachable"
    err = fapi.call("POST", f"/v1/apps/{app}/volumes", 412,
                    json={"name": "data", "region": "lcl-c", "source_volume_id": vol["id"]})
    assert "cannot fork volume" in err["error"] and "unreachable" in err["error"]
    err = fapi.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 412)
    assert "unreachable" in err["error"]
    cap = fapi.raw("POST", f"/v1/apps/{app}/volumes", json={"name": "d", "region": "lcl-b"})
    assert isinstance(classify(cap.status_code, cap.text), CapacityError)
    # snapshots live off-host: restoring into another region still works
    restored = fapi.call("POST", f"/v1/apps/{app}/volumes", 200,
                         json={"name": "data", "region": "lcl-c", "snapshot_id": snap["id"]})
    r = fapi.machine(app, volume=restored["id"])
    assert fapi.get_key(r["id"], "k").content == b"before outage"

    fapi.local("POST", "/_local/regions/lcl-b/outage", json={"down": False})
    assert fapi.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["host_status"] == "ok"
    assert fapi.get(app, m["id"])["state"] == "stopped"  # like a rebooted host: stays stopped
    fapi.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
    fapi.wait(app, m["id"], "started")
    assert fapi.get_key(m["id"], "k").content == b"before outage"
    fapi.local("POST", "/_local/regions/nowhere/outage", 404, json={"down": True})
    fapi.local("POST", "/_local/regions/lcl-b/outage", 400, json={"down": "yes"})


def test_capacity_refusal_has_fly_shape(fapi: Api) -> None:
    app = fapi.new_app()
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": False})
    err = fapi.call("POST", f"/v1/apps/{app}/machines", 412,
                    json={"region": "lcl-a", "config": {"image": "sandkeep/gateway"}})
    assert err["status"] == "insufficient_capacity" and "insufficient resources" in err["error"]
    resp = fapi.raw("POST", f"/v1/apps/{app}/volumes", json={"name": "d", "region": "lcl-a"})
    assert isinstance(classify(resp.status_code, resp.text), CapacityError)
    assert fapi.call("GET", f"/v1/apps/{app}/volumes", 200) == []
    fapi.volume(app, "lcl-b")  # other regions unaffected
    fapi.local("POST", "/_local/regions/lcl-a/capacity", json={"available": True})
    fapi.volume(app, "lcl-a")


def test_fault_rules_count_429_and_after_phase(fapi: Api) -> None:
    app = fapi.new_app()
    rules = fapi.local("POST", "/_local/faults", json={"operation": "volume.list", "status": 503, "count": 2})
    assert rules["rules"][0]["remaining"] == 2
    assert fapi.raw("GET", f"/v1/apps/{app}/volumes").status_code == 503
    r = fapi.raw("GET", f"/v1/apps/{app}/volumes")
    assert r.status_code == 503 and isinstance(classify(r.status_code, r.text), TransientError)
    fapi.call("GET", f"/v1/apps/{app}/volumes", 200)  # the rule is used up
    fapi.call("GET", f"/v1/apps/{app}", 200)  # other operations never matched

    fapi.local("POST", "/_local/faults", json={"rules": [
        {"operation": "machine.get", "status": 429, "retry_after": 2, "count": 1}]})
    r = fapi.raw("GET", f"/v1/apps/{app}/machines/00000000000000")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    err = classify(r.status_code, r.text, retry_after=2.0)
    assert isinstance(err, RateLimitedError)

    fapi.local("POST", "/_local/faults", json={"rules": [
        {"operation": "machine.create", "status": 500, "phase": "after", "count": 1}]})
    r = fapi.raw("POST", f"/v1/apps/{app}/machines", json={"name": "ambiguous",
                                                           "config": {"image": "sandkeep/gateway"}})
    assert r.status_code == 500
    listed = fapi.call("GET", f"/v1/apps/{app}/machines", 200)
    assert [m["name"] for m in listed] == ["ambiguous"], "phase=after performs the operation, then fails"

    assert fapi.local("GET", "/_local/faults")["rules"][0]["remaining"] == 0
    fapi.local("POST", "/_local/faults", 400, json={"operation": "nope", "status": 503})
    fapi.local("POST", "/_local/faults", 400, json={"status": 404})
    fapi.local("POST", "/_local/faults", 400, json={"rate": 2})
    fapi.local("DELETE", "/_local/faults")
    assert fapi.local("GET", "/_local/faults")["rules"] == []


def test_rate_rule_is_reproducible_with_seed(fapi: Api) -> None:
    app = fapi.new_app()

    def run() -> list[int]:
        fapi.local("POST", "/_local/faults", json={"rules": [{"operation": "app.get", "status": 502, "rate": 0.5}],
                                                   "seed": 42})
        return [fapi.raw("GET", f"/v1/apps/{app}").status_code for _ in range(20)]
    first, second = run(), run()
    assert first == second and set(first) == {200, 502}


def test_watch_long_poll_reports_state_changes(fapi: Api) -> None:
    seq = fapi.local("GET", "/_local/watch", json=None)["seq"]
    app = fapi.new_app()
    m = fapi.machine(app)
    out = fapi.http.get("/_local/watch", params={"since": seq, "timeout": 5}).json()
    mine = [e for e in out["events"] if e["machine_id"] == m["id"]]
    assert [e["state"] for e in mine][:3] == ["created", "starting", "started"]
    assert all(e["app_name"] == app and e["seq"] > seq for e in mine)
    assert set(mine[0]) == {"seq", "app_name", "machine_id", "type", "state", "exit_code", "requested_stop", "at"}
    latest = out["seq"]
    fapi.local("POST", f"/_local/apps/{app}/machines/{m['id']}/crash")
    nxt = fapi.http.get("/_local/watch", params={"since": latest, "timeout": 10}).json()
    assert nxt["seq"] > latest and nxt["events"][0]["machine_id"] == m["id"]
    crash = [e for e in fapi.http.get("/_local/watch", params={"since": latest}).json()["events"]
             if e["type"] == "exit"]
    assert crash and crash[0]["exit_code"] == 137 and crash[0]["requested_stop"] is False
    fapi.local("GET", "/_local/watch?timeout=31", 400)


def test_destroyed_machine_turns_404_after_retention(fapi: Api) -> None:
    app = fapi.new_app()
    m = fapi.machine(app, wait=None, skip_launch=True)
    fapi.call("DELETE", f"/v1/apps/{app}/machines/{m['id']}", 200)
    wait_until(lambda: fapi.raw("GET", f"/v1/apps/{app}/machines/{m['id']}").status_code == 404, timeout=10,
               message="destroyed machine gone")
    fapi.call("GET", f"/v1/apps/{app}/machines/{m['id']}", 404)
