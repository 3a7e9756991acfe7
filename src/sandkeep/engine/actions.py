"""The engine's vocabulary: what reconcile observed, and the typed actions its decisions return.

Decisions (``lifecycle``, ``recovery``, ``intents``, dispatched by ``reconcile``) are pure functions of
``(record, Observed, settings, now) -> list[Action]``; :mod:`sandkeep.engine.executor` performs the actions
against the provider and the store. Every provider effect is a frozen, hashable dataclass whose *identity*
(the fields that take part in ``==``/``hash``) says which outcome it is: the executor records an
:class:`Outcome` under the action itself in ``Observed.outcomes``, and the next decision of the same pass
asks ``obs.outcome(DestroyMachine(machine_id))``. Fields marked ``compare=False`` are parameters, not identity.

What a decision may write is :class:`Changes`: a ``TypedDict`` of the instance row's mutable fields, so a
misspelt field is a type error, not a run-time surprise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

from sandkeep.provider.errors import ProviderError
from sandkeep.provider.models import Machine, Volume, VolumeSnapshot
from sandkeep.store.records import Status


class Changes(TypedDict, total=False):
    """The instance fields a decision (or an intent) may persist; every key optional."""

    status: Status
    machine_id: str | None
    volume_id: str | None
    region: str | None
    machine_size: str
    image: str
    env: dict[str, str]
    secrets_encrypted: dict[str, str]
    gateway_token_encrypted: str | None
    config_generation: int
    last_started_at: datetime | None
    last_stopped_at: datetime | None
    status_changed_at: datetime | None
    health_fail_count: int
    alarm_at: datetime | None
    pending_action: str | None
    recovery_started_at: datetime | None
    recovery_step: str | None
    pending_recovery_volume_id: str | None
    retained_volume_id: str | None
    retained_volume_cleanup_after: datetime | None
    last_recovery_error: str | None
    last_recovery_error_at: datetime | None
    pending_destroy_machine_id: str | None
    pending_destroy_volume_id: str | None
    destroy_volume_attempts: int
    destroyed_at: datetime | None
    provider_error_count: int
    last_provider_error: str | None
    last_provider_error_at: datetime | None
    suspect_since: datetime | None
    suspect_reason: str | None
    restore_approval: str | None
    fenced_machine_id: str | None
    flagged_volume_ids: list[str]
    recovery_point: str | None
    incident_note: str | None
    last_snapshot_at: datetime | None
    unsettled_create_at: datetime | None
    name: str | None
    labels: dict[str, str]
    guest_cpu_kind: str | None
    guest_cpus: int | None
    guest_memory_mb: int | None


#: record fields that receive a created volume's id (``CreateVolume.assign``)
VolumeField = Literal["volume_id", "pending_recovery_volume_id"]


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    error: ProviderError | None = None
    refused: str | None = None  # 7.5 refusal message

    @property
    def message(self) -> str:
        if self.refused:
            return self.refused
        return str(self.error) if self.error is not None else ""


@dataclass
class Observed:
    """Provider state read at the start of one decision step, plus the outcomes of this pass so far."""

    machine: Machine | None = None  # the record's machine_id, when found
    machine_missing: bool = False  # provider answered 404 for machine_id
    volume: Volume | None = None
    volume_missing: bool = False
    pending_volume: Volume | None = None
    pending_volume_missing: bool = False
    # live machines whose metadata names this instance (orphan adoption, destroy sweep)
    owned_machines: list[Machine] = field(default_factory=list)
    # volumes named like this instance's volumes (idempotent volume creation)
    named_volumes: list[Volume] = field(default_factory=list)
    fenced_machine: Machine | None = None  # the old machine on a dead host (record.fenced_machine_id)
    fenced_machine_missing: bool = False
    transient: ProviderError | None = None  # a read failed; nothing can be decided about the provider
    outcomes: dict[Effect, Outcome] = field(default_factory=dict)

    def outcome(self, action: Effect) -> Outcome | None:
        return self.outcomes.get(action)


@dataclass(frozen=True)
class Needs:
    """What a status module needs observed for a record (``needs(record)`` beside each ``decide``)."""

    machine: bool = False  # the record's machine_id
    volume: bool = False  # the record's volume_id
    pending_volume: bool = False  # the record's pending_recovery_volume_id
    owned_machines: bool = False  # live machines whose metadata names the instance
    named_volumes: bool = False  # volumes named like the instance's volume
    fenced_machine: bool = False  # the old machine of a dead host, waiting to be destroyed


# ------------------------------------------------------------------ bookkeeping actions


@dataclass(frozen=True)
class Persist:
    """Fenced write of ``changes`` (a status change also stamps status_changed_at and reschedules the alarm)."""

    changes: Changes


@dataclass(frozen=True)
class Emit:
    event: str
    label: str | None = None
    error: str | None = None
    duration_ms: int | None = None
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    level: str = "info"
    required: bool = False  # a record that must not be lost (a data loss): a store failure ends the pass


@dataclass(frozen=True)
class RequeueAfter:
    """End the pass; reconcile again after ``seconds`` (plus jitter); resets the provider error count."""

    seconds: float


@dataclass(frozen=True)
class Backoff:
    """End the pass after a transient provider error: bump provider_error_count, exponential alarm."""

    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Done:
    """End the pass without touching the alarm (e.g. a destroyed instance)."""


# ------------------------------------------------------------------ provider effects
# Identity = the fields compared; ``compare=False`` fields are parameters of the call.


def _no_changes() -> Changes:
    return Changes()


@dataclass(frozen=True)
class EnsureApp:
    pass


@dataclass(frozen=True)
class RotateGatewayToken:
    """Give the instance a new random gateway token (stored encrypted) and bump ``config_generation`` so its
    machine is updated with it before it serves again (an instance from before gateway tokens, SPEC §13)."""

    reason: str = field(default="missing", compare=False)


@dataclass(frozen=True)
class CreateVolume:
    """Create (or fork / restore) a volume over ``regions`` (capacity fallback); persist its id at once.

    ``assign`` names the record field that receives the id; with ``assign_region`` the volume's region goes
    into ``region``; ``extra`` goes into the same write. ``announce`` is emitted once the volume exists and before
    that write (a restore's data-loss record: should the write fail, the next pass adopts the volume and emits it
    again -- at least once, never lost). Identity: the purpose.
    """

    purpose: str  # "primary" | "recovery" | "restore" | "replacement"
    name: str = field(default="", compare=False)
    regions: tuple[str, ...] = field(default=(), compare=False)
    assign: VolumeField = field(default="volume_id", compare=False)
    size_gb: int | None = field(default=None, compare=False)
    source_volume_id: str | None = field(default=None, compare=False)
    snapshot_id: str | None = field(default=None, compare=False)
    compute_size: str | None = field(default=None, compare=False)
    assign_region: bool = field(default=False, compare=False)
    extra: Changes = field(default_factory=_no_changes, compare=False)
    announce: Emit | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CreateMachine:
    """Create a machine with the instance's current configuration; persist its id before anything else.

    Identity: the purpose."""

    purpose: str  # "primary" | "recovery"
    name: str = field(default="", compare=False)
    volume_id: str = field(default="", compare=False)
    region: str | None = field(default=None, compare=False)
    extra: Changes = field(default_factory=_no_changes, compare=False)


@dataclass(frozen=True)
class StartMachine:
    machine_id: str


@dataclass(frozen=True)
class StopMachine:
    machine_id: str


@dataclass(frozen=True)
class RestartMachine:
    machine_id: str


@dataclass(frozen=True)
class UpdateMachine:
    """Apply the current configuration (and volume) to an existing machine."""

    machine_id: str
    volume_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class DestroyMachine:
    """Force-destroy; 404 counts as done; ``clear`` is persisted after the provider confirms."""

    machine_id: str
    clear: Changes = field(default_factory=_no_changes, compare=False)
    label: str | None = field(default=None, compare=False)  # the event's label (e.g. "admin")
    details: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # more event details


@dataclass(frozen=True)
class WaitMachine:
    """One provider wait call (timeout kept below the lease; the lease is released while waiting)."""

    machine_id: str
    state: str = "started"


@dataclass(frozen=True)
class ProbeHealth:
    """Probe the gateway (GET /health through the provider's proxy) until healthy or the timeout."""

    machine_id: str
    timeout: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class ListSnapshots:
    volume_id: str


@dataclass(frozen=True)
class TakeSnapshot:
    """sandkeep's own on-demand snapshot of the instance's volume (SANDKEEP_SNAPSHOT_INTERVAL)."""

    volume_id: str


@dataclass(frozen=True)
class FindVolumes:
    """List the app's volumes named like this instance's (a lost volume id: adopt one of our own before ever
    creating an empty one, SPEC §15)."""


@dataclass(frozen=True)
class DeleteVolumeSafely:
    """SPEC §7.5: refuse when the attached machine names another sandbox; else destroy it, delete the volume.

    ``clear`` is persisted only after the delete succeeded (404 counts).
    """

    volume_id: str
    reason: str = field(default="", compare=False)
    clear: Changes = field(default_factory=_no_changes, compare=False)


Effect = (EnsureApp | RotateGatewayToken | CreateVolume | CreateMachine | StartMachine | StopMachine
          | RestartMachine | UpdateMachine | DestroyMachine | WaitMachine | ProbeHealth | ListSnapshots
          | FindVolumes | TakeSnapshot | DeleteVolumeSafely)
Action = Persist | Emit | RequeueAfter | Backoff | Done | Effect

TERMINAL = (RequeueAfter, Backoff, Done)


def usable_own_volumes(volumes: list[Volume], *, exclude: tuple[str | None, ...],
                       own_machines: frozenset[str] = frozenset()) -> list[Volume]:
    """Volumes of this instance's name that could carry it, newest first: not being destroyed, not attached to
    a machine that is not ours, not one of ``exclude`` (the lost id, retained and flagged old volumes)."""
    out = [v for v in volumes if v.id not in exclude
           and (v.state or "created") not in ("destroyed", "destroying", "pending_destroy")
           and (not v.attached_machine_id or v.attached_machine_id in own_machines)]
    return sorted(out, key=lambda v: (v.created_at or "", v.id), reverse=True)


def newest_snapshot(snapshots: list[VolumeSnapshot]) -> VolumeSnapshot | None:
    usable = [s for s in snapshots if (s.status or "created") not in ("failed", "deleted")]
    if not usable:
        return None
    return max(usable, key=lambda s: s.created_at or "")
