"""Small pure helpers the decisions share: intervals, deadlines, region order, machine facts, and the
limits every caller of the service is held to (instance quota, image allow-list, machine sizes per role)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sandkeep.config import Settings
from sandkeep.engine.labels import GuestNotAllowed, GuestRequest
from sandkeep.engine.service import Actor, ImageNotAllowed, MachineSizeNotAllowed
from sandkeep.provider.errors import AuthError, ProviderError, RateLimitedError, TransientError
from sandkeep.provider.models import Machine
from sandkeep.store.records import InstanceRecord, Status

#: machine states that mean "on its way up" (starting timeouts wait for these until the hard timeout)
PROGRESS_STATES = frozenset({"created", "starting", "replacing", "updating", "stopping"})
GONE_STATES = frozenset({"destroyed", "destroying"})
#: states of a replacement machine that end a recovery (SPEC §7.4)
TERMINAL_REPLACEMENT_STATES = frozenset({"stopped", "failed", "destroyed", "destroying"})

#: provider errors that never change an instance's status: back off and retry at the next alarm
BACKOFF_ERRORS: tuple[type[ProviderError], ...] = (TransientError, RateLimitedError, AuthError)


def is_backoff_error(error: BaseException) -> bool:
    return isinstance(error, BACKOFF_ERRORS)


def interval_for(status: Status | str, settings: Settings) -> float:
    s = Status(status)
    if s == Status.RUNNING:
        return settings.interval_running
    if s in (Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING):
        return settings.interval_busy
    return settings.interval_idle


def backoff_seconds(error_count: int, settings: Settings, retry_after: float | None = None) -> float:
    """Exponential backoff for the ``error_count``-th consecutive transient provider error."""
    base = max(0.1, settings.interval_busy)
    delay: float = min(base * (2 ** min(max(error_count - 1, 0), 20)), max(base, settings.provider_backoff_max))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def deadline_cap(record: InstanceRecord, settings: Settings) -> datetime | None:
    """The latest moment the next alarm may be set to, so no timeout or due cleanup is slept through."""
    caps: list[datetime] = []
    if record.status == Status.RECOVERING and record.recovery_started_at is not None:
        caps.append(record.recovery_started_at + timedelta(seconds=settings.recovery_timeout + 0.5))
    if record.status in (Status.STARTING, Status.RESTARTING) and record.status_changed_at is not None:
        caps.append(record.status_changed_at + timedelta(seconds=settings.start_hard_timeout + 0.5))
    if (record.retained_volume_id and record.retained_volume_cleanup_after is not None
            and record.status not in (Status.RECOVERING, Status.DESTROYING, Status.DESTROYED)):
        caps.append(record.retained_volume_cleanup_after)
    if (record.status in (Status.PROVISIONED, Status.STOPPED) and record.last_started_at is None):
        caps.append(record.created_at + timedelta(seconds=settings.stale_provision_after + 0.5))
    return min(caps) if caps else None


def call_deadline(record: InstanceRecord, settings: Settings) -> datetime | None:
    """The moment by which the provider calls made for ``record`` now must end (SPEC §12.5): a recovery's
    steps end by its timeout. The fail/timeout cleanup (``failing…`` steps) runs after it and is not bounded."""
    if record.status != Status.RECOVERING or record.recovery_started_at is None:
        return None
    if (record.recovery_step or "").startswith("failing"):
        return None
    return record.recovery_started_at + timedelta(seconds=settings.recovery_timeout)


def creation_regions(regions: Sequence[str], preferred: str | None) -> tuple[str, ...]:
    """Regions for a new volume: the preferred one first, then the configured order."""
    ordered = [r for r in regions if r]
    if preferred and preferred in ordered:
        ordered.remove(preferred)
        ordered.insert(0, preferred)
    elif preferred:
        ordered.insert(0, preferred)
    return tuple(ordered)


def recovery_regions(regions: Sequence[str], old_region: str | None) -> tuple[str, ...]:
    """SPEC §7.2.3: the old region dropped when 3+ regions are configured, moved last with 2."""
    ordered = [r for r in regions if r]
    if not old_region or old_region not in ordered:
        return tuple(ordered) if ordered else ((old_region,) if old_region else ())
    others = [r for r in ordered if r != old_region]
    if len(ordered) >= 3:
        return tuple(others)
    return (*others, old_region)


def last_exit_time(machine: Machine | None) -> datetime | None:
    """When the machine last exited (its newest 'exit' event), from the provider's event timestamps."""
    if machine is None:
        return None
    stamps = [e.timestamp for e in machine.events if e.type == "exit" and e.timestamp is not None]
    if not stamps:
        return None
    return datetime.fromtimestamp(max(stamps) / 1000.0, tz=UTC)


def detection_latency_ms(machine: Machine | None, now: datetime) -> int | None:
    stopped_at = last_exit_time(machine)
    if stopped_at is None:
        return None
    latency = (now - stopped_at).total_seconds()
    if latency < 0 or latency > 86400:  # clocks disagree (e.g. a test clock): not a measurement
        return None
    return int(latency * 1000)


def elapsed_ms(since: datetime | None, now: datetime) -> int | None:
    if since is None:
        return None
    return max(0, int((now - since).total_seconds() * 1000))


# --------------------------------------------------------------------------------------------- limits


def _csv(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def allowed_images(settings: Settings) -> frozenset[str]:
    """SANDKEEP_ALLOWED_IMAGES, or just SANDKEEP_IMAGE when unset."""
    return frozenset(_csv(settings.allowed_images) or [settings.image])


def check_image(image: str, settings: Settings) -> None:
    """Every role is held to the allow-list (operators change the setting, not the request)."""
    allowed = allowed_images(settings)
    if image not in allowed:
        raise ImageNotAllowed(f"image {image[:100]!r} is not allowed here; allowed: {', '.join(sorted(allowed))}",
                              allowed=sorted(allowed))


def check_size(actor: Actor, size: str, settings: Settings) -> None:
    """Admins may pick any size; users and platform callers the sizes in SANDKEEP_USER_MACHINE_SIZES."""
    if actor.is_admin:
        return
    allowed = _csv(settings.user_machine_sizes)
    if size not in allowed:
        raise MachineSizeNotAllowed(f"machine size {size!r} is not allowed for role {actor.role}; "
                                    f"allowed: {', '.join(allowed) or 'none'}", allowed=allowed)


def check_guest(actor: Actor, guest: GuestRequest, settings: Settings) -> None:
    """Admins may pick any valid guest; others a CPU kind in SANDKEEP_GUEST_CPU_KINDS, at most
    SANDKEEP_GUEST_MAX_CPUS CPUs and SANDKEEP_GUEST_MAX_MEMORY_MB of memory."""
    if actor.is_admin:
        return
    kinds = _csv(settings.guest_cpu_kinds)
    max_cpus, max_memory = int(settings.guest_max_cpus), int(settings.guest_max_memory_mb)
    if guest.cpu_kind not in kinds:
        problem = f"cpu_kind {guest.cpu_kind!r} is not allowed; allowed: {', '.join(kinds) or 'none'}"
    elif guest.cpus > max_cpus:
        problem = f"{guest.cpus} CPUs is more than the {max_cpus} allowed"
    elif guest.memory_mb > max_memory:
        problem = f"{guest.memory_mb} MB of memory is more than the {max_memory} MB allowed"
    else:
        return
    raise GuestNotAllowed(f"guest not allowed for role {actor.role}: {problem}", allowed_cpu_kinds=kinds,
                          max_cpus=max_cpus, max_memory_mb=max_memory)


def instance_quota(actor: Actor, settings: Settings) -> int | None:
    """How many instances (not destroyed) the owner may have when ``actor`` creates one; None = no limit."""
    limit = int(settings.max_instances_per_user)
    if actor.is_admin or limit <= 0:
        return None
    return limit
