"""The gateway health probe: ``GET /health`` through the provider's proxy (``fly-force-instance-id``), with the
instance's gateway token (the gateway answers 401 without it)."""

from __future__ import annotations

from typing import Protocol

import httpx

from sandkeep.clock import Clock
from sandkeep.gateway import TOKEN_HEADER as GATEWAY_TOKEN_HEADER
from sandkeep.provider.base import MachineProvider


class Prober(Protocol):
    async def probe(self, app_name: str, machine_id: str, gateway_token: str | None = None) -> bool: ...

    async def aclose(self) -> None: ...


class GatewayProber:
    """One probe = one GET of ``/health``; 200 means healthy."""

    def __init__(self, provider: MachineProvider, *, request_timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.provider = provider
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), transport=transport,
                                       follow_redirects=False)

    async def probe(self, app_name: str, machine_id: str, gateway_token: str | None = None) -> bool:
        base, headers = self.provider.proxy_target(app_name, machine_id)
        if gateway_token:
            headers = {**headers, GATEWAY_TOKEN_HEADER: gateway_token}
        try:
            resp = await self._http.get(f"{base.rstrip('/')}/health", headers=headers)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()


async def probe_until_healthy(prober: Prober, clock: Clock, app_name: str, machine_id: str, *,
                              timeout: float, interval: float, gateway_token: str | None = None) -> bool:
    """Probe every ``interval`` until healthy or ``timeout`` (on ``clock``) has passed."""
    deadline = clock.monotonic() + max(0.0, timeout)
    while True:
        if await prober.probe(app_name, machine_id, gateway_token):
            return True
        if clock.monotonic() >= deadline:
            return False
        await clock.sleep(max(0.01, interval))
