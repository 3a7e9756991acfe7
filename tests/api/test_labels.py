"""Instance names, labels and guest CPU/memory through the API over the real service (issue 13): validated with
machine-readable codes, shown in the instance JSON, the guest within the policy and passed to the provider."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.test_real_service import Real


async def _create(real: Real, body: dict[str, Any], who: tuple[str, str] = ("alice", "user")) -> Any:
    return await real.client.post("/v1/instances", json=body, headers=real.auth(*who))


async def test_name_labels_and_guest_are_kept_shown_and_given_to_the_machine(real: Real) -> None:
    resp = await _create(real, {"name": "dev-box", "labels": {"team": "ml", "tier": "gold"},
                                "guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024}})
    assert resp.status_code == 201, resp.text
    inst = resp.json()
    assert inst["name"] == "dev-box" and inst["labels"] == {"team": "ml", "tier": "gold"}
    assert inst["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024}
    await real.engine.reconcile_now(inst["id"])
    shown = (await real.client.get(f"/v1/instances/{inst['id']}", headers=real.auth("alice"))).json()
    assert shown["status"] == "running"
    guest = real.model.config(shown["machine_id"])["guest"]
    assert (guest["cpu_kind"], guest["cpus"], guest["memory_mb"]) == ("shared", 2, 1024)
    listed = (await real.client.get("/v1/instances", headers=real.auth("alice"))).json()["items"]
    assert [(i["name"], i["labels"]) for i in listed] == [("dev-box", {"team": "ml", "tier": "gold"})]


async def test_without_a_guest_the_size_preset_is_shown(real: Real) -> None:
    inst = (await _create(real, {"size": "shared-cpu-2x"})).json()
    assert inst["name"] is None and inst["labels"] == {}
    assert inst["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}


@pytest.mark.parametrize(("body", "code"), [
    ({"name": "Dev Box"}, "invalid_name"),
    ({"name": "-dev"}, "invalid_name"),
    ({"name": "x" * 64}, "invalid_name"),
    ({"labels": {f"k{i}": "v" for i in range(17)}}, "invalid_labels"),
    ({"labels": {"Team": "ml"}}, "invalid_labels"),
    ({"labels": {"team": "m l"}}, "invalid_labels"),
    ({"labels": {"team": "v" * 64}}, "invalid_labels"),
    ({"labels": {"k" * 64: "v"}}, "invalid_labels"),
    ({"guest": {"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048}}, "guest_not_allowed"),
    ({"guest": {"cpus": 16, "memory_mb": 1024}}, "guest_not_allowed"),
    ({"guest": {"cpus": 1, "memory_mb": 4096}}, "guest_not_allowed"),
    ({"guest": {"cpus": 1, "memory_mb": 300}}, "invalid_guest"),
    ({"guest": {"cpus": 0, "memory_mb": 256}}, "invalid_guest"),
    ({"guest": {"cpu_kind": "gpu", "cpus": 1, "memory_mb": 256}}, "invalid_guest"),
])
async def test_bad_names_labels_and_guests_are_422_with_a_code_and_create_nothing(
        real: Real, body: dict[str, Any], code: str) -> None:
    resp = await _create(real, body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["status"] == 422 and err["message"]
    assert (await real.client.get("/v1/instances", headers=real.auth("alice"))).json()["items"] == []


async def test_admins_may_pick_any_valid_guest(real: Real) -> None:
    resp = await _create(real, {"user_id": "alice", "guest": {"cpu_kind": "performance", "cpus": 4,
                                                                "memory_mb": 8192}}, ("root", "admin"))
    assert resp.status_code == 201, resp.text
    assert resp.json()["guest"] == {"cpu_kind": "performance", "cpus": 4, "memory_mb": 8192}


async def test_patch_changes_name_and_labels_at_once_and_the_guest_at_the_next_start(real: Real) -> None:
    inst = await real.running("alice")
    url = f"/v1/instances/{inst['id']}"
    renamed = await real.client.patch(url, json={"name": "renamed", "labels": {"env": "prod"}},
                                      headers=real.auth("alice"))
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert body["name"] == "renamed" and body["labels"] == {"env": "prod"}
    assert body["config_generation"] == inst["config_generation"]  # nothing the machine gets changed
    cleared = (await real.client.patch(url, json={"name": "", "labels": {}}, headers=real.auth("alice"))).json()
    assert cleared["name"] is None and cleared["labels"] == {}
    bigger = await real.client.patch(url, json={"guest": {"cpus": 2, "memory_mb": 2048}}, headers=real.auth("alice"))
    assert bigger.status_code == 200 and bigger.json()["config_generation"] == inst["config_generation"] + 1
    refused = await real.client.patch(url, json={"labels": {"BAD": "x"}}, headers=real.auth("alice"))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_labels"
    other = await real.client.patch(url, json={"name": "mine"}, headers=real.auth("bob"))
    assert other.status_code == 404
