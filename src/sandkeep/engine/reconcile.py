"""The reconcile dispatcher: route by status (SPEC §5), after the housekeeping every status shares.

``decide(record, observed, settings, now) -> list[Action]`` is pure; the executor runs it in a loop
(observe → decide → act) until a decision ends the pass (RequeueAfter / Backoff / Done).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sandkeep.config import Settings
from sandkeep.engine import deadhost, lifecycle, recovery
from sandkeep.engine.actions import (
    Action,
    Backoff,
    DeleteVolumeSafely,
    Done,
    Emit,
    Needs,
    Observed,
    Persist,
    RequeueAfter,
    StopMachine,
)
from sandkeep.provider.errors import ProviderError, RateLimitedError
from sandkeep.store.records import InstanceRecord, Status


def housekeeping(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """SPEC §5 "Always": leftover pending recovery volume (never while recovering), due retained volume."""
    if record.status in (Status.RECOVERING, Status.DESTROYING, Status.DESTROYED):
        return []
    pending = record.pending_recovery_volume_id
    if pending:
        if pending in (record.volume_id, record.retained_volume_id):
            return [Persist({"pending_recovery_volume_id": None})]  # it is in use: just forget the pointer
        if obs.outcome(DeleteVolumeSafely(pending)) is None:
            return [DeleteVolumeSafely(pending, reason="leftover_pending_recovery_volume",
                                       clear={"pending_recovery_volume_id": None})]
    retained = record.retained_volume_id
    due = record.retained_volume_cleanup_after
    if retained and due is not None and due <= now:
        if retained == record.volume_id:
            return [Persist({"retained_volume_id": None, "retained_volume_cleanup_after": None})]
        if obs.outcome(DeleteVolumeSafely(retained)) is None:
            return [DeleteVolumeSafely(retained, reason="alarm_retained_recovery_cleanup",
                                       clear={"retained_volume_id": None, "retained_volume_cleanup_after": None}),
                    Emit("instance.retained_volume_deleted", label="alarm_retained_recovery_cleanup",
                         details={"deleted_volume_id": retained})]
    return []


#: statuses whose machine pointer is at rest: a machine of the instance's that the record does not name is a stray
AT_REST = frozenset({Status.RUNNING, Status.STOPPED})


def looking_for_strays(record: InstanceRecord) -> bool:
    return record.unsettled_create_at is not None and record.status in AT_REST


def strays(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """SPEC 12.2 after a machine create whose outcome is unknown (it failed with a 5xx or no answer, or was
    abandoned at a deadline): the provider may still make that machine, after the instance moved on to another
    one (sim small seed 3867: a start's create landed a minute late, beside the machine a recovery had started
    since). Until ``create_landing_window`` has passed, a started machine of the instance's that the record does
    not name is stopped (not destroyed: the orphan inventory deletes it after its grace)."""
    since = record.unsettled_create_at
    if since is None or not looking_for_strays(record):
        return []
    if record.machine_id:  # (without one, the status's decision adopts such a machine instead)
        named = {record.machine_id, record.fenced_machine_id, record.pending_destroy_machine_id}
        for m in obs.owned_machines:
            if m.id not in named and m.state in ("started", "starting") and obs.outcome(StopMachine(m.id)) is None:
                return [StopMachine(m.id),
                        Emit("reconcile.stray_machine_stopped", level="warning",
                             details={"machine_id": m.id, "state": m.state, "region": m.region,
                                      "unsettled_create_at": since.isoformat()})]
    if (now - since).total_seconds() >= settings.create_landing_window:
        return [Persist({"unsettled_create_at": None})]
    return []


def no_deadlines(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    return []


def backoff(error: ProviderError) -> list[Action]:
    """The one answer to a provider hiccup (a read failed): back off exponentially, status unchanged."""
    retry_after = error.retry_after if isinstance(error, RateLimitedError) else None
    return [Backoff(str(error), retry_after=retry_after)]


def no_special_hiccup(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action] | None:
    return None


Decision = Callable[[InstanceRecord, Observed, Settings, datetime], list[Action]]


@dataclass(frozen=True)
class Rules:
    """One status's rules: what it needs observed, its deadlines (checked even when the provider could not be
    read), its own answer to a provider hiccup (None: the common :func:`backoff`), and its decision proper."""

    needs: Callable[[InstanceRecord], Needs]
    decide: Decision
    deadlines: Decision = no_deadlines
    on_transient: Callable[[InstanceRecord, Observed, Settings, datetime], list[Action] | None] = no_special_hiccup


RULES: dict[Status, Rules] = {
    Status.PROVISIONED: Rules(lifecycle.needs_provisioned, lifecycle.decide_provisioned, lifecycle.deadlines_idle),
    Status.STARTING: Rules(lifecycle.needs_starting, lifecycle.decide_starting, lifecycle.deadlines_starting,
                           lifecycle.on_transient_starting),
    Status.RESTARTING: Rules(lifecycle.needs_starting, lifecycle.decide_starting, lifecycle.deadlines_starting,
                             lifecycle.on_transient_starting),
    Status.RUNNING: Rules(lifecycle.needs_running, lifecycle.decide_running),
    Status.STOPPED: Rules(lifecycle.needs_stopped, lifecycle.decide_stopped, lifecycle.deadlines_idle),
    Status.RECOVERING: Rules(recovery.needs, recovery.decide, recovery.deadlines, recovery.on_transient),
    Status.DESTROYING: Rules(lifecycle.needs_destroying, lifecycle.decide_destroying),
}


def needs(record: InstanceRecord) -> Needs:
    """What to read from the provider before deciding for ``record`` (nothing once destroyed)."""
    rules = RULES.get(record.status)
    need = rules.needs(record) if rules is not None else Needs()
    if record.fenced_machine_id and record.status != Status.DESTROYED:
        need = dataclasses.replace(need, fenced_machine=True)
    if looking_for_strays(record):
        need = dataclasses.replace(need, owned_machines=True)
    return need


def decide(record: InstanceRecord, obs: Observed, settings: Settings, now: datetime) -> list[Action]:
    """Housekeeping, then the status's deadlines, then (once, for every status) a provider hiccup, then the
    status's decision."""
    status = record.status
    if status == Status.DESTROYED:
        return [Persist({"alarm_at": None}), Done()] if record.alarm_at is not None else [Done()]
    rules = RULES[status]
    fenced = deadhost.fence(record, obs, settings, now)  # the old machine of a dead host goes first (SPEC §15)
    if fenced:
        return fenced
    chores = housekeeping(record, obs, settings, now)  # nothing while recovering or destroying
    if chores:
        return chores
    ended = rules.deadlines(record, obs, settings, now)
    if ended:
        return ended
    if obs.transient is not None:
        return rules.on_transient(record, obs, settings, now) or backoff(obs.transient)
    stray = strays(record, obs, settings, now)
    if stray:
        return stray
    decided = rules.decide(record, obs, settings, now)
    if looking_for_strays(record) and decided and isinstance(decided[-1], RequeueAfter):
        # while a create may still land, look again at least every routine interval
        decided[-1] = RequeueAfter(min(decided[-1].seconds, settings.interval_running))
    return decided
