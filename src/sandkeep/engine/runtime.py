"""The engine process part: the alarm worker loop, wake-ups, the detector, and the instance service.

``Engine(settings, store, provider, clock, worker_id=...)``; ``await engine.start()`` runs

* the **worker loop**: every ``alarm_poll_interval`` (or at once when kicked) it claims due alarms
  (``store.claim_due`` with lease ``lease_ttl``) up to the free concurrency slots
  (``engine_concurrency``) and runs one reconcile pass per claimed instance under its lease;
* the **detector** (SPEC §6) that turns provider stop signals into ``wake(instance_id)``.

``reconcile_now(id)`` claims one instance (retrying briefly while another worker holds it) and runs a pass
right away; ``wake(id)`` does that in the background. Several engines (threads, processes, hosts) can share
one database: the lease makes them take turns per instance, and fencing stops a worker whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import secrets as _pysecrets
import socket
import time

from sandkeep import metrics
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.engine.detector import Detector
from sandkeep.engine.events import Emitter
from sandkeep.engine.executor import LeaseLost, Pass
from sandkeep.engine.health import GatewayProber, Prober
from sandkeep.engine.instances import InstanceService
from sandkeep.engine.lease import EngineContext, Lease, TraceFn, claim
from sandkeep.engine.orphans import OrphanSweeper
from sandkeep.logs import get_logger
from sandkeep.provider.base import MachineProvider
from sandkeep.secrets import SecretBox
from sandkeep.store.base import FencedError, NotFound, Store
from sandkeep.store.records import InstanceRecord

GAUGE_REFRESH_SECONDS = 5.0
MAX_CLAIM_BATCH = 500


class Engine:
    def __init__(self, settings: Settings, store: Store, provider: MachineProvider, clock: Clock, *,
                 worker_id: str | None = None, prober: Prober | None = None,
                 secret_box: SecretBox | None = None, trace: TraceFn | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.clock = clock
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{_pysecrets.token_hex(3)}"
        self._owns_prober = prober is None
        self.ctx = EngineContext(settings=settings, store=store, provider=provider, clock=clock,
                                 emitter=Emitter(store, clock), secrets=secret_box or SecretBox.from_settings(settings),
                                 prober=prober or GatewayProber(provider), rng=rng or random.Random(), trace=trace)
        self.log = get_logger("sandkeep.engine", worker_id=self.worker_id)
        self._seq = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._passes: set[asyncio.Task[object]] = set()
        self._wakes: dict[str, asyncio.Task[object]] = {}
        self._rewake: set[str] = set()
        self._kick = asyncio.Event()
        self._gauge_at = 0.0
        self.detector = Detector(settings, store, provider, self.wake)
        self.service = InstanceService(self.ctx, owner_prefix=self.worker_id, wake=self.wake)
        self.orphans = OrphanSweeper(self.ctx, self.worker_id)  # SPEC §15 inventory (engine/orphans.py)
        self.started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        metrics.RECOVERY_TIMEOUT.set(self.settings.recovery_timeout)
        self._tasks = [asyncio.create_task(self._worker_loop(), name=f"sandkeep-worker-{self.worker_id}"),
                       asyncio.create_task(self._detector_loop(), name=f"sandkeep-detector-{self.worker_id}"),
                       asyncio.create_task(self.orphans.run(), name=f"sandkeep-orphans-{self.worker_id}")]
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
        work = Pass(self.ctx, Lease(self.ctx, record, owner))
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
            self._release(work.record, owner)
            raise
        except Exception as exc:
            self.log.exception("reconcile.crashed", instance_id=record.id, error=str(exc))
        finally:
            metrics.ENGINE_PASSES_IN_FLIGHT.dec()
        self._release(work.record, owner)
        return current

    def _release(self, record: InstanceRecord, owner: str) -> None:
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
        """Reconcile ``instance_id`` soon, in the background (coalesces repeated wake-ups)."""
        running = self._wakes.get(instance_id)
        if running is not None and not running.done():
            self._rewake.add(instance_id)
            return

        async def go() -> None:
            try:
                while True:
                    self._rewake.discard(instance_id)
                    await self.reconcile_now(instance_id)
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
        claimed = self._claim_due(owner, free)
        if claimed:
            await asyncio.gather(*(self._run_claimed(r, owner) for r in claimed))
        return len(claimed)

    def _claim_due(self, owner: str, limit: int) -> list[InstanceRecord]:
        """Claim due alarms, counting the claims and how late each alarm was."""
        now = self.clock.now()
        claimed = self.store.claim_due(owner, self.settings.lease_ttl, now, limit)
        if claimed:
            metrics.ENGINE_CLAIMS.labels(source="alarm").inc(len(claimed))
            for record in claimed:
                if record.alarm_at is not None:
                    metrics.ALARM_LAG.observe(max(0.0, (now - record.alarm_at).total_seconds()))
        return claimed

    # ------------------------------------------------------------------ loops

    async def _worker_loop(self) -> None:
        while True:
            try:
                self._refresh_gauge()
                free = min(self.settings.engine_concurrency - len(self._passes), MAX_CLAIM_BATCH)
                if free > 0:
                    owner = self._owner()
                    claimed = self._claim_due(owner, free)
                    for record in claimed:
                        task: asyncio.Task[object] = asyncio.create_task(self._run_claimed(record, owner))
                        self._passes.add(task)
                        task.add_done_callback(self._passes.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("engine.worker_loop_error", error=str(exc))
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=max(0.01, self.settings.alarm_poll_interval))

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

    def _refresh_gauge(self) -> None:
        now = time.monotonic()
        if now - self._gauge_at < GAUGE_REFRESH_SECONDS:
            return
        self._gauge_at = now
        try:
            metrics.set_instance_counts(self.store.count_by_status())
            metrics.set_engine_gauges(self.store.ops_gauges(self.clock.now()))
        except Exception as exc:
            self.log.warning("engine.gauge_failed", error=str(exc))
