"""Typed views of the Machines API objects sandkeep uses (Fly's JSON shapes; unknown fields kept)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MachineState = Literal[
    "created", "starting", "started", "stopping", "stopped", "replacing", "destroying", "destroyed",
    "suspending", "suspended", "failed", "replaced", "updating",
]
WaitState = Literal["started", "stopped", "destroyed"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Guest(_Model):
    cpu_kind: str = "shared"
    cpus: int = 1
    memory_mb: int = 256


class Mount(_Model):
    volume: str
    path: str = "/data"
    name: str | None = None


class MachineConfig(_Model):
    image: str
    env: dict[str, str] = Field(default_factory=dict)
    guest: Guest | None = None
    mounts: list[Mount] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    services: list[dict[str, Any]] = Field(default_factory=list)
    auto_destroy: bool | None = None
    restart: dict[str, Any] | None = None


class MachineEvent(_Model):
    id: str | None = None
    type: str
    status: str | None = None
    source: str | None = None
    timestamp: int | None = None  # milliseconds since the epoch
    request: dict[str, Any] | None = None

    def _exit_event(self) -> dict[str, Any]:
        exit_event = (self.request or {}).get("exit_event")
        return exit_event if isinstance(exit_event, dict) else {}

    @property
    def exit_code(self) -> int | None:
        """For an ``exit`` event: the process's exit code (Fly puts it in ``request.exit_event``)."""
        value = self._exit_event().get("exit_code")
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def requested_stop(self) -> bool | None:
        """For an ``exit`` event: whether the exit followed a stop request (False = unexpected)."""
        value = self._exit_event().get("requested_stop")
        return value if isinstance(value, bool) else None


class Machine(_Model):
    id: str
    name: str | None = None
    state: str
    region: str | None = None
    instance_id: str | None = None
    private_ip: str | None = None
    config: MachineConfig | None = None
    created_at: str | None = None
    updated_at: str | None = None
    events: list[MachineEvent] = Field(default_factory=list)
    host_status: str | None = None  # "ok" | "unknown" | "unreachable" (fly-go HostStatus)
    # Fly sends this instead of ``config`` while host_status is not "ok" (fly-go Machine.IncompleteConfig)
    incomplete_config: MachineConfig | None = None

    @property
    def effective_config(self) -> MachineConfig | None:
        return self.config if self.config is not None else self.incomplete_config

    @property
    def metadata(self) -> dict[str, str]:
        config = self.effective_config
        return dict(config.metadata) if config else {}

    @property
    def volume_ids(self) -> list[str]:
        config = self.effective_config
        return [m.volume for m in config.mounts] if config else []


class Volume(_Model):
    id: str
    name: str | None = None
    state: str | None = None
    region: str | None = None
    size_gb: int | None = None
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    host_status: str | None = None  # "ok" | "unknown" | "unreachable"
    zone: str | None = None
    created_at: str | None = None
    encrypted: bool | None = None
    snapshot_retention: int | None = None


class VolumeSnapshot(_Model):
    id: str
    created_at: str | None = None
    size: int | None = None
    digest: str | None = None
    status: str | None = None
    retention_days: int | None = None
    volume_size: int | None = None  # the source volume's size when the snapshot was taken (the host: bytes)


class App(_Model):
    id: str | None = None
    name: str
    status: str | None = None
    organization: dict[str, Any] | None = None
