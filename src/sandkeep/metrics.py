"""Prometheus metrics of sandkeep, in one module-level registry (served at ``/metrics`` by the API)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sandkeep.store.records import Status

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
INSTANCES = Gauge("sandkeep_instances", "Instances by status.", ["status"], registry=REGISTRY)
PROVIDER_ERRORS = Counter("sandkeep_provider_errors", "Provider errors seen by the engine, by class.", ["kind"],
                          registry=REGISTRY)
RECONCILE_PASSES = Counter("sandkeep_reconcile_passes", "Reconcile passes run, by the status they started in.",
                           ["status"], registry=REGISTRY)
STEP_LIMIT = Counter("sandkeep_reconcile_step_limit", "Reconcile passes cut off by the step limit (a loop: a bug).",
                     registry=REGISTRY)
DATA_LOSS = Counter("sandkeep_data_loss", "Instances whose volume vanished or was restored from a snapshot.",
                    ["kind"], registry=REGISTRY)


def set_instance_counts(counts: Mapping[str, int]) -> None:
    """Refresh the by-status gauge (statuses absent from ``counts`` are set to 0)."""
    for status in Status:
        INSTANCES.labels(status=status.value).set(float(counts.get(status.value, 0)))


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
