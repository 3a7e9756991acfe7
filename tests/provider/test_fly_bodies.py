"""The client classifies Fly's real error bodies as SPEC §10 says (README "Fidelity to Fly").

Bodies are Fly's as seen in production traffic and in fly-go's error handling (flaps/flaps_error.go); each is
also checked through a full client call, so the classification is what the engine actually receives.
"""

from __future__ import annotations

import json

import httpx
import pytest

from sandkeep.provider.errors import (
    CapacityError,
    ConflictError,
    HostUnavailableError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    TransientError,
    classify,
)
from sandkeep.provider.models import MachineConfig, Mount
from tests.provider.fakeapi import FakeApi, make_client

APP = "sk-owner"


def fly(error: str, status: str = "unknown") -> str:
    return json.dumps({"error": error, "status": status})


BODIES: list[tuple[str, int, str, type[ProviderError]]] = [
    # missing volume: a 400, never "the machine is gone"
    ("update mounting a vanished volume", 400, fly("invalid_argument: volume does not exist"), MissingVolumeError),
    ("create mounting a vanished volume (later Fly)", 400, fly("volume not found"), MissingVolumeError),
    # capacity, each shape
    ("volume create, region full", 400, fly("aborted: no capacity"), CapacityError),
    ("volume create/fork, all hosts refused", 409, fly("failed to create volume: aborted: no capacity"),
     CapacityError),
    ("machine create", 412, fly("insufficient resources to create new machine", "insufficient_capacity"),
     CapacityError),
    ("machine create, every host tried", 412, fly("insufficient resources available to fulfill request"),
     CapacityError),
    ("update of an existing machine", 409,
     fly("could not reserve resource for machine: insufficient memory available to fulfill request"),
     CapacityError),
    ("update needing CPUs", 409, fly("insufficient CPUs available to fulfill request on the current host"),
     CapacityError),
    ("region out of capacity (status code only)", 422, fly("", "insufficient_capacity"), CapacityError),
    ("volume's host full (status code only)", 412, fly("placement failed", "volume_placement_capacity"),
     CapacityError),
    # a dead host: distinct, neither capacity nor transient
    ("fork from an unreachable host", 412,
     fly("failed_precondition: cannot fork volume vol_1: its host in region ord is unreachable "
         "(host_status: unreachable)"), HostUnavailableError),
    ("start on an unreachable host", 412, fly("failed_precondition: machine's host is unreachable"),
     HostUnavailableError),
    # neighbours that must keep their own class
    ("start of a machine already on its way up", 412, fly("unable to start machine from current state: 'starting'"),
     ConflictError),
    ("volume still attached", 412, fly("failed_precondition: volume is currently bound to machine: 148e"),
     ConflictError),
    ("not implemented", 501, fly("not implemented: the local host does not serve POST /v1/apps/a/machines/m/cordon"),
     InvalidRequestError),
    ("wrong method", 405, fly("method not allowed: PATCH /v1/apps/a/volumes"), InvalidRequestError),
    ("machine gone", 404, fly("machine not found"), NotFoundError),
    ("upstream unreachable, server side", 503, fly("upstream host unreachable"), TransientError),
]


@pytest.mark.parametrize(("what", "status", "body", "kind"), BODIES, ids=[b[0] for b in BODIES])
def test_fly_bodies_are_classified(what: str, status: int, body: str, kind: type[ProviderError]) -> None:
    error = classify(status, body, operation=what)
    assert type(error) is kind, (what, type(error).__name__)
    assert error.status == status and error.operation == what


async def test_update_with_a_vanished_volume_reaches_the_caller_as_missing_volume() -> None:
    api = FakeApi().on("POST", f"/v1/apps/{APP}/machines/m1",
                       httpx.Response(400, json={"error": "invalid_argument: volume does not exist",
                                                 "status": "unknown"}))
    client, _ = make_client(api)
    config = MachineConfig(image="img", mounts=[Mount(volume="vol_gone")])
    with pytest.raises(MissingVolumeError):
        await client.update_machine(APP, "m1", config=config)
    assert len(api.requests) == 1  # final: not retried
    await client.aclose()


async def test_update_sends_skip_launch_only_when_asked() -> None:
    answer = {"id": "m1", "state": "stopped"}
    api = FakeApi().on("POST", f"/v1/apps/{APP}/machines/m1", httpx.Response(200, json=answer))
    client, _ = make_client(api)
    await client.update_machine(APP, "m1", config=MachineConfig(image="img"))
    await client.update_machine(APP, "m1", config=MachineConfig(image="img"), skip_launch=True)
    sent = [json.loads(r.content) for r in api.requests]
    assert "skip_launch" not in sent[0] and sent[1]["skip_launch"] is True
    await client.aclose()


async def test_a_machine_on_an_unreachable_host_keeps_its_metadata() -> None:
    # while host_status is not "ok", Fly sends incomplete_config instead of config (fly-go Machine)
    answer = {"id": "m1", "state": "started", "host_status": "unreachable",
              "incomplete_config": {"image": "img", "metadata": {"sandbox_id": "sbx_1"},
                                    "mounts": [{"volume": "vol_1", "path": "/data"}]}}
    api = FakeApi().on("GET", f"/v1/apps/{APP}/machines/m1", httpx.Response(200, json=answer))
    client, _ = make_client(api)
    m = await client.get_machine(APP, "m1")
    assert m.host_status == "unreachable" and m.config is None
    assert m.metadata == {"sandbox_id": "sbx_1"} and m.volume_ids == ["vol_1"]
    await client.aclose()
