"""Machines through raw HTTP against a real host process; every /v1 answer checked against Fly's spec."""

from __future__ import annotations

from sandkeep.gateway import TOKEN_ENV
from tests.host.conftest import GATEWAY_TOKEN, Api
from tests.support.wait import wait_until


def test_app_create_get_list_and_errors(api: Api) -> None:
    app = api.new_app()
    got = api.call("GET", f"/v1/apps/{app}", 200)
    assert got["name"] == app and got["organization"]["slug"] == "personal"
    listed = api.call("GET", "/v1/apps", 200, params={"org_slug": "personal"})
    assert app in [a["name"] for a in listed["apps"]]
    err = api.call("POST", "/v1/apps", 409, json={"app_name": app, "org_slug": "personal"})
    assert "already exists" in err["error"]
    api.call("GET", "/v1/apps/no-such-app-xyz", 404)
    api.call("GET", "/v1/apps/no-such-app-xyz/machines", 404)
    api.call("GET", "/v1/apps/no-such-app-xyz/volumes", 404)
    api.call("POST", "/v1/apps/no-such-app-xyz/machines", 404, json={"config": {"image": "sandkeep/gateway"}})
    api.call("POST", "/v1/apps", 422, json={"app_name": "Bad Name!"})
    err = api.call("GET", "/v1/apps", 401, headers={"Authorization": "Bearer not-the-token"})
    assert "token" in err["error"]

    doomed = api.new_app()
    vol = api.volume(doomed)
    api.machine(doomed, volume=vol["id"], wait=None)
    assert api.call("DELETE", f"/v1/apps/{doomed}", 202) is None
    api.call("GET", f"/v1/apps/{doomed}", 404)
    api.call("DELETE", f"/v1/apps/{doomed}", 404)
    assert not (api.handle.data_dir / "regions" / "lcl-a" / "volumes" / vol["id"]).exists()
    assert doomed not in [a["name"] for a in api.call("GET", "/v1/apps", 200)["apps"]]


def test_machine_lifecycle_env_and_events(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app, "lcl-b")
    m = api.machine(app, volume=vol["id"], name="life-1", config={"env": {"GREETING": "hi"},
                                                                  "metadata": {"sandbox": "sbx_1"}})
    assert m["state"] == "created", "like Fly, a create answers the machine as created; it then starts"
    assert m["region"] == "lcl-b" and len(m["id"]) == 14 and m["name"] == "life-1"
    assert m["config"]["metadata"] == {"sandbox": "sbx_1"}
    got = api.get(app, m["id"])
    assert got["state"] == "started"
    health = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()
    assert health["machine_id"] == m["id"]
    assert "volume_path" not in health and str(api.handle.data_dir) not in str(health), "no host path (SPEC §13)"
    assert api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["attached_machine_id"] == m["id"]

    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/stop", 200)
    api.wait(app, m["id"], "stopped")
    assert api.get_key(m["id"], "x").status_code == 503
    started = api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 200)
    assert started["previous_state"] == "stopped"
    api.wait(app, m["id"], "started")
    pid_before = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/restart", 200)
    api.wait(app, m["id"], "started")
    pid_after = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
    assert pid_after != pid_before

    events = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps, reverse=True), "events are newest first"
    assert events[0]["status"] == "started"
    stop_exit = [e for e in events if e["type"] == "exit"]
    assert stop_exit and all(e["request"]["requested_stop"] is True for e in stop_exit)
    assert events[-1]["type"] == "launch"


def test_wait_timeout_is_408_with_fly_message(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app, wait=None, skip_launch=True)
    assert api.get(app, m["id"])["state"] == "created"
    err = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/wait", 408, params={"state": "started", "timeout": 1})
    assert err["error"] == "deadline_exceeded: machine failed to reach desired state, started, currently created"
    api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/wait", 400, params={"state": "started", "timeout": 61})
    api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/wait", 400, params={"state": "sleeping"})
    api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/wait", 400, params={"timeout": "soon"})


def test_list_filters_metadata_and_update(api: Api) -> None:
    app = api.new_app()
    a = api.machine(app, region="lcl-a", wait=None, skip_launch=True, config={"metadata": {"sandbox": "sbx_a"}})
    b = api.machine(app, region="lcl-c", wait=None, skip_launch=True, config={"metadata": {"sandbox": "sbx_b"}})
    ids = lambda params: [x["id"] for x in api.call("GET", f"/v1/apps/{app}/machines", 200, params=params)]  # noqa: E731
    assert set(ids({})) == {a["id"], b["id"]}
    assert ids({"metadata.sandbox": "sbx_b"}) == [b["id"]]
    assert ids({"metadata.sandbox": "nope"}) == []
    assert ids({"region": "lcl-a"}) == [a["id"]]

    base = f"/v1/apps/{app}/machines/{a['id']}/metadata"
    api.call("POST", f"{base}/owner", 204, json={"value": "alice"})
    assert api.call("GET", base, 200) == {"sandbox": "sbx_a", "owner": "alice"}
    assert ids({"metadata.owner": "alice"}) == [a["id"]]
    api.call("DELETE", f"{base}/owner", 204)
    assert api.call("GET", base, 200) == {"sandbox": "sbx_a"}
    api.call("POST", f"{base}/owner", 400, json={"value": 5})

    updated = api.call("POST", f"/v1/apps/{app}/machines/{a['id']}", 200,
                       json={"config": {"image": "sandkeep/gateway", "env": {"V": "2"},
                                        "metadata": {"sandbox": "sbx_a", "v": "2"}}, "skip_launch": True})
    assert updated["config"]["env"] == {"V": "2"} and updated["instance_id"] != a["instance_id"]
    assert updated["state"] == "created"  # skip_launch: the update does not launch it

    api.call("DELETE", f"/v1/apps/{app}/machines/{b['id']}", 200)
    assert api.get(app, b["id"])["state"] == "destroyed"
    assert ids({}) == [a["id"]]
    assert set(ids({"include_deleted": "true"})) == {a["id"], b["id"]}


def test_update_running_machine_restarts_it_with_new_env(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app)
    pid = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]}).json()["pid"]
    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}", 200,
             json={"config": {"image": "sandkeep/gateway", "metadata": {"v": "2"},
                              "env": {TOKEN_ENV: GATEWAY_TOKEN}}})

    def restarted() -> bool:
        r = api.proxy.get("/health", headers={"fly-force-instance-id": m["id"]})
        return r.status_code == 200 and r.json()["pid"] != pid
    wait_until(restarted, timeout=30, message="machine restarted after update")
    assert api.get(app, m["id"])["config"]["metadata"] == {"v": "2"}


def test_destroy_needs_force_while_running_and_detaches(api: Api) -> None:
    app = api.new_app()
    vol = api.volume(app)
    m = api.machine(app, volume=vol["id"])
    err = api.call("DELETE", f"/v1/apps/{app}/machines/{m['id']}", 412)
    assert "not currently stopped" in err["error"]
    api.call("DELETE", f"/v1/apps/{app}/machines/{m['id']}", 200, params={"force": "true"})
    api.wait(app, m["id"], "destroyed")
    assert api.get(app, m["id"])["state"] == "destroyed"
    assert api.call("GET", f"/v1/apps/{app}/volumes/{vol['id']}", 200)["attached_machine_id"] is None
    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/start", 404)
    # the volume is free again: a new machine may mount it
    m2 = api.machine(app, volume=vol["id"], wait=None, skip_launch=True)
    api.call("DELETE", f"/v1/apps/{app}/machines/{m2['id']}", 200, params={"kill": "true"})


def test_unknown_image_and_crashy_and_oneshot_exit(api: Api) -> None:
    app = api.new_app()
    err = api.call("POST", f"/v1/apps/{app}/machines", 422, json={"config": {"image": "nginx:latest"}})
    assert "unknown image 'nginx:latest'" in err["error"] and "sandkeep/gateway" in err["error"]

    crashy = api.machine(app, image="sandkeep/crashy", wait=None)
    api.wait_until_state(app, crashy["id"], "failed")

    oneshot = api.machine(app, image="sandkeep/oneshot", wait=None, config={"env": {"EXIT_CODE": "7"}})
    api.wait(app, oneshot["id"], "stopped")
    exit_event = api.call("GET", f"/v1/apps/{app}/machines/{oneshot['id']}/events", 200)[0]
    assert exit_event["type"] == "exit" and exit_event["status"] == "stopped"
    assert exit_event["request"]["exit_code"] == 7
    assert exit_event["request"]["requested_stop"] is False
    assert exit_event["request"]["exit_event"]["exit_code"] == 7


def test_crash_makes_machine_stopped_with_exit_event_137(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app)
    api.local("POST", f"/_local/apps/{app}/machines/{m['id']}/crash")
    api.wait(app, m["id"], "stopped")
    ev = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]
    assert ev["type"] == "exit" and ev["request"]["exit_code"] == 137
    assert ev["request"]["requested_stop"] is False
    api.local("POST", f"/_local/apps/{app}/machines/{m['id']}/crash", 412)  # nothing left to kill


def test_machine_names_are_unique_per_app(api: Api) -> None:
    app = api.new_app()
    api.machine(app, name="only-one", wait=None, skip_launch=True)
    err = api.call("POST", f"/v1/apps/{app}/machines", 409,
                   json={"name": "only-one", "config": {"image": "sandkeep/gateway"}})
    assert "already exists" in err["error"]


def test_stop_escalates_to_sigkill_after_the_grace_period(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app, image="sandkeep/stubborn")
    api.call("POST", f"/v1/apps/{app}/machines/{m['id']}/stop", 200, json={"signal": "SIGTERM", "timeout": "1s"})
    assert api.get(app, m["id"])["state"] in ("stopping", "stopped")
    api.wait(app, m["id"], "stopped")
    ev = api.call("GET", f"/v1/apps/{app}/machines/{m['id']}/events", 200)[0]
    assert ev["type"] == "exit" and ev["request"]["exit_code"] == 137 and ev["request"]["requested_stop"] is True
