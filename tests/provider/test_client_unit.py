"""MachinesClient against a scripted API (httpx.MockTransport): classification, retries, creates, fallback."""

from __future__ import annotations

import random
from email.utils import format_datetime

import httpx
import pytest
from structlog.testing import capture_logs

from sandkeep.provider.client import MachinesClient, parse_retry_after
from sandkeep.provider.errors import (
    AuthError,
    CapacityError,
    ConflictError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
    WaitTimeoutError,
    classify,
)
from sandkeep.provider.models import MachineConfig, MachineEvent, Mount
from sandkeep.provider.retry import RetryPolicy
from tests.provider.fakeapi import TOKEN, FakeApi, body, err, machine, make_client, ok, raises, volume

APP = "sk-owner"
M_PATH = f"/v1/apps/{APP}/machines"
V_PATH = f"/v1/apps/{APP}/volumes"
CONFIG = MachineConfig(image="sandkeep/gateway", env={"A": "1"}, metadata={"instance": "inst-1"},
                       mounts=[Mount(volume="vol_1", path="/data")])


def _bounds(policy_base: float, policy_max: float, attempt: int) -> tuple[float, float]:
    cap = min(policy_max, policy_base * 2 ** (attempt - 1))
    return cap / 2, cap


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (404, "machine not found", NotFoundError),
        (404, "app not found", NotFoundError),
        (400, "volume vol_x not found", MissingVolumeError),
        (422, "could not reserve resource for machine: insufficient resources to create new machine",
         CapacityError),
        (412, "insufficient_capacity", CapacityError),
        (503, "no capacity available in lcl-a", CapacityError),
        (403, "over the allowed quota for this organization", CapacityError),
        (408, "deadline_exceeded: machine failed to reach desired state, started, currently stopped",
         WaitTimeoutError),
        (429, "rate limit exceeded", RateLimitedError),
        (500, "internal error", TransientError),
        (502, "bad gateway", TransientError),
        (503, "service unavailable", TransientError),
        (401, "unauthorized", AuthError),
        (403, "forbidden", AuthError),
        (409, "conflict", ConflictError),
        (412, "failed_precondition: volume is currently bound to machine: m1", ConflictError),
        (400, "failed_precondition: volume is currently bound to machine: m1", ConflictError),
        (422, "image not in catalogue: nope", InvalidRequestError),
        (400, "bad json", InvalidRequestError),
    ],
)
def test_classify_maps_every_error_class(status: int, message: str, expected: type[ProviderError]) -> None:
    exc = classify(status, f'{{"error": "{message}", "status": "x"}}', operation="op")
    assert type(exc) is expected
    assert exc.status == status
    assert exc.message == message


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (404, "machine not found", NotFoundError),
        (400, "volume vol_gone not found", MissingVolumeError),
        (401, "bad token", AuthError),
        (422, "unknown image", InvalidRequestError),
        (412, "failed_precondition: nope", ConflictError),
        (503, "insufficient_capacity", CapacityError),
    ],
)
async def test_client_raises_classified_errors_without_retrying_permanent_ones(
        status: int, message: str, expected: type[ProviderError]) -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(status, message))
    client, clock = make_client(api)
    with pytest.raises(expected) as info:
        await client.get_machine(APP, "m1")
    assert info.value.status == status
    assert "get_machine" in str(info.value)
    assert len(api.requests) == 1
    assert clock.sleeps == []
    await client.aclose()


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError])
async def test_network_failures_are_transient_and_retried(exc_type: type[httpx.TransportError]) -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", raises(exc_type))
    client, clock = make_client(api, max_attempts=3)
    with pytest.raises(TransientError) as info:
        await client.get_machine(APP, "m1")
    assert info.value.status is None
    assert len(api.requests) == 3
    assert len(clock.sleeps) == 2
    await client.aclose()


async def test_malformed_success_body_is_a_provider_error() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", httpx.Response(200, text="<html>oops"))
    client, _ = make_client(api)
    with pytest.raises(ProviderError, match="malformed JSON"):
        await client.get_machine(APP, "m1")
    api.on("GET", f"{M_PATH}/m2", ok({"no": "id"}))
    with pytest.raises(ProviderError, match="unexpected response shape"):
        await client.get_machine(APP, "m2")
    await client.aclose()


# --------------------------------------------------------------------------- retry and backoff


async def test_transient_errors_are_retried_with_bounded_jittered_backoff() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(500, "a"), err(502, "b"), err(503, "c"), ok(machine()))
    client, clock = make_client(api, backoff_base=0.5, backoff_max=10.0)
    m = await client.get_machine(APP, "m1")
    assert m.id == "m1" and m.state == "started"
    assert len(api.requests) == 4
    assert len(clock.sleeps) == 3
    for attempt, slept in enumerate(clock.sleeps, start=1):
        low, high = _bounds(0.5, 10.0, attempt)
        assert low <= slept <= high, (attempt, slept)
    await client.aclose()


async def test_retries_stop_after_max_attempts_and_reraise_the_last_error() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(500, "first"), err(500, "second"), err(503, "last one"))
    client, clock = make_client(api, max_attempts=3)
    with pytest.raises(TransientError, match="last one"):
        await client.get_machine(APP, "m1")
    assert len(api.requests) == 3
    assert len(clock.sleeps) == 2
    await client.aclose()


async def test_backoff_is_capped_at_backoff_max() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(500, "down"))
    client, clock = make_client(api, max_attempts=8, backoff_base=1.0, backoff_max=2.0)
    with pytest.raises(TransientError):
        await client.get_machine(APP, "m1")
    assert len(clock.sleeps) == 7
    assert all(s <= 2.0 for s in clock.sleeps)
    assert all(s >= 1.0 for s in clock.sleeps[1:])  # from the 2nd retry on the cap is reached: [cap/2, cap]
    await client.aclose()


def test_backoff_is_jittered() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=100.0, rng=random.Random(42))
    draws = {policy.backoff(4) for _ in range(20)}
    assert len(draws) > 10
    assert all(4.0 <= d <= 8.0 for d in draws)


async def test_max_attempts_one_means_no_retry() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(500, "x"), ok(machine()))
    client, clock = make_client(api, max_attempts=1)
    with pytest.raises(TransientError):
        await client.get_machine(APP, "m1")
    assert len(api.requests) == 1 and clock.sleeps == []
    await client.aclose()


async def test_429_retry_after_seconds_is_honoured() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(429, "slow down", {"Retry-After": "3"}), ok(machine()))
    client, clock = make_client(api, backoff_base=0.1, backoff_max=1.0)
    m = await client.get_machine(APP, "m1")
    assert m.id == "m1"
    assert clock.sleeps == [3.0]
    await client.aclose()


async def test_429_retry_after_http_date_is_honoured_relative_to_the_clock() -> None:
    api = FakeApi()
    client, clock = make_client(api, backoff_base=0.1, backoff_max=1.0)
    when = clock.now().replace(microsecond=0)
    from datetime import timedelta
    date = format_datetime(when + timedelta(seconds=7), usegmt=True)
    api.on("GET", f"{M_PATH}/m1", err(429, "slow down", {"Retry-After": date}), ok(machine()))
    await client.get_machine(APP, "m1")
    assert len(clock.sleeps) == 1
    assert 6.0 <= clock.sleeps[0] <= 7.0
    await client.aclose()


async def test_429_without_retry_after_uses_backoff_and_gives_up_as_rate_limited() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(429, "slow down"))
    client, clock = make_client(api, max_attempts=4, backoff_base=0.2, backoff_max=5.0)
    with pytest.raises(RateLimitedError) as info:
        await client.get_machine(APP, "m1")
    assert info.value.retry_after is None
    assert len(api.requests) == 4
    for attempt, slept in enumerate(clock.sleeps, start=1):
        low, high = _bounds(0.2, 5.0, attempt)
        assert low <= slept <= high


async def test_429_with_retry_after_beyond_the_limit_goes_to_the_caller() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(429, "come back later", {"Retry-After": "3600"}), ok(machine()))
    client, clock = make_client(api, max_retry_after=60.0)
    with pytest.raises(RateLimitedError) as info:
        await client.get_machine(APP, "m1")
    assert info.value.retry_after == 3600.0
    assert len(api.requests) == 1 and clock.sleeps == []
    await client.aclose()


def test_parse_retry_after() -> None:
    from sandkeep.clock import FakeClock

    clock = FakeClock()
    assert parse_retry_after(None, clock) is None
    assert parse_retry_after("", clock) is None
    assert parse_retry_after("2.5", clock) == 2.5
    assert parse_retry_after("-4", clock) == 0.0
    assert parse_retry_after("soon", clock) is None
    assert parse_retry_after("nan", clock) is None
    past = format_datetime(clock.now().replace(year=2020), usegmt=True)
    assert parse_retry_after(past, clock) == 0.0


async def test_retries_are_logged_without_the_token() -> None:
    api = FakeApi().on("GET", f"{M_PATH}/m1", err(503, "busy"), err(429, "slow", {"Retry-After": "1"}),
                       ok(machine()))
    client, _ = make_client(api)
    with capture_logs() as logs:
        await client.get_machine(APP, "m1")
    retries = [e for e in logs if e["event"] == "provider.retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert retries[0]["error"] == "TransientError" and retries[0]["status"] == 503
    assert retries[1]["error"] == "RateLimitedError" and retries[1]["retry_after"] == 1.0
    assert retries[1]["sleep_seconds"] >= 1.0
    assert all("get_machine" in e["operation"] for e in retries)
    assert TOKEN not in repr(logs)
    assert TOKEN not in repr(client)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    await client.aclose()


# --------------------------------------------------------------------------- non-idempotent creates


async def test_408_on_create_machine_is_resolved_by_name_without_a_second_create() -> None:
    created = machine("m-new", name="inst-1-g1")
    api = (FakeApi()
           .on("GET", M_PATH, ok([]), ok([created]))
           .on("POST", M_PATH, err(408, "deadline_exceeded: request timed out")))
    client, clock = make_client(api)
    m = await client.create_machine(APP, config=CONFIG, name="inst-1-g1", region="lcl-a")
    assert m.id == "m-new"
    assert len(api.calls("POST", M_PATH)) == 1
    assert len(clock.sleeps) == 1  # backed off once before looking
    await client.aclose()


async def test_408_on_create_machine_not_found_by_name_is_retried() -> None:
    api = (FakeApi()
           .on("GET", M_PATH, ok([]))
           .on("POST", M_PATH, err(408, "deadline_exceeded"), ok(machine("m2", name="vm"))))
    client, _ = make_client(api)
    m = await client.create_machine(APP, config=CONFIG, name="vm")
    assert m.id == "m2"
    assert len(api.calls("POST", M_PATH)) == 2
    assert len(api.calls("GET", M_PATH)) == 2  # before the first create, and the look-up before the retry
    await client.aclose()


async def test_create_machine_5xx_that_did_create_returns_the_new_machine_not_an_old_namesake() -> None:
    old = machine("m-old", name="vm", state="stopped")
    new = machine("m-new", name="vm")
    api = (FakeApi()
           .on("GET", M_PATH, ok([old]), ok([old, new]))
           .on("POST", M_PATH, err(502, "bad gateway")))
    client, _ = make_client(api)
    m = await client.create_machine(APP, config=CONFIG, name="vm")
    assert m.id == "m-new"
    assert len(api.calls("POST", M_PATH)) == 1
    await client.aclose()


async def test_create_machine_final_ambiguous_failure_is_looked_up_before_failing() -> None:
    new = machine("m-late", name="vm")
    api = (FakeApi()
           .on("GET", M_PATH, ok([]), ok([]), ok([new]))
           .on("POST", M_PATH, err(500, "oops")))
    client, _ = make_client(api, max_attempts=2)
    m = await client.create_machine(APP, config=CONFIG, name="vm")
    assert m.id == "m-late"
    assert len(api.calls("POST", M_PATH)) == 2
    await client.aclose()


async def test_create_machine_gives_up_after_attempts_when_nothing_was_created() -> None:
    api = FakeApi().on("GET", M_PATH, ok([])).on("POST", M_PATH, err(500, "still broken"))
    client, _ = make_client(api, max_attempts=3)
    with pytest.raises(TransientError, match="still broken"):
        await client.create_machine(APP, config=CONFIG, name="vm")
    assert len(api.calls("POST", M_PATH)) == 3
    await client.aclose()


async def test_failed_lookup_after_ambiguous_create_never_leads_to_a_blind_create() -> None:
    new = machine("m-new", name="vm")
    api = (FakeApi()
           .on("GET", M_PATH, ok([]), err(503, "list down"), ok([new]))
           .on("POST", M_PATH, err(500, "oops")))
    client, _ = make_client(api)
    m = await client.create_machine(APP, config=CONFIG, name="vm")
    assert m.id == "m-new"
    assert len(api.calls("POST", M_PATH)) == 1
    await client.aclose()


async def test_create_machine_without_name_does_not_retry_ambiguous_failures() -> None:
    api = FakeApi().on("POST", M_PATH, err(500, "maybe created"), ok(machine()))
    client, _ = make_client(api)
    with pytest.raises(TransientError):
        await client.create_machine(APP, config=CONFIG)
    assert len(api.calls("POST")) == 1
    api.on("POST", M_PATH, err(429, "slow", {"Retry-After": "1"}), ok(machine("m9")))
    m = await client.create_machine(APP, config=CONFIG)
    assert m.id == "m9"
    await client.aclose()


async def test_create_machine_sends_fly_shaped_body() -> None:
    api = FakeApi().on("GET", M_PATH, ok([])).on("POST", M_PATH, ok(machine("m1", name="vm")))
    client, _ = make_client(api)
    await client.create_machine(APP, config=CONFIG, name="vm", region="lcl-b", skip_launch=True)
    sent = body(api.calls("POST", M_PATH)[0])
    assert sent["name"] == "vm" and sent["region"] == "lcl-b" and sent["skip_launch"] is True
    assert sent["config"]["image"] == "sandkeep/gateway"
    assert sent["config"]["mounts"] == [{"volume": "vol_1", "path": "/data"}]
    assert sent["config"]["metadata"] == {"instance": "inst-1"}
    assert "guest" not in sent["config"]  # None fields are left out
    await client.aclose()


async def test_create_machine_missing_volume_and_capacity_are_not_retried() -> None:
    api = FakeApi().on("GET", M_PATH, ok([])).on("POST", M_PATH, err(400, "volume vol_1 not found"))
    client, _ = make_client(api)
    with pytest.raises(MissingVolumeError):
        await client.create_machine(APP, config=CONFIG, name="vm")
    api.on("POST", M_PATH, err(412, "insufficient resources"))
    with pytest.raises(CapacityError):
        await client.create_machine(APP, config=CONFIG, name="vm")
    assert len(api.calls("POST")) == 2
    await client.aclose()


async def test_create_volume_transient_failure_resolved_by_name_and_region() -> None:
    other_region = volume("vol_b", name="data", region="lcl-b")
    made = volume("vol_new", name="data", region="lcl-a")
    api = (FakeApi()
           .on("GET", V_PATH, ok([other_region]), ok([other_region, made]))
           .on("POST", V_PATH, raises(httpx.ReadTimeout)))
    client, _ = make_client(api)
    v = await client.create_volume(APP, name="data", region="lcl-a", size_gb=1, source_volume_id="vol_src")
    assert v.id == "vol_new"
    assert len(api.calls("POST", V_PATH)) == 1
    sent = body(api.calls("POST", V_PATH)[0])
    assert sent == {"name": "data", "region": "lcl-a", "size_gb": 1, "source_volume_id": "vol_src"}
    await client.aclose()


async def test_snapshot_retention_is_sent_with_every_create_fork_and_restore() -> None:
    made = volume("vol_new", name="data", region="lcl-a")
    api = FakeApi().on("GET", V_PATH, ok([])).on("POST", V_PATH, ok(made))
    client, _ = make_client(api, snapshot_retention=12)
    await client.create_volume(APP, name="data", region="lcl-a", size_gb=1)
    await client.create_volume(APP, name="data", region="lcl-a", source_volume_id="vol_src")
    await client.create_volume(APP, name="data", region="lcl-a", size_gb=3, snapshot_id="vs_1")
    sent = [body(r) for r in api.calls("POST", V_PATH)]
    assert [b["snapshot_retention"] for b in sent] == [12, 12, 12]
    assert sent[1]["source_volume_id"] == "vol_src" and sent[2]["snapshot_id"] == "vs_1"
    await client.aclose()
    with pytest.raises(ValueError, match="1-60"):
        MachinesClient("http://fly.test", TOKEN, snapshot_retention=61)


async def test_create_snapshot_parses_body_or_returns_none_and_is_not_blindly_retried() -> None:
    path = f"{V_PATH}/vol_1/snapshots"
    api = FakeApi().on("POST", path, ok({"id": "vs_1", "size": 10, "status": "created"}))
    client, _ = make_client(api)
    snap = await client.create_snapshot(APP, "vol_1")
    assert snap is not None and snap.id == "vs_1"
    api.on("POST", path, ok(status=200))
    assert await client.create_snapshot(APP, "vol_1") is None
    api.on("POST", path, err(500, "boom"))
    with pytest.raises(TransientError):
        await client.create_snapshot(APP, "vol_1")
    assert len(api.calls("POST")) == 3
    await client.aclose()


# --------------------------------------------------------------------------- region fallback


async def test_fallback_moves_on_only_on_capacity_errors() -> None:
    def by_region(request: httpx.Request) -> httpx.Response:
        region = body(request)["region"]
        if region in ("lcl-a", "lcl-b"):
            return err(412, f"insufficient resources in {region}")
        return ok(volume("vol_c", region=region))

    api = FakeApi().on("GET", V_PATH, ok([])).on("POST", V_PATH, by_region)
    client, _ = make_client(api)
    v = await client.create_volume_with_fallback(APP, regions=["lcl-a", "lcl-b", "lcl-c"], name="data", size_gb=1)
    assert v.id == "vol_c" and v.region == "lcl-c"
    assert [body(r)["region"] for r in api.calls("POST")] == ["lcl-a", "lcl-b", "lcl-c"]
    await client.aclose()


async def test_fallback_reraises_the_last_capacity_error() -> None:
    def by_region(request: httpx.Request) -> httpx.Response:
        return err(503, f"insufficient_capacity in {body(request)['region']}")

    api = FakeApi().on("GET", V_PATH, ok([])).on("POST", V_PATH, by_region)
    client, _ = make_client(api)
    with pytest.raises(CapacityError, match="in lcl-c"):
        await client.create_volume_with_fallback(APP, regions=["lcl-a", "lcl-b", "lcl-c"], name="data")
    assert len(api.calls("POST")) == 3  # capacity errors are not retried within a region
    await client.aclose()


@pytest.mark.parametrize(("reply", "expected"), [
    (err(422, "size_gb must be positive"), InvalidRequestError),
    (err(404, "app not found"), NotFoundError),
    (err(500, "internal"), TransientError),
])
async def test_fallback_stops_at_any_other_error(reply: httpx.Response, expected: type[ProviderError]) -> None:
    api = FakeApi().on("GET", V_PATH, ok([])).on("POST", V_PATH, reply)
    client, _ = make_client(api, max_attempts=2)
    with pytest.raises(expected):
        await client.create_volume_with_fallback(APP, regions=["lcl-a", "lcl-b"], name="data")
    assert {body(r)["region"] for r in api.calls("POST")} == {"lcl-a"}
    await client.aclose()


async def test_fallback_needs_regions() -> None:
    client, _ = make_client(FakeApi())
    with pytest.raises(InvalidRequestError):
        await client.create_volume_with_fallback(APP, regions=[], name="data")
    await client.aclose()


# --------------------------------------------------------------------------- the other operations


async def test_destroy_and_delete_treat_404_as_done_only_when_missing_ok() -> None:
    api = (FakeApi()
           .on("DELETE", f"{M_PATH}/m1", err(404, "machine not found"))
           .on("DELETE", f"{V_PATH}/vol_1", err(404, "volume not found")))
    client, _ = make_client(api)
    await client.destroy_machine(APP, "m1")
    await client.delete_volume(APP, "vol_1")
    with pytest.raises(NotFoundError):
        await client.destroy_machine(APP, "m1", missing_ok=False)
    with pytest.raises(NotFoundError):
        await client.delete_volume(APP, "vol_1", missing_ok=False)
    destroys = api.calls("DELETE", f"{M_PATH}/m1")
    assert destroys[0].url.params["force"] == "true"
    await client.aclose()


async def test_destroy_without_force_sends_no_force_and_delete_of_attached_volume_conflicts() -> None:
    api = (FakeApi()
           .on("DELETE", f"{M_PATH}/m1", ok({"ok": True}))
           .on("DELETE", f"{V_PATH}/vol_1", err(412, "failed_precondition: volume is currently bound to machine: m1")))
    client, _ = make_client(api)
    await client.destroy_machine(APP, "m1", force=False)
    assert "force" not in api.requests[0].url.params
    with pytest.raises(ConflictError, match="bound to machine"):
        await client.delete_volume(APP, "vol_1")
    assert len(api.calls("DELETE", f"{V_PATH}/vol_1")) == 1
    await client.aclose()


async def test_wait_sends_fly_params_caps_timeout_and_raises_408_unretried() -> None:
    path = f"{M_PATH}/m1/wait"
    api = FakeApi().on("GET", path, ok({"ok": True}))
    client, clock = make_client(api)
    await client.wait_machine(APP, "m1", state="stopped", timeout=600, instance_id="inst-9")
    params = api.requests[-1].url.params
    assert params["state"] == "stopped" and params["timeout"] == "60" and params["instance_id"] == "inst-9"
    await client.wait_machine(APP, "m1", timeout=0.2)
    assert api.requests[-1].url.params["timeout"] == "1"
    assert api.requests[-1].url.params["state"] == "started"
    api.on("GET", path, err(408, "deadline_exceeded: machine failed to reach desired state, started, "
                                 "currently stopped"))
    with pytest.raises(WaitTimeoutError, match="deadline_exceeded"):
        await client.wait_machine(APP, "m1", timeout=5)
    assert len(api.requests) == 3 and clock.sleeps == []
    await client.aclose()


async def test_list_machines_filters_as_query_params() -> None:
    api = FakeApi().on("GET", M_PATH, ok([machine("m1", metadata={"instance": "i1"})]))
    client, _ = make_client(api)
    ms = await client.list_machines(APP, metadata={"instance": "i1", "owner": "bob"}, region="lcl-a",
                                    include_deleted=True)
    assert [m.id for m in ms] == ["m1"] and ms[0].metadata == {"instance": "i1"}
    params = api.requests[0].url.params
    assert params["metadata.instance"] == "i1" and params["metadata.owner"] == "bob"
    assert params["region"] == "lcl-a" and params["include_deleted"] == "true"
    await client.list_machines(APP)
    assert not api.requests[1].url.params
    await client.aclose()


async def test_machine_lifecycle_calls_hit_fly_paths() -> None:
    api = (FakeApi()
           .on("POST", f"{M_PATH}/m1/start", ok({"previous_state": "stopped"}))
           .on("POST", f"{M_PATH}/m1/stop", ok({"ok": True}))
           .on("POST", f"{M_PATH}/m1/restart", ok({"ok": True}))
           .on("POST", f"{M_PATH}/m1", ok(machine("m1")))
           .on("GET", f"{M_PATH}/m1/events", ok([
               {"type": "exit", "status": "stopped", "source": "flyd", "timestamp": 2,
                "request": {"exit_event": {"exit_code": 137, "requested_stop": False}}},
               {"type": "start", "status": "started", "source": "user", "timestamp": 1}]))
           .on("GET", f"{M_PATH}/m1/metadata", ok({"instance": "i1"}))
           .on("POST", f"{M_PATH}/m1/metadata/a%2Fb", ok(status=204))
           .on("DELETE", f"{M_PATH}/m1/metadata/k", ok(status=204)))
    client, _ = make_client(api)
    await client.start_machine(APP, "m1")
    await client.stop_machine(APP, "m1")
    await client.restart_machine(APP, "m1")
    updated = await client.update_machine(APP, "m1", config=CONFIG)
    assert updated.id == "m1"
    assert body(api.calls("POST", f"{M_PATH}/m1")[0])["config"]["env"] == {"A": "1"}
    events = await client.list_machine_events(APP, "m1")
    assert events[0].type == "exit" and events[0].exit_code == 137 and events[0].requested_stop is False
    assert events[1].exit_code is None
    assert await client.get_metadata(APP, "m1") == {"instance": "i1"}
    await client.set_metadata(APP, "m1", "a/b", "v")
    assert body(api.requests[-1]) == {"value": "v"}
    assert api.requests[-1].url.raw_path.endswith(b"/metadata/a%2Fb")
    await client.delete_metadata(APP, "m1", "k")
    assert all(r.url.path.startswith(f"/v1/apps/{APP}/machines/m1") for r in api.requests)
    await client.aclose()


async def test_volume_reads() -> None:
    api = (FakeApi()
           .on("GET", f"{V_PATH}/vol_1", ok(volume("vol_1", attached="m1") | {"host_status": "unreachable"}))
           .on("GET", V_PATH, ok([volume("vol_1"), volume("vol_2")]))
           .on("GET", f"{V_PATH}/vol_1/snapshots", ok([{"id": "vs_1", "size": 5, "created_at": "x"}])))
    client, _ = make_client(api)
    v = await client.get_volume(APP, "vol_1")
    assert v.attached_machine_id == "m1" and v.host_status == "unreachable"
    assert [x.id for x in await client.list_volumes(APP)] == ["vol_1", "vol_2"]
    assert [s.id for s in await client.list_snapshots(APP, "vol_1")] == ["vs_1"]
    await client.aclose()


async def test_ensure_app_gets_creates_and_tolerates_a_concurrent_create() -> None:
    app_path = f"/v1/apps/{APP}"
    ips = f"{app_path}/ip_assignments"
    existing = {"id": "a1", "name": APP, "status": "deployed", "organization": {"slug": "personal"}}
    has_ips = ok({"ips": [{"ip": "203.0.113.1", "shared": True}, {"ip": "2001:db8::1"}]})
    api = FakeApi().on("GET", app_path, ok(existing)).on("GET", ips, has_ips)
    client, _ = make_client(api)
    assert (await client.ensure_app(APP, "personal")).name == APP
    assert api.calls("POST") == []

    api = (FakeApi().on("GET", app_path, err(404, "app not found"), ok(existing)).on("POST", "/v1/apps", ok(status=201))
           .on("GET", ips, ok({"ips": []})).on("POST", ips, ok({"ip": "2001:db8::1"})))
    client, _ = make_client(api)
    app = await client.ensure_app(APP, "personal")
    assert app.id == "a1"
    assert body(api.calls("POST")[0]) == {"app_name": APP, "org_slug": "personal"}
    # a new app gets its public IPs (Fly's <app>.fly.dev resolves only then): a shared IPv4 and an IPv6
    assert [body(r) for r in api.calls("POST", ips)] == [{"type": "shared_v4"}, {"type": "v6"}]

    api = (FakeApi().on("GET", app_path, err(404, "app not found"), ok(existing))
           .on("POST", "/v1/apps", err(422, "Name has already been taken")).on("GET", ips, has_ips))
    client, _ = make_client(api)
    assert (await client.ensure_app(APP, "personal")).id == "a1"

    api = (FakeApi().on("GET", app_path, err(404, "app not found"))
           .on("POST", "/v1/apps", err(422, "invalid app name")))
    client, _ = make_client(api)
    with pytest.raises(InvalidRequestError, match="invalid app name"):
        await client.ensure_app(APP, "personal")
    await client.aclose()


@pytest.mark.parametrize("base", ["https://api.machines.dev", "https://api.machines.dev/", "https://api.machines.dev/v1"])
async def test_base_url_works_for_real_fly(base: str) -> None:
    api = FakeApi().on("GET", f"/v1/apps/{APP}", ok({"name": APP}))
    client, _ = make_client(api, base_url=base)
    await client.get_app(APP)
    assert str(api.requests[0].url) == f"https://api.machines.dev/v1/apps/{APP}"
    assert client.is_local is False
    url, headers = client.proxy_target(APP, "m1")
    assert url == f"https://{APP}.fly.dev" and headers == {"fly-force-instance-id": "m1"}
    await client.aclose()


def test_fly_proxy_template_is_configurable() -> None:
    client = MachinesClient("https://api.machines.dev", "t", fly_proxy_template="http://{app}.internal:8080/")
    assert client.is_local is False
    assert client.proxy_target("my-app", "m9") == ("http://my-app.internal:8080", {"fly-force-instance-id": "m9"})
    with pytest.raises(ValueError, match="app"):
        MachinesClient("https://api.machines.dev", "t", fly_proxy_template="https://proxy.example")


async def test_local_host_proxy_target_and_watch() -> None:
    api = FakeApi().on("GET", "/_local/watch", ok({"seq": 12, "events": [
        {"seq": 12, "app_name": APP, "machine_id": "m1", "type": "exit", "state": "stopped", "exit_code": 137,
         "requested_stop": False, "at": "2026-01-01T00:00:00Z"}]}))
    client, _ = make_client(api, base_url="http://127.0.0.1:4280", proxy_url="http://127.0.0.1:4281/")
    assert client.is_local
    assert client.proxy_target(APP, "m1") == ("http://127.0.0.1:4281", {"fly-force-instance-id": "m1"})
    seq, events = await client.watch_events(since=3, timeout=300)
    assert seq == 12 and events[0]["exit_code"] == 137
    params = api.requests[0].url.params
    assert params["since"] == "3" and params["timeout"] == "30"
    await client.aclose()


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MachinesClient("127.0.0.1:4280", "t")
    with pytest.raises(ValueError):
        MachinesClient("http://x", "t", timeout=0)
    with pytest.raises(ValueError):
        MachinesClient("http://x", "t", max_attempts=0)


async def test_empty_identifiers_are_refused_before_any_request() -> None:
    api = FakeApi()
    client, _ = make_client(api)
    with pytest.raises(InvalidRequestError):
        await client.get_machine(APP, "")
    assert api.requests == []
    await client.aclose()


def test_machine_event_exit_fields_tolerate_other_shapes() -> None:
    assert MachineEvent(type="exit", request={"exit_event": "weird"}).exit_code is None
    assert MachineEvent(type="exit", request={"exit_event": {"exit_code": True}}).exit_code is None
    assert MachineEvent(type="start").requested_stop is None


async def test_volume_not_found_on_its_own_url_is_not_found_but_a_referenced_one_is_missing_volume() -> None:
    api = (FakeApi()
           .on("GET", f"{V_PATH}/vol_x", err(404, "volume vol_x not found"))
           .on("GET", V_PATH, ok([]))
           .on("POST", V_PATH, err(404, "source volume vol_x not found")))
    client, _ = make_client(api)
    with pytest.raises(NotFoundError):
        await client.get_volume(APP, "vol_x")
    with pytest.raises(MissingVolumeError):
        await client.create_volume(APP, name="data", region="lcl-a", source_volume_id="vol_x")
    await client.aclose()


async def test_conflict_on_retry_after_an_ambiguous_create_is_resolved_by_name() -> None:
    late = machine("m-late", name="vm")
    api = (FakeApi()
           .on("GET", M_PATH, ok([]), ok([]), ok([late]))
           .on("POST", M_PATH, err(503, "lost reply"), err(409, "already_exists: a machine named 'vm'")))
    client, _ = make_client(api)
    m = await client.create_machine(APP, config=CONFIG, name="vm")
    assert m.id == "m-late"
    assert len(api.calls("POST", M_PATH)) == 2
    await client.aclose()


async def test_plain_conflict_on_create_is_raised() -> None:
    old = machine("m-old", name="vm", state="stopped")
    api = (FakeApi().on("GET", M_PATH, ok([old]))
           .on("POST", M_PATH, err(409, "already_exists: a machine named 'vm'")))
    client, _ = make_client(api)
    with pytest.raises(ConflictError):
        await client.create_machine(APP, config=CONFIG, name="vm")
    assert len(api.calls("POST", M_PATH)) == 1
    await client.aclose()


async def test_public_ips_are_allocated_only_when_missing() -> None:
    ips = f"/v1/apps/{APP}/ip_assignments"
    # fly-go's newer IPAssignment carries no "type": shared / v6 are derived from the address, egress ignored
    listed = {"ips": [{"ip": "66.241.124.1", "shared": True}, {"ip": "2a09:8280:1::3", "shared": False},
                      {"ip": "2a09:8280:1::9", "egress": True}]}
    api = FakeApi().on("GET", ips, ok(listed))
    client, _ = make_client(api)
    await client.ensure_public_ips(APP)
    assert api.calls("POST") == []
    api = FakeApi().on("GET", ips, ok({"ips": [{"ip": "fdaa:0:1::3", "type": "private_v6"},
                                               {"ip": "2a09:8280:1::3", "type": "v6"}]})).on("POST", ips, ok({}))
    client, _ = make_client(api)
    await client.ensure_public_ips(APP)
    assert [body(r) for r in api.calls("POST", ips)] == [{"type": "shared_v4"}]
    await client.aclose()
