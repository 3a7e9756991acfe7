"""The engine process part: the alarm worker loop, wake-ups, the detector, and the instance service.

``Engine(settings, store, provider, clock, worker_id=...)``; ``await engine.start()`` runs

* the **worker loop**: it claims due alarms in batches (``store.claim_due`` with lease ``lease_ttl``) up to
  the free concurrency slots (``engine_concurrency``) and runs one reconcile pass per claimed instance. It is
  woken whenever passes free slots (refill as passes finish, in batches of at least a quarter of the slots),
  and otherwise sleeps until the next due alarm (at least ``alarm_coalesce``, so alarms due close together
  are claimed together; at most ``alarm_poll_interval``);
* the **detector** (SPEC §6) that turns provider stop signals into ``wake(instance_id)``;
* the **heartbeat** (issue 11): the engine registers in the ``engines`` table and beats every
  ``engine_heartbeat_interval``; each beat also voids the leases of engines whose heartbeat is older than
  ``engine_heartbeat_ttl`` (their instances are picked up within seconds; voiding bumps the rows' versions,
  so a voided holder's fenced writes fail). ``stop()`` voids this engine's own leases (a planned restart
  resumes at once).

Wake-ups (``wake(id)``: a detected stop, an intent) and alarms share one bounded concurrency
(``engine_concurrency`` slots); a wake-up waiting for a slot goes before any new alarm claim, so recoveries
are not queued behind routine reconciles. Store calls of the hot path (claim, renew, the pass's last write,
release, the alarm look-ahead) run on the engine's store thread (:class:`~sandkeep.store.aio.AsyncStore`);
the last write of a routine pass also drops the lease, and those writes of concurrent passes share one commit.
A no-op pass of a healthy instance costs one write of its own (plus its share of a batched claim).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import secrets as _pysecrets
import socket
from collections.abc import Callable

from sandkeep import metrics
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.engine.events import Emitter
from sandkeep.engine.executor import LeaseLost, Pass
from sandkeep.engine.health import GatewayProber, Prober
from sandkeep.engine.heartbeat import make_detection
from sandkeep.engine.instances import InstanceService
from sandkeep.engine.lease import EngineContext, Lease, TraceFn, claim
from sandkeep.engine.orphans import OrphanSweeper
from sandkeep.logs import get_logger
from sandkeep.provider.base import MachineProvider
from sandkeep.secrets import SecretBox
from sandkeep.store.aio import AsyncStore
from sandkeep.store.base import FencedError, NotFound, Store
from sandkeep.store.records import InstanceRecord

MAX_CLAIM_BATCH = 500


class Slots:
    """``capacity`` pass slots shared by alarms and wake-ups; wake-ups waiting for a slot go first."""

    def __init__(self, capacity: int, on_free: Callable[[], None]) -> None:
        self.capacity = max(1, capacity)
        self.used = 0
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()
        self._on_free = on_free

    def free(self) -> int:
        """Slots an alarm claim may take now (none while a wake-up waits)."""
        return 0 if self._urgent else max(0, self.capacity - self.used)

    def take(self, n: int) -> None:
        self.used += n

    async def acquire_urgent(self) -> None:
        if not self._urgent and self.used < self.capacity:
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._urgent.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._urgent.remove(fut)
            raise

    def release(self) -> None:
        while self._urgent:
            fut = self._urgent.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the waiting wake-up
                return
        self.used = max(0, self.used - 1)
        self._on_free()


class Engine:
    def __init__(self, settings: Settings, store: Store, provider: MachineProvider, clock: Clock, *,
                 worker_id: str | None = None, prober: Prober | None = None,
                 secret_box: SecretBox | None = None, trace: TraceFn | None = None,
                 rng: random.Random | None = None, role: str = "engine") -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.clock = clock
        self.role = role
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{_pysecrets.token_hex(3)}"
        self._owns_prober = prober is None
        self.astore = AsyncStore(store)
        self.ctx = EngineContext(settings=settings, store=store, provider=provider, clock=clock,
                                 emitter=Emitter(store, clock, astore=self.astore),
                                 secrets=secret_box or SecretBox.from_settings(settings),
                                 prober=prober or GatewayProber(provider), rng=rng or random.Random(), trace=trace,
                                 astore=self.astore)
        self.log = get_logger("sandkeep.engine", worker_id=self.worker_id)
        self._seq = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._passes: set[asyncio.Task[object]] = set()
        self._wakes: dict[str, asyncio.Task[object]] = {}
        self._rewake: set[str] = set()
        self._kick = asyncio.Event()
        self._slots = Slots(settings.engine_concurrency, self._kick.set)
        self._gauge_at: float | None = None
        # detection: the detector, plus gateway heartbeats when machines beat (engine/heartbeat.py)
        self.detector, self.heartbeats, self.monitor = make_detection(settings, store, provider, clock, self.wake,
                                                                      self.ctx.secrets, engine_id=self.worker_id)
        self.service = InstanceService(self.ctx, owner_prefix=self.worker_id, wake=self.wake)
        self.orphans = OrphanSweeper(self.ctx, self.worker_id)  # SPEC §15 inventory (engine/orphans.py)
        self.started = False
        self.voided_engines: dict[str, int] = {}

    @property
    def passive(self) -> bool:
        """An API-only process (``--role api``): it never reconciles; engines pick up the persisted intents."""
        return self.role == "api"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.started or self.passive:
            return
        self.started = True
        metrics.RECOVERY_TIMEOUT.set(self.settings.recovery_timeout)
        try:  # register (and void dead engines' leases) before claiming anything
            await self._heartbeat_once()
        except Exception as exc:  # the database hiccuped: the heartbeat loop tries again
            self.log.warning("engine.heartbeat_failed", error=str(exc))
        self._tasks = [asyncio.create_task(self._worker_loop(), name=f"sandkeep-worker-{self.worker_id}"),
                       asyncio.create_task(self._detector_loop(), name=f"sandkeep-detector-{self.worker_id}"),
                       asyncio.create_task(self.orphans.run(), name=f"sandkeep-orphans-{self.worker_id}"),
                       asyncio.create_task(self._heartbeat_loop(), name=f"sandkeep-heartbeat-{self.worker_id}")]
        if self.monitor is not None:
            self._tasks.append(asyncio.create_task(self.monitor.run(), name=f"sandkeep-beats-{self.worker_id}"))
        self.log.info("engine.started", concurrency=self.settings.engine_concurrency,
                      detection="watch" if self.detector.uses_watch else "poll")

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._passes, *self._wakes.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._passes.clear()
        self._wakes.clear()
        await self.heartbeats.aclose()
        if self.started:
            try:  # a planned stop: our leases are voided now, so a restarted engine resumes them at once
                voided = await self.astore.call(self.store.engine_leave, self.worker_id, self.clock.now())
                self.log.info("engine.left", leases_voided=voided)
            except Exception as exc:
                self.log.warning("engine.leave_failed", error=str(exc))
        await self.astore.aclose()
        if self._owns_prober:
            await self.ctx.prober.aclose()
        if self.started:
            self.log.info("engine.stopped")
        self.started = False

    def _owner(self) -> str:
        return f"{self.worker_id}#{next(self._seq)}"

    # ------------------------------------------------------------------ passes

    async def _run_claimed(self, record: InstanceRecord, owner: str) -> InstanceRecord | None:
        self.ctx.traced("acquire", record.id, owner)
        current: InstanceRecord | None = record
        work = Pass(self.ctx, Lease(self.ctx, record, owner), release_at_end=True)
        metrics.ENGINE_PASSES_IN_FLIGHT.inc()
        try:
            current = await work.run()
        except (FencedError, NotFound) as exc:
            self.log.warning("reconcile.fenced", instance_id=record.id, error=str(exc))
            current = None
        except LeaseLost as exc:
            self.log.info("reconcile.lease_lost", instance_id=record.id, error=str(exc))
            return None
        except asyncio.CancelledError:
            if not work.lease.released:
                self._release_now(work.record, owner)
            raise
        except Exception as exc:
            self.log.exception("reconcile.crashed", instance_id=record.id, error=str(exc))
        finally:
            metrics.ENGINE_PASSES_IN_FLIGHT.dec()
        if not work.lease.released:
            self.ctx.traced("release", work.record.id, owner)
            try:
                await self.astore.release(work.record, owner)
            except Exception as exc:
                self.log.warning("reconcile.release_failed", instance_id=record.id, error=str(exc))
        return current

    def _release_now(self, record: InstanceRecord, owner: str) -> None:
        self.ctx.traced("release", record.id, owner)
        try:
            self.store.release(record, owner)
        except Exception as exc:
            self.log.warning("reconcile.release_failed", instance_id=record.id, error=str(exc))

    async def claim(self, instance_id: str, owner: str, *, wait: float | None = None) -> InstanceRecord | None:
        """Claim one instance, retrying while another worker holds it (up to ``wait`` s, real time)."""
        lease = await claim(self.ctx, instance_id, owner, wait=wait)
        if lease is None:
            return None
        metrics.ENGINE_CLAIMS.labels(source="direct").inc()
        return lease.record

    async def reconcile_now(self, instance_id: str, *, wait: float | None = None) -> InstanceRecord | None:
        """Reconcile one instance now (claim with brief retry). None when it is held elsewhere or unknown."""
        owner = self._owner()
        record = await self.claim(instance_id, owner, wait=wait)
        if record is None:
            return None
        return await self._run_claimed(record, owner)

    def wake(self, instance_id: str) -> None:
        """Reconcile ``instance_id`` soon, in the background (coalesces repeated wake-ups). The pass takes one
        of the engine's slots, ahead of alarm claims. An API-only process does nothing: the intent it
        persisted (alarm now) is picked up by an engine process."""
        if self.passive:
            return
        running = self._wakes.get(instance_id)
        if running is not None and not running.done():
            self._rewake.add(instance_id)
            return

        async def go() -> None:
            try:
                while True:
                    self._rewake.discard(instance_id)
                    await self._slots.acquire_urgent()
                    try:
                        await self.reconcile_now(instance_id)
                    finally:
                        self._slots.release()
                    if instance_id not in self._rewake:
                        return
            finally:
                self._wakes.pop(instance_id, None)

        try:
            self._wakes[instance_id] = asyncio.get_running_loop().create_task(go())
        except RuntimeError:  # no running loop (sync caller): the alarm will do it
            self._kick.set()

    async def run_due_once(self, limit: int | None = None) -> int:
        """Claim due alarms (up to ``limit`` or the free slots) and reconcile them; returns how many ran."""
        free = min(self.settings.engine_concurrency if limit is None else limit, MAX_CLAIM_BATCH)
        if free <= 0:
            return 0
        owner = self._owner()
        claimed = await self._claim_due(owner, free)
        if claimed:
            await asyncio.gather(*(self._run_claimed(r, owner) for r in claimed))
        return len(claimed)

    async def _claim_due(self, owner: str, limit: int) -> list[InstanceRecord]:
        """Claim due alarms, counting the claims and how late each alarm was."""
        now = self.clock.now()
        claimed = await self.astore.call(self.store.claim_due, owner, self.settings.lease_ttl, now, limit)
        if claimed:
            metrics.ENGINE_CLAIMS.labels(source="alarm").inc(len(claimed))
            for record in claimed:
                if record.alarm_at is not None:
                    metrics.ALARM_LAG.observe(max(0.0, (now - record.alarm_at).total_seconds()))
        return claimed

    # ------------------------------------------------------------------ loops

    def _spawn_alarm_pass(self, record: InstanceRecord, owner: str) -> None:
        async def run() -> None:
            try:
                await self._run_claimed(record, owner)
            finally:
                self._slots.release()

        task: asyncio.Task[object] = asyncio.create_task(run())
        self._passes.add(task)
        task.add_done_callback(self._passes.discard)

    async def _worker_loop(self) -> None:
        poll = max(0.01, self.settings.alarm_poll_interval)
        batch_floor = max(1, self.settings.engine_concurrency // 4)
        coalesce = max(0.001, min(poll, self.settings.alarm_coalesce))
        while True:
            timeout = poll
            caught_up = False  # every due alarm is claimed: passes ending now need not wake us at once
            self._kick.clear()  # before looking: a pass that ends from here on kicks the wait below
            try:
                await self._refresh_gauge()
                free = min(self._slots.free(), MAX_CLAIM_BATCH)
                # refill in batches: wait for a quarter of the slots unless nothing runs (one claim, many passes)
                if free > 0 and (free >= batch_floor or self._slots.used == 0):
                    owner = self._owner()
                    claimed = await self._claim_due(owner, free)
                    self._slots.take(len(claimed))
                    for record in claimed:
                        self._spawn_alarm_pass(record, owner)
                    if len(claimed) == free:
                        await asyncio.sleep(0)  # more may be due: claim again as soon as slots free up
                        if self._slots.free() >= batch_floor:
                            continue
                    else:  # nothing more due now: sleep until the next alarm (at most the poll interval)
                        caught_up = True
                        now = self.clock.now()
                        nxt = await self.astore.call(self.store.next_due_at, now)
                        if nxt is not None:  # not sooner than the coalescing window: claims in batches
                            timeout = min(poll, max(coalesce, (nxt - now).total_seconds()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("engine.worker_loop_error", error=str(exc))
            if caught_up:  # finishing passes kick often; let alarms due meanwhile gather for one claim
                window = min(timeout, coalesce)
                await asyncio.sleep(window)
                timeout -= window
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), timeout=timeout)

    async def _heartbeat_once(self) -> None:
        now = self.clock.now()
        ttl = max(self.settings.engine_heartbeat_ttl, 2 * self.settings.engine_heartbeat_interval)
        known = await self.astore.call(self.store.engine_heartbeat, self.worker_id, self.role, now, ttl)
        if not known and self.started and self._tasks:
            self.log.warning("engine.declared_dead", note="another engine voided our leases; re-registered")
        voided = await self.astore.call(self.store.void_dead_engines, now)
        if voided:
            for engine_id, count in voided.items():
                self.voided_engines[engine_id] = self.voided_engines.get(engine_id, 0) + count
                metrics.ENGINE_LEASES_VOIDED.inc(count)
                self.log.warning("engine.dead_engine_voided", dead_engine=engine_id, leases_voided=count)
            self._kick.set()

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self.settings.engine_heartbeat_interval)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("engine.heartbeat_failed", error=str(exc))

    async def _detector_loop(self) -> None:
        while True:
            try:
                await self.detector.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("detector.crashed", error=str(exc))
                await asyncio.sleep(1.0)

    async def _refresh_gauge(self) -> None:
        now = self.clock.monotonic()  # the injected clock: a simulated run refreshes at the same points each replay
        if self._gauge_at is not None and now - self._gauge_at < self.settings.gauge_refresh_interval:
            return
        self._gauge_at = now
        try:
            metrics.set_instance_counts(await self.astore.call(self.store.count_by_status))
            metrics.set_engine_gauges(await self.astore.call(self.store.ops_gauges, self.clock.now()))
        except Exception as exc:
            self.log.warning("engine.gauge_failed", error=str(exc))
