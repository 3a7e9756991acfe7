"""Bounded recovery storms on the virtual clock: the token bucket (rate, burst, Retry-After for everyone),
the per-region circuit breaker and the per-region concurrency cap, alone and inside the Machines client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sandkeep.clock import FakeClock
from sandkeep.provider.client import MachinesClient
from sandkeep.provider.errors import CapacityError, TransientError
from sandkeep.provider.limits import RegionBreaker, RegionGates, TokenBucket


async def test_bucket_grants_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5.0, clock=clock)
    start = clock.monotonic()
    for _ in range(5):
        await bucket.acquire()
    assert clock.monotonic() == start  # the burst costs no time
    for _ in range(20):
        await bucket.acquire()
    elapsed = clock.monotonic() - start
    assert 1.9 <= elapsed <= 2.1  # 20 more at 10/s on the virtual clock
    assert bucket.granted == 25


async def test_retry_after_holds_every_caller() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=100.0, clock=clock)
    await bucket.acquire()
    bucket.penalise(7.5)  # a 429 with Retry-After: 7.5
    start = clock.monotonic()
    assert bucket.delay() == pytest.approx(7.5)
    await bucket.acquire()
    assert clock.monotonic() - start >= 7.5


def test_breaker_opens_then_half_opens_then_closes() -> None:
    clock = FakeClock()
    breaker = RegionBreaker(threshold=3, cooldown=30.0, clock=clock)
    for _ in range(2):
        assert breaker.allow("ams")
        breaker.failure("ams")
    assert breaker.state("ams") == "closed"
    breaker.failure("ams")
    assert breaker.state("ams") == "open" and not breaker.allow("ams")
    assert breaker.allow("fra")  # other regions are unaffected
    clock.advance(29)
    assert not breaker.allow("ams")
    clock.advance(2)
    assert breaker.allow("ams")  # one trial create...
    assert not breaker.allow("ams")  # ...and only one
    breaker.failure("ams")  # the trial failed: open again for a full cooldown
    assert breaker.state("ams") == "open"
    clock.advance(31)
    assert breaker.allow("ams")
    breaker.success("ams")
    assert breaker.state("ams") == "closed" and breaker.allow("ams") and breaker.allow("ams")
    assert breaker.opened == 2


async def test_region_gate_caps_in_flight() -> None:
    gates = RegionGates(2)
    release = asyncio.Event()

    async def create(region: str) -> None:
        async with gates.hold(region):
            await release.wait()

    tasks = [asyncio.create_task(create("ams")) for _ in range(5)] + [asyncio.create_task(create("fra"))]
    for _ in range(5):
        await asyncio.sleep(0)
    assert gates.in_flight == {"ams": 2, "fra": 1}
    release.set()
    await asyncio.gather(*tasks)
    assert gates.peak == {"ams": 2, "fra": 1} and gates.in_flight == {"ams": 0, "fra": 0}


async def test_client_stops_hammering_a_failing_region() -> None:
    """Every volume create in ``ams`` answers 503; after the threshold the client refuses ams creates without a
    request (CapacityError, so create_volume_with_fallback moves on to the next region at once)."""
    clock = FakeClock()
    hits: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=[])
        region = __import__("json").loads(request.content)["region"]
        hits[region] = hits.get(region, 0) + 1
        if region == "ams":
            return httpx.Response(503, json={"error": "region down"})
        return httpx.Response(200, json={"id": f"vol_{hits[region]}", "name": "data", "region": region})

    client = MachinesClient("http://fly.invalid", "t", clock=clock, transport=httpx.MockTransport(handler),
                            max_attempts=1, breaker_threshold=3, breaker_cooldown=60.0, region_concurrency=4)
    try:
        for _ in range(3):
            with pytest.raises(TransientError):
                await client.create_volume("app", name="data", region="ams")
        assert hits["ams"] == 3
        for _ in range(10):
            vol = await client.create_volume_with_fallback("app", regions=["ams", "fra"], name="data")
            assert vol.region == "fra"
        assert hits["ams"] == 3  # no request went to the broken region while its breaker was open
        with pytest.raises(CapacityError):
            await client.create_volume("app", name="data", region="ams")
        clock.advance(61)
        with pytest.raises(TransientError):  # the half-open trial goes through (and fails)
            await client.create_volume("app", name="data", region="ams")
        assert hits["ams"] == 4
    finally:
        await client.aclose()


async def test_client_bucket_paces_requests_and_honours_retry_after() -> None:
    clock = FakeClock()
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(clock.monotonic())
        if len(calls) == 3:
            return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "4"})
        return httpx.Response(200, json={"id": "m1", "state": "started"})

    client = MachinesClient("http://fly.invalid", "t", clock=clock, transport=httpx.MockTransport(handler),
                            rate_limit=2.0, rate_burst=2.0, max_attempts=3)
    try:
        for _ in range(3):
            await client.get_machine("app", "m1")
    finally:
        await client.aclose()
    # two in the burst, the third paced (0.5 s), answered 429 + Retry-After 4: its retry waits >= 4 s
    assert calls[1] == calls[0] and calls[2] - calls[0] == pytest.approx(0.5)
    assert calls[3] - calls[2] >= 4.0
    assert len(calls) == 4  # three calls, the throttled one retried once
