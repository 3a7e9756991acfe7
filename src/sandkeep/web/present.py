"""Turning records into what a person reads: badges, relative times, button states, explanations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sandkeep.clock import utc_iso
from sandkeep.store.records import EventRecord, InstanceRecord, Status

BADGE_LABELS: dict[str, str] = {
    Status.PROVISIONED: "Provisioned",
    Status.STARTING: "Starting",
    Status.RUNNING: "Running",
    Status.STOPPED: "Stopped",
    Status.RESTARTING: "Restarting",
    Status.RECOVERING: "Recovering",
    Status.DESTROYING: "Destroying",
    Status.DESTROYED: "Destroyed",
}

ALL_STATUSES: list[str] = [s.value for s in Status]
LIVE_STATUSES: list[str] = [s.value for s in Status if s is not Status.DESTROYED]


def status_value(status: object) -> str:
    return status.value if isinstance(status, Status) else str(status)


def badge_label(status: object) -> str:
    value = status_value(status)
    return BADGE_LABELS.get(value, value.capitalize())


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def human_duration(seconds: float) -> str:
    """Coarse, stable wording ("less than a minute", "5 min", "2 h 5 min", "3 days 4 h")."""
    seconds = abs(seconds)
    if seconds < 60:
        return "less than a minute"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{_plural(days, 'day')} {hours} h" if hours else _plural(days, "day")


def relative(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "—"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - now).total_seconds()
    if abs(delta) < 60:
        return "just now" if delta <= 0 else "in less than a minute"
    text = human_duration(delta)
    return f"in {text}" if delta > 0 else f"{text} ago"


def absolute(when: datetime | None) -> str:
    """``2026-01-01 12:00:05 UTC``."""
    if when is None:
        return "—"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(when: datetime | None) -> str:
    return utc_iso(when) or ""


def duration_ms_text(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    return human_duration(seconds)


@dataclass(frozen=True)
class Button:
    action: str  # start | stop | restart | destroy | ...
    label: str
    enabled: bool
    reason: str = ""  # why it is disabled (shown as title and as visible text)
    confirm: str = ""  # confirmation question for dangerous actions
    danger: bool = False


def is_healthy(record: InstanceRecord) -> bool:
    return (status_value(record.status) == Status.RUNNING and record.machine_id is not None
            and record.health_fail_count == 0 and not record.pending_action)


def owner_buttons(record: InstanceRecord, *, admin: bool = False) -> list[Button]:
    status = status_value(record.status)
    label = badge_label(status).lower()
    busy_reason = ""
    if status in (Status.STARTING, Status.RESTARTING, Status.RECOVERING, Status.DESTROYING):
        busy_reason = f"Busy: the instance is {label}; wait until it finishes."
    elif record.pending_action:
        busy_reason = f"Busy: your {record.pending_action} request is still being carried out."
    destroyed = status == Status.DESTROYED

    def gate(action: str, ok_states: tuple[str, ...], not_ok: str) -> Button:
        if destroyed:
            return Button(action, action.capitalize(), False, "The instance has been destroyed.")
        if busy_reason:
            return Button(action, action.capitalize(), False, busy_reason)
        if status not in ok_states:
            return Button(action, action.capitalize(), False, not_ok)
        return Button(action, action.capitalize(), True)

    start = gate("start", (Status.PROVISIONED, Status.STOPPED), "Already running." if status == Status.RUNNING
                 else f"Cannot start while {label}.")
    stop = gate("stop", (Status.RUNNING,), "Already stopped." if status == Status.STOPPED
                else f"Nothing to stop: the instance is {label}.")
    restart = gate("restart", (Status.RUNNING,), "Stopped: use Start." if status in (Status.STOPPED,
                   Status.PROVISIONED) else f"Cannot restart while {label}.")
    confirm = (f"Destroy instance {record.id}? Its machine and its volume (your data) are deleted for good.")
    if destroyed:
        destroy = Button("destroy", "Destroy", False, "The instance has been destroyed.", danger=True)
    elif status == Status.DESTROYING:
        destroy = Button("destroy", "Destroy", False, "Already being destroyed.", danger=True)
    elif status == Status.RECOVERING and not admin:
        destroy = Button("destroy", "Destroy", False,
                         "Busy: the instance is recovering; it can be destroyed once recovery ends.", danger=True)
    elif status == Status.RECOVERING:  # admins may force it (the recovery is abandoned)
        destroy = Button("destroy", "Destroy", True, danger=True,
                         confirm=f"Force-destroy instance {record.id} while it is recovering? The recovery is "
                                 "abandoned; its machine and all its volumes are deleted for good.")
    else:
        destroy = Button("destroy", "Destroy", True, confirm=confirm, danger=True)
    return [start, stop, restart, destroy]


def reason_groups(buttons: list[Button]) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """Disabled buttons grouped by their reason (shown once), and each action's group index."""
    groups: list[tuple[str, list[str]]] = []
    index: dict[str, int] = {}
    for b in buttons:
        if b.enabled or not b.reason:
            continue
        for i, (reason, labels) in enumerate(groups):
            if reason == b.reason:
                labels.append(b.label)
                index[b.action] = i
                break
        else:
            index[b.action] = len(groups)
            groups.append((b.reason, [b.label]))
    return groups, index


@dataclass(frozen=True)
class Explanation:
    headline: str
    error: str
    when: datetime | None
    advice: str


def recovery_explanation(record: InstanceRecord) -> Explanation | None:
    """A short human explanation of the last failed recovery, while it is still relevant."""
    error = record.last_recovery_error
    if not error:
        return None
    status = status_value(record.status)
    if status in (Status.RUNNING, Status.RECOVERING, Status.DESTROYING, Status.DESTROYED):
        return None
    lower = error.lower()
    if "timed out" in lower or "timeout" in lower:
        advice = ("Moving your machine to a new host took too long, so we stopped trying. Your data is still on "
                  "its original volume. Press Start to try again.")
    elif "capacity" in lower or "insufficient resources" in lower:
        advice = ("No region had room for a replacement machine. Your data is safe on its original volume; "
                  "press Start in a few minutes.")
    elif "source volume missing" in lower or ("volume" in lower and "missing" in lower):
        advice = ("The volume holding your data could not be found, so nothing was moved. Contact an "
                  f"administrator and mention instance {record.id}.")
    else:
        advice = ("Your machine stopped unexpectedly and moving it to a new host failed. Your data stays on its "
                  "original volume. Press Start to try again; if it fails again, contact an administrator and "
                  f"mention instance {record.id}.")
    return Explanation(headline="The last automatic recovery failed", error=error,
                       when=record.last_recovery_error_at, advice=advice)


def provider_problem(record: InstanceRecord) -> Explanation | None:
    """Plain words for an owner whose instance the cloud provider keeps failing (no raw error, no internal names).

    Shown while the instance is busy or stopped and the engine has a provider error on record; admins see the
    error itself on the instance page.
    """
    if not record.last_provider_error:
        return None
    status = status_value(record.status)
    if status in (Status.STARTING, Status.RESTARTING, Status.RECOVERING):
        return Explanation(headline="The cloud provider is not answering",
                           error="", when=record.last_provider_error_at,
                           advice="sandkeep keeps retrying on its own. Nothing is lost; if this lasts more than a "
                                  "few minutes the start is abandoned and your machine is left stopped.")
    if status == Status.STOPPED:
        return Explanation(headline="Your machine could not be started", error="", when=record.last_provider_error_at,
                           advice="The cloud provider kept failing, so sandkeep gave up. Your data is safe. Press "
                                  "Start to try again later; if it keeps failing, contact an administrator and "
                                  f"mention instance {record.id}.")
    return None


RECOVERY_SUCCEEDED = "instance.unexpected_stop_recovery_succeeded"


@dataclass(frozen=True)
class LastRecovery:
    when: datetime
    took: str
    from_region: str | None
    to_region: str | None


def last_recovery(events: list[EventRecord]) -> LastRecovery | None:
    """The newest successful recovery among ``events``: when, how long, from which region to which."""
    done = [e for e in events if e.event == RECOVERY_SUCCEEDED]
    if not done:
        return None
    newest = max(done, key=lambda e: (e.at, e.id or 0))
    details = newest.details or {}
    old_region = details.get("old_region")
    return LastRecovery(when=newest.at, took=duration_ms_text(newest.duration_ms),
                        from_region=old_region if isinstance(old_region, str) else None, to_region=newest.region)


def retry_recovery_reason(record: InstanceRecord) -> str:
    """Why "Retry recovery" is disabled ("" when it makes sense: a recovery is running or the last one failed)."""
    status = status_value(record.status)
    if status in (Status.DESTROYING, Status.DESTROYED):
        return "The instance is being destroyed."
    if status == Status.RECOVERING:
        return ""  # reconcile the running recovery now
    if status == Status.STOPPED and record.last_recovery_error:
        return ""  # the last recovery failed: try again
    return f"Nothing to retry: no recovery is running and none failed (the instance is {badge_label(status).lower()})."


def recovery_state(record: InstanceRecord) -> str:
    status = status_value(record.status)
    if status == Status.RECOVERING:
        step = f" (step: {record.recovery_step})" if record.recovery_step else ""
        return f"Recovering now{step}"
    if record.last_recovery_error and status == Status.STOPPED:
        return "Last recovery failed"
    if record.retained_volume_id:
        return "Recovered; old volume retained"
    return "No recovery in progress"
