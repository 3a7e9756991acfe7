"""Every client call, on the real Fly base URL, sends exactly Fly's paths, query parameters and bodies.

The MockTransport checks each request against Fly's spec file (tests/provider/speccheck.py: declared query
parameters with their types, strict body schemas) and records it; each test then asserts the exact requests.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from sandkeep.provider.client import MachinesClient
from sandkeep.provider.errors import CapacityError
from sandkeep.provider.models import Guest, MachineConfig, Mount
from tests.provider.fakeapi import TOKEN, RecordingClock
from tests.provider.speccheck import check_request, operation_of

FLY = "https://api.machines.dev"
APP = "sk-owner"
A = f"{FLY}/v1/apps/{APP}"
MID = "148e272b5e0789"
VID = "vol_4ylq0z1kvn9rpel8"
CONFIG = MachineConfig(image="registry.fly.io/sandkeep-gateway:1", env={"A": "1"},
                       guest=Guest(cpu_kind="shared", cpus=1, memory_mb=256),
                       mounts=[Mount(volume=VID, path="/data")], metadata={"instance": "inst-1"},
                       services=[{"protocol": "tcp", "internal_port": 8080,
                                  "ports": [{"port": 443, "handlers": ["tls", "http"]}]}],
                       restart={"policy": "no"})
Sent = tuple[str, str, Any]


class Fly:
    """A scripted Fly: answers by operation, checks every request against the spec, records it."""

    def __init__(self, no_capacity: tuple[str, ...] = ()) -> None:
        self.sent: list[Sent] = []
        self.no_capacity = no_capacity

    def __call__(self, request: httpx.Request) -> httpx.Response:
        check_request(request)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        payload = json.loads(request.content) if request.content else None
        self.sent.append((request.method, str(request.url), payload))
        op = operation_of(request)
        machine = {"id": MID, "name": "vm-1", "state": "created", "region": "ord", "instance_id": "01J0",
                   "config": CONFIG.model_dump(mode="json", exclude_none=True)}
        volume = {"id": VID, "name": "data", "state": "created", "region": "ord", "size_gb": 1,
                  "attached_machine_id": None}
        if op == ("POST", "/apps/{app_name}/volumes") and payload["region"] in self.no_capacity:
            return httpx.Response(412, json={"error": "insufficient resources to create new volume",
                                             "status": "insufficient_capacity"})
        answers: dict[tuple[str, str], httpx.Response] = {
            ("POST", "/apps"): httpx.Response(201),
            ("GET", "/apps/{app_name}"): httpx.Response(200, json={"id": "a1", "name": APP, "status": "deployed"}),
            ("GET", "/apps/{app_name}/ip_assignments"): httpx.Response(200, json={"ips": []}),
            ("POST", "/apps/{app_name}/ip_assignments"): httpx.Response(200, json={
                "ip": "2a09:8280:1::1", "region": "global", "service_name": "", "shared": False}),
            ("GET", "/apps/{app_name}/machines"): httpx.Response(200, json=[]),
            ("POST", "/apps/{app_name}/machines"): httpx.Response(200, json=machine),
            ("GET", "/apps/{app_name}/machines/{machine_id}"): httpx.Response(200, json=machine),
            ("POST", "/apps/{app_name}/machines/{machine_id}"): httpx.Response(200, json=machine),
            ("DELETE", "/apps/{app_name}/machines/{machine_id}"): httpx.Response(200, json={"ok": True}),
            ("POST", "/apps/{app_name}/machines/{machine_id}/start"): httpx.Response(
                200, json={"previous_state": "stopped", "migrated": False, "new_host": ""}),
            ("POST", "/apps/{app_name}/machines/{machine_id}/stop"): httpx.Response(200, json={"ok": True}),
            ("POST", "/apps/{app_name}/machines/{machine_id}/restart"): httpx.Response(200, json={"ok": True}),
            ("GET", "/apps/{app_name}/machines/{machine_id}/wait"): httpx.Response(200, json={"ok": True}),
            ("GET", "/apps/{app_name}/machines/{machine_id}/events"): httpx.Response(200, json=[]),
            ("GET", "/apps/{app_name}/machines/{machine_id}/metadata"): httpx.Response(200, json={"k": "v"}),
            ("POST", "/apps/{app_name}/machines/{machine_id}/metadata/{key}"): httpx.Response(204),
            ("DELETE", "/apps/{app_name}/machines/{machine_id}/metadata/{key}"): httpx.Response(204),
            ("GET", "/apps/{app_name}/volumes"): httpx.Response(200, json=[]),
            ("POST", "/apps/{app_name}/volumes"): httpx.Response(200, json={**volume, "region": payload and
                                                                            payload.get("region")}),
            ("GET", "/apps/{app_name}/volumes/{volume_id}"): httpx.Response(200, json=volume),
            ("DELETE", "/apps/{app_name}/volumes/{volume_id}"): httpx.Response(200, json=volume),
            ("GET", "/apps/{app_name}/volumes/{volume_id}/snapshots"): httpx.Response(200, json=[]),
            ("PUT", "/apps/{app_name}/volumes/{volume_id}/extend"): httpx.Response(
                200, json={"volume": {**volume, "size_gb": 5}, "needs_restart": True}),
            ("POST", "/apps/{app_name}/volumes/{volume_id}/snapshots"): httpx.Response(200),
        }
        return answers[op]


def fly_client(fly: Fly) -> MachinesClient:
    return MachinesClient(FLY, TOKEN, clock=RecordingClock(), transport=httpx.MockTransport(fly))


async def test_app_calls() -> None:
    fly = Fly()
    async with fly_client(fly) as c:
        await c.create_app(APP, "personal")
        await c.ensure_app(APP, "personal")
    assert fly.sent == [
        ("POST", f"{FLY}/v1/apps", {"app_name": APP, "org_slug": "personal"}),
        ("GET", A, None),  # Fly answers a create with an empty 201: the client reads the app back
        ("GET", A, None),
        # <app>.fly.dev (the gateway's route through Fly's proxy) needs public IPs: fly-go's ip_assignments calls
        ("GET", f"{A}/ip_assignments", None),
        ("POST", f"{A}/ip_assignments", {"type": "shared_v4"}),
        ("POST", f"{A}/ip_assignments", {"type": "v6"}),
    ]


async def test_machine_calls() -> None:
    fly = Fly()
    config = CONFIG.model_dump(mode="json", exclude_none=True)
    async with fly_client(fly) as c:
        created = await c.create_machine(APP, config=CONFIG, name="vm-1", region="ord", skip_launch=True)
        assert created.state == "created"
        await c.create_machine(APP, config=CONFIG)
        await c.get_machine(APP, MID)
        await c.list_machines(APP, metadata={"instance": "inst-1", "owner": "u1"}, region="ord", include_deleted=True)
        await c.update_machine(APP, MID, config=CONFIG)
        await c.start_machine(APP, MID)
        await c.stop_machine(APP, MID)
        await c.restart_machine(APP, MID)
        await c.wait_machine(APP, MID, state="stopped", timeout=30, instance_id="01J0")
        await c.wait_machine(APP, MID, timeout=120)
        await c.list_machine_events(APP, MID)
        assert await c.get_metadata(APP, MID) == {"k": "v"}
        await c.set_metadata(APP, MID, "instance", "inst-2")
        await c.delete_metadata(APP, MID, "instance")
        await c.destroy_machine(APP, MID)
        await c.destroy_machine(APP, MID, force=False)
    m = f"{A}/machines/{MID}"
    assert fly.sent == [
        ("GET", f"{A}/machines", None),  # a named create first notes the machines of that name (ambiguity)
        ("POST", f"{A}/machines", {"config": config, "name": "vm-1", "region": "ord", "skip_launch": True}),
        ("POST", f"{A}/machines", {"config": config}),
        ("GET", m, None),
        ("GET", f"{A}/machines?metadata.instance=inst-1&metadata.owner=u1&region=ord&include_deleted=true", None),
        ("POST", m, {"config": config}),
        ("POST", f"{m}/start", None),
        ("POST", f"{m}/stop", None),
        ("POST", f"{m}/restart", None),
        ("GET", f"{m}/wait?state=stopped&timeout=30&instance_id=01J0", None),
        ("GET", f"{m}/wait?state=started&timeout=60", None),  # Fly's wait blocks at most 60 s
        ("GET", f"{m}/events", None),
        ("GET", f"{m}/metadata", None),
        ("POST", f"{m}/metadata/instance", {"value": "inst-2"}),
        ("DELETE", f"{m}/metadata/instance", None),
        ("DELETE", f"{m}?force=true", None),
        ("DELETE", m, None),
    ]


async def test_volume_calls() -> None:
    fly = Fly(no_capacity=("syd",))
    async with fly_client(fly) as c:
        await c.create_volume(APP, name="data", region="ord", size_gb=1)
        await c.create_volume(APP, name="data", region="iad", source_volume_id=VID,
                              compute=Guest(cpu_kind="shared", cpus=1, memory_mb=256))
        await c.create_volume(APP, name="data", region="ord", snapshot_id="vs_1")
        v = await c.create_volume_with_fallback(APP, regions=["syd", "ams"], name="data", size_gb=1)
        assert v.region == "ams"
        await c.get_volume(APP, VID)
        await c.list_volumes(APP)
        await c.list_snapshots(APP, VID)
        assert await c.create_snapshot(APP, VID) is None  # Fly answers 200 without a body
        await c.delete_volume(APP, VID)
    v = f"{A}/volumes"
    assert fly.sent == [
        ("GET", v, None), ("POST", v, {"name": "data", "region": "ord", "size_gb": 1}),
        ("GET", v, None), ("POST", v, {"name": "data", "region": "iad", "source_volume_id": VID,
                                       "compute": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}}),
        ("GET", v, None), ("POST", v, {"name": "data", "region": "ord", "snapshot_id": "vs_1"}),
        ("GET", v, None), ("POST", v, {"name": "data", "region": "syd", "size_gb": 1}),  # capacity: next region
        ("GET", v, None), ("POST", v, {"name": "data", "region": "ams", "size_gb": 1}),
        ("GET", f"{v}/{VID}", None),
        ("GET", v, None),
        ("GET", f"{v}/{VID}/snapshots", None),
        ("POST", f"{v}/{VID}/snapshots", None),
        ("DELETE", f"{v}/{VID}", None),
    ]


def _request(method: str, path: str, body: Any = None, **params: str) -> httpx.Request:
    return httpx.Request(method, f"{FLY}/v1{path}", params=params or None, json=body)


@pytest.mark.parametrize(("request_", "problem"), [
    (_request("GET", f"/apps/{APP}/machines", limit="5"), "'limit' is not in Fly's spec"),
    (_request("GET", f"/apps/{APP}/machines", include_deleted="yes"), "not a boolean"),
    (_request("GET", f"/apps/{APP}/machines/{MID}/wait", timeout="30s"), "not an integer"),
    (_request("GET", f"/apps/{APP}/machines/{MID}/wait", state="running"), "not one of"),
    (_request("DELETE", f"/apps/{APP}/machines/{MID}", kill="true"), "'kill' is not in Fly's spec"),
    (_request("POST", f"/apps/{APP}/volumes", {"name": "d", "region": "ord", "size": 1}), "'size' was unexpected"),
    (_request("POST", f"/apps/{APP}/volumes", {"name": "d", "size_gb": "1"}), "is not of type 'integer'"),
    (_request("POST", f"/apps/{APP}/machines", {"config": {"image": "x", "mount": []}}), "'mount' was unexpected"),
    (_request("POST", f"/apps/{APP}/machines/{MID}/start", {"force": True}), "takes no body"),
    (_request("POST", f"/apps/{APP}/machines/{MID}/metadata/k", {"val": "v"}), "val"),
    (_request("PUT", f"/apps/{APP}/machines/{MID}"), "not an operation"),
])
def test_the_request_checker_catches_deviations(request_: httpx.Request, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_request(request_)


async def test_capacity_in_every_region_is_raised() -> None:
    fly = Fly(no_capacity=("syd", "ams"))
    async with fly_client(fly) as c:
        with pytest.raises(CapacityError):
            await c.create_volume_with_fallback(APP, regions=["syd", "ams"], name="data")
    assert [s[2]["region"] for s in fly.sent if s[0] == "POST"] == ["syd", "ams"]


async def test_extend_volume_call() -> None:
    fly = Fly()
    async with fly_client(fly) as c:
        volume, needs_restart = await c.extend_volume(APP, VID, 5)
    assert volume.size_gb == 5 and needs_restart is True
    assert fly.sent == [("PUT", f"{A}/volumes/{VID}/extend", {"size_gb": 5})]
