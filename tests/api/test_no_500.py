"""The API never answers 500 to bad input, and every error has the standard shape.

Two layers: a hand-written fuzz of the classic bad inputs (malformed JSON, wrong types, huge values,
unknown ids, bad cursors, unknown routes and methods), and — when schemathesis is installed — a
property-based run over every operation in /openapi.json.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandkeep.store.records import Status
from tests.api.conftest import Api

HUGE = 10**40


def assert_error_shape(resp: Any, status: int | None = None) -> dict[str, Any]:
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    body = resp.json()
    err = body["error"]
    assert set(err) >= {"code", "message", "status"}
    assert err["status"] == resp.status_code and isinstance(err["code"], str) and err["message"]
    return dict(err)


BAD_BODIES: list[tuple[str, bytes | str, str]] = [
    ("POST", b"{not json", "application/json"),
    ("POST", b"", "application/json"),
    ("POST", b"[]", "application/json"),
    ("POST", b"null", "application/json"),
    ("POST", b"\xff\xfe\x00garbage", "application/json"),
    ("POST", json.dumps({"size": 5}), "application/json"),
    ("POST", json.dumps({"size": "x" * 10000}), "application/json"),
    ("POST", json.dumps({"env": "A=1"}), "application/json"),
    ("POST", json.dumps({"env": {"A": 1}}), "application/json"),
    ("POST", json.dumps({"env": {"1BAD": "x"}}), "application/json"),
    ("POST", json.dumps({"env": {"A": "x" * 40000}}), "application/json"),
    ("POST", json.dumps({"env": {f"K{i}": "v" for i in range(500)}}), "application/json"),
    ("POST", json.dumps({"secrets": ["a"]}), "application/json"),
    ("POST", json.dumps({"user_id": ""}), "application/json"),
    ("POST", json.dumps({"user_id": "../../etc"}), "application/json"),
    ("POST", json.dumps({"user_id": 12}), "application/json"),
    ("POST", json.dumps({"unknown": True}), "application/json"),
    ("POST", json.dumps({"size": HUGE}), "application/json"),
    ("POST", "size=big", "application/x-www-form-urlencoded"),
    ("POST", json.dumps({"image": "bad image name with spaces"}), "application/json"),
]


@pytest.mark.parametrize(("method", "body", "ctype"), BAD_BODIES)
async def test_bad_create_bodies_are_4xx(api: Api, method: str, body: bytes | str, ctype: str) -> None:
    resp = await api.client.request(method, "/v1/instances", content=body,
                                    headers={**api.auth("root", "admin"), "Content-Type": ctype})
    if resp.status_code == 201:  # an empty (or null) body is a valid "all defaults" create
        assert body in (b"", b"null")
        return
    err = assert_error_shape(resp)
    assert resp.status_code in (400, 415, 422)
    assert err["code"] in ("invalid_json", "validation_error", "unsupported_media_type")
    assert (resp.status_code == 415) == (err["code"] == "unsupported_media_type") == (ctype != "application/json")
    assert not api.service.instances


async def test_malformed_json_is_400_invalid_json(api: Api) -> None:
    resp = await api.client.post("/v1/instances", content=b'{"size": ', headers={**api.auth(),
                                                                               "Content-Type": "application/json"})
    assert assert_error_shape(resp, 400)["code"] == "invalid_json"


async def test_bad_patch_bodies(api: Api) -> None:
    r = api.service.add("alice")
    for body in (b"{", b"[1]", json.dumps({"env": None, "size": None}).encode(),
                 json.dumps({"secrets": {"A": 5}}).encode(), json.dumps({"status": "running"}).encode()):
        resp = await api.client.patch(f"/v1/instances/{r.id}", content=body,
                                      headers={**api.auth(), "Content-Type": "application/json"})
        assert_error_shape(resp)
        assert resp.status_code in (400, 422)
    assert api.service.instances[r.id].config_generation == 0


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", f"limit={HUGE}", "limit=abc", "limit=1e3", "cursor=%%%", "cursor=bm90LWEtY3Vyc29y",
    "cursor=" + "A" * 3000, "status=", "status=destroyed%00", "user_id=" + "u" * 500, "region=" + "r" * 500,
])
async def test_bad_list_queries_are_4xx(api: Api, query: str) -> None:
    api.service.add("alice")
    resp = await api.client.get(f"/v1/instances?{query}", headers=api.auth("root", "admin"))
    if resp.status_code == 200:
        assert query in ("status=",)  # an empty filter is no filter
        return
    err = assert_error_shape(resp)
    assert resp.status_code in (400, 422)
    if query.startswith("cursor=") and resp.status_code == 400:
        assert err["code"] == "invalid_cursor"


@pytest.mark.parametrize("path", ["/v1/events?cursor=zzz", "/v1/audit?cursor=zzz", "/v1/events?limit=100000",
                                  "/v1/audit?limit=-5"])
async def test_bad_admin_listing_queries(api: Api, path: str) -> None:
    assert_error_shape(await api.client.get(path, headers=api.auth("root", "admin")))


@pytest.mark.parametrize("instance_id", ["ins_missing", "x" * 300, "%00", "ins_%2F..%2Fetc", "💥", "a b"])
@pytest.mark.parametrize("suffix", ["", "/events", "/start", "/debug", "/gateway/x", "/recovery/retry"])
async def test_unknown_or_weird_ids_are_404(api: Api, instance_id: str, suffix: str) -> None:
    method = "POST" if suffix in ("/start", "/recovery/retry") else "GET"
    resp = await api.client.request(method, f"/v1/instances/{instance_id}{suffix}", headers=api.auth("root", "admin"))
    err = assert_error_shape(resp)
    assert resp.status_code in (404, 422), resp.text
    if resp.status_code == 404:
        assert err["code"] in ("instance_not_found", "not_found")


async def test_unknown_routes_and_methods_have_the_error_shape(api: Api) -> None:
    assert assert_error_shape(await api.client.get("/v2/nothing"), 404)["code"] == "not_found"
    assert assert_error_shape(await api.client.put("/v1/instances", headers=api.auth()), 405)["code"] == \
        "method_not_allowed"
    assert_error_shape(await api.client.delete("/healthz"), 405)


async def test_bad_authorization_headers(api: Api) -> None:
    for header in ("Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer a.b.c", "Bearer " + "x" * 5000, "Token abc"):
        resp = await api.client.get("/v1/instances", headers={"Authorization": header})
        assert assert_error_shape(resp, 401)["code"] == "unauthorized"


async def test_oversized_json_body_is_413(api: Api) -> None:
    resp = await api.client.post("/v1/instances", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                                 headers={**api.auth(), "Content-Type": "application/json"})
    assert assert_error_shape(resp, 413)["code"] == "payload_too_large"
    assert not api.service.instances


async def test_actions_in_the_wrong_state_are_409_not_500(api: Api) -> None:
    r = api.service.add("alice", Status.DESTROYED)
    for action in ("start", "stop", "restart"):
        err = assert_error_shape(await api.client.post(f"/v1/instances/{r.id}/{action}", headers=api.auth()), 409)
        assert err["code"] == "invalid_state"


async def test_oversized_chunked_body_is_413(api: Api) -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    resp = await api.client.post("/v1/instances", content=chunks(),
                                 headers={**api.auth(), "Content-Type": "application/json"})
    assert assert_error_shape(resp, 413)["code"] == "payload_too_large"
    assert not api.service.instances
