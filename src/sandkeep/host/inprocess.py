"""The host's model as an in-process provider: sandkeep's real Machines client, no socket in between.

:func:`in_process_client` puts the host's HTTP faces (:class:`~sandkeep.host.api.HostAPI`: the Fly API with its
faults and rate limits) behind an ``httpx.ASGITransport`` and hands it to
:class:`~sandkeep.provider.client.MachinesClient`, so the engine can be driven against the one Fly-semantics
model -- its region walk, retries and error classification included -- inside one event loop, on the clock the
model was given (issue 10's deterministic simulation). :func:`proxy_transport` does the same for gateway traffic
(:class:`~sandkeep.host.api.ProxyApp`: with simulated machines the gateway answers in process).
"""

from __future__ import annotations

import weakref
from typing import Any

import httpx

from sandkeep.host.api import HostAPI, ProxyApp
from sandkeep.host.core import Host
from sandkeep.host.faults import Faults
from sandkeep.provider.client import MachinesClient

API_URL = "http://local-host.invalid"
PROXY_URL = "http://local-proxy.invalid"


def in_process_api(host: Host, *, token: str = "in-process", faults: Faults | None = None,
                   rate_limits: bool = False) -> HostAPI:
    return HostAPI(host, token, faults, rate_limits=rate_limits)


def in_process_client(host: Host, *, api: HostAPI | None = None, **client_kw: Any) -> MachinesClient:
    """A MachinesClient whose every request is answered by ``host`` in this process (``api`` carries the
    fault rules and rate limits; by default none). ``client_kw`` go to the client (``rng``, ``max_attempts``...);
    its clock defaults to the host's."""
    api = api or in_process_api(host)
    client_kw.setdefault("clock", host.clock)
    return MachinesClient(API_URL, api.token, proxy_url=PROXY_URL,
                          transport=httpx.ASGITransport(app=api.app()), **client_kw)


_PROXIES: weakref.WeakKeyDictionary[Host, ProxyApp] = weakref.WeakKeyDictionary()


def proxy_transport(host: Host) -> httpx.ASGITransport:
    """Gateway traffic (``fly-force-instance-id``) to ``host``'s machines, in process (base URL ``PROXY_URL``).
    Every transport of one host shares its :class:`ProxyApp` (building one costs an HTTP client and its TLS
    context: tens of milliseconds, once per controller of a simulated world otherwise)."""
    app = _PROXIES.get(host)
    if app is None:
        app = _PROXIES[host] = ProxyApp(host)
    return httpx.ASGITransport(app=app)
