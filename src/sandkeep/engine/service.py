"""What the API, the CLI (through the API) and the web UI ask of the engine.

One implementation (:class:`sandkeep.engine.instances.InstanceService`) serves every caller, so the
web pages and the HTTP API run the same code paths. Methods raise the exceptions below; the API maps
them to HTTP errors with a machine-readable ``code``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
"""User ids: 1-128 characters, letters, digits and ``._@:+-``, starting with a letter or digit."""


def valid_user_id(user_id: object) -> bool:
    return isinstance(user_id, str) and bool(USER_ID_RE.match(user_id))


class ServiceError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InstanceNotFound(ServiceError):
    code = "instance_not_found"
    http_status = 404


class InstanceBusy(ServiceError):
    """User action while starting/restarting/recovering/destroying (SPEC §3)."""

    code = "instance_busy"
    http_status = 409


class InvalidTransition(ServiceError):
    """E.g. stop while already stopped, or any action on a destroyed instance."""

    code = "invalid_state"
    http_status = 409


class RecoveringRefused(ServiceError):
    """Destroy (without admin force) or admin retained-volume cleanup while recovering."""

    code = "instance_recovering"
    http_status = 409


class CleanupRefused(ServiceError):
    """Retained volume cleanup refused (e.g. attached machine names another sandbox)."""

    code = "cleanup_refused"
    http_status = 409


class Forbidden(ServiceError):
    """The actor may not do this (e.g. a user creating an instance for someone else, a non-admin admin action)."""

    code = "forbidden"
    http_status = 403


class QuotaExceeded(ServiceError):
    """The instance owner already has SANDKEEP_MAX_INSTANCES_PER_USER instances (not destroyed)."""

    code = "quota_exceeded"
    http_status = 403


class ImageNotAllowed(ServiceError):
    """The image is not in SANDKEEP_ALLOWED_IMAGES (default: only SANDKEEP_IMAGE)."""

    code = "image_not_allowed"
    http_status = 403


class MachineSizeNotAllowed(ServiceError):
    """A non-admin asked for a machine size outside SANDKEEP_USER_MACHINE_SIZES."""

    code = "machine_size_not_allowed"
    http_status = 403


class InvalidArgument(ServiceError):
    """A malformed filter, cursor or argument."""

    code = "invalid_request"
    http_status = 400


class InstanceLocked(ServiceError):
    """Another worker holds the instance's claim for longer than an API request waits; retry shortly."""

    code = "instance_locked"
    http_status = 503


class InvalidUserId(ServiceError):
    """A user id outside :data:`USER_ID_RE` (the one rule for tokens, the API, the CLI and the web UI)."""

    code = "validation_error"
    http_status = 422


class InvalidConfig(ServiceError):
    code = "invalid_config"
    http_status = 422


class ForbiddenEnvName(InvalidConfig):
    """An env or secret name on the forbidden list (:data:`sandkeep.engine.naming.FORBIDDEN_ENV_NAMES`)."""

    code = "forbidden_env_name"


class ProviderUnavailable(ServiceError):
    code = "provider_unavailable"
    http_status = 503


@dataclass(frozen=True)
class Actor:
    user_id: str
    role: str  # "user" | "admin" | "platform"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class InstanceServiceAPI(Protocol):
    async def create_instance(self, actor: Actor, *, user_id: str | None = None, size: str | None = None,
                              env: dict[str, str] | None = None,
                              secrets: dict[str, str] | None = None,
                              image: str | None = None, idempotency_key: str | None = None,
                              name: str | None = None, labels: dict[str, str] | None = None,
                              guest: dict[str, Any] | None = None) -> InstanceRecord:
        """Create and start an instance (``user_id`` defaults to the caller's own)."""
        ...

    async def update_config(self, actor: Actor, instance_id: str, *, size: str | None = None,
                            env: dict[str, str] | None = None,
                            secrets: dict[str, str | None] | None = None,
                            name: str | None = None, labels: dict[str, str] | None = None,
                            guest: dict[str, Any] | None = None) -> InstanceRecord:
        """Change the configuration (applied at the next start), the name (``""`` removes it) or the labels
        (replaced as a whole)."""
        ...

    def get_instance(self, actor: Actor, instance_id: str) -> InstanceRecord:
        """The instance if ``actor`` may see it (:mod:`sandkeep.engine.access`), else :class:`InstanceNotFound`."""
        ...

    def list_instances(self, actor: Actor, *, user_id: str | None = None, status: list[str] | None = None,
                       region: str | None = None, cursor: str | None = None,
                       limit: int = 50) -> Page[InstanceRecord]:
        """Users list their own instances (naming another user is :class:`Forbidden`); others list all."""
        ...

    def count_by_status(self, actor: Actor) -> dict[str, int]:
        """Admin: instances per status, destroyed ones excluded (statuses with none are absent)."""
        ...

    async def start(self, actor: Actor, instance_id: str) -> InstanceRecord: ...
    async def stop(self, actor: Actor, instance_id: str) -> InstanceRecord: ...
    async def restart(self, actor: Actor, instance_id: str) -> InstanceRecord: ...
    async def destroy(self, actor: Actor, instance_id: str, *, force: bool = False) -> InstanceRecord: ...
    def list_events(self, actor: Actor, instance_id: str, *, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        """One instance's events, newest first (the instance must be visible to ``actor``)."""
        ...

    # admin
    def fleet_events(self, actor: Actor, *, instance_id: str | None = None, name: str | None = None,
                     cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        """Admin: every instance's events, newest first."""
        ...

    def debug(self, actor: Actor, instance_id: str) -> dict[str, Any]: ...
    async def retry_recovery(self, actor: Actor, instance_id: str) -> InstanceRecord: ...
    async def cleanup_retained_volume(self, actor: Actor, instance_id: str) -> str | None:
        """Returns the deleted volume id."""
        ...

    async def approve_restore(self, actor: Actor, instance_id: str) -> InstanceRecord:
        """Admin: approve the snapshot restore an instance on a dead host waits for (policy ``approve``)."""
        ...

    async def list_volume_snapshots(self, actor: Actor, instance_id: str) -> list[dict[str, Any]]:
        """Admin: every snapshot of the instance's current, retained and flagged volumes, newest first."""
        ...

    async def restore_volume(self, actor: Actor, instance_id: str, *, snapshot_id: str | None = None,
                             volume_id: str | None = None) -> InstanceRecord:
        """Admin: restore a snapshot (or fork a kept volume) into a new volume and switch the instance over."""
        ...

    async def delete_flagged_volume(self, actor: Actor, instance_id: str, volume_id: str) -> str:
        """Admin: delete an old volume flagged after a snapshot restore; returns its id."""
        ...

    async def destroy_machine(self, actor: Actor, instance_id: str) -> InstanceRecord: ...
    async def rotate_gateway_token(self, actor: Actor, instance_id: str) -> InstanceRecord:
        """Admin: give the instance a new gateway token (its running machine restarts with it)."""
        ...

    def list_audit(self, actor: Actor, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        """Admin: the audit log, newest first."""
        ...

    def list_orphans(self, actor: Actor) -> list[dict[str, Any]]:
        """Admin: machines and volumes of sandkeep's that no record references (SPEC §15), oldest sighting first:
        kind, id, app_name, region, instance_id, reason, first_seen_at, last_seen_at, deletes_at."""
        ...

    def audit_denied(self, actor: Actor, action: str, instance_id: str | None, reason: str) -> None:
        """Record an admin action refused before it reached an instance (e.g. a non-admin token)."""
        ...

    # traffic
    def gateway_target(self, actor: Actor, instance_id: str) -> tuple[str, dict[str, str]] | None:
        """Base URL and headers to reach the instance's gateway (owner or admin), or None when not running."""
        ...
