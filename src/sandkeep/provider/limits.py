"""Bounded recovery storms (issue 11): a global token bucket, a per-region concurrency cap and a per-region
circuit breaker for the Machines API client. Everything runs on the injected clock (tests use the virtual one).

* :class:`TokenBucket` -- ``rate`` requests/s with bursts up to ``burst``; ``await acquire()`` waits for a
  token. ``penalise(seconds)`` (a 429's ``Retry-After``) holds *every* caller back that long, so one
  throttled request slows the whole process down instead of each caller finding out on its own.
* :class:`RegionBreaker` -- after ``threshold`` consecutive failed creates (fork/create volume, create
  machine) in a region the breaker opens for ``cooldown`` seconds: creates there fail at once
  (:class:`~sandkeep.provider.errors.CapacityError`, so a volume create falls back to the next region and a
  machine create backs off) instead of hammering a region that is down. After the cooldown one trial
  create goes through (half-open); its success closes the breaker, its failure re-opens it.
* :class:`RegionGates` -- at most ``limit`` creates in flight per region.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sandkeep.clock import Clock


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock.monotonic()
        self._hold_until = 0.0
        self.granted = 0
        self.waited = 0.0

    def _refill(self) -> float:
        now = self.clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return now

    def penalise(self, seconds: float) -> None:
        """A ``Retry-After``: nobody gets a token for ``seconds`` (the bucket restarts empty)."""
        now = self._refill()
        self._hold_until = max(self._hold_until, now + max(0.0, seconds))
        self._tokens = 0.0

    def delay(self) -> float:
        """Seconds until a token is available (0: now)."""
        now = self._refill()
        if now < self._hold_until:
            return self._hold_until - now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    async def acquire(self) -> None:
        while True:
            wait = self.delay()
            if wait <= 0:
                now = self.clock.monotonic()
                if now >= self._hold_until:
                    self._tokens -= 1.0
                    self.granted += 1
                    return
            self.waited += wait
            await self.clock.sleep(max(wait, 1e-3))


@dataclass
class _Circuit:
    failures: int = 0
    open_until: float = 0.0
    trial: bool = False  # half-open: one create is being tried


class RegionBreaker:
    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = max(0.0, cooldown)
        self.clock = clock
        self._circuits: dict[str, _Circuit] = {}
        self.opened = 0

    def state(self, region: str) -> str:
        c = self._circuits.get(region)
        if c is None or c.failures < self.threshold:
            return "closed"
        return "open" if self.clock.monotonic() < c.open_until or c.trial else "half-open"

    def allow(self, region: str) -> bool:
        """May a create go to ``region`` now? (In half-open, only the first caller gets to try.)"""
        c = self._circuits.get(region)
        if c is None or c.failures < self.threshold:
            return True
        if self.clock.monotonic() < c.open_until or c.trial:
            return False
        c.trial = True
        return True

    def success(self, region: str) -> None:
        self._circuits.pop(region, None)

    def failure(self, region: str) -> None:
        c = self._circuits.setdefault(region, _Circuit())
        c.failures += 1
        c.trial = False
        if c.failures >= self.threshold:
            if c.open_until <= self.clock.monotonic():
                self.opened += 1
            c.open_until = self.clock.monotonic() + self.cooldown

    def snapshot(self) -> dict[str, str]:
        return {region: self.state(region) for region in sorted(self._circuits)}


class RegionGates:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._gates: dict[str, asyncio.Semaphore] = {}
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, region: str) -> AsyncIterator[None]:
        gate = self._gates.setdefault(region, asyncio.Semaphore(self.limit))
        async with gate:
            n = self.in_flight.get(region, 0) + 1
            self.in_flight[region] = n
            self.peak[region] = max(self.peak.get(region, 0), n)
            try:
                yield
            finally:
                self.in_flight[region] -= 1
