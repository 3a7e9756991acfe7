"""Limits, attacked over HTTP on a real `sandkeep serve`: the per-user instance quota (also under concurrent
creates), the image allow-list, machine sizes per role, sign-in throttling, and refused admin calls that
must not grow the audit log without bound."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.serving import Serve, running_serve
from tests.security.authsupport import error_code, paste_token
from tests.support.wait import wait_until

QUOTA = 2
LIMITS_ENV = {
    "SANDKEEP_MAX_INSTANCES_PER_USER": str(QUOTA),
    "SANDKEEP_SIGNIN_MAX_FAILURES": "3",
    "SANDKEEP_SIGNIN_FAILURE_WINDOW": "300",
    "SANDKEEP_AUDIT_REFUSED_MAX": "3",
}
FOREIGN_IMAGE = "registry.fly.io/another-app:latest"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(tmp_path_factory.mktemp("limits"), extra_env=LIMITS_ENV) as running:
        yield running


def create(serve: Serve, who: str, role: str = "user", **body: Any) -> httpx.Response:
    return httpx.post(f"{serve.url}/v1/instances", json=body, headers=serve.headers(who, role), timeout=60)


def live_ids(serve: Serve, user: str) -> set[str]:
    resp = httpx.get(f"{serve.url}/v1/instances", params={"user_id": user, "limit": 200},
                     headers=serve.headers("lim-root", "admin"), timeout=30)
    return {i["id"] for i in resp.json()["items"]}


def test_the_instance_quota_refuses_the_next_create_and_frees_up_on_destroy(serve: Serve) -> None:
    made = [create(serve, "lim-alice") for _ in range(QUOTA)]
    assert [r.status_code for r in made] == [201] * QUOTA, [r.text for r in made]
    over = create(serve, "lim-alice")
    assert over.status_code == 403 and error_code(over) == "quota_exceeded"
    assert str(QUOTA) in over.json()["error"]["message"]
    for_her = create(serve, "lim-backend", "platform", user_id="lim-alice")  # the owner's quota, whoever asks
    assert for_her.status_code == 403 and error_code(for_her) == "quota_exceeded"
    assert live_ids(serve, "lim-alice") == {r.json()["id"] for r in made}

    with serve.client("lim-alice") as client:
        first = made[0].json()["id"]
        serve.wait_status(client, first, "running")
        assert client.delete(f"/v1/instances/{first}").status_code == 202
        serve.wait_status(client, first, "destroyed")
    again = create(serve, "lim-alice")
    assert again.status_code == 201, again.text


def test_admins_are_exempt_from_the_quota(serve: Serve) -> None:
    for _ in range(QUOTA):
        assert create(serve, "lim-root", "admin").status_code == 201
    extra = create(serve, "lim-root", "admin")
    assert extra.status_code == 201, extra.text
    assert len(live_ids(serve, "lim-root")) == QUOTA + 1


def test_concurrent_creates_cannot_slip_past_the_quota(serve: Serve) -> None:
    headers = serve.headers("lim-bob")

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{serve.url}/v1/instances", json={}, headers=headers, timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * QUOTA + [403] * (6 - QUOTA), [r.text for r in answers]
    assert all(error_code(r) == "quota_exceeded" for r in answers if r.status_code == 403)
    assert len(live_ids(serve, "lim-bob")) == QUOTA


@pytest.mark.parametrize("role", ["user", "platform", "admin"])
def test_an_image_outside_the_allow_list_is_refused_for_every_role(serve: Serve, role: str) -> None:
    user = f"lim-img-{role}"
    r = create(serve, user, role, image=FOREIGN_IMAGE)
    assert r.status_code == 403 and error_code(r) == "image_not_allowed"
    assert "sandkeep/gateway" in r.json()["error"]["message"]  # names what is allowed
    assert live_ids(serve, user) == set()


def test_machine_sizes_follow_the_role(serve: Serve) -> None:
    big = create(serve, "lim-carol", size="performance-8x")
    assert big.status_code == 403 and error_code(big) == "machine_size_not_allowed"
    by_platform = create(serve, "lim-backend", "platform", user_id="lim-carol", size="performance-1x")
    assert by_platform.status_code == 403 and error_code(by_platform) == "machine_size_not_allowed"
    assert live_ids(serve, "lim-carol") == set()

    made = create(serve, "lim-carol")
    assert made.status_code == 201 and made.json()["size"] == "shared-cpu-1x"
    iid = made.json()["id"]
    with serve.client("lim-carol") as client:
        grow = client.patch(f"/v1/instances/{iid}", json={"size": "performance-2x"})
        assert grow.status_code == 403 and error_code(grow) == "machine_size_not_allowed"
        assert client.get(f"/v1/instances/{iid}").json()["size"] == "shared-cpu-1x"
        serve.wait_status(client, iid, "running")
        assert client.patch(f"/v1/instances/{iid}", json={"size": "shared-cpu-2x"}).status_code == 200
    with serve.client("lim-root", "admin") as admin:
        done = admin.patch(f"/v1/instances/{iid}", json={"size": "performance-2x"})
        assert done.status_code == 200 and done.json()["size"] == "performance-2x"


def test_refused_admin_calls_cannot_grow_the_audit_log_without_bound(serve: Serve) -> None:
    headers = serve.headers("lim-mallory")
    for _ in range(25):
        r = httpx.post(f"{serve.url}/v1/instances/ins_nope/recovery/retry", headers=headers, timeout=30)
        assert r.status_code == 403
    audit = httpx.get(f"{serve.url}/v1/audit", params={"limit": 500}, headers=serve.headers("lim-root", "admin"),
                      timeout=30).json()["items"]
    refused = [a for a in audit if a["actor"] == "lim-mallory"]
    assert len(refused) == 3 and all(a["outcome"] == "refused" for a in refused)
    wait_until(lambda: "audit.refusals_suppressed" in serve.proc.log(), timeout=30,
               message="the suppression is logged")
    assert serve.proc.log().count("audit.refusals_suppressed") == 1


def test_repeated_failed_sign_ins_are_throttled_with_retry_after(serve: Serve) -> None:
    for _ in range(3):
        bad = paste_token(serve, "not-a-token")
        assert bad.status_code == 401
    good = serve.token("lim-dave")
    blocked = paste_token(serve, good)  # even a valid token waits: the client is throttled, not the token
    assert blocked.status_code == 429
    wait = int(blocked.headers["retry-after"])
    assert 1 <= wait <= 300
    link = httpx.get(f"{serve.url}/login/once/guessed-code", timeout=30)
    assert link.status_code == 429 and link.headers.get("retry-after")
    api = httpx.get(f"{serve.url}/v1/instances", headers={"Authorization": f"Bearer {good}"}, timeout=30)
    assert api.status_code == 200  # API calls are not sign-ins
