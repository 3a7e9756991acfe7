"""One ``emit``: the event row (SPEC §9), one JSON log line and the Prometheus metrics."""

from __future__ import annotations

from typing import Any

from sandkeep import metrics
from sandkeep.clock import Clock
from sandkeep.logs import get_logger
from sandkeep.store.aio import AsyncStore
from sandkeep.store.base import Store
from sandkeep.store.records import EventRecord, InstanceRecord

_LEVELS = ("debug", "info", "warning", "error")


class Emitter:
    """``emit`` writes the event row on the caller's thread; ``aemit`` (the engine's passes and intents) on the
    engine's store thread (``astore``), in the order the caller awaits them."""

    def __init__(self, store: Store, clock: Clock, *, astore: AsyncStore | None = None) -> None:
        self.store = store
        self.clock = clock
        self.astore = astore
        self.log = get_logger("sandkeep.engine")

    def emit(self, record: InstanceRecord | None, event: str, *, label: str | None = None,
             error: str | None = None, duration_ms: int | None = None, value: float | None = None,
             details: dict[str, Any] | None = None, level: str = "info", machine_id: str | None = None,
             volume_id: str | None = None, region: str | None = None) -> EventRecord:
        """Record ``event``; ``machine_id``/``volume_id``/``region`` name what the event acted on when that is
        not (yet) the record's own (e.g. a replacement machine created in another region)."""
        row = self._row(record, event, label=label, error=error, duration_ms=duration_ms, value=value,
                        details=details, machine_id=machine_id, volume_id=volume_id, region=region)
        stored = self._add(row)
        self._told(record, row, level)
        return stored

    async def aemit(self, record: InstanceRecord | None, event: str, *, label: str | None = None,
                    error: str | None = None, duration_ms: int | None = None, value: float | None = None,
                    details: dict[str, Any] | None = None, level: str = "info", machine_id: str | None = None,
                    volume_id: str | None = None, region: str | None = None,
                    required: bool = False) -> EventRecord:
        """:meth:`emit`, the row written on the store thread (directly when there is none). ``required``: a
        record that must not be lost (a data loss): a store failure is raised, after the log line, instead of
        swallowed -- the pass ends and the next one records it again."""
        row = self._row(record, event, label=label, error=error, duration_ms=duration_ms, value=value,
                        details=details, machine_id=machine_id, volume_id=volume_id, region=region)
        try:
            stored = (await self.astore.call(self._add, row, required) if self.astore is not None
                      else self._add(row, required))
        finally:
            self._told(record, row, level)
        return stored

    def _add(self, row: EventRecord, required: bool = False) -> EventRecord:
        """Store ``row``; a store failure is logged and the row returned (the log line and the metric still
        happen), or raised when the row is ``required``."""
        try:
            return self.store.add_event(row)
        except Exception as exc:
            self.log.error("event.store_failed", event_name=row.event, error=str(exc), required=required)
            if required:
                raise
            return row

    def _row(self, record: InstanceRecord | None, event: str, *, label: str | None, error: str | None,
             duration_ms: int | None, value: float | None, details: dict[str, Any] | None,
             machine_id: str | None, volume_id: str | None, region: str | None) -> EventRecord:
        return EventRecord(
            event=event, instance_id=record.id if record else None, at=self.clock.now(),
            user_id=record.user_id if record else None, sandbox_id=record.sandbox_id if record else None,
            status=record.status.value if record else None,
            machine_id=machine_id or (record.machine_id if record else None),
            volume_id=volume_id or (record.volume_id if record else None),
            region=region or (record.region if record else None),
            label=label, error=error, duration_ms=duration_ms, value=value, details=dict(details or {}),
        )

    def _told(self, record: InstanceRecord | None, row: EventRecord, level: str) -> None:
        """The JSON log line and the metrics of an event."""
        fields: dict[str, Any] = {k: v for k, v in {
            "instance_id": row.instance_id, "user_id": row.user_id, "sandbox_id": row.sandbox_id,
            "status": row.status, "machine_id": row.machine_id, "volume_id": row.volume_id, "region": row.region,
            "app_name": record.app_name if record else None, "label": row.label, "error": row.error,
            "duration_ms": row.duration_ms, "value": row.value}.items() if v is not None}
        if row.details:
            fields["details"] = row.details
        log_level = level if level in _LEVELS else "info"
        getattr(self.log, log_level)(row.event, **fields)
        self._count(row)

    @staticmethod
    def _count(row: EventRecord) -> None:
        metrics.EVENTS.labels(event=row.event).inc()
        label = row.label or ""
        if row.event == "instance.unexpected_stop_recovery_started":
            metrics.RECOVERIES_STARTED.labels(label=label).inc()
            latency = row.details.get("detection_latency_ms")
            if isinstance(latency, int | float):
                metrics.DETECTION_LATENCY.observe(float(latency) / 1000.0)
        elif row.event == "instance.unexpected_stop_recovery_succeeded":
            metrics.RECOVERIES_SUCCEEDED.labels(label=label).inc()
            if row.duration_ms is not None:
                metrics.RECOVERY_DURATION.labels(outcome="succeeded").observe(row.duration_ms / 1000.0)
        elif row.event == "instance.unexpected_stop_recovery_failed":
            metrics.RECOVERIES_FAILED.labels(label=label).inc()
            if row.duration_ms is not None:
                metrics.RECOVERY_DURATION.labels(outcome="failed").observe(row.duration_ms / 1000.0)
        elif row.event == "instance.data_loss":
            metrics.DATA_LOSS.labels(kind="volume_missing").inc()
        elif row.event == "instance.restored_from_snapshot":
            metrics.DATA_LOSS.labels(kind="restored_from_snapshot").inc()
