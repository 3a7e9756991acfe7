"""Every route against user A (owner) / user B / admin / platform / no token / bad tokens.

Rules (sandkeep.api.auth): users see only their own instances — another user's instance is 404, not 403,
so existence does not leak; admins see and act on everything; platform creates for any user and manages
any instance but gets no admin routes and no gateway traffic. Refused requests must change nothing.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from sandkeep.store.records import Status
from tests.api.conftest import SECRET, Api
from tests.support.fake_service import retained

OWNER, OTHER, ADMIN, PLATFORM = "owner", "other", "admin", "platform"
NO_TOKEN, GARBAGE, EXPIRED, WRONG_SECRET, BAD_ROLE, NO_SUB = (
    "no_token", "garbage", "expired", "wrong_secret", "bad_role", "no_sub")
UNAUTHENTICATED = (NO_TOKEN, GARBAGE, EXPIRED, WRONG_SECRET, BAD_ROLE, NO_SUB)


def headers_for(api: Api, who: str) -> dict[str, str]:
    tokens: dict[str, str | None] = {
        OWNER: api.token("alice", "user"),
        OTHER: api.token("bob", "user"),
        ADMIN: api.token("root", "admin"),
        PLATFORM: api.token("backend", "platform"),
        NO_TOKEN: None,
        GARBAGE: "not-a-jwt",
        EXPIRED: jwt.encode({"sub": "alice", "role": "user", "exp": 1000}, SECRET, algorithm="HS256"),
        WRONG_SECRET: jwt.encode({"sub": "alice", "role": "admin"}, "another-secret-0123456789abcdefghijklmnopq",
                                 algorithm="HS256"),
        BAD_ROLE: jwt.encode({"sub": "alice", "role": "superuser"}, SECRET, algorithm="HS256"),
        NO_SUB: jwt.encode({"role": "admin"}, SECRET, algorithm="HS256"),
    }
    token = tokens[who]
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def ok_for(status: int, *who: str) -> dict[str, int]:
    return dict.fromkeys(who, status)


# (name, method, path, json body, expected status per actor; unauthenticated actors always get 401)
ROUTES: list[tuple[str, str, str, Any, dict[str, int], bool]] = [
    # name, method, path, body, expected, mutates
    ("create_self", "POST", "/v1/instances", {}, ok_for(201, OWNER, OTHER, ADMIN, PLATFORM), True),
    ("create_for_alice", "POST", "/v1/instances", {"user_id": "alice"},
     {OWNER: 201, OTHER: 403, ADMIN: 201, PLATFORM: 201}, True),
    ("list", "GET", "/v1/instances", None, ok_for(200, OWNER, OTHER, ADMIN, PLATFORM), False),
    ("list_alice", "GET", "/v1/instances?user_id=alice", None,
     {OWNER: 200, OTHER: 403, ADMIN: 200, PLATFORM: 200}, False),
    ("get", "GET", "/v1/instances/{id}", None, {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 200}, False),
    ("patch", "PATCH", "/v1/instances/{id}", {"env": {"A": "1"}},
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 200}, True),
    ("stop", "POST", "/v1/instances/{id}/stop", None, {OWNER: 202, OTHER: 404, ADMIN: 202, PLATFORM: 202}, True),
    ("restart", "POST", "/v1/instances/{id}/restart", None,
     {OWNER: 202, OTHER: 404, ADMIN: 202, PLATFORM: 202}, True),
    ("start_running", "POST", "/v1/instances/{id}/start", None,
     {OWNER: 409, OTHER: 404, ADMIN: 409, PLATFORM: 409}, True),
    ("destroy", "DELETE", "/v1/instances/{id}", None, {OWNER: 202, OTHER: 404, ADMIN: 202, PLATFORM: 202}, True),
    ("destroy_force", "DELETE", "/v1/instances/{id}?force=true", None,
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("events", "GET", "/v1/instances/{id}/events", None,
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 200}, False),
    ("fleet_events", "GET", "/v1/events", None, {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("audit", "GET", "/v1/audit", None, {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("debug", "GET", "/v1/instances/{id}/debug", None, {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("retry_recovery", "POST", "/v1/instances/{id}/recovery/retry", None,
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("cleanup", "POST", "/v1/instances/{id}/retained-volume/cleanup", None,
     {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, True),
    ("destroy_machine", "POST", "/v1/instances/{id}/machine/destroy", None,
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("approve_restore", "POST", "/v1/instances/{id}/recovery/approve-restore", None,
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("flagged_volume_delete", "POST", "/v1/instances/{id}/flagged-volumes/vol_old/delete", None,
     {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, True),
    ("list_snapshots", "GET", "/v1/instances/{id}/snapshots", None,
     {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("volume_restore", "POST", "/v1/instances/{id}/restore", {"snapshot_id": "vs_1"},
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("admin_orphans", "GET", "/v1/admin/orphans", None, {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    # token registry: everyone lists their own tokens; listing all and revoking are admin routes
    ("my_tokens", "GET", "/v1/tokens", None, ok_for(200, OWNER, OTHER, ADMIN, PLATFORM), False),
    ("admin_tokens", "GET", "/v1/admin/tokens", None, {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("revoke_token", "POST", "/v1/admin/tokens/{tok}/revoke", None,
     {OWNER: 403, OTHER: 403, ADMIN: 200, PLATFORM: 403}, False),
    ("rotate_gateway_token", "POST", "/v1/instances/{id}/gateway-token/rotate", None,
     {OWNER: 403, OTHER: 403, ADMIN: 202, PLATFORM: 403}, True),
    ("gateway", "GET", "/v1/instances/{id}/gateway/data/x", None,
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_put", "PUT", "/v1/instances/{id}/gateway/data/x", "hello",
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_post", "POST", "/v1/instances/{id}/gateway/data/x", "hello",
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_patch", "PATCH", "/v1/instances/{id}/gateway/data/x", "hello",
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_delete", "DELETE", "/v1/instances/{id}/gateway/data/x", None,
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_head", "HEAD", "/v1/instances/{id}/gateway/data/x", None,
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    ("gateway_options", "OPTIONS", "/v1/instances/{id}/gateway/data/x", None,
     {OWNER: 200, OTHER: 404, ADMIN: 200, PLATFORM: 403}, False),
    # a machine's heartbeat takes the instance's gateway token, never a user token: 401 for everyone
    ("gateway_heartbeat", "POST", "/v1/gateway/heartbeat", None, ok_for(401, OWNER, OTHER, ADMIN, PLATFORM), False),
]
# routes that need no token at all (tested in test_healthz_and_metrics_need_no_token)
PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}

ACTORS = [OWNER, OTHER, ADMIN, PLATFORM, *UNAUTHENTICATED]


@pytest.mark.parametrize("who", ACTORS)
@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
async def test_route_authorization(api: Api, route: tuple[str, str, str, Any, dict[str, int], bool],
                                   who: str) -> None:
    name, method, path, body, expected, mutates = route
    target = api.service.add("alice", Status.RUNNING, **retained(api.service.clock))
    api.service.add("bob", Status.RUNNING)
    before = api.service.instances[target.id]
    victim = api.credentials.issue_token("alice", "user", 3600).record  # {tok}: a token of the owner
    url = path.replace("{id}", target.id).replace("{tok}", victim.jti)
    kwargs: dict[str, Any] = {"headers": headers_for(api, who)}
    if isinstance(body, str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body

    resp = await api.client.request(method, url, **kwargs)

    want = 401 if who in UNAUTHENTICATED else expected[who]
    assert resp.status_code == want, (name, who, resp.text)
    if want >= 400 and method != "HEAD":  # a HEAD answer has no body
        err = resp.json()["error"]
        assert err["status"] == want and err["code"] and err["message"]
    if want == 401:
        scheme = "sandkeep-gateway-token" if name == "gateway_heartbeat" else "Bearer"
        assert resp.headers.get("www-authenticate", "").startswith(scheme)
    if want >= 400:
        if want in (401, 403, 404):
            assert api.service.calls == [], f"{name} by {who} reached the service"
            assert api.service.instances[target.id] == before
            assert not api.upstream
            assert api.credentials.get_token(victim.jti).revoked_at is None
    elif mutates:
        assert api.service.calls, f"{name} by {who} did not reach the service"


async def test_other_users_instance_is_indistinguishable_from_a_missing_one(api: Api) -> None:
    target = api.service.add("alice")
    bob = api.auth("bob")
    theirs = await api.client.get(f"/v1/instances/{target.id}", headers=bob)
    missing = await api.client.get("/v1/instances/ins_9999", headers=bob)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "instance_not_found"


async def test_list_shows_users_only_their_own(api: Api) -> None:
    mine = api.service.add("alice")
    other = api.service.add("bob")
    resp = await api.client.get("/v1/instances", headers=api.auth("alice"))
    assert [i["id"] for i in resp.json()["items"]] == [mine.id]
    admin = await api.client.get("/v1/instances", headers=api.auth("root", "admin"))
    assert {i["id"] for i in admin.json()["items"]} == {mine.id, other.id}
    filtered = await api.client.get("/v1/instances?user_id=bob", headers=api.auth("backend", "platform"))
    assert [i["id"] for i in filtered.json()["items"]] == [other.id]


async def test_platform_creates_for_any_user_and_users_cannot(api: Api) -> None:
    resp = await api.client.post("/v1/instances", json={"user_id": "carol"}, headers=api.auth("backend", "platform"))
    assert resp.status_code == 201
    assert resp.json()["user_id"] == "carol"
    denied = await api.client.post("/v1/instances", json={"user_id": "carol"}, headers=api.auth("bob"))
    assert denied.status_code == 403
    assert [i.user_id for i in api.service.instances.values()] == ["carol"]


async def test_healthz_and_metrics_need_no_token(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"ok": True}
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


def _template(path: str) -> str:
    """A matrix path as the OpenAPI spells it."""
    path = path.split("?", 1)[0].replace("{id}", "{instance_id}").replace("{tok}", "{token_id}")
    path = path.replace("/flagged-volumes/vol_old/", "/flagged-volumes/{volume_id}/")
    if "/gateway/" in path and path.startswith("/v1/instances/"):
        path = path.split("/gateway/", 1)[0] + "/gateway/{path}"
    return path


async def test_the_matrix_covers_every_route_in_the_openapi(api: Api) -> None:
    """Adding a route without adding it to ROUTES (or PUBLIC_ROUTES) fails here."""
    spec = (await api.client.get("/openapi.json")).json()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    covered = {(method, _template(path)) for _, method, path, *_ in ROUTES} | PUBLIC_ROUTES
    assert documented - covered == set(), "routes missing from the authorization matrix"
    assert covered - documented == set(), "matrix rows for routes that do not exist"
    # and every API route of the app is in the OpenAPI (nothing hidden from the matrix)
    app = api.client._transport.app  # type: ignore[attr-defined]
    hidden = []
    for route in _api_routes(app.router.routes):
        if route.path.startswith("/v1/") and not route.include_in_schema:
            hidden.append(route.path)
    assert hidden == []


def _api_routes(routes: list[Any]) -> list[Any]:
    from fastapi.routing import APIRoute

    out: list[Any] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out.extend(_api_routes(list(inner.routes)))
    return out


@pytest.mark.parametrize("who", [OWNER, PLATFORM, ADMIN])
@pytest.mark.parametrize(("action", "method", "path"), [
    ("retry_recovery", "POST", "/v1/instances/{id}/recovery/retry"),
    ("retained_volume_cleanup", "POST", "/v1/instances/{id}/retained-volume/cleanup"),
    ("destroy_machine", "POST", "/v1/instances/{id}/machine/destroy"),
    ("approve_restore", "POST", "/v1/instances/{id}/recovery/approve-restore"),
    ("flagged_volume_delete", "POST", "/v1/instances/{id}/flagged-volumes/vol_old/delete"),
    ("volume_restore", "POST", "/v1/instances/{id}/restore"),
    ("force_destroy", "DELETE", "/v1/instances/{id}?force=true"),
])
async def test_refused_admin_actions_are_audited(api: Api, who: str, action: str, method: str, path: str) -> None:
    """Every admin action lands in the audit log, refusals included: a non-admin token (403) and, for an
    admin, an unknown instance (404)."""
    target = api.service.add("alice", Status.RUNNING)
    url = path.replace("{id}", target.id if who != ADMIN else "ins_missing")
    resp = await api.client.request(method, url, headers=headers_for(api, who))
    assert resp.status_code == (404 if who == ADMIN else 403)
    assert api.service.calls == []
    audit = await api.client.get("/v1/audit", headers=api.auth("root", "admin"))
    items = audit.json()["items"]
    assert len(items) == 1, items
    entry = items[0]
    assert entry["action"] == action and entry["outcome"] == "refused"
    assert entry["actor"] == {OWNER: "alice", PLATFORM: "backend", ADMIN: "root"}[who]
    assert entry["instance_id"] == url.split("/")[3].split("?")[0]
    assert str(resp.status_code) in entry["details"]["error"]
