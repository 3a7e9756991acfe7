"""The host's answers other than success, in Fly's shapes (shared by the model, the runners and the API)."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


class HostError(Exception):
    """An answer other than success: HTTP status, Fly-style message and ``status`` code."""

    def __init__(self, status: int, message: str, *, code: str = "unknown",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def body(self) -> JSON:
        return {"error": self.message, "status": self.code}


def bad(message: str, status: int = 400) -> HostError:
    return HostError(status, message)


def capacity_error(region: str, what: str) -> HostError:
    """Fly's refusal of a create the region cannot place: a volume create is a 400 ending in "no capacity",
    a machine create a 412 "insufficient resources" with status ``insufficient_capacity`` (README, fidelity)."""
    if what == "volume":
        return HostError(400, f"could not place the volume in region {region} (local host): aborted: no capacity")
    return HostError(412, f"insufficient resources to create new {what} in region {region}: no capacity "
                          f"available on the local host", code="insufficient_capacity")


def memory_error(m: JSON) -> HostError:
    """Fly's refusal to (re)reserve resources for an existing machine on its host: 409 "insufficient memory"."""
    return HostError(409, f"could not reserve resource for machine {m['id']}: insufficient memory available to "
                          f"fulfill request (region {m['region']} has no capacity on the local host)")


def host_unreachable(what: str, region: str, host: str | None = None) -> HostError:
    """A request that needs the host of ``what`` while that host is unreachable (dead host, region outage): the
    412 body the provider client classifies as HostUnavailableError."""
    where = f"its host {host} in region {region}" if host else f"its host in region {region}"
    return HostError(412, f"failed_precondition: {what}: {where} is unreachable (host_status: unreachable)")
