"""Provider error classes, as SPEC §10 classifies the Machines API's answers."""

from __future__ import annotations

import re

_CAPACITY_STATUSES = {400, 403, 409, 412, 422, 503}
# Fly's capacity answers (README "Fidelity to Fly"): volume create 400 "... no capacity", machine create 412
# "insufficient resources" (status insufficient_capacity), update/start of an existing machine 409 "insufficient
# memory" (or CPUs/IPs) "available to fulfill request"; the status codes insufficient_capacity and
# volume_placement_capacity (fly-go flaps_error.go) say so without any message.
_CAPACITY_PATTERNS = re.compile(
    r"insufficient_capacity|volume_placement_capacity|no capacity|insufficient (resources|memory|cpus|ips)"
    r"|over the allowed quota",
    re.IGNORECASE,
)
_MISSING_VOLUME_PATTERNS = re.compile(r"volume[^\n]*(not found|does not exist|missing)|no such volume",
                                      re.IGNORECASE)
# The request needs a host that cannot be reached (Fly's host_status "unreachable"; a fork from a volume on a
# dead host): neither capacity (another region does not help the source) nor transient (retrying soon does not
# help either).
_HOST_UNAVAILABLE_PATTERNS = re.compile(
    r"host[^\n]{0,80}\b(unreachable|unavailable)\b|host_status\W{0,4}(unreachable|unknown)", re.IGNORECASE)
# Fly's gRPC-style precondition failures (e.g. "failed_precondition: volume is currently bound to machine: <id>")
# arrive with varying HTTP statuses; retrying never helps.
_PRECONDITION_PATTERNS = re.compile(r"failed_precondition", re.IGNORECASE)


class ProviderError(Exception):
    """Any non-success answer from the machine provider (or failure to get one)."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "",
                 operation: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.operation = operation

    def __str__(self) -> str:
        where = f"{self.operation}: " if self.operation else ""
        code = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{where}{self.message}{code}"


class NotFoundError(ProviderError):
    """404: the app, machine or volume does not exist (on delete this counts as done)."""


class MissingVolumeError(ProviderError):
    """The request named a volume that does not exist (e.g. a machine create mounting a deleted volume)."""


class CapacityError(ProviderError):
    """The region has no capacity for this request; try another region."""


class HostUnavailableError(ProviderError):
    """The machine's or volume's host is unreachable (e.g. a fork from a volume on a dead host): not capacity,
    not transient. Recovery reads it as "fork impossible" and restores a snapshot instead (SPEC §7.2.3)."""


class WaitTimeoutError(ProviderError):
    """408 from wait: the machine did not reach the desired state in time. Not a failure by itself."""


class RateLimitedError(ProviderError):
    """429: slow down; ``retry_after`` seconds when the provider said so."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class TransientError(ProviderError):
    """5xx, timeouts and network failures: retry later, never change an instance's status."""


class DeadlineExceededError(TransientError):
    """The caller's deadline passed before the call could finish (:mod:`sandkeep.provider.deadline`): the call
    was abandoned, so whether it happened is unknown (an ambiguous answer, like a timeout)."""


class ConflictError(ProviderError):
    """A precondition failed (e.g. deleting a volume that is still attached); not retried."""


class InvalidRequestError(ProviderError):
    """4xx for a malformed or unacceptable request (e.g. unknown image); not retried."""


class AuthError(ProviderError):
    """401/403 not about capacity: the token is wrong or lacks rights."""


def classify(status: int, body: str, *, operation: str = "",
             retry_after: float | None = None) -> ProviderError:
    """Map an HTTP error answer to the most specific ProviderError (SPEC §10)."""
    message = _error_message(body) or f"HTTP {status}"
    kw = {"status": status, "body": body, "operation": operation}
    if status == 408:
        return WaitTimeoutError(message, **kw)  # type: ignore[arg-type]
    if status == 429:
        return RateLimitedError(message, retry_after=retry_after, **kw)
    if status in _CAPACITY_STATUSES and _CAPACITY_PATTERNS.search(body or ""):
        return CapacityError(message, **kw)  # type: ignore[arg-type]
    if 400 <= status < 500 and status != 404 and _HOST_UNAVAILABLE_PATTERNS.search(body or message):
        return HostUnavailableError(message, **kw)  # type: ignore[arg-type]
    if _MISSING_VOLUME_PATTERNS.search(body or "") and status in (400, 404, 412, 422):
        return MissingVolumeError(message, **kw)  # type: ignore[arg-type]
    if status == 404:
        return NotFoundError(message, **kw)  # type: ignore[arg-type]
    if 400 <= status < 600 and _PRECONDITION_PATTERNS.search(body or ""):
        return ConflictError(message, **kw)  # type: ignore[arg-type]
    if status in (405, 501):  # the operation is not offered: final, never "gone", never worth a retry
        return InvalidRequestError(message, **kw)  # type: ignore[arg-type]
    if status >= 500:
        return TransientError(message, **kw)  # type: ignore[arg-type]
    if status in (401, 403):
        return AuthError(message, **kw)  # type: ignore[arg-type]
    if status in (409, 412):
        return ConflictError(message, **kw)  # type: ignore[arg-type]
    return InvalidRequestError(message, **kw)  # type: ignore[arg-type]


def _error_message(body: str) -> str:
    import json

    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return (body or "").strip()[:500]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return (body or "").strip()[:500]
