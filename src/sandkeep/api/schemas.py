"""Request bodies and response shapes of the HTTP API, and the renderers from store records.

Instance JSON never contains secret values: ``secret_names`` lists which secrets are set. ``env`` is
returned with its values (environment variables are configuration, not secrets; put anything sensitive
in ``secrets``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandkeep.clock import utc_iso
from sandkeep.engine.naming import machine_guest
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_ENTRIES = 100
MAX_VALUE_CHARS = 32 * 1024
SIZE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,255}$")


def _check_names(values: dict[str, Any] | None, what: str) -> None:
    if values is None:
        return
    if len(values) > MAX_ENV_ENTRIES:
        raise ValueError(f"at most {MAX_ENV_ENTRIES} {what} entries")
    for name, value in values.items():
        if not ENV_NAME_RE.match(name):
            raise ValueError(f"invalid {what} name {name[:64]!r}: letters, digits and _, not starting with a digit")
        if value is not None and len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"{what} {name!r} is longer than {MAX_VALUE_CHARS} characters")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GuestBody(_Strict):
    cpu_kind: str = Field(default="shared", description="shared or performance (SANDKEEP_GUEST_CPU_KINDS for "
                          "non-admins).")
    cpus: int = Field(description="CPUs (at most SANDKEEP_GUEST_MAX_CPUS for non-admins).")
    memory_mb: int = Field(description="Memory in MB, a multiple of 256 (at most SANDKEEP_GUEST_MAX_MEMORY_MB for "
                           "non-admins).")


_NAME_DOC = ("A name for people (1-63 lowercase letters, digits and '-'; need not be unique). 422 invalid_name "
             "otherwise.")
_LABELS_DOC = ("Labels (at most SANDKEEP_MAX_LABELS; keys 1-63 lowercase letters, digits and '._-', values up to "
               "63 letters, digits and '._-'). 422 invalid_labels otherwise.")
_GUEST_DOC = ("CPU kind, CPUs and memory instead of the size's preset, within the guest policy (422 "
              "guest_not_allowed / invalid_guest).")


class CreateInstanceBody(_Strict):
    user_id: str | None = Field(default=None, description="Owner; only platform and admin tokens may name "
                                "another user (defaults to the token's user).")
    size: str | None = Field(default=None, description="Machine size, e.g. shared-cpu-1x.")
    image: str | None = Field(default=None, description="Machine image (default: the configured image).")
    env: dict[str, str] | None = Field(default=None, description="Environment variables (returned by the API).")
    secrets: dict[str, str] | None = Field(default=None, description="Secrets: encrypted at rest, handed to the "
                                           "machine, never returned.")
    name: str | None = Field(default=None, description=_NAME_DOC)
    labels: dict[str, str] | None = Field(default=None, description=_LABELS_DOC)
    guest: GuestBody | None = Field(default=None, description=_GUEST_DOC)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and not SIZE_RE.match(v):
            raise ValueError("size must look like 'shared-cpu-1x' (lowercase letters, digits, dashes)")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and not IMAGE_RE.match(v):
            raise ValueError("image must be an image reference such as 'sandkeep/gateway'")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        _check_names(v, "env")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        _check_names(v, "secret")
        return v


class UpdateConfigBody(_Strict):
    size: str | None = Field(default=None, description="New machine size.")
    env: dict[str, str] | None = Field(default=None, description="Replaces the whole environment.")
    secrets: dict[str, str | None] | None = Field(
        default=None, description="Sets secrets by name; null removes one. Unnamed secrets are kept.")
    name: str | None = Field(default=None, description=_NAME_DOC + ' "" removes the name.')
    labels: dict[str, str] | None = Field(default=None, description=_LABELS_DOC + " Replaces all labels.")
    guest: GuestBody | None = Field(default=None, description=_GUEST_DOC + " Applied at the next start.")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        return CreateInstanceBody._size(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        _check_names(v, "env")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: dict[str, str | None] | None) -> dict[str, str | None] | None:
        _check_names(v, "secret")
        return v


class Recovery(BaseModel):
    started_at: str | None
    pending_volume_id: str | None
    retained_volume_id: str | None
    retained_volume_cleanup_after: str | None
    last_error: str | None
    last_error_at: str | None


class DeadHost(BaseModel):
    """SPEC §15: a dead host's suspicion, the restore approval, the fenced old machine, flagged volumes."""

    suspect_since: str | None = None
    suspect_reason: str | None = None
    restore_approval: str | None = Field(default=None, description="'awaiting' (an admin must approve the "
                                         "data-losing snapshot restore) or 'approved'.")
    needs_approval: bool = False
    fenced_machine_id: str | None = None
    flagged_volume_ids: list[str] = Field(default_factory=list, description="Old volumes left by snapshot "
                                          "restores: they may hold newer data and are never deleted automatically.")
    incident_note: str | None = Field(default=None, description="What happened and what was lost, in plain words.")
    last_snapshot_at: str | None = Field(default=None, description="sandkeep's own newest snapshot of the current "
                                         "volume (SANDKEEP_SNAPSHOT_INTERVAL): what a dead host can cost at most.")


class Guest(BaseModel):
    cpu_kind: str
    cpus: int
    memory_mb: int


class Instance(BaseModel):
    id: str
    user_id: str
    sandbox_id: str
    status: str
    busy: bool
    region: str | None
    machine_id: str | None
    volume_id: str | None
    app_name: str
    created_at: str | None
    last_started_at: str | None
    last_stopped_at: str | None
    recovery: Recovery
    size: str
    image: str
    env: dict[str, str]
    secret_names: list[str]
    config_generation: int
    pending_action: str | None
    updated_at: str | None
    last_provider_error: str | None = Field(
        default=None, description="The last error the machine provider answered for this instance (cleared once "
        "it runs again; kept on an instance that stopped because of it).")
    last_provider_error_at: str | None = None
    dead_host: DeadHost = Field(default_factory=DeadHost)
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    guest: Guest | None = Field(default=None, description="The machine's CPU kind, CPUs and memory (chosen, or "
                                "the size's preset).")


class InstancePage(BaseModel):
    items: list[Instance]
    next_cursor: str | None


class Event(BaseModel):
    id: int | None
    event: str
    instance_id: str | None
    user_id: str | None
    sandbox_id: str | None
    status: str | None
    machine_id: str | None
    volume_id: str | None
    region: str | None
    label: str | None
    error: str | None
    duration_ms: int | None
    value: float | None
    at: str | None
    details: dict[str, Any]


class EventPage(BaseModel):
    items: list[Event]
    next_cursor: str | None


class AuditEntry(BaseModel):
    id: int | None
    actor: str
    role: str
    action: str
    instance_id: str | None
    outcome: str
    at: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None


class CleanupResult(BaseModel):
    ok: bool
    deleted_volume_id: str | None


class TokenInfo(BaseModel):
    id: str
    user_id: str
    role: str
    issued_at: str | None
    expires_at: str | None
    issued_by: str | None
    revoked_at: str | None
    revoked_by: str | None
    live: bool


class TokenList(BaseModel):
    items: list[TokenInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str
    status: int
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _guest(r: InstanceRecord) -> dict[str, Any]:
    g = machine_guest(r)
    return {"cpu_kind": g.cpu_kind, "cpus": g.cpus, "memory_mb": g.memory_mb}


def render_instance(r: InstanceRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "user_id": r.user_id,
        "sandbox_id": r.sandbox_id,
        "status": str(r.status),
        "busy": r.busy,
        "region": r.region,
        "machine_id": r.machine_id,
        "volume_id": r.volume_id,
        "app_name": r.app_name,
        "created_at": utc_iso(r.created_at),
        "last_started_at": utc_iso(r.last_started_at),
        "last_stopped_at": utc_iso(r.last_stopped_at),
        "recovery": {
            "started_at": utc_iso(r.recovery_started_at),
            "pending_volume_id": r.pending_recovery_volume_id,
            "retained_volume_id": r.retained_volume_id,
            "retained_volume_cleanup_after": utc_iso(r.retained_volume_cleanup_after),
            "last_error": r.last_recovery_error,
            "last_error_at": utc_iso(r.last_recovery_error_at),
        },
        "size": r.machine_size,
        "image": r.image,
        "env": dict(r.env or {}),
        "secret_names": sorted((r.secrets_encrypted or {}).keys()),
        "config_generation": r.config_generation,
        "pending_action": r.pending_action,
        "updated_at": utc_iso(r.updated_at),
        "last_provider_error": r.last_provider_error,
        "last_provider_error_at": utc_iso(r.last_provider_error_at),
        "dead_host": {"suspect_since": utc_iso(r.suspect_since), "suspect_reason": r.suspect_reason,
                      "restore_approval": r.restore_approval, "needs_approval": r.restore_approval == "awaiting",
                      "fenced_machine_id": r.fenced_machine_id, "flagged_volume_ids": list(r.flagged_volume_ids),
                      "incident_note": r.incident_note, "last_snapshot_at": utc_iso(r.last_snapshot_at)},
        "name": r.name,
        "labels": dict(r.labels or {}),
        "guest": _guest(r),
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    iso = utc_iso(value) if hasattr(value, "astimezone") else None
    return iso if iso is not None else str(value)


def render_event(e: EventRecord) -> dict[str, Any]:
    return {
        "id": e.id, "event": e.event, "instance_id": e.instance_id, "user_id": e.user_id,
        "sandbox_id": e.sandbox_id, "status": e.status, "machine_id": e.machine_id, "volume_id": e.volume_id,
        "region": e.region, "label": e.label, "error": e.error, "duration_ms": e.duration_ms, "value": e.value,
        "at": utc_iso(e.at), "details": _plain(e.details or {}),
    }


def render_audit(a: AuditRecord) -> dict[str, Any]:
    return {"id": a.id, "actor": a.actor, "role": a.role, "action": a.action, "instance_id": a.instance_id,
            "outcome": a.outcome, "at": utc_iso(a.at), "details": _plain(a.details or {})}


def render_token(t: Any, now: Any) -> dict[str, Any]:
    """A registry row (:class:`sandkeep.credentials.TokenRecord`); the token's text is never stored or shown."""
    return {"id": t.jti, "user_id": t.user_id, "role": t.role, "issued_at": utc_iso(t.issued_at),
            "expires_at": utc_iso(t.expires_at), "issued_by": t.issued_by, "revoked_at": utc_iso(t.revoked_at),
            "revoked_by": t.revoked_by, "live": t.live(now)}


SECRET_FIELDS = frozenset({"secrets_encrypted"})


def render_debug(data: dict[str, Any]) -> dict[str, Any]:
    """Every persisted field (as the service reports it), JSON-safe, secret values redacted."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECRET_FIELDS and isinstance(value, dict):
            out[key] = {name: "<redacted>" for name in value}
        else:
            out[key] = _plain(value)
    return out
