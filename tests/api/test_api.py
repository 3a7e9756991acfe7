"""API behaviour over the fake service: instance JSON, errors, busy gating, pagination, the gateway proxy."""

from __future__ import annotations

import json
from pathlib import Path

from sandkeep.store.records import Status
from tests.api.conftest import Api, refusing_gateway_client
from tests.support.fake_service import retained

INSTANCE_KEYS = {"id", "user_id", "sandbox_id", "status", "busy", "region", "machine_id", "volume_id", "app_name",
                 "created_at", "last_started_at", "last_stopped_at", "recovery"}
RECOVERY_KEYS = {"started_at", "pending_volume_id", "retained_volume_id", "retained_volume_cleanup_after",
                 "last_error", "last_error_at"}


async def test_create_returns_the_instance_json_without_secret_values(api: Api) -> None:
    resp = await api.client.post("/v1/instances", headers=api.auth(),
                                 json={"size": "shared-cpu-2x", "env": {"MODE": "dev"},
                                       "secrets": {"API_KEY": "s3cr3t"}})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert INSTANCE_KEYS <= set(body)
    assert set(body["recovery"]) == RECOVERY_KEYS
    assert body["user_id"] == "alice" and body["status"] == "starting" and body["busy"] is True
    assert body["env"] == {"MODE": "dev"} and body["secret_names"] == ["API_KEY"] and body["size"] == "shared-cpu-2x"
    assert "s3cr3t" not in resp.text and "enc:" not in resp.text
    assert body["created_at"].endswith("Z")


async def test_instance_times_are_iso_utc_and_recovery_fields_rendered(api: Api) -> None:
    r = api.service.add("alice", last_recovery_error="fork failed", **retained(api.service.clock))
    body = (await api.client.get(f"/v1/instances/{r.id}", headers=api.auth())).json()
    assert body["recovery"]["retained_volume_id"] == "vol_old"
    assert body["recovery"]["retained_volume_cleanup_after"] == "2026-01-08T00:00:00Z"
    assert body["recovery"]["last_error"] == "fork failed"


async def test_busy_instance_answers_409_instance_busy_on_every_user_action(api: Api) -> None:
    for status in (Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING):
        r = api.service.add("alice", status)
        for action in ("start", "stop", "restart"):
            resp = await api.client.post(f"/v1/instances/{r.id}/{action}", headers=api.auth())
            assert resp.status_code == 409, (status, action, resp.text)
            err = resp.json()["error"]
            assert err["code"] == "instance_busy" and err["status"] == 409 and str(status) in err["message"]
            assert err["details"]["instance_status"] == str(status)
        assert api.service.instances[r.id].status == status


async def test_destroy_while_recovering_needs_admin_force(api: Api) -> None:
    r = api.service.add("alice", Status.RECOVERING)
    refused = await api.client.delete(f"/v1/instances/{r.id}", headers=api.auth())
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "instance_recovering"
    assert api.service.instances[r.id].status == Status.RECOVERING
    forced = await api.client.delete(f"/v1/instances/{r.id}?force=true", headers=api.auth("root", "admin"))
    assert forced.status_code == 202 and forced.json()["status"] == "destroying"
    audit = (await api.client.get("/v1/audit", headers=api.auth("root", "admin"))).json()["items"]
    assert [(a["action"], a["actor"], a["instance_id"]) for a in audit] == [("force_destroy", "root", r.id)]


async def test_admin_cleanup_shape_and_refusals(api: Api) -> None:
    admin = api.auth("root", "admin")
    r = api.service.add("alice", **retained(api.service.clock))
    ok = await api.client.post(f"/v1/instances/{r.id}/retained-volume/cleanup", headers=admin)
    assert ok.status_code == 200 and ok.json() == {"ok": True, "deleted_volume_id": "vol_old"}
    rec = api.service.add("alice", Status.RECOVERING, **retained(api.service.clock))
    busy = await api.client.post(f"/v1/instances/{rec.id}/retained-volume/cleanup", headers=admin)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "instance_recovering"
    assert api.service.instances[rec.id].retained_volume_id == "vol_old"
    api.service.cleanup_refused = True
    other = api.service.add("alice", **retained(api.service.clock))
    refused = await api.client.post(f"/v1/instances/{other.id}/retained-volume/cleanup", headers=admin)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "cleanup_refused"
    assert "Refusing to destroy attached machine" in refused.json()["error"]["message"]


async def test_debug_has_every_field_and_redacts_secrets(api: Api) -> None:
    r = api.service.add("alice", secrets_encrypted={"TOKEN": "gAAAA-ciphertext"})
    body = (await api.client.get(f"/v1/instances/{r.id}/debug", headers=api.auth("root", "admin"))).json()
    assert {"alarm_at", "lease_owner", "lease_expires_at", "version", "pending_destroy_machine_id"} <= set(body)
    assert body["secrets_encrypted"] == {"TOKEN": "<redacted>"}
    assert "ciphertext" not in json.dumps(body)


async def test_patch_changes_config(api: Api) -> None:
    r = api.service.add("alice")
    resp = await api.client.patch(f"/v1/instances/{r.id}", headers=api.auth(),
                                  json={"env": {"A": "1"}, "secrets": {"S": "x"}})
    assert resp.status_code == 200 and resp.json()["env"] == {"A": "1"} and resp.json()["secret_names"] == ["S"]
    gone = await api.client.patch(f"/v1/instances/{r.id}", headers=api.auth(), json={"secrets": {"S": None}})
    assert gone.json()["secret_names"] == []
    empty = await api.client.patch(f"/v1/instances/{r.id}", headers=api.auth(), json={})
    assert empty.status_code == 422 and "nothing to change" in empty.json()["error"]["message"]


async def test_pagination_walks_every_instance_once(api: Api) -> None:
    ids = {api.service.add("alice").id for _ in range(7)}
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/instances", params=params, headers=api.auth())).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)


async def test_status_filter_accepts_repeats_and_commas(api: Api) -> None:
    a = api.service.add("alice", Status.RUNNING)
    b = api.service.add("alice", Status.STOPPED)
    api.service.add("alice", Status.RECOVERING)
    admin = api.auth("root", "admin")
    both = (await api.client.get("/v1/instances?status=running,stopped", headers=admin)).json()["items"]
    assert {i["id"] for i in both} == {a.id, b.id}
    rep = (await api.client.get("/v1/instances?status=running&status=stopped", headers=admin)).json()["items"]
    assert {i["id"] for i in rep} == {a.id, b.id}
    bad = await api.client.get("/v1/instances?status=sleeping", headers=admin)
    assert bad.status_code == 422 and "sleeping" in bad.json()["error"]["message"]


async def test_gateway_proxy_forwards_method_path_query_body_and_strips_credentials(api: Api) -> None:
    r = api.service.add("alice")
    resp = await api.client.put(f"/v1/instances/{r.id}/gateway/data/notes%20one.txt?x=1&x=2",
                                headers={**api.auth(), "Cookie": "sk_session=abc", "X-Custom": "kept"},
                                content=b"hello")
    assert resp.status_code == 200 and resp.headers["x-gateway"] == "yes"
    seen = resp.json()
    assert seen["method"] == "PUT" and seen["body"] == "hello"
    assert seen["url"] == "http://gateway.test/data/notes%20one.txt?x=1&x=2"
    assert seen["headers"]["fly-force-instance-id"] == r.machine_id
    assert seen["headers"]["x-custom"] == "kept"
    assert "authorization" not in seen["headers"] and "cookie" not in seen["headers"]


async def test_gateway_answers_503_with_retry_after_while_not_running(api: Api) -> None:
    r = api.service.add("alice", Status.RECOVERING)
    resp = await api.client.get(f"/v1/instances/{r.id}/gateway/data/x", headers=api.auth())
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["code"] == "instance_not_running" and err["details"]["instance_status"] == "recovering"
    assert not api.upstream


async def test_gateway_unreachable_is_502_not_500(tmp_path: Path) -> None:
    client, instance_id = refusing_gateway_client(tmp_path)
    async with client:
        resp = await client.get(f"/v1/instances/{instance_id}/gateway/health")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "gateway_unreachable"


async def test_openapi_and_docs_are_served(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    assert "/v1/instances/{instance_id}/retained-volume/cleanup" in spec["paths"]
    assert "/v1/instances/{instance_id}/gateway/{path}" in spec["paths"]
    assert (await api.client.get("/docs")).status_code == 200


async def test_untranslated_provider_and_fencing_errors_are_not_500(api: Api) -> None:
    from sandkeep.provider.errors import TransientError
    from sandkeep.store.base import FencedError

    r = api.service.add("alice")

    async def provider_down(*args: object, **kwargs: object) -> None:
        raise TransientError("connection refused", operation="stop_machine")

    async def fenced(*args: object, **kwargs: object) -> None:
        raise FencedError("lease lost")

    api.service.stop = provider_down  # type: ignore[method-assign]
    resp = await api.client.post(f"/v1/instances/{r.id}/stop", headers=api.auth())
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "provider_unavailable"
    assert resp.headers["retry-after"]
    api.service.stop = fenced  # type: ignore[method-assign]
    resp = await api.client.post(f"/v1/instances/{r.id}/stop", headers=api.auth())
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"


async def test_a_bug_is_a_500_with_the_error_shape_and_no_traceback(api: Api) -> None:
    r = api.service.add("alice")

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    api.service.restart = broken  # type: ignore[method-assign]
    resp = await api.client.post(f"/v1/instances/{r.id}/restart", headers=api.auth())
    assert resp.status_code == 500
    assert resp.json() == {"error": {"code": "internal_error", "status": 500,
                                     "message": "internal error; the server log has the details"}}
