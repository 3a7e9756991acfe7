"""A 1,000-instance region outage against a rate-limited Machines API: ``python -m bench.scale_outage``.

Each recovery makes the Machines API calls of a fork recovery (create volume from the old one, create machine,
read it back) through sandkeep's real :class:`~sandkeep.provider.client.MachinesClient`. The fake API answers
after ``LATENCY`` and enforces a process-wide ``RATE`` requests/s (burst ``RATE``) with 429 + Retry-After, the
way an org-wide limit would. All 1,000 recoveries start at once.

The bound: ``RATE`` requests/s / ``CALLS`` calls per recovery = the most recoveries/s any client can get.
With the client's token bucket set to the limit (``SANDKEEP_PROVIDER_RATE_LIMIT``) and the per-region cap,
throughput stays near the bound and 429s stay rare; without them (unlimited fan-out, 1,000 at once) each
throttled call is retried after its Retry-After. Prints one JSON line per variant.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from sandkeep.clock import SystemClock
from sandkeep.provider.client import MachinesClient
from sandkeep.provider.models import MachineConfig

N = 1000
RATE = 100.0
CALLS = 3
LATENCY = 0.02


class Limited(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.tokens = RATE
        self.at = time.monotonic()
        self.ok = 0
        self.throttled = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        now = time.monotonic()
        self.tokens = min(RATE, self.tokens + (now - self.at) * RATE)
        self.at = now
        if self.tokens < 1:
            self.throttled += 1
            return httpx.Response(429, json={"error": "rate limited"},
                                  headers={"Retry-After": f"{(1 - self.tokens) / RATE + 0.5:.2f}"})
        self.tokens -= 1
        self.ok += 1
        await asyncio.sleep(LATENCY)
        path = request.url.path
        if request.method == "GET" and path.endswith("/volumes"):
            return httpx.Response(200, json=[])
        if request.method == "GET" and "/machines" in path and not path.endswith("/machines"):
            return httpx.Response(200, json={"id": path.rsplit("/", 1)[1], "state": "started"})
        if request.method == "GET":
            return httpx.Response(200, json=[])
        if path.endswith("/volumes"):
            return httpx.Response(200, json={"id": f"vol_{self.ok}", "name": "data", "region": "ams"})
        return httpx.Response(200, json={"id": f"m_{self.ok}", "state": "created", "region": "ams"})


async def one_variant(name: str, **client_kw: Any) -> dict[str, Any]:
    transport = Limited()
    client = MachinesClient("http://fly.invalid", "t", clock=SystemClock(), transport=transport,
                            max_attempts=50, backoff_max=2.0, max_retry_after=30.0, **client_kw)
    done = 0

    async def recover(i: int) -> None:
        nonlocal done
        app = f"app-{i}"
        vol = await client.create_volume(app, name="data", region="ams", source_volume_id=f"vol_old{i}")
        machine = await client.create_machine(app, config=MachineConfig(image="x"), region="ams")
        await client.get_machine(app, machine.id)
        assert vol.id
        done += 1

    start = time.monotonic()
    await asyncio.gather(*(recover(i) for i in range(N)))
    took = time.monotonic() - start
    await client.aclose()
    per_recovery = (transport.ok) / N  # create_volume also lists the app's volumes first (idempotency)
    bound = RATE / per_recovery
    return {"variant": name, "recoveries": done, "seconds": round(took, 1),
            "recoveries_per_s": round(done / took, 2), "api_calls_per_recovery": round(per_recovery, 2),
            "bound_recoveries_per_s": round(bound, 2), "fraction_of_bound": round(done / took / bound, 3),
            "throttled_429": transport.throttled}


async def main() -> None:
    for name, kw in (("bucket at the limit + region cap 16", {"rate_limit": RATE, "rate_burst": RATE,
                                                                "region_concurrency": 16}),
                     ("no client limits (today)", {})):
        print(json.dumps(await one_variant(name, **kw)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
