"""Performs the decisions' actions against the provider and the store, under the instance's lease.

One :class:`Pass` = observe → decide → act, repeated until a decision ends it (RequeueAfter, Backoff, Done)
or the step limit. Every store write is fenced (``store.update`` with the lease owner and the version last
read); a :class:`~sandkeep.store.base.FencedError` ends the pass at once. Provider waits (machine wait,
gateway probe) never hold the lease: the alarm is pushed past the wait, the lease released, and re-claimed
afterwards (:class:`LeaseLost` when someone else took it meanwhile — that worker carries on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from sandkeep import metrics
from sandkeep.engine import crashpoints
from sandkeep.engine.actions import (
    TERMINAL,
    Action,
    Backoff,
    Changes,
    CreateMachine,
    CreateVolume,
    DeleteVolumeSafely,
    DestroyMachine,
    Done,
    Effect,
    Emit,
    EnsureApp,
    FindVolumes,
    ListSnapshots,
    Observed,
    Outcome,
    Persist,
    ProbeHealth,
    RequeueAfter,
    RestartMachine,
    RotateGatewayToken,
    StartMachine,
    StopMachine,
    TakeSnapshot,
    UpdateMachine,
    WaitMachine,
)
from sandkeep.engine.health import probe_until_healthy
from sandkeep.engine.lease import EngineContext, Lease
from sandkeep.engine.naming import (
    METADATA_INSTANCE,
    METADATA_SANDBOX,
    guest_for,
    volume_name,
)
from sandkeep.engine.policy import GONE_STATES, backoff_seconds, call_deadline, deadline_cap, is_backoff_error
from sandkeep.engine.reconcile import decide, needs
from sandkeep.provider.deadline import deadline
from sandkeep.provider.errors import (
    ConflictError,
    DeadlineExceededError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from sandkeep.secrets import SecretsError
from sandkeep.sim import plant
from sandkeep.store.records import InstanceRecord, Status

#: states in which Fly refuses a start because one is already underway ("unable to start machine from current
#: state": starting, started, or mid-update: replacing/updating, and created while an update swaps the image)
STARTING_OR_STARTED = frozenset({"created", "starting", "started", "replacing", "updating"})

MAX_STEPS = 24
"""Decision steps per pass before the pass gives up and requeues (a safety valve against loops)."""

LEASE_MARGIN = 0.1
"""Fraction of ``lease_ttl`` kept free at the end of a lease: a provider call is abandoned that much before the
lease ends, so the pass's next (fenced) write still lands while it holds the lease."""

DEADLINE_SLACK = 0.001
"""Seconds past the record's deadline at which a provider call is abandoned (see :meth:`Pass.deadline`)."""

RENEW_BEFORE_EFFECT = 0.75
"""Before a provider effect the lease is renewed unless more than this fraction of ``lease_ttl`` is left."""


class LeaseLost(Exception):
    """The lease was released for a wait and someone else claimed the instance meanwhile."""


class Refused(Exception):
    """SPEC §7.5 refused to delete (the attached machine names another sandbox)."""


# ------------------------------------------------------------------------------------------ observe


async def observe(ctx: EngineContext, record: InstanceRecord) -> Observed:
    """Read what the record's status says it needs (:func:`sandkeep.engine.reconcile.needs`)."""
    obs = Observed()
    need = needs(record)
    provider, app = ctx.provider, record.app_name
    try:
        if need.machine and record.machine_id:
            try:
                obs.machine = await provider.get_machine(app, record.machine_id)
            except NotFoundError:
                obs.machine_missing = True
        if need.volume and record.volume_id:
            try:
                obs.volume = await provider.get_volume(app, record.volume_id)
            except (NotFoundError, MissingVolumeError):
                obs.volume_missing = True
        if need.pending_volume and record.pending_recovery_volume_id:
            try:
                obs.pending_volume = await provider.get_volume(app, record.pending_recovery_volume_id)
            except (NotFoundError, MissingVolumeError):
                obs.pending_volume_missing = True
        if need.fenced_machine and record.fenced_machine_id:
            try:
                obs.fenced_machine = await provider.get_machine(app, record.fenced_machine_id)
            except NotFoundError:
                obs.fenced_machine_missing = True
        if need.owned_machines:
            try:
                machines = await provider.list_machines(app, metadata={METADATA_INSTANCE: record.id})
            except NotFoundError:
                machines = []
            obs.owned_machines = [m for m in machines if m.metadata.get(METADATA_SANDBOX) == record.sandbox_id
                                  and m.metadata.get(METADATA_INSTANCE) == record.id
                                  and m.state not in GONE_STATES]
        if need.named_volumes:
            try:
                volumes = await provider.list_volumes(app)
            except NotFoundError:
                volumes = []
            name = volume_name(record)
            obs.named_volumes = [v for v in volumes if v.name == name]
    except ProviderError as exc:
        obs.transient = exc
    return obs


# ------------------------------------------------------------------------------------------ 7.5


async def safe_delete_volume(ctx: EngineContext, record: InstanceRecord, volume_id: str) -> bool:
    """SPEC §7.5. True when the volume is gone now (deleted or already 404). Raises :class:`Refused`."""
    provider, app = ctx.provider, record.app_name
    try:
        volume = await provider.get_volume(app, volume_id)
    except (NotFoundError, MissingVolumeError):
        return True
    attached = volume.attached_machine_id
    if attached:
        try:
            machine = await provider.get_machine(app, attached)
        except NotFoundError:
            machine = None
        if machine is not None and machine.state != "destroyed":
            owner = machine.metadata.get(METADATA_SANDBOX)
            if owner != record.sandbox_id and not (plant.ACTIVE and plant.on("skip_ownership_check")):
                raise Refused(f"Refusing to destroy attached machine {attached} of volume {volume_id}: its metadata "
                              f"names sandbox {owner or '(none)'}, not {record.sandbox_id}")
            await provider.destroy_machine(app, attached, force=True, missing_ok=True)
    try:
        await provider.delete_volume(app, volume_id, missing_ok=True)
    except MissingVolumeError:
        pass
    return True


# ------------------------------------------------------------------------------------------ the pass


def _unleashed(action: Action) -> bool:
    """An effect that releases the lease for its provider wait (:meth:`Pass.unleashed`): not bounded by it."""
    return isinstance(action, WaitMachine) or (isinstance(action, ProbeHealth) and action.timeout > 0)


def _observation_kept(action: Action) -> bool:
    """An action after which the pass decides again on the same observation: it changes neither the provider
    nor the record, and its outcome is what the next decision looks at (a running instance's one no-wait
    health probe). A healthy pass then reads the machine and the volume once, not again after its probe."""
    return isinstance(action, ProbeHealth) and action.timeout <= 0


class Pass:
    """One reconcile pass over one claimed instance (or one intent's actions, ``intent=True``)."""

    def __init__(self, ctx: EngineContext, lease: Lease, *, intent: bool = False,
                 release_at_end: bool = False) -> None:
        self.ctx = ctx
        self.lease = lease
        self.intent = intent
        #: end the pass (requeue / backoff) with one write that also drops the lease (the engine's passes)
        self.release_at_end = release_at_end
        self.outcomes: dict[Effect, Outcome] = {}
        self.log = ctx.emitter.log.bind(instance_id=lease.record.id)

    @property
    def record(self) -> InstanceRecord:
        return self.lease.record

    @property
    def owner(self) -> str:
        return self.lease.owner

    # -------------------------------------------------------------- store plumbing

    async def persist(self, changes: Changes) -> InstanceRecord:
        return await self.lease.persist(changes)

    async def requeue(self, seconds: float) -> None:
        await self.persist(self.requeue_changes(seconds))

    def requeue_changes(self, seconds: float) -> Changes:
        changes: Changes = {"alarm_at": self.ctx.alarm_in(seconds, self.record)}
        if self.record.provider_error_count:
            changes["provider_error_count"] = 0
            if self.record.status != Status.STOPPED:  # a stopped instance keeps the error that stopped it
                changes["last_provider_error"] = None
                changes["last_provider_error_at"] = None
        return changes

    async def end(self, changes: Changes) -> None:
        """The pass's last write: with ``release_at_end`` also the lease release, in one (batched) write."""
        if self.release_at_end:
            await self.lease.finish(changes)
        else:
            await self.persist(changes)

    async def backoff(self, message: str, error: BaseException | None = None, *,
                      retry_after: float | None = None) -> None:
        await self.persist(self.backoff_changes(message, error, retry_after=retry_after))

    def backoff_changes(self, message: str, error: BaseException | None = None, *,
                        retry_after: float | None = None) -> Changes:
        count = self.record.provider_error_count + 1
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            retry_after = error.retry_after
        delay = backoff_seconds(count, self.ctx.settings, retry_after)
        metrics.PROVIDER_ERRORS.labels(kind=type(error).__name__ if error else "ProviderError").inc()
        self.log.warning("reconcile.provider_error", status=self.record.status.value, error=message[:500],
                         error_count=count, retry_in_seconds=round(delay, 3))
        return {"provider_error_count": count, "last_provider_error": message[:500],
                "last_provider_error_at": self.ctx.clock.now(), "alarm_at": self.ctx.alarm_in(delay, self.record)}

    @asynccontextmanager
    async def unleashed(self, seconds: float) -> AsyncIterator[None]:
        """Release the lease around a provider wait of up to ``seconds``; re-claim afterwards.

        The alarm is moved just past the wait (one busy interval after it, never past the record's deadline):
        if this controller dies during the wait, whoever comes next picks the instance up then -- not a lease
        TTL or two later."""
        now = self.ctx.clock.now()
        when = now + timedelta(seconds=seconds + max(0.1, self.ctx.settings.interval_busy))
        cap = deadline_cap(self.record, self.ctx.settings)
        if cap is not None and now < cap < when:
            when = cap
        await self.persist({"alarm_at": when})
        await self.lease.release()
        try:
            yield
        finally:
            if not await self.lease.reclaim():
                raise LeaseLost(f"instance {self.record.id} was claimed by another worker during a wait")

    def deadline(self, *, leased: bool = True) -> float | None:
        """Where the pass's deadline lies on the clock's monotonic scale: every provider call made now is bounded
        by it (:mod:`sandkeep.provider.deadline`). The earlier of the record's deadline
        (:func:`~sandkeep.engine.policy.call_deadline`) and, for a call made under the lease (``leased``; a wait
        runs with the lease released, :meth:`unleashed`), the lease's end less a margin (:meth:`lease_deadline`)."""
        lease_at = self.lease_deadline() if leased else None
        at = call_deadline(self.record, self.ctx.settings)
        if at is None:
            return lease_at
        clock = self.ctx.clock
        left = (at - clock.now()).total_seconds()
        if left <= 0:
            # passed: the decision says what happens now (time out, or finish a cutover that already deleted
            # the old volume), and it must see the provider as it is to say it -- nothing left to bound but the
            # lease
            return lease_at
        # a hair past the deadline: an effect abandoned there re-decides with the deadline passed on the wall clock
        # too (the monotonic and wall scales round differently -- a re-decision 1 us early failed the recovery
        # for the abandoned effect instead of timing it out)
        mine = clock.monotonic() + left + DEADLINE_SLACK
        return mine if lease_at is None else min(mine, lease_at)

    def lease_deadline(self) -> float | None:
        """The lease's end less :data:`LEASE_MARGIN` of its TTL, on the clock's monotonic scale (None: no lease
        expiry known). A lease holder must not act after losing its lease: once the lease may have run out,
        another worker may have claimed the instance and be running the same step (two forks of one volume,
        say). So no provider call of this pass outlives the lease: a call that would is abandoned (a 429 whose
        Retry-After is longer ends at once) and the pass re-decides after a fenced renewal, or backs off."""
        expires = self.record.lease_expires_at
        if expires is None:
            return None
        clock = self.ctx.clock
        left = (expires - clock.now()).total_seconds() - LEASE_MARGIN * self.ctx.settings.lease_ttl
        return clock.monotonic() + max(0.0, left)

    def wait_seconds(self) -> float:
        """One provider wait call (SPEC §4); the lease is released meanwhile, so it may outlast the lease.

        While recovering, never longer than what is left of the recovery timeout (SPEC §12.5)."""
        settings = self.ctx.settings
        seconds = max(1.0, settings.machine_wait_timeout)
        started = self.record.recovery_started_at
        if self.record.status == Status.RECOVERING and started is not None:
            remaining = settings.recovery_timeout - (self.ctx.clock.now() - started).total_seconds()
            seconds = min(seconds, max(1.0, remaining))
        return seconds

    # -------------------------------------------------------------- the loop

    async def run(self) -> InstanceRecord:
        metrics.RECONCILE_PASSES.labels(status=self.record.status.value).inc()
        settings = self.ctx.settings
        obs: Observed | None = None
        for _ in range(MAX_STEPS):
            await self.lease.renew_if_needed()
            if obs is None:
                with deadline(self.ctx.clock, self.deadline()):
                    obs = await observe(self.ctx, self.record)
                obs.outcomes = self.outcomes
            try:
                actions = decide(self.record, obs, settings, self.ctx.clock.now())
            except Exception as exc:  # a bug must not wedge the worker: log loudly, look again later
                self.log.exception("reconcile.decide_crashed", error=str(exc))
                await self.requeue(settings.interval_busy)
                return self.record
            if await self.execute(actions):
                return self.record
            if not (actions and all(_observation_kept(a) for a in actions)):
                obs = None  # the provider (or the record, hence what to read) may have changed: read again
        metrics.STEP_LIMIT.inc()
        self.log.error("reconcile.step_limit", steps=MAX_STEPS, status=self.record.status.value)
        await self.requeue(settings.interval_busy)
        return self.record

    async def emit(self, action: Emit) -> None:
        await self.ctx.emitter.aemit(self.record, action.event, label=action.label, error=action.error,
                                     duration_ms=action.duration_ms, value=action.value, details=action.details,
                                     level=action.level, required=action.required)

    async def execute(self, actions: list[Action]) -> bool:
        """Run ``actions`` in order; True when the pass is over. A failed effect stops the list (re-decide)."""
        for action in actions:
            if isinstance(action, Persist):
                if action.changes.get("status") == Status.RUNNING and self.record.status == Status.RECOVERING:
                    crashpoints.reached("recovery.cutover")  # the old volume is dealt with, the write not done
                await self.persist(action.changes)
            elif isinstance(action, Emit):
                await self.emit(action)
            elif isinstance(action, RequeueAfter):
                await self.end(self.requeue_changes(action.seconds))
                return True
            elif isinstance(action, Backoff):
                await self.end(self.backoff_changes(action.error, None, retry_after=action.retry_after))
                return True
            elif isinstance(action, Done):
                return True
            else:
                try:
                    # the lease is renewed (fenced: a lost lease ends the pass here) before each provider effect,
                    # so the effect has most of a lease to run in (it is bounded by the lease, see deadline())
                    if self.lease.renew_due(RENEW_BEFORE_EFFECT):  # a direct write, like persist()
                        await self.lease.renew()
                    # a volume delete is never abandoned half-way: whether the data is gone must be known (the
                    # cutover deletes the old volume; a fail after an unknown delete could lose both copies)
                    bound = None if isinstance(action, DeleteVolumeSafely) else self.deadline(
                        leased=not _unleashed(action))
                    with deadline(self.ctx.clock, bound):
                        value = await self.effect(action)
                except Refused as exc:
                    self.outcomes[action] = Outcome(False, refused=str(exc))
                    if self.intent:  # the caller (the instance service) answers for it
                        raise
                    if isinstance(action, DeleteVolumeSafely):
                        name, label, volume_id = "reconcile.delete_volume_refused", action.reason, action.volume_id
                    else:
                        name, label, volume_id = "reconcile.destroy_machine_refused", None, None
                    await self.ctx.emitter.aemit(self.record, name, level="error", error=str(exc), label=label,
                                          details={"volume_id": volume_id})
                    return False
                except ProviderError as exc:
                    self.outcomes[action] = Outcome(False, error=exc)
                    if isinstance(action, CreateMachine) and isinstance(exc, TransientError):
                        # abandoned, or answered 5xx / not at all: the provider may still make the machine. Until
                        # create_landing_window has passed, passes look for it and stop it (reconcile.strays)
                        await self.persist({"unsettled_create_at": self.ctx.clock.now()})
                    if self.intent:
                        raise
                    if isinstance(exc, DeadlineExceededError):  # decide again: the deadline has its answer
                        self.log.warning("reconcile.effect_abandoned", effect=type(action).__name__,
                                         error=str(exc))
                        return False
                    if is_backoff_error(exc):
                        await self.end(self.backoff_changes(str(exc), exc))
                        return True
                    self.log.warning("reconcile.effect_failed", effect=type(action).__name__,
                                     action=repr(action)[:300], error=str(exc))
                    return False
                self.outcomes[action] = Outcome(True, value=value)
            assert not isinstance(action, TERMINAL)
        return False

    # -------------------------------------------------------------- effects

    def _probe_token(self) -> str | None:
        try:
            return self.ctx.gateway_token(self.record)
        except SecretsError as exc:
            raise InvalidRequestError(str(exc), operation="decrypt gateway token") from exc

    async def effect(self, action: Action) -> Any:
        ctx, record = self.ctx, self.record
        provider, app = ctx.provider, record.app_name
        if isinstance(action, EnsureApp):
            return await provider.ensure_app(app, ctx.settings.fly_org)
        if isinstance(action, CreateVolume):
            return await self._create_volume(action)
        if isinstance(action, RotateGatewayToken):
            await self.persist({"gateway_token_encrypted": ctx.new_gateway_token(),
                          "config_generation": self.record.config_generation + 1})
            await ctx.emitter.aemit(self.record, "instance.gateway_token_rotated", label=action.reason)
            return None
        if isinstance(action, CreateMachine):
            return await self._create_machine(action)
        if isinstance(action, StartMachine):
            try:
                await provider.start_machine(app, action.machine_id)
            except ConflictError as exc:
                # Fly refuses (412) to start a machine already on its way up, e.g. launched by an update just
                # before: that is no failure. Any other state keeps the error (the decision fails the start).
                state = await self._machine_state(action.machine_id)
                if state not in STARTING_OR_STARTED:
                    raise
                self.log.info("reconcile.start_already_underway", machine_id=action.machine_id, state=state,
                              error=str(exc))
                return state
            return None
        if isinstance(action, StopMachine):
            await provider.stop_machine(app, action.machine_id)
            return None
        if isinstance(action, RestartMachine):
            await provider.restart_machine(app, action.machine_id)
            return None
        if isinstance(action, UpdateMachine):
            config = ctx.machine_config(record, action.volume_id)
            return await provider.update_machine(app, action.machine_id, config=config)
        if isinstance(action, DestroyMachine):
            await destroy_own_machine(ctx, record, action.machine_id)
            if action.clear:
                await self.persist(action.clear)
            await ctx.emitter.aemit(self.record, "reconcile.destroy_machine", label=action.label,
                             details={"machine_id": action.machine_id, **dict(action.details)})
            return None
        if isinstance(action, WaitMachine):
            seconds = self.wait_seconds()
            async with self.unleashed(seconds):
                if record.status == Status.RECOVERING:
                    crashpoints.reached("recovery.wait")  # the lease released, the alarm set past the wait
                await provider.wait_machine(app, action.machine_id, state=action.state, timeout=seconds)
            return None
        if isinstance(action, ProbeHealth):
            return await self._probe_health(action)
        if isinstance(action, ListSnapshots):
            return await provider.list_snapshots(app, action.volume_id)
        if isinstance(action, TakeSnapshot):
            snap = await provider.create_snapshot(app, action.volume_id)
            await ctx.emitter.aemit(self.record, "instance.snapshot_taken", label="interval",
                                    volume_id=action.volume_id,
                                    details={"volume_id": action.volume_id, "snapshot_id": snap.id if snap else None})
            return snap
        if isinstance(action, FindVolumes):
            name = volume_name(record)
            return [v for v in await provider.list_volumes(app) if v.name == name]
        if isinstance(action, DeleteVolumeSafely):
            await safe_delete_volume(ctx, record, action.volume_id)
            if action.clear:
                await self.persist(action.clear)
            await ctx.emitter.aemit(self.record, "reconcile.delete_volume", label=action.reason,
                             details={"deleted_volume_id": action.volume_id})
            return True
        raise TypeError(f"unknown action {action!r}")  # pragma: no cover

    async def _create_volume(self, action: CreateVolume) -> Any:
        ctx, record = self.ctx, self.record
        provider, app = ctx.provider, record.app_name
        recovering = action.purpose in ("recovery", "restore")
        if recovering:
            crashpoints.reached("recovery.before_fork")
        compute = guest_for(action.compute_size) if action.compute_size else None
        source = action.source_volume_id
        if plant.ACTIVE and plant.on("fork_without_source") and action.purpose == "recovery":
            source = None
        volume = await provider.create_volume_with_fallback(
            app, regions=list(action.regions), name=action.name, size_gb=action.size_gb,
            source_volume_id=source, snapshot_id=action.snapshot_id, compute=compute)
        if action.announce is not None:
            await self.emit(action.announce)
        changes: Changes = {**action.extra}
        changes[action.assign] = volume.id
        if action.assign_region:
            changes["region"] = volume.region
        await self.persist(changes)
        if recovering:
            crashpoints.reached("recovery.after_fork")
        return volume

    async def _create_machine(self, action: CreateMachine) -> Any:
        ctx, record = self.ctx, self.record
        provider, app = ctx.provider, record.app_name
        # a new machine gets a new gateway token, persisted before the machine exists (a crash in between
        # only means one more rotation; a machine created with it is adopted by name/metadata). The generation
        # moves with the token: an older machine adopted later (a failed create, a dead host's machine coming
        # back) carries an older generation, so it is updated with the token before it serves (seed 290)
        await self.persist({"gateway_token_encrypted": ctx.new_gateway_token(),
                            "config_generation": self.record.config_generation + 1})
        config = ctx.machine_config(self.record, action.volume_id)
        machine = await provider.create_machine(app, config=config, name=action.name, region=action.region)
        await self.persist({**action.extra, "machine_id": machine.id})
        if action.purpose == "recovery":
            crashpoints.reached("recovery.after_create")
        await ctx.emitter.aemit(self.record, "reconcile.create_machine", label=action.purpose,
                         machine_id=machine.id, volume_id=action.volume_id, region=machine.region,
                         details={"machine_id": machine.id, "region": machine.region,
                                  "volume_id": action.volume_id})
        return machine

    async def _probe_health(self, action: ProbeHealth) -> Any:
        ctx, app = self.ctx, self.record.app_name
        if action.timeout <= 0:  # one probe while running (dead-host suspicion): no wait, lease kept
            return await ctx.prober.probe(app, action.machine_id, self._probe_token())
        async with self.unleashed(action.timeout):
            healthy = await probe_until_healthy(ctx.prober, ctx.clock, app, action.machine_id,
                                                timeout=action.timeout,
                                                interval=ctx.settings.health_probe_interval,
                                                gateway_token=self._probe_token())
        if self.record.status == Status.RECOVERING:  # the cutover's probe is part of the recovery story
            await ctx.emitter.aemit(self.record, "reconcile.gateway_health_probe",
                             label="healthy" if healthy else "timeout", level="info" if healthy else "warning",
                             machine_id=action.machine_id,
                             details={"machine_id": action.machine_id, "blocking": False})
        return healthy

    async def _machine_state(self, machine_id: str) -> str | None:
        try:
            return (await self.ctx.provider.get_machine(self.record.app_name, machine_id)).state
        except NotFoundError:
            return None


async def destroy_own_machine(ctx: EngineContext, record: InstanceRecord, machine_id: str) -> None:
    """Force-destroy one of this instance's machines (never one whose metadata names another sandbox)."""
    provider, app = ctx.provider, record.app_name
    try:
        machine = await provider.get_machine(app, machine_id)
    except NotFoundError:
        return
    owner = machine.metadata.get(METADATA_SANDBOX)
    if owner is not None and owner != record.sandbox_id:
        raise Refused(f"Refusing to destroy machine {machine_id}: its metadata names sandbox {owner}")
    if machine.state == "destroyed":
        return
    await provider.destroy_machine(app, machine_id, force=True, missing_ok=True)
