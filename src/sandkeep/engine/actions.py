"""The engine's vocabulary: what reconcile observed, and the typed actions its decisions return.

Decisions (``lifecycle``, ``recovery``, dispatched by ``reconcile``) are pure functions of
``(record, Observed, settings, now) -> list[Action]``; :mod:`sandkeep.engine.executor` performs the actions
against the provider and the store. Effects that can fail record an :class:`Outcome` under their ``key``
in ``Observed.outcomes`` so the next decision of the same pass sees what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandkeep.provider.errors import ProviderError
from sandkeep.provider.models import Machine, Volume, VolumeSnapshot


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
    transient: ProviderError | None = None  # a read failed; nothing can be decided about the provider
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def outcome(self, key: str) -> Outcome | None:
        return self.outcomes.get(key)


# ------------------------------------------------------------------ bookkeeping actions


@dataclass(frozen=True)
class Persist:
    """Fenced write of ``changes`` (a status change also stamps status_changed_at)."""

    changes: dict[str, Any]


@dataclass(frozen=True)
class Emit:
    event: str
    label: str | None = None
    error: str | None = None
    duration_ms: int | None = None
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    level: str = "info"


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


@dataclass(frozen=True)
class EnsureApp:
    @property
    def key(self) -> str:
        return "ensure_app"


@dataclass(frozen=True)
class RotateGatewayToken:
    """Give the instance a new random gateway token (stored encrypted) and bump ``config_generation`` so its
    machine is updated with it before it serves again (an instance from before gateway tokens, SPEC §13)."""

    reason: str = "missing"

    @property
    def key(self) -> str:
        return "rotate_gateway_token"


@dataclass(frozen=True)
class CreateVolume:
    """Create (or fork / restore) a volume over ``regions`` (capacity fallback); persist its id at once.

    ``assign`` names the record field that receives the id; ``assign_region`` the one that receives its
    region; ``extra`` goes into the same write.
    """

    purpose: str  # "primary" | "recovery" | "replacement"
    name: str
    regions: tuple[str, ...]
    assign: str
    size_gb: int | None = None
    source_volume_id: str | None = None
    snapshot_id: str | None = None
    compute_size: str | None = None
    assign_region: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"create_volume:{self.purpose}"


@dataclass(frozen=True)
class CreateMachine:
    """Create a machine with the instance's current configuration; persist its id before anything else."""

    purpose: str  # "primary" | "recovery"
    name: str
    volume_id: str
    region: str | None
    assign: str = "machine_id"
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"create_machine:{self.purpose}"


@dataclass(frozen=True)
class StartMachine:
    machine_id: str

    @property
    def key(self) -> str:
        return f"start:{self.machine_id}"


@dataclass(frozen=True)
class StopMachine:
    machine_id: str

    @property
    def key(self) -> str:
        return f"stop:{self.machine_id}"


@dataclass(frozen=True)
class RestartMachine:
    machine_id: str

    @property
    def key(self) -> str:
        return f"restart:{self.machine_id}"


@dataclass(frozen=True)
class UpdateMachine:
    """Apply the current configuration (and volume) to an existing machine."""

    machine_id: str
    volume_id: str

    @property
    def key(self) -> str:
        return f"update:{self.machine_id}"


@dataclass(frozen=True)
class DestroyMachine:
    """Force-destroy; 404 counts as done; ``clear`` is persisted after the provider confirms."""

    machine_id: str
    clear: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"destroy_machine:{self.machine_id}"


@dataclass(frozen=True)
class WaitMachine:
    """One provider wait call (timeout kept below the lease; the lease is released while waiting)."""

    machine_id: str
    state: str = "started"

    @property
    def key(self) -> str:
        return f"wait:{self.machine_id}:{self.state}"


@dataclass(frozen=True)
class ProbeHealth:
    """Probe the gateway (GET /health through the provider's proxy) until healthy or the timeout."""

    machine_id: str
    timeout: float

    @property
    def key(self) -> str:
        return f"probe:{self.machine_id}"


@dataclass(frozen=True)
class ListSnapshots:
    volume_id: str

    @property
    def key(self) -> str:
        return f"snapshots:{self.volume_id}"


@dataclass(frozen=True)
class DeleteVolumeSafely:
    """SPEC §7.5: refuse when the attached machine names another sandbox; else destroy it, delete the volume.

    ``clear`` is persisted only after the delete succeeded (404 counts).
    """

    volume_id: str
    reason: str
    clear: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"delete_volume:{self.volume_id}"


Effect = (EnsureApp | RotateGatewayToken | CreateVolume | CreateMachine | StartMachine | StopMachine
          | RestartMachine | UpdateMachine | DestroyMachine | WaitMachine | ProbeHealth | ListSnapshots
          | DeleteVolumeSafely)
Action = Persist | Emit | RequeueAfter | Backoff | Done | Effect

TERMINAL = (RequeueAfter, Backoff, Done)


def newest_snapshot(snapshots: list[VolumeSnapshot]) -> VolumeSnapshot | None:
    usable = [s for s in snapshots if (s.status or "created") not in ("failed", "deleted")]
    if not usable:
        return None
    return max(usable, key=lambda s: s.created_at or "")
