"""Prometheus metrics of sandkeep, in one module-level registry (served at ``/metrics`` by the API).

Families: lifecycle events and recoveries (engine), HTTP requests (``sandkeep.api.middleware``), provider
calls (``sandkeep.provider.client``), engine claims, passes, alarm lag and queue depth, and build info.
No ``_created`` series are exported (``disable_created_metrics``): they double the series count for nothing.
``deploy/grafana-dashboard.json`` and ``deploy/prometheus-rules.yml`` use these names (a test keeps them in step).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from sandkeep import __version__
from sandkeep.store.records import Status

disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter("sandkeep_events", "Lifecycle events emitted, by event name (SPEC §9).", ["event"],
                 registry=REGISTRY)
RECOVERIES_STARTED = Counter("sandkeep_recoveries_started", "Unexpected-stop recoveries begun.", ["label"],
                             registry=REGISTRY)
RECOVERIES_SUCCEEDED = Counter("sandkeep_recoveries_succeeded", "Unexpected-stop recoveries completed (cutover).",
                               ["label"], registry=REGISTRY)
RECOVERIES_FAILED = Counter("sandkeep_recoveries_failed", "Unexpected-stop recoveries that ended in stopped.",
                            ["label"], registry=REGISTRY)
RECOVERY_DURATION = Histogram(
    "sandkeep_recovery_duration_seconds", "Time from recovery start to its end (success or failure).",
    ["outcome"], registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, float("inf")))
DETECTION_LATENCY = Histogram(
    "sandkeep_detection_latency_seconds", "Machine stop (provider event time) to status 'recovering'.",
    registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, float("inf")))
GATEWAY_HEARTBEATS = Counter("sandkeep_gateway_heartbeats", "Gateway heartbeats received, by result (ok, refused, "
                             "stream_closed).", ["result"], registry=REGISTRY)
HEARTBEAT_READS = Counter("sandkeep_heartbeat_reads", "Targeted machine reads after a missed heartbeat, by outcome "
                          "(alive, woken, error).", ["outcome"], registry=REGISTRY)
INSTANCES = Gauge("sandkeep_instances", "Instances by status.", ["status"], registry=REGISTRY)
PROVIDER_ERRORS = Counter("sandkeep_provider_errors", "Provider errors seen by the engine, by class.", ["kind"],
                          registry=REGISTRY)
RECONCILE_PASSES = Counter("sandkeep_reconcile_passes", "Reconcile passes run, by the status they started in.",
                           ["status"], registry=REGISTRY)
STEP_LIMIT = Counter("sandkeep_reconcile_step_limit", "Reconcile passes cut off by the step limit (a loop: a bug).",
                     registry=REGISTRY)
DATA_LOSS = Counter("sandkeep_data_loss", "Instances whose volume vanished or was restored from a snapshot.",
                    ["kind"], registry=REGISTRY)

# ---------------------------------------------------------------------------------------------- build

BUILD_INFO = Gauge("sandkeep_build_info", "Always 1; the labels name the running sandkeep build.",
                   ["version", "python"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__, python=platform.python_version()).set(1)

# ---------------------------------------------------------------------------------------------- HTTP API

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
HTTP_REQUESTS = Counter("sandkeep_http_requests", "HTTP requests answered, by route template, method and status.",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_DURATION = Histogram("sandkeep_http_request_duration_seconds",
                          "Time to answer an HTTP request (to the end of the response headers for streams).",
                          ["route", "method"], registry=REGISTRY, buckets=_LATENCY_BUCKETS)

# ---------------------------------------------------------------------------------------------- provider

PROVIDER_REQUESTS = Counter(
    "sandkeep_provider_requests",
    "Provider (Machines API) HTTP exchanges, by operation and outcome "
    "(ok, not_found, capacity, rate_limited, wait_timeout, transient, auth, error).",
    ["operation", "outcome"], registry=REGISTRY)
PROVIDER_DURATION = Histogram("sandkeep_provider_request_duration_seconds",
                              "Duration of one provider HTTP exchange, by operation.", ["operation"],
                              registry=REGISTRY, buckets=_LATENCY_BUCKETS)
PROVIDER_RETRIES = Counter("sandkeep_provider_retries", "Provider calls retried after a transient error or a 429.",
                           ["operation"], registry=REGISTRY)
PROVIDER_RATE_LIMITED = Counter("sandkeep_provider_rate_limited", "Provider answers HTTP 429 (rate limited).",
                                ["operation"], registry=REGISTRY)

# ---------------------------------------------------------------------------------------------- engine

ENGINE_CLAIMS = Counter("sandkeep_engine_claims",
                        "Instances claimed by this engine, by source (alarm = due alarm, direct = API or wake-up).",
                        ["source"], registry=REGISTRY)
ENGINE_PASSES_IN_FLIGHT = Gauge("sandkeep_engine_passes_in_flight", "Reconcile passes running in this process now.",
                                registry=REGISTRY)
PROVIDER_BREAKER_REFUSALS = Counter("sandkeep_provider_breaker_refusals_total",
                                    "Creates refused at once because the region's circuit breaker is open.",
                                    ["region"], registry=REGISTRY)
ENGINE_LEASES_VOIDED = Counter("sandkeep_engine_leases_voided_total",
                               "Instance leases voided because the engine holding them stopped heartbeating.",
                               registry=REGISTRY)
ALARM_LAG = Histogram("sandkeep_alarm_lag_seconds", "How late a due alarm was claimed (claim time - alarm_at).",
                      registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, float("inf")))
ALARMS_DUE = Gauge("sandkeep_alarms_due", "Alarms due now and not yet claimed (the engine's queue depth).",
                   registry=REGISTRY)
RECOVERIES_IN_FLIGHT = Gauge("sandkeep_recoveries_in_flight", "Instances recovering now.", registry=REGISTRY)
RECOVERY_OLDEST_AGE = Gauge("sandkeep_recovery_oldest_age_seconds",
                            "Age of the oldest recovery still in progress (0 when none).", registry=REGISTRY)
RECOVERY_TIMEOUT = Gauge("sandkeep_recovery_timeout_seconds", "The configured recovery timeout "
                         "(SANDKEEP_RECOVERY_TIMEOUT), for alerts.", registry=REGISTRY)
RETAINED_VOLUMES = Gauge("sandkeep_retained_volumes", "Old volumes retained after a recovery.", registry=REGISTRY)
RETAINED_VOLUMES_OVERDUE = Gauge("sandkeep_retained_volumes_overdue",
                                 "Retained volumes whose cleanup time passed more than an hour ago.",
                                 registry=REGISTRY)

DEAD_HOST_SUSPECTS = Gauge("sandkeep_dead_host_suspects", "Running instances suspect of a dead host (host "
                           "unreachable or gateway silent), within their grace or awaiting approval.",
                           registry=REGISTRY)
RESTORES_AWAITING_APPROVAL = Gauge("sandkeep_restores_awaiting_approval", "Instances on a dead host waiting for an "
                                   "admin to approve a snapshot restore.", registry=REGISTRY)
OLD_MACHINES_TO_FENCE = Gauge("sandkeep_old_machines_to_fence", "Old machines on dead hosts to destroy as soon as "
                              "their host answers.", registry=REGISTRY)
FLAGGED_VOLUME_INSTANCES = Gauge("sandkeep_instances_with_flagged_volumes", "Instances with an old volume flagged "
                                 "after a snapshot restore (kept until an admin decides).", registry=REGISTRY)
ORPHANS = Gauge("sandkeep_orphans", "Machines and volumes of sandkeep's that no record references, as the last "
                "inventory pass of this process left them (SANDKEEP_INVENTORY_INTERVAL).", ["kind"],
                registry=REGISTRY)

SNAPSHOT_NEWEST_AGE_MAX = Gauge("sandkeep_snapshot_newest_age_max_seconds", "Across running instances, the largest "
                                "age of sandkeep's newest snapshot of an instance's volume (what a dead host could "
                                "cost at most now; 0 when none was taken yet).", registry=REGISTRY)


def provider_outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of a provider exchange: ok, or the class of its error."""
    if exc is None:
        return "ok"
    from sandkeep.provider import errors

    for cls, label in ((errors.RateLimitedError, "rate_limited"), (errors.NotFoundError, "not_found"),
                       (errors.CapacityError, "capacity"), (errors.WaitTimeoutError, "wait_timeout"),
                       (errors.TransientError, "transient"), (errors.AuthError, "auth")):
        if isinstance(exc, cls):
            return label
    return "error"


def operation_label(operation: str) -> str:
    """The operation's kind without the app or object names the client puts after it (bounded cardinality)."""
    return operation.split(" ", 1)[0] or "unknown"


def observe_provider_call(operation: str, exc: BaseException | None, seconds: float) -> None:
    operation = operation_label(operation)
    outcome = provider_outcome(exc)
    PROVIDER_REQUESTS.labels(operation=operation, outcome=outcome).inc()
    PROVIDER_DURATION.labels(operation=operation).observe(max(0.0, seconds))
    if outcome == "rate_limited":
        PROVIDER_RATE_LIMITED.labels(operation=operation).inc()


def set_engine_gauges(gauges: Mapping[str, float]) -> None:
    """Refresh the engine's store-derived gauges (keys as returned by ``SqlStore.ops_gauges``)."""
    ALARMS_DUE.set(float(gauges.get("alarms_due", 0)))
    RECOVERY_OLDEST_AGE.set(float(gauges.get("recovery_oldest_age_seconds", 0)))
    RETAINED_VOLUMES.set(float(gauges.get("retained_volumes", 0)))
    RETAINED_VOLUMES_OVERDUE.set(float(gauges.get("retained_volumes_overdue", 0)))
    DEAD_HOST_SUSPECTS.set(float(gauges.get("dead_host_suspects", 0)))
    RESTORES_AWAITING_APPROVAL.set(float(gauges.get("restores_awaiting_approval", 0)))
    OLD_MACHINES_TO_FENCE.set(float(gauges.get("old_machines_to_fence", 0)))
    FLAGGED_VOLUME_INSTANCES.set(float(gauges.get("instances_with_flagged_volumes", 0)))
    SNAPSHOT_NEWEST_AGE_MAX.set(float(gauges.get("snapshot_newest_age_max_seconds", 0)))


def set_instance_counts(counts: Mapping[str, int]) -> None:
    """Refresh the by-status gauge (statuses absent from ``counts`` are set to 0)."""
    for status in Status:
        INSTANCES.labels(status=status.value).set(float(counts.get(status.value, 0)))
    RECOVERIES_IN_FLIGHT.set(float(counts.get(Status.RECOVERING.value, 0)))


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
