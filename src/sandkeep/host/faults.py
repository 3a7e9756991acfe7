"""Fault injection and the ``realistic`` delay profile of the local host.

Faults are rules posted to ``POST /_local/faults`` (same bearer token as the API)::

    {"operation": "machine.create",   # or "*" (default) for every /v1 operation
     "status": 503,                   # 429 or 500-599; omit for latency only
     "rate": 1.0,                     # probability per matching request (default 1.0)
     "count": 2,                      # inject at most this many failures, then the rule retires (default: no limit)
     "retry_after": 1,                # seconds, sent as Retry-After on a 429 (default 1)
     "latency": 0.2,                  # seconds added to every matching request (default 0)
     "phase": "before",               # "before": fail without doing anything; "after": do the operation,
                                      # then answer the error (an ambiguous failure, like a lost reply)
     "message": "..."}                # optional error text

``{"rules": [...]}`` replaces every rule; ``DELETE /_local/faults`` clears them; ``GET`` lists them with
their remaining counts. ``seed`` (an integer, top level) makes the rate draws reproducible.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

OPERATIONS: tuple[str, ...] = (
    "app.list", "app.create", "app.get", "app.delete", "app.ips.list", "app.ips.assign", "app.ips.release",
    "machine.create", "machine.get", "machine.list", "machine.update", "machine.start", "machine.stop",
    "machine.restart", "machine.destroy", "machine.wait", "machine.events", "machine.metadata.get",
    "machine.metadata.set", "machine.metadata.delete",
    "volume.create", "volume.get", "volume.list", "volume.delete", "volume.extend", "volume.snapshots.list",
    "volume.snapshots.create",
)

# name -> (seconds, why). Applied with --profile realistic; every delay goes through the host's Clock.
REALISTIC_PROFILE: dict[str, tuple[float, str]] = {
    "api": (0.05, "every API call: one round trip to api.machines.dev from a nearby region is ~30-80 ms"),
    "machine.create": (0.5, "placement + reserving resources on a host before Fly answers a create: ~0.3-1 s"),
    "machine.boot.first": (1.5, "first boot of a new machine (rootfs prepared from an already pulled image): "
                                "Fly quotes ~1-2 s"),
    "machine.boot": (0.4, "starting an existing stopped machine: Fly quotes 'sub-second', ~300-500 ms"),
    "machine.stop": (0.3, "stop acknowledgment and VM teardown after the process exits: a few hundred ms"),
    "volume.create": (1.0, "allocating an empty volume on a host: ~1 s"),
    "volume.fork": (3.0, "fork = a new volume hydrated from another host's data; the API answers after the "
                         "copy is set up: ~2-5 s for small volumes"),
    "volume.restore": (3.0, "restore from a snapshot held in object storage: ~2-5 s for small volumes"),
    "volume.snapshot": (0.5, "on-demand snapshot request acknowledged: ~0.5 s"),
}


def profile_delays(profile: str | None) -> dict[str, float]:
    if profile in (None, "", "none", "fast"):
        return {}
    if profile == "realistic":
        return {name: seconds for name, (seconds, _why) in REALISTIC_PROFILE.items()}
    raise ValueError(f"unknown profile {profile!r}; use 'realistic' or 'none'")


class FaultInputError(ValueError):
    pass


@dataclass
class FaultRule:
    id: int
    operation: str = "*"
    status: int | None = None
    rate: float = 1.0
    count: int | None = None
    retry_after: float = 1.0
    latency: float = 0.0
    phase: Literal["before", "after"] = "before"
    message: str | None = None
    injected: int = 0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["remaining"] = None if self.count is None else max(0, self.count - self.injected)
        return out

    def exhausted(self) -> bool:
        return self.count is not None and self.injected >= self.count


@dataclass
class Injection:
    status: int
    message: str
    retry_after: float | None
    phase: str


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultInputError(f"'{key}' must be a number")
    if not lo <= float(value) <= hi:
        raise FaultInputError(f"'{key}' must be between {lo} and {hi}")
    return float(value)


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self.rules: list[FaultRule] = []
        self._next_id = 1
        self._rng = random.Random(seed)

    def parse_rule(self, body: Any) -> FaultRule:
        if not isinstance(body, dict):
            raise FaultInputError("a fault rule must be a JSON object")
        known = {"operation", "status", "rate", "count", "retry_after", "latency", "phase", "message", "seed"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise FaultInputError(f"unknown fault field(s): {', '.join(unknown)}")
        op = body.get("operation", "*")
        if op is None:
            op = "*"
        if not isinstance(op, str) or (op != "*" and op not in OPERATIONS):
            raise FaultInputError(f"'operation' must be '*' or one of: {', '.join(OPERATIONS)}")
        status = body.get("status")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)
                                   or not (status == 429 or 500 <= status <= 599 or status == 408)):
            raise FaultInputError("'status' must be 429, 408 or a 5xx code")
        count = body.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise FaultInputError("'count' must be a whole number >= 0")
        phase = body.get("phase", "before")
        if phase not in ("before", "after"):
            raise FaultInputError("'phase' must be 'before' or 'after'")
        message = body.get("message")
        if message is not None and not isinstance(message, str):
            raise FaultInputError("'message' must be a string")
        rule = FaultRule(id=self._next_id, operation=op, status=status, rate=_num(body, "rate", 1.0, 0.0, 1.0),
                         count=count, retry_after=_num(body, "retry_after", 1.0, 0.0, 3600.0),
                         latency=_num(body, "latency", 0.0, 0.0, 120.0), phase=phase, message=message)
        self._next_id += 1
        return rule

    def configure(self, body: Any) -> list[FaultRule]:
        """Apply a POST body: one rule (appended) or ``{"rules": [...]}`` (replaces all)."""
        if not isinstance(body, dict):
            raise FaultInputError("body must be a JSON object")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FaultInputError("'seed' must be an integer")
        if "rules" in body:
            extra = sorted(set(body) - {"rules", "seed"})
            if extra:
                raise FaultInputError(f"with 'rules' only 'seed' may be given, not {', '.join(extra)}")
            if not isinstance(body["rules"], list):
                raise FaultInputError("'rules' must be a list")
            new_rules = [self.parse_rule(r) for r in body["rules"]]
            self.rules = new_rules
        else:
            self.rules.append(self.parse_rule({k: v for k, v in body.items() if k != "seed"}))
        if seed is not None:
            self._rng = random.Random(seed)
        return self.rules

    def clear(self) -> None:
        self.rules = []

    def decide(self, operation: str) -> tuple[float, Injection | None]:
        """Latency to add and the failure to inject (if any) for one request."""
        latency = 0.0
        injection: Injection | None = None
        for rule in self.rules:
            if rule.operation not in ("*", operation):
                continue
            latency += rule.latency
            if injection is not None or rule.status is None or rule.exhausted():
                continue
            if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                continue
            rule.injected += 1
            if rule.status == 429:
                msg = rule.message or "rate limit exceeded (injected by the local host)"
                injection = Injection(429, msg, rule.retry_after, rule.phase)
            elif rule.status == 408:
                msg = rule.message or "deadline_exceeded: request timed out (injected by the local host)"
                injection = Injection(408, msg, None, rule.phase)
            else:
                msg = rule.message or f"internal error (injected by the local host, HTTP {rule.status})"
                injection = Injection(rule.status, msg, None, rule.phase)
        return latency, injection


# Fly's documented Machines API rate limits (https://fly.io/docs/machines/api/working-with-machines-api/):
# 1 request/s per action per machine with bursts up to 3; "get machine" 5 requests/s with bursts up to 10.
# Off by default; ``sandkeep host --rate-limits`` turns them on. (rate per second, burst)
FLY_RATE_LIMITS: dict[str, tuple[float, float]] = {
    "machine.get": (5.0, 10.0),
    "machine.list": (5.0, 10.0),
    "*": (1.0, 3.0),
}


class RateLimiter:
    """Token buckets per (operation, app, machine) on a monotonic clock."""

    def __init__(self, monotonic: Any, limits: dict[str, tuple[float, float]] | None = None) -> None:
        self._monotonic = monotonic
        self._limits = limits or FLY_RATE_LIMITS
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def check(self, operation: str, key: str) -> float | None:
        """None when allowed, else the seconds to wait (the Retry-After)."""
        rate, burst = self._limits.get(operation, self._limits["*"])
        now = float(self._monotonic())
        tokens, last = self._buckets.get((operation, key), (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[(operation, key)] = (tokens - 1.0, now)
            return None
        self._buckets[(operation, key)] = (tokens, now)
        return (1.0 - tokens) / rate
